"""Entry point for ``python -m histstat``."""

import sys

from histstat.runner import main

if __name__ == "__main__":
    sys.exit(main())
