"""Teacher sweep: released teachers, human rationales and answer-only (or generating teachers) x students.

    python sweeps/teacher.py [--config sweeps/teacher.yaml] [--set KEY=VALUE ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python sweeps/teacher.py

Without --config it runs sweeps/teacher.yaml. `--help` lists the options.
"""

import sys

if __name__ == "__main__":
    from raydistill.sweep import script_main

    sys.exit(script_main(__file__))
