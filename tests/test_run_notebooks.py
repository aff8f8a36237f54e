"""tools/run_notebooks.py: every notebook runs, in groups that share the work."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


def test_every_notebook_is_in_exactly_one_group(tmp_path):
    for name in ["00_a.ipynb", "01_b.ipynb", "02_c.ipynb", "solutions/12_s.ipynb", ".ipynb_checkpoints/00_a-checkpoint.ipynb"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    found = run_notebooks.notebooks(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["00_a.ipynb", "01_b.ipynb", "02_c.ipynb", "solutions/12_s.ipynb"]
    parts = run_notebooks.groups(found, 2)
    assert [[p.name for p in g] for g in parts] == [["00_a.ipynb", "02_c.ipynb"], ["01_b.ipynb", "12_s.ipynb"]]
    assert run_notebooks.groups(found, 8) == [[p] for p in found]  # never an empty group


def test_the_course_notebooks_are_all_collected():
    found = run_notebooks.notebooks(ROOT / "notebooks")
    assert {p.name for p in found} >= {p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert any(p.parent.name == "solutions" for p in found)


def test_a_group_count_below_one_is_refused():
    with pytest.raises(ValueError, match="jobs: expected at least 1, got 0"):
        run_notebooks.groups([Path("a.ipynb")], 0)


def test_an_empty_folder_is_an_error_not_a_pass(tmp_path, capsys):
    assert run_notebooks.main([str(tmp_path)]) == 2
    assert "no notebooks under" in capsys.readouterr().err


def _notebook(path, source):
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_one_failing_notebook_fails_the_run_and_each_kernel_has_one_thread(tmp_path, capsys):
    _notebook(tmp_path / "00_ok.ipynb", "import os\nassert os.environ['OMP_NUM_THREADS'] == '1'")
    _notebook(tmp_path / "01_fails.ipynb", "raise RuntimeError('this notebook fails')")
    assert run_notebooks.main([str(tmp_path), "--jobs", "2"]) != 0
    out = capsys.readouterr().out
    assert "00_ok.ipynb (exit 0)" in out and "01_fails.ipynb (exit 1)" in out and "this notebook fails" in out
    (tmp_path / "01_fails.ipynb").unlink()
    assert run_notebooks.main([str(tmp_path), "--jobs", "2"]) == 0
