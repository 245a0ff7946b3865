"""Granularity sweep: levels x students on released (or generated) annotations.

    python sweeps/granularity.py [--config sweeps/granularity.yaml] [--set KEY=VALUE ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python sweeps/granularity.py

Without --config it runs sweeps/granularity.yaml. `--help` lists the options.
"""

import sys

if __name__ == "__main__":
    from raydistill.sweep import script_main

    sys.exit(script_main(__file__))
