"""TailorPO against its controls with confidence intervals (experiments/claims/controls.py says what and why).

    # docs/results.md "Controls": colorfulness on launch/shapes.yaml, 5 seeds of every variant (CPU, ~2 h on
    # 2 cores: run two invocations with disjoint --seeds or --variants at OMP_NUM_THREADS=1, then one more)
    python experiments/controls.py --config launch/shapes.yaml --set reward.name=colorfulness \\
        --out outputs/controls_colorfulness
    # an ablation beside them: NAME=key=value;key=value
    python experiments/controls.py ... --variants tailorpo random_labels \\
        --variant "gap=algorithm.name=tailorpo;algorithm.branching.min_reward_gap=2.0"

Writes OUT/controls.csv, OUT/controls.md and OUT/controls_training_reward.png (the training reward
during each run, binned, mean +- std across seeds); runs go to OUT/runs/VARIANT/seedS and per-model scores to
OUT/scores, both reused when their config matches.
"""

import sys

from claims.controls import main

if __name__ == "__main__":
    sys.exit(main())
