"""``python -m regedu``: the same as the ``regedu`` command."""
import sys

from .cli import main

# Guarded so that importing this module (pytest --doctest-modules does) runs nothing.
if __name__ == "__main__":
    sys.exit(main())
