"""`python -m raydistill.datasets ...`: the same as `raydistill data ...`."""

import sys

from raydistill.datasets.cli import main

sys.exit(main(sys.argv[1:]))
