"""Tiny helpers to write notebooks from Python source (stored without outputs)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
NOTEBOOKS = HERE.parent


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))


def write(name: str, cells) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    # Stable cell ids keep diffs small when a notebook is regenerated.
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem[:2]}-{i:03d}"
    nbformat.validate(nb)
    path = NOTEBOOKS / name
    nbformat.write(nb, path)
    return path


PROFILE_CELL = '''
# The profile sets every size and step count in this notebook.
# To override it, set REGEDU_PROFILE=ci|cpu|gpu before starting Jupyter, or run
# regedu.profiles.set_profile("ci") here and re-run the notebook from the top.
import regedu
from regedu.profiles import get_profile

profile = get_profile()
print(f"profile: {profile.name}  device: {profile.device}  fundus size: {profile.fundus_size} px")
'''
