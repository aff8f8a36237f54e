"""The course as a static site, in a real browser: headless chromium opens index.html from disk.

Builds a two-notebook site with ``run_course`` (a title, printed text, a
matplotlib figure, a markdown image from a file beside the notebook, an
ipywidgets slider; then a notebook that fails), opens ``index.html`` through
``file://``, follows every link of its table and checks that each page loads
without a script error, shows the title the index gave it, has every ``<img>``
decoded (``naturalWidth > 0``), carries the widget state, and links back to
the index. Requests to the network are refused: the site must stand on its
own. Built with ``scripts="cdn"``, the widget manager nbconvert's template
loads from unpkg.com cannot come, so that site's test checks the widgets'
saved state and the note that says why they are not drawn; a second site,
built with the scripts in its ``_static/`` (regedu.course.site_scripts, when
cached), must draw its slider and typeset its formula with no network.

Needs Debian's chromium, like tests/test_browser.py (whose skip rule and
browser flags it shares); skipped with a message when it is missing.
Screenshots go to $REGEDU_ARTIFACTS/site (default: pytest's tmp folder).
"""
import json
import re
import time
from pathlib import Path

import nbformat
import pytest
import test_browser
from test_browser import CHROMIUM, CHROMIUM_ARGS, STEP_MS

from regedu.course import run_course

# The same rule as the JupyterLab test: without Debian's chromium, skip and say how to get it.
pytestmark = test_browser.pytestmark
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebooks")
    from PIL import Image
    # A file beside the notebook: the page must inline it (nbconvert's embed_images).
    Image.new("RGB", (8, 6), (200, 40, 40)).save(folder / "dot.png")
    _notebook(folder / "01_figures.ipynb", [
        ("md", "# 01 · Figures and widgets\n\nA picture from a file: ![dot](dot.png)"),
        ("code", "print('hello from the kernel')"),
        ("code", "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2], [2, 0, 1])\nplt.show()"),
        ("code", "import ipywidgets as widgets\nwidgets.IntSlider(value=3, max=9, description='steps')"),
    ])
    _notebook(folder / "02_fails.ipynb", [("md", "# 02 · A notebook that fails"), ("code", "1 / 0")])
    out = tmp_path_factory.mktemp("site")
    summary = run_course(folder=folder, profile="ci", out_dir=out, timeout=120, progress=False,
                         scripts="cdn")
    return out, summary


@pytest.fixture
def artifacts(tmp_path):
    return test_browser.artifacts_folder(tmp_path, "site")


def test_site_in_chromium(site, artifacts):
    from playwright.sync_api import sync_playwright
    out, summary = site
    t0 = time.monotonic()
    errors, failed, refused = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     headless=True, timeout=STEP_MS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(STEP_MS)
            page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
            page.on("requestfailed", lambda r: r.url.startswith("file:")
                    and failed.append(f"{r.url}: {r.failure}"))
            outputs = page.locator(".jp-OutputArea-output")

            def refuse(route):
                refused.append(route.request.url)
                route.abort()
            page.route(re.compile(r"^(https?|wss?)://"), refuse)

            index = (out / "index.html").resolve().as_uri()
            page.goto(index, wait_until="load")
            page.screenshot(path=str(artifacts / "index.png"), full_page=True)
            links = page.eval_on_selector_all(
                "table a[href]", "els => els.map(a => [a.href, a.textContent])")
            assert [title for _, title in links] == [r["title"] for r in summary.rows], \
                "the index must link every notebook under its title"
            for url, title in links:
                page.goto(url, wait_until="load")
                name = Path(url).stem
                assert page.title() == title, \
                    f"{name}: page title {page.title()!r}, the index says {title!r}"
                page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
                widths = page.eval_on_selector_all("img", "els => els.map(i => i.naturalWidth)")
                page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
                assert all(w > 0 for w in widths), f"{name}: an image did not decode: {widths}"
                if name == "01_figures":
                    assert len(widths) == 2, f"{name}: expected the markdown image and the figure"
                    assert outputs.filter(has_text="hello from the kernel").count() == 1, \
                        f"{name}: the printed output is missing"
                    state = page.evaluate(
                        f"() => JSON.parse(document.querySelector('script[type=\"{WIDGET_STATE}\"]')"
                        ".textContent)")
                    values = [m["state"].get("value") for m in state["state"].values()
                              if m["model_name"] == "IntSliderModel"]
                    assert values == [3], f"{name}: the slider's saved state is {values}"
                    # Offline, the widget's output says why it is blank instead of staying blank.
                    page.locator("div.jupyter-widgets .regedu-widget-offline").wait_for()
                else:
                    assert outputs.filter(has_text="ZeroDivisionError").count() > 0, \
                        f"{name}: the page of a failed notebook must show the error"
                # Back to the table of contents the way a reader would.
                page.click("nav.regedu-nav a")
                page.wait_for_url(index)
        finally:
            browser.close()
    (artifacts / "result.json").write_text(json.dumps(
        {"seconds": round(time.monotonic() - t0, 1), "refused": refused}, indent=1))
    assert not errors, f"script errors: {errors}"
    assert not failed, f"files the pages point at did not load: {failed}"


def test_check_site_reports_what_a_page_could_not_draw(site):
    """tools/check_site.py, on the site whose widget scripts are on unpkg.com: the refused requests and
    the offline note are reported, and the page fails."""
    out, _ = site
    rows = {r["page"]: r for r in test_browser.check_site.check_site(out, settle_ms=500)}
    assert list(rows) == ["01_figures.html", "02_fails.html"]
    figures = rows["01_figures.html"]
    assert figures["images"] == 2 and figures["broken_images"] == 0 and figures["widgets"] == 1
    found = " ".join(test_browser.check_site.problems(figures))
    assert "offline_notes: 1" in found and "unpkg.com" in found, found


def test_widgets_are_drawn_offline_with_the_sites_own_scripts(tmp_path):
    """With regedu.course.site_scripts in the site (make unit fetches them), tools/check_site.py sees a
    slider drawn from its saved state and the formulas typeset while every request to the network is
    refused."""
    from regedu.course import site_scripts
    from regedu.datasets import DataUnavailableError
    try:
        site_scripts(download=False)
    except DataUnavailableError as err:
        pytest.skip(f"{err} ('make unit' fetches them when registry.npmjs.org can be reached)")
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_slider.ipynb", [
        ("md", "# 01 · A slider\n\nA warp $\\varphi(x) = x + u(x)$ and $$\\det J_\\varphi > 0.$$"),
        ("code", "import ipywidgets as widgets\nwidgets.IntSlider(value=3, max=9, description='steps')")])
    out = tmp_path / "site"
    summary = run_course(folder=folder, profile="ci", out_dir=out, timeout=120, progress=False,
                         scripts="auto")
    assert summary.ok and summary.scripts == "local"
    (row,) = test_browser.check_site.check_site(out)
    assert row["sliders"] == 1 and row["slider_values"] == ["3"], \
        f"the slider must be drawn with the value it had when the notebook finished: {row}"
    assert row["formulas"] == 2, f"an inline and a display formula, typeset: {row}"
    assert not test_browser.check_site.problems(row), row
