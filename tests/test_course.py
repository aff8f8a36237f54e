"""regedu.course: headless execution, HTML pages, a summary of time and peak memory."""
import json

import nbformat
import pytest

from regedu.course import find_notebooks, run_course


def write_notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebooks")
    write_notebook(folder / "01_good.ipynb",
                   "import os, numpy as np\nprint('profile is', os.environ['REGEDU_PROFILE'])",
                   "block = np.ones(300 * 2**20 // 8)  # 300 MB\nprint(block.sum())")
    write_notebook(folder / "02_broken.ipynb", "print('before')", "1 / 0", "print('never')")
    out = tmp_path_factory.mktemp("html")
    return folder, out, run_course(profile="cpu", out_dir=out, folder=folder, timeout=120,
                                   progress=False)


def test_every_notebook_gets_a_page_and_a_row(course):
    folder, out, summary = course
    assert [r["notebook"] for r in summary.rows] == ["01_good", "02_broken"]
    good = (out / "01_good.html").read_text()
    assert "profile is cpu" in good, "the kernel must see REGEDU_PROFILE and the page its output"
    assert (out / "index.html").is_file() and (out / "summary.md").is_file()
    data = json.loads((out / "summary.json").read_text())
    assert data["profile"] == "cpu" and len(data["rows"]) == 2


def test_status_time_and_peak_memory(course):
    _, _, summary = course
    good, broken = summary.rows
    assert good["status"] == "ok" and good["error"] == ""
    assert good["seconds"] > 0
    assert 300 < good["peak_mb"] < 4000, f"the kernel held a 300 MB array: {good['peak_mb']:.0f} MB"
    assert broken["status"] == "error" and "ZeroDivisionError" in broken["error"]
    assert not summary.ok


def test_markdown_table(course):
    _, _, summary = course
    md = summary.to_markdown()
    assert md.splitlines()[0] == "| notebook | status | time (cpu) | peak memory (cpu) |"
    assert "| 01_good | ok |" in md and "ZeroDivisionError" in md


def test_find_notebooks(tmp_path):
    for name in ("00_a.ipynb", "10_b.ipynb", "_draft.ipynb"):
        write_notebook(tmp_path / name, "1")
    assert [p.name for p in find_notebooks(folder=tmp_path)] == ["00_a.ipynb", "10_b.ipynb"]
    assert find_notebooks(10, folder=tmp_path)[0].name == "10_b.ipynb"
    assert find_notebooks([tmp_path / "_draft.ipynb"])[0].name == "_draft.ipynb"
    with pytest.raises(ValueError, match="matches 0 notebooks"):
        find_notebooks("42", folder=tmp_path)


def test_bad_profile():
    with pytest.raises(ValueError, match="profile"):
        run_course(profile="laptop")


def test_cli_course_command(tmp_path, capsys):
    from regedu.cli import main
    assert main(["course", "--help"]) == 0
    assert "usage: regedu course" in capsys.readouterr().out
    nb = write_notebook(tmp_path / "03_tiny.ipynb", "print(6 * 7)")
    assert main(["course", str(nb), "--profile", "ci", "--out", str(tmp_path / "html")]) == 0
    out = capsys.readouterr().out
    assert "| 03_tiny | ok |" in out and (tmp_path / "html" / "03_tiny.html").is_file()


def test_get_msg_polls_in_slices_until_the_reply_or_the_deadline():
    import asyncio
    import time
    from queue import Empty

    from regedu.course import _get_msg_in_slices

    class Channel:
        # A reply that a long wait would miss: only a fresh poll after 0.25 s sees it.
        def __init__(self):
            self.start, self.waits = time.monotonic(), []

        async def get_msg(self, timeout=None):
            self.waits.append(timeout)
            await asyncio.sleep(min(timeout, 0.05))
            if time.monotonic() - self.start > 0.25:
                return {"msg": "reply"}
            raise Empty

    channel = Channel()
    _get_msg_in_slices(channel, slice_s=0.05)
    assert asyncio.run(channel.get_msg(timeout=None)) == {"msg": "reply"}
    assert max(channel.waits) <= 0.05 and len(channel.waits) > 3
    late = Channel()
    late.start += 10                                  # the reply never comes: Empty at the deadline
    _get_msg_in_slices(late, slice_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(late.get_msg(timeout=0.2))
    assert 0.15 < time.monotonic() - t0 < 1.0
