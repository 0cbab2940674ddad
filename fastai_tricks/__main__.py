"""``python -m fastai_tricks``: the same command line as ``fastai-tricks``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
