"""`python -m raydistill`: the same command line as `raydistill`."""

import sys

from raydistill.cli import main

sys.exit(main())
