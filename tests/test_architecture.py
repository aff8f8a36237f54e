"""docs/architecture.md's layers hold: every import inside regedu goes to a lower floor."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "regedu"


def _floors() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    floors = {}
    for floor, modules in re.findall(r"^\| (\d) \| (.+?) \|$", text, re.M):
        for name in re.findall(r"`(\w+)`", modules):
            floors[name] = int(floor)
    return floors


def _unit(path: Path) -> str:
    # A module of the package, or the subpackage a file belongs to (datasets, nets, viz).
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path):
    """(line, unit) of every relative import in a file, lazy ones included."""
    package = path.parent.relative_to(PACKAGE).parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[:len(package) - node.level + 1])
            parts = base + (node.module.split(".") if node.module else [])
            names = parts[:1] or [a.name for a in node.names]
            for name in names:
                yield node.lineno, name


def test_every_import_goes_down_a_floor():
    floors = _floors()
    files = [p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert {_unit(p) for p in files} <= set(floors), "a module the architecture page does not place"
    upward = [f"{p.relative_to(ROOT)}:{line} imports {target} (floor {floors[target]}) from floor "
              f"{floors[_unit(p)]}"
              for p in files for line, target in _imports(p)
              if target in floors and target != _unit(p) and floors[target] >= floors[_unit(p)]]
    assert not upward, upward
