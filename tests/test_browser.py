"""The 3D viewer in a real browser: JupyterLab on the loopback address, driven by chromium.

Opens tests/browser/viewer.ipynb (copied to a temporary folder), runs all
cells, checks that the 3D viewer's three sliders, three layer menus and nine
panels render, moves a slider with the keyboard and checks that the panels
change, switches a row to the Jacobian, then raises the 2D playground's
amplitude and checks that its warped image changes. Screenshots go to
$REGEDU_ARTIFACTS/browser (default: pytest's tmp folder). Hard time limits
throughout; JupyterLab and its kernel are stopped even when the test fails.

Needs Debian's chromium (``apt-get install -y chromium``); skipped with a
message when /usr/bin/chromium is missing.
"""
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(__file__).with_name("browser") / "viewer.ipynb"
# tools/check_site.py (the static site in the same browser) knows where Debian's chromium is and how to start it.
_spec = importlib.util.spec_from_file_location("check_site", REPO / "tools" / "check_site.py")
check_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_site)
CHROMIUM, CHROMIUM_ARGS = check_site.CHROMIUM, check_site.CHROMIUM_ARGS
SERVER_START_S = 30
STEP_MS = 30_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="browser test needs Debian's chromium at /usr/bin/chromium: "
           "apt-get update && apt-get install -y chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def artifacts_folder(tmp_path, name: str) -> Path:
    """Where a browser test leaves its screenshots: $REGEDU_ARTIFACTS/name, else pytest's tmp folder."""
    root = Path(os.environ["REGEDU_ARTIFACTS"]) if os.environ.get("REGEDU_ARTIFACTS") else tmp_path
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def artifacts(tmp_path):
    return artifacts_folder(tmp_path, "browser")


@pytest.fixture
def lab(tmp_path, artifacts):
    """A JupyterLab server on 127.0.0.1 serving a copy of the viewer notebook: (url, start time)."""
    t0 = time.monotonic()
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No news or update pop-ups over the notebook (and no network from the page).
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               REGEDU_PROFILE="ci")
    log = open(artifacts / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0", "--allow-root",
         "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start within {SERVER_START_S} s "
                                f"(exit code {proc.poll()}); see {artifacts / 'jupyterlab.log'}")
                time.sleep(0.3)
        yield f"{url}/lab/tree/{NOTEBOOK.name}?token={token}", t0
    finally:
        # The server runs in its own session with its kernel: stop the whole group we started.
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _pixels(png: bytes) -> np.ndarray:
    from io import BytesIO

    from PIL import Image
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=np.int16)


def _wait_new_src(page, img, old_src):
    """Wait until the image element shows new bytes (and give the bitmap time to paint)."""
    page.wait_for_function("([img, old]) => img.src !== old && img.complete",
                           arg=[img.element_handle(), old_src])
    page.wait_for_timeout(300)


def test_viewers_in_jupyterlab(lab, artifacts):
    from playwright.sync_api import sync_playwright
    url, t0 = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     headless=True, timeout=STEP_MS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.set_default_timeout(STEP_MS)
            page.goto(url)
            # Wait for the notebook's kernel, then run every cell through JupyterLab's own command.
            page.wait_for_function(
                "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                " const k = w && w.sessionContext && w.sessionContext.session"
                " && w.sessionContext.session.kernel; return k && k.status === 'idle'; }")
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

            cells = page.locator(".jp-Notebook .jp-CodeCell")
            viewer, playground = cells.nth(0), cells.nth(2)
            images = viewer.locator(".jp-OutputArea img.widget-image")
            sliders = viewer.locator(".jp-OutputArea .widget-slider")
            page.wait_for_function("() => document.querySelectorAll("
                                   "'.jp-OutputArea img.widget-image').length === 12")
            page.get_by_text("viewer index [").wait_for()
            assert images.count() == 9, "expected 3 rows x 3 views in the 3D viewer"
            assert sliders.count() == 3, "expected one slider per axis"
            menus = viewer.locator(".jp-OutputArea select")
            assert menus.count() == 3, "expected a layer menu per row"
            first = images.nth(0)
            first.scroll_into_view_if_needed()
            page.wait_for_function("(img) => img.complete && img.naturalWidth > 0",
                                   arg=first.element_handle())
            widget = viewer.locator(".jp-OutputArea-output:has(img.widget-image)")
            page.screenshot(path=str(artifacts / "page.png"))
            widget.screenshot(path=str(artifacts / "viewer_before.png"))
            before = first.screenshot(path=str(artifacts / "panel_before.png"))
            src_before = first.get_attribute("src")
            assert _pixels(before).std() > 10, "the first panel rendered blank"
            readout = sliders.nth(0).locator(".widget-readout")
            start = int(readout.inner_text())

            # Move the axis-0 slider five steps with the keyboard, as a student would.
            handle = sliders.nth(0).locator(".noUi-handle")
            handle.focus()
            for _ in range(5):
                handle.press("ArrowLeft")
            _wait_new_src(page, first, src_before)
            after = first.screenshot(path=str(artifacts / "panel_after.png"))
            widget.screenshot(path=str(artifacts / "viewer_after.png"))
            moved_to = int(readout.inner_text())

            # Switch the third row to the Jacobian: its panels must change too.
            third = images.nth(6)
            src_third = third.get_attribute("src")
            menus.nth(2).select_option("jacobian")
            _wait_new_src(page, third, src_third)
            widget.screenshot(path=str(artifacts / "viewer_jacobian.png"))

            # The playground: raise the amplitude; the warped image must change.
            play_images = playground.locator(".jp-OutputArea img.widget-image")
            assert play_images.count() == 3, "expected warped image, grid and Jacobian panels"
            play_widget = playground.locator(".jp-OutputArea-output:has(img.widget-image)")
            play_widget.scroll_into_view_if_needed()
            play_widget.screenshot(path=str(artifacts / "playground_before.png"))
            warped_src = play_images.nth(0).get_attribute("src")
            amp = playground.locator(".widget-slider").nth(0).locator(".noUi-handle")
            amp.focus()
            for _ in range(10):
                amp.press("ArrowRight")
            _wait_new_src(page, play_images.nth(0), warped_src)
            play_widget.screenshot(path=str(artifacts / "playground_after.png"))
        finally:
            browser.close()
    a, b = _pixels(before), _pixels(after)
    assert a.shape == b.shape
    changed = float((np.abs(a - b).max(-1) > 24).mean())
    assert changed > 0.05, f"only {changed:.1%} of the panel's pixels changed after moving the slider"
    assert moved_to == start - 5, f"slider at {moved_to} after five steps left from {start}"
    took = time.monotonic() - t0
    (artifacts / "result.json").write_text(json.dumps(
        {"seconds": round(took, 1), "slider": [start, moved_to], "panel_pixels_changed": changed},
        indent=1))
    assert took < 90, f"the browser test took {took:.0f} s, more than 90 s"
