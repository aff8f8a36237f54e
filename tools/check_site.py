"""Open a built course site page by page in headless Chromium, offline, and say what each page drew.

``make site`` (``regedu course --profile cpu --out site --scripts local``)
writes the executed course as a static site. This opens its ``index.html``,
follows every link of the table of contents with every request to the network
refused, and reports per page: figures (and how many failed to decode),
widget outputs (and how many show the offline note instead of a widget),
sliders drawn, formulas typeset, markdown cells still showing raw ``$...$``,
script errors, files of the site that did not load and requests that tried
the network. A page passes when none of the problems is present.

Usage (from the repository root, in the test environment, which has
playwright; the browser is Debian's chromium)::

    .venv-test/bin/python tools/check_site.py site [--json report.json]

The exit status is 1 when a page has a problem, else 0.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PROBLEMS = ("broken_images", "offline_notes", "raw_tex", "errors", "failed", "refused")

# Markdown cells whose text still holds $...$ after MathJax ran (it replaces what it typesets).
_RAW_TEX = ("() => Array.from(document.querySelectorAll('.jp-RenderedMarkdown'))"
            ".filter(e => /\\$[^$\\s][^$]*\\$/.test(e.innerText)).length")


def check_site(site, *, settle_ms: int = 3000, timeout_ms: int = 60_000) -> list[dict]:
    """One row per page linked from ``site/index.html``, in the index's order (see the module docstring).

    ``settle_ms``: how long each page is given, after its images are complete,
    for the widget manager and MathJax to finish drawing.
    """
    from playwright.sync_api import sync_playwright

    index = Path(site).resolve() / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"site: expected a folder with index.html (made by regedu course), "
                                f"got {str(site)!r}")
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                                     timeout=timeout_ms)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(timeout_ms)
            errors, failed, refused = [], [], []
            page.on("pageerror", lambda e: errors.append(str(e)[:300]))
            page.on("requestfailed", lambda r: r.url.startswith("file:") and failed.append(r.url))
            page.route(re.compile(r"^(https?|wss?)://"),
                       lambda route: (refused.append(route.request.url), route.abort()))
            page.goto(index.as_uri(), wait_until="load")
            links = page.eval_on_selector_all("table a[href]", "els => els.map(a => [a.href, a.textContent])")
            for url, title in links:
                for log in (errors, failed, refused):
                    log.clear()
                page.goto(url, wait_until="load")
                page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
                page.wait_for_timeout(settle_ms)
                widths = page.eval_on_selector_all("img", "els => els.map(i => i.naturalWidth)")
                rows.append({
                    "page": Path(url).name, "title": title, "images": len(widths),
                    "broken_images": sum(w == 0 for w in widths),
                    "widgets": page.locator("div.jupyter-widgets").count(),
                    "offline_notes": page.locator(".regedu-widget-offline").count(),
                    "sliders": page.locator(".widget-slider").count(),
                    "slider_values": page.eval_on_selector_all(
                        ".widget-slider .widget-readout", "els => els.map(e => e.textContent.trim())"),
                    "formulas": page.locator("mjx-container").count(),
                    "raw_tex": page.evaluate(_RAW_TEX),
                    "errors": list(errors), "failed": list(failed), "refused": list(refused)})
        finally:
            browser.close()
    return rows


def problems(row: dict) -> list[str]:
    """What is wrong with one page of :func:`check_site` (empty: it passes)."""
    return [f"{key}: {row[key]}" for key in PROBLEMS if row[key]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", help="the site's folder (holds index.html)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = check_site(args.site)
    print(f"{'page':<44} {'images':>6} {'widgets':>7} {'sliders':>7} {'formulas':>8}  problems")
    for row in rows:
        print(f"{row['page']:<44} {row['images']:>6} {row['widgets']:>7} {row['sliders']:>7} "
              f"{row['formulas']:>8}  {'; '.join(problems(row)) or 'none'}")
    totals = {key: sum(r[key] for r in rows) for key in ("images", "widgets", "sliders", "formulas")}
    bad = [r["page"] for r in rows if problems(r)]
    print(f"{len(rows)} pages: " + ", ".join(f"{v} {k}" for k, v in totals.items())
          + (f"; problems on {', '.join(bad)}" if bad else "; no problem"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
