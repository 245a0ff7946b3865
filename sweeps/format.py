"""Format sweep: CoT, Branch-Solve-Merge, Rephrase-and-Respond, symbolic (and Least-to-Most from a generating teacher) at a fixed level.

    python sweeps/format.py [--config sweeps/format.yaml] [--set KEY=VALUE ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python sweeps/format.py

Without --config it runs sweeps/format.yaml. `--help` lists the options.
"""

import sys

if __name__ == "__main__":
    from raydistill.sweep import script_main

    sys.exit(script_main(__file__))
