"""``python -m grounding_dino.label``: see :mod:`grounding_dino.label.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
