"""Granularity sweep: levels x students on released (or generated) annotations.

    python sweeps/granularity.py [--config sweeps/granularity.yaml] [--set KEY=VALUE ...]
    ray job submit --working-dir . -- python sweeps/granularity.py

Without --config it runs sweeps/granularity.yaml, the embedded default. `--help` lists options.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's raydistill, also inside `ray job submit`

if __name__ == "__main__":
    from raydistill.sweep import main

    sys.exit(main(sys.argv[1:], prog="granularity.py", default_config=str(HERE / "granularity.yaml")))
