"""``python -m rkekernels.cli``: the command line, as ``python -m rkekernels``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
