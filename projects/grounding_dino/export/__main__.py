"""``python -m grounding_dino.export``: see :mod:`grounding_dino.export.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
