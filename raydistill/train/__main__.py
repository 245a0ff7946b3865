"""`python -m raydistill.train`: the same as `raydistill train`."""

import sys

from raydistill.train.cli import main

raise SystemExit(main(sys.argv[1:]))
