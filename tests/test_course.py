"""regedu.course: headless execution, the static site (pages, index), a summary of time and memory."""
import json
import os
import re
import stat

import nbformat
import pytest

from regedu.course import find_notebooks, notebook_title, run_course

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def write_notebook(path, *sources, title=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    if title is not None:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(title))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


FIGURE = "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2], [2, 0, 1])\nplt.show()"
SLIDER = ("import ipywidgets as widgets\n"
          "widgets.IntSlider(value=7, min=0, max=10, description='amplitude')")


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebooks")
    write_notebook(folder / "01_good.ipynb",
                   "import os, numpy as np\nprint('profile is', os.environ['REGEDU_PROFILE'])",
                   "block = np.ones(300 * 2**20 // 8)  # 300 MB\nprint(block.sum())",
                   FIGURE, SLIDER,
                   title="<!-- generated -->\n# 01 · A *good* notebook\n\nSome prose.")
    write_notebook(folder / "02_broken.ipynb", "print('before')", "1 / 0", "print('never')")
    out = tmp_path_factory.mktemp("html")
    return folder, out, run_course(profile="cpu", out_dir=out, folder=folder, timeout=120,
                                   progress=False, scripts="cdn")


def _index_rows(out):
    """{notebook: (href, title, status, data-seconds, memory cell)} from index.html."""
    page = (out / "index.html").read_text()
    rows = re.findall(r'<tr class="(\w+)" id="([^"]+)"><td class="title"><a href="([^"]+)">(.*?)</a>'
                      r'.*?<td class="time" data-seconds="([^"]+)">(.*?)</td>', page)
    return {nb: (href, title, status, float(seconds), shown)
            for status, nb, href, title, seconds, shown in rows}


def test_every_notebook_gets_a_page_and_a_row(course):
    folder, out, summary = course
    assert [r["notebook"] for r in summary.rows] == ["01_good", "02_broken"]
    good = (out / "01_good.html").read_text()
    assert "profile is cpu" in good, "the kernel must see REGEDU_PROFILE and the page its output"
    assert (out / "index.html").is_file() and (out / "summary.md").is_file()
    data = json.loads((out / "summary.json").read_text())
    assert data["profile"] == "cpu" and len(data["rows"]) == 2 and data["date"] == summary.date
    assert [r["title"] for r in summary.rows] == ["01 · A good notebook", "02_broken"]


def test_index_lists_each_page_with_title_status_and_time(course):
    _, out, summary = course
    rows = _index_rows(out)
    assert list(rows) == ["01_good", "02_broken"]
    for r in summary.rows:
        href, title, status, seconds, shown = rows[r["notebook"]]
        assert (out / href).is_file() and href == f"{r['notebook']}.html"
        assert title == (r["title"] if r["notebook"] == "01_good" else r["notebook"])
        assert status == r["status"] and seconds == pytest.approx(r["seconds"], abs=1e-3)
        assert shown.endswith(" s"), f"time shown as {shown!r}"
    index = (out / "index.html").read_text()
    assert "<b class=\"profile\">cpu</b>" in index and summary.date[:10] in index
    assert "ZeroDivisionError" in index, "a failed notebook's error belongs in its row"
    good_mb = float(re.search(r'id="01_good">.*?data-mb="([^"]+)"', index).group(1))
    assert good_mb == pytest.approx(summary.rows[0]["peak_mb"], abs=0.1) and good_mb > 300


def test_pages_are_self_contained(course):
    _, out, _ = course
    page = (out / "01_good.html").read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), \
        f"figures must be inline data: URLs so the site works offline, got {[s[:40] for s in srcs]}"
    assert "<title>01 · A good notebook</title>" in page
    assert re.search(r'<body[^>]*>\s*<nav class="regedu-nav"[^>]*><a href="index.html">', page), \
        "each page starts with a link back to the index"


def test_widget_state_is_saved_in_the_page(course):
    _, out, _ = course
    page = (out / "01_good.html").read_text()
    state = re.search(rf'<script type="{re.escape(WIDGET_STATE)}">(.*?)</script>', page, re.S)
    assert state, "the page must carry the widgets' state (nbclient store_widget_state)"
    state = json.loads(state.group(1))
    assert state["version_major"] == 2
    sliders = [m for m in state["state"].values() if m["model_name"] == "IntSliderModel"]
    assert len(sliders) == 1 and sliders[0]["state"]["value"] == 7
    view = re.search(r'<script type="application/vnd.jupyter.widget-view\+json">(.*?)</script>',
                     page, re.S)
    assert view and json.loads(view.group(1))["model_id"] in state["state"], \
        "the displayed view must point at a saved model"
    assert WIDGET_STATE not in (out / "02_broken.html").read_text(), "no widgets, no state"


def test_site_files_are_whole_and_readable(course):
    _, out, _ = course
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left in the site: {leftovers}"
    umask = os.umask(0)
    os.umask(umask)
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, \
            f"{p.name}: a web server must be able to read the site's files"


def test_status_time_and_peak_memory(course):
    _, _, summary = course
    good, broken = summary.rows
    assert good["status"] == "ok" and good["error"] == ""
    assert good["seconds"] > 0
    assert 300 < good["peak_mb"] < 4000, f"the kernel held a 300 MB array: {good['peak_mb']:.0f} MB"
    assert broken["status"] == "error" and "ZeroDivisionError" in broken["error"]
    assert "\x1b" not in broken["error"], "no terminal colour codes in the summary"
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


def test_bad_out_dir_and_no_notebooks(tmp_path):
    nb = write_notebook(tmp_path / "01_a.ipynb", "1")
    (tmp_path / "site").write_text("a file, not a folder")
    with pytest.raises(NotADirectoryError, match="out_dir: expected a folder"):
        run_course(nb, out_dir=tmp_path / "site", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="notebooks: nothing to run"):
        run_course(folder=tmp_path / "empty", out_dir=tmp_path / "out", progress=False)


def test_a_notebook_that_cannot_be_read_gets_an_error_page(tmp_path):
    bad = tmp_path / "05_corrupt.ipynb"
    bad.write_text("{ not json")
    out = tmp_path / "site"
    out.mkdir()
    (out / "05_corrupt.html").write_text("a page from an earlier run")
    summary = run_course(bad, out_dir=out, progress=False, scripts="cdn")
    (row,) = summary.rows
    assert row["status"] == "error" and "worker failed" in row["error"]
    page = (out / "05_corrupt.html").read_text()
    assert "did not run" in page and "earlier run" not in page
    assert 'href="05_corrupt.html"' in (out / "index.html").read_text()


def _fake_scripts(folder, text):
    files = {}
    for rel in ("require.js", "html-manager/embed-amd.js", "html-manager/a1b2.woff2"):
        files[rel] = folder / rel.replace("/", "_")
        files[rel].write_text(f"/* {text} {rel} */")
    return files


def test_local_site_scripts_are_copied_beside_the_pages(tmp_path, monkeypatch):
    import regedu.course
    nb = write_notebook(tmp_path / "01_w.ipynb", SLIDER)
    out = tmp_path / "site"
    monkeypatch.setattr(regedu.course, "site_scripts", lambda download: _fake_scripts(tmp_path, "one"))
    summary = run_course(nb, out_dir=out, progress=False, scripts="local")
    assert summary.scripts == "local" and summary.ok
    page = (out / "01_w.html").read_text()
    assert '<script src="_static/require.js">' in page and "'_static/html-manager/embed-amd.js'" in page
    assert "unpkg.com" not in page and "regedu-widget-offline" not in page, \
        "with the scripts in the site, the page must not send the reader to unpkg.com"
    assert (out / "_static" / "html-manager" / "a1b2.woff2").read_text() == "/* one html-manager/a1b2.woff2 */"
    assert "_static/" in (out / "index.html").read_text()
    assert json.loads((out / "summary.json").read_text())["scripts"] == "local"
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(out / "_static").as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in (out / "_static").rglob("*")}
    assert modes == {"html-manager": 0o777 & ~umask, "require.js": 0o666 & ~umask,
                     "html-manager/embed-amd.js": 0o666 & ~umask, "html-manager/a1b2.woff2": 0o666 & ~umask}
    # A second run replaces the folder whole: no file of the first stays, no temporary is left.
    monkeypatch.setattr(regedu.course, "site_scripts",
                        lambda download: {k: v for k, v in _fake_scripts(tmp_path, "two").items()
                                          if k != "html-manager/a1b2.woff2"})
    run_course(nb, out_dir=out, progress=False, scripts="local")
    assert sorted(p.name for p in (out / "_static").rglob("*")) == ["embed-amd.js", "html-manager", "require.js"]
    assert (out / "_static" / "require.js").read_text() == "/* two require.js */"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_site_scripts_come_verified_or_not_at_all(tmp_path, monkeypatch, capfd):
    import importlib
    import urllib.error

    from regedu.course import site_scripts
    from regedu.datasets import ChecksumError, DataUnavailableError
    monkeypatch.setenv("REGEDU_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("REGEDU_MIRROR", raising=False)
    with pytest.raises(DataUnavailableError, match="not in the cache.*registry.npmjs.org"):
        site_scripts(download=False)
    # A copy that is not the pinned tarball is refused, and nothing enters the cache.
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("html-manager-1.0.15.tgz", "requirejs-2.3.8.tgz", "mathjax-3.2.2.tgz"):
        (mirror / name).write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(ChecksumError, match="html-manager-1.0.15.tgz.*expected 5142829 bytes"):
        site_scripts(download=False, mirror=mirror)
    assert not list((tmp_path / "cache").glob("html-manager*"))

    def offline(url, dest, **kw):
        raise urllib.error.URLError("no network")
    # The module (regedu.datasets.fetch, the attribute, is its function of the same name).
    monkeypatch.setattr(importlib.import_module("regedu.datasets.fetch"), "_download", offline)
    nb = write_notebook(tmp_path / "01_w.ipynb", SLIDER)
    with pytest.raises(DataUnavailableError, match="registry.npmjs.org.*no network"):
        run_course(nb, out_dir=tmp_path / "a", progress=False, scripts="local")
    # auto never downloads: without a cached copy the pages use unpkg.com, and the run says so.
    summary = run_course(nb, out_dir=tmp_path / "b", progress=False, scripts="auto")
    assert summary.scripts == "cdn" and "unpkg.com" in capfd.readouterr().err
    page = (tmp_path / "b" / "01_w.html").read_text()
    assert "unpkg.com" in page and "regedu-widget-offline" in page and not (tmp_path / "b" / "_static").exists()
    with pytest.raises(ValueError, match="scripts"):
        run_course(nb, out_dir=tmp_path / "c", progress=False, scripts="offline")


def test_notebook_title():
    def nb(*markdown):
        return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# not a heading")]
                                        + [nbformat.v4.new_markdown_cell(m) for m in markdown])
    assert notebook_title(nb("Intro text", "## The `warp` and [STN](x.md) ##")) == "The warp and STN"
    assert notebook_title(nb("```\n# in code\n```\nA **setext** title\n=====")) == "A setext title"
    assert notebook_title(nb("<!--\n# hidden\n-->\n# shown")) == "shown"
    assert notebook_title(nb("no heading"), default="01_x") == "01_x"
    assert notebook_title(nb("# snake_case and __init__ &amp; more")) == "snake_case and __init__ & more"
    with pytest.raises(FileNotFoundError, match="notebook: no notebook file"):
        notebook_title("/nonexistent/01.ipynb")


def test_cli_course_command(tmp_path, capsys):
    from regedu.cli import main
    assert main(["course", "--help"]) == 0
    assert "usage: regedu course" in capsys.readouterr().out
    nb = write_notebook(tmp_path / "03_tiny.ipynb", "print(6 * 7)")
    assert main(["course", str(nb), "--profile", "ci", "--out", str(tmp_path / "html"),
                 "--scripts", "cdn"]) == 0
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
