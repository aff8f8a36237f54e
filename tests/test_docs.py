"""Every reference to a document resolves to a file (and a section) in the repository."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".ipynb", ".txt", ".toml", ".yml", ".sh", ".cfg")


def _files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / p for p in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        paths = [p for p in ROOT.rglob("*") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return [p for p in paths if p.is_file() and (p.suffix in TEXT or p.name in ("Makefile", "postBuild"))]


FILES = _files()


def _slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path: Path) -> dict[str, str]:
    return {_slug(m.group(1)): m.group(1).strip()
            for m in re.finditer(r"^#{1,6}\s+(.+)$", path.read_text(), re.M)}


def test_no_reference_to_files_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in FILES
                 if p.name != "test_docs.py" and "DESIGN.md" in p.read_text(errors="ignore")]
    assert not offenders, f"these cite DESIGN.md, which is not in the repository: {offenders}"


def test_docs_references_name_existing_files_and_sections():
    checked = 0
    pattern = re.compile(r'docs/([\w-]+\.md)(?:#([\w-]+)|,? \(?\\?"([^"\\]+)\\?"\)?)?')
    for path in FILES:
        for m in pattern.finditer(path.read_text(errors="ignore")):
            target = ROOT / "docs" / m.group(1)
            where = f"{path.relative_to(ROOT)}: {m.group(0)}"
            assert target.is_file(), f"{where}: no such file"
            anchor = m.group(2) or (m.group(3) and _slug(m.group(3)))
            if anchor:
                assert anchor in _headings(target), f"{where}: {target.name} has no section {anchor!r}"
            checked += 1
    assert checked >= 10, f"expected the library and notebooks to cite docs/conventions.md, found {checked}"


def test_markdown_links_resolve():
    for path in [p for p in FILES if p.suffix == ".md"]:
        for m in re.finditer(r"\]\(([^)\s]+)\)", path.read_text()):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):
                continue  # a web address
            file_part, _, anchor = link.partition("#")
            target = (path.parent / file_part) if file_part else path
            assert target.exists(), f"{path.relative_to(ROOT)}: link {link} points nowhere"
            if anchor and target.suffix == ".md":
                assert anchor in _headings(target), f"{path.relative_to(ROOT)}: {target.name} has no #{anchor}"


def test_every_cited_seed_is_described():
    described = set(re.findall(r"^\| seed (\d{3}) \|", (ROOT / "docs" / "references.md").read_text(), re.M))
    assert described == {"000", "001", "002", "004"}
    for path in FILES:
        for number in re.findall(r"\bseed (\d{3})\b", path.read_text(errors="ignore")):
            assert number in described, f"{path.relative_to(ROOT)} cites seed {number}, which docs/references.md does not describe"


def _table(text: str, after: str) -> list[str]:
    """The first markdown table after the line ``after``."""
    lines = text[text.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def test_readme_conventions_table_is_the_documents():
    readme = _table((ROOT / "README.md").read_text(), "## Conventions")
    docs = _table((ROOT / "docs" / "conventions.md").read_text(), "## Conventions")
    assert readme == docs, "README's conventions table must be docs/conventions.md's (copy it across)"
    assert "docs/conventions.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("heading", ["Conventions", "The 30 evaluation structures", "VV-Net, from the paper"])
def test_conventions_sections_exist(heading):
    assert _slug(heading) in _headings(ROOT / "docs" / "conventions.md")
