"""``python -m ibkd ...`` (and ``torchrun -m ibkd ...``): the ``ibkd`` command of :mod:`ibkd.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
