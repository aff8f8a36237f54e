"""Regenerate every notebook from its source here (stored without outputs).

Run from anywhere: ``python notebooks/_build/build_all.py``. Edit ``nbXX.py``,
not the ``.ipynb`` files; each ``nbXX.py`` also runs on its own.
"""
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    for source in sorted(HERE.glob("nb[0-9][0-9].py")):
        runpy.run_path(str(source), run_name="__main__")
