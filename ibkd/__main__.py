"""``python -m ibkd ...`` (and ``torchrun -m ibkd ...``): the command line of :mod:`ibkd.distill.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
