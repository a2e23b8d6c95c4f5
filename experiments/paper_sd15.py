"""The TailorPO paper's Table 3 (with Fig. 4, Fig. 2 and Table 1 per reward) with SD v1.5 and the real reward
models, on one CUDA machine, in one process per reward. Not run in CI: its tests only load the configs.

    python experiments/paper_sd15.py --out outputs/paper_sd15                 # one seed, every reward
    python experiments/paper_sd15.py --rewards aesthetic jpeg --seeds 0 1 2   # Fig. 4's three seeds
    python experiments/paper_sd15.py --steps paper                            # the paper's preset only

For each reward of Table 3 (aesthetic, ImageReward, HPSv2, PickScore, JPEG compressibility): start
``tailorpo serve-reward NAME --device cuda`` (the owner class a Ray job's ``reward.launch`` uses; JPEG runs in
process), train DDPO, D3PO, TailorPO and, for differentiable rewards, TailorPO-G on the simple-animal prompts
(``launch/paper_sd15.yaml``: the paper's setup, 10,000 samples, batch 2) with ``paper_claims all``, evaluate
every LoRA on the 500 held-out prompts with 5 images each, and stop the server. Then ``paper_claims merge``
writes OUT/table3_generalization.md (a column per reward) and OUT/fig4_reward_curves.png (a panel per reward).
All of this runs for each set of steps (``--steps``), into OUT/paper and OUT/default: the paper's preset
(fine-tuned steps 20,16,12,8,4, the LoRA at all 20: launch/paper_sd15.yaml as written) and the framework's
default (those plus 3,2,1, the LoRA only there; docs/results.md "Which steps" says why), so the two compare
on SD v1.5 as they do on the tiny-shapes model.

Held-out prompts: the 500 captions of Pick-a-Pic v2's ``test_unique`` split, read with ``datasets`` from
``yuvalkirstain/pickapic_v2_no_images`` (the same rows without image bytes, ~0.3 MB) into
OUT/pickapic_v2_test_unique.txt; ``--prompts FILE`` uses a local list instead (offline). The paper says "500
complex prompts (Kirstain et al., 2023)" without naming the split; test_unique is our reading.

Cost: README's estimate (A100, bf16) is 0.73 samples/s, so a 10,000-sample run takes about 3.8 h: one seed
of all 19 runs (4 learned rewards x 4 methods + JPEG x 3) is ~72 GPU hours per set of steps (the default's 8
branch steps cost ~1.2x the paper's 5 on the tiny-shapes model), plus the held-out evals (2,500 images per
model). ``--samples`` and ``--rewards`` shrink it; runs already finished are reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tailorpo.config import DEFAULT_STEPS

HERE = Path(__file__).resolve().parent
CONFIG = str(HERE.parent / "launch" / "paper_sd15.yaml")
TABLE3_REWARDS = ("aesthetic", "imagereward", "hpsv2", "pickscore", "jpeg")  # the paper's column order
STEP_PRESETS = {  # --steps: the config's overrides for each
    "paper": [],  # launch/paper_sd15.yaml is the paper's preset
    "default": [f"algorithm.fine_tuned_steps={list(DEFAULT_STEPS)}", "lora.active_steps=trained"],
}
PICKAPIC = ("yuvalkirstain/pickapic_v2_no_images", "test_unique")


def reward_overrides(reward: str, address: str | None) -> list[str]:
    """The config changes for one reward: JPEG in process, the others through the server at ``address``."""
    if reward == "jpeg":
        return ["reward.name=jpeg", "reward.servers=[]"]
    return [f"reward.servers=[{{addresses: ['{address}']}}]"]


def pickapic_prompts(path: Path) -> Path:
    """Write the held-out captions once (one per line, order kept, duplicates and inner newlines removed)."""
    if not path.exists():
        import datasets

        captions = datasets.load_dataset(PICKAPIC[0], split=PICKAPIC[1])["caption"]
        unique = dict.fromkeys(" ".join(c.split()) for c in captions if c and c.strip())
        path.write_text("\n".join(unique) + "\n", encoding="utf-8")
        print(f"wrote {len(unique)} held-out prompts from {PICKAPIC[0]} ({PICKAPIC[1]}) to {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/paper_sd15")
    parser.add_argument("--rewards", nargs="+", choices=TABLE3_REWARDS, default=list(TABLE3_REWARDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samples", type=int, default=10_000, help="training samples per run (paper: 10,000)")
    parser.add_argument("--prompts", help="held-out prompt file (default: Pick-a-Pic v2 test_unique captions)")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--steps", nargs="+", choices=list(STEP_PRESETS), default=list(STEP_PRESETS),
                        help="the paper's preset, the framework's default steps, or both (default)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("error: experiments/paper_sd15.py needs a CUDA GPU (SD v1.5 at 512 px, ~3.8 h per 10,000-sample run "
              "on an A100); for a CPU run use experiments/paper_claims.py with launch/tiny.yaml", file=sys.stderr)
        return 2
    from claims.cli import main as paper_claims  # experiments/claims, beside this script

    from tailorpo.runtime.reward_actors import RewardServerOwner

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = Path(args.prompts) if args.prompts else pickapic_prompts(out / "pickapic_v2_test_unique.txt")
    common = ["--config", args.config, "--seeds", *map(str, args.seeds), "--samples", str(args.samples),
              "--held-out", str(prompts)]
    for reward in args.rewards:
        server = None if reward == "jpeg" else RewardServerOwner({"name": reward, "device": "cuda"})
        try:
            if server is not None and not server.serving(timeout_s=60):
                print(f"error: the {reward} reward server at {server.address()} is not serving", file=sys.stderr)
                return 1
            for steps in args.steps:
                overrides = reward_overrides(reward, server and server.address()) + STEP_PRESETS[steps]
                paper_claims(["all", *common, "--out", str(out / steps / reward), *[f"--set={o}" for o in overrides]])
        finally:
            if server is not None:
                server.stop()
    for steps in args.steps:
        paper_claims(["merge", "--out", str(out / steps), "--from", *[str(out / steps / r) for r in args.rewards]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
