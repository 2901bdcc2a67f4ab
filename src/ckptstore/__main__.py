"""``python -m ckptstore``: the ``ckptstore`` command (see ``ckptstore --help``)."""

import sys

from ckptstore.cli import main

if __name__ == "__main__":
    sys.exit(main())
