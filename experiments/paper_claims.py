"""The paper's Fig. 2, Table 1, Fig. 4 and Table 3 from this framework's runs (the code: ``experiments/claims/``).

    python experiments/paper_claims.py all --config launch/tiny.yaml --seeds 0 1 2 --samples 32 --out outputs/claims
    python experiments/paper_claims.py curves --config launch/shapes.yaml --samples 256
    python experiments/paper_claims.py merge --out outputs/sd15 --from outputs/sd15/aesthetic outputs/sd15/jpeg
"""

import sys

from claims.cli import main

if __name__ == "__main__":
    sys.exit(main())
