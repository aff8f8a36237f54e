"""Run the whole course headless and publish it as a static site.

``regedu course`` (or ``make course``; ``make site`` for the cpu profile into
``site/``) calls :func:`run_course`: every notebook runs top to bottom in a
fresh Jupyter kernel under the chosen profile, its executed copy is saved as
an HTML page, and ``index.html`` lists the pages with, per notebook, its
title, whether it ran, the wall-clock time and the kernel's peak memory::

    from regedu.course import run_course
    table = run_course(profile="cpu", out_dir="site")   # all notebooks in notebooks/
    print(table.to_markdown())

The folder is a static site: open ``site/index.html`` from disk or serve it
from any web server. Figures are inline (``data:`` URLs, markdown images
included), so pages need no other file. Widgets keep the state they had when
the notebook finished (nbclient's ``store_widget_state``, saved in the page
as ``application/vnd.jupyter.widget-state+json``) and are drawn by Jupyter's
widget manager for static pages (``@jupyter-widgets/html-manager``) under
require.js; formulas are typeset by MathJax. Those scripts come with the site
(``_static/``): they are downloaded once from the npm registry, pinned and
checked against a sha256 (:func:`site_scripts`, cached beside the datasets),
so that the pages draw their widgets and formulas with no network. With
``scripts="cdn"``, or when the scripts cannot be had, the pages load them from
unpkg.com and cdnjs as nbconvert does by default: offline, each widget says
why it is blank and formulas show their TeX source. Every file is written
whole or not at all (:func:`regedu._files.write_atomic`).

Each notebook runs in its own worker process (``python -m regedu.course``),
whose only child is the kernel: the kernel's peak resident memory is then the
worker's ``RUSAGE_CHILDREN`` maximum once the kernel has exited.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ._files import replace_folder, write_atomic

__all__ = ["run_course", "find_notebooks", "CourseSummary", "execute_notebook", "notebook_title",
           "site_scripts"]

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _default_folder() -> Path:
    # The repository's notebooks/ (regedu is installed in development mode beside it).
    return Path(__file__).resolve().parent.parent / "notebooks"


def find_notebooks(notebooks=None, *, folder=None) -> list[Path]:
    """Resolve which notebooks to run.

    Parameters
    ----------
    notebooks : None, str, Path, or a sequence of them
        None: every ``NN_*.ipynb`` in ``folder``, in course order. A path runs
        that file; a number or prefix (``"10"``, ``"06_voxelmorph"``) picks
        the notebook of ``folder`` whose name starts with it.
    folder : path, optional
        Default: the repository's ``notebooks/``.
    """
    folder = Path(folder) if folder is not None else _default_folder()
    if notebooks is None:
        if not folder.is_dir():
            raise FileNotFoundError(f"folder: no notebooks folder at {str(folder)!r}; pass "
                                    f"folder= or the notebook paths")
        return sorted(p for p in folder.glob("*.ipynb") if p.name[:2].isdigit())
    if isinstance(notebooks, (str, Path, int)):
        notebooks = [notebooks]
    found = []
    for item in notebooks:
        path = Path(str(item))
        if path.suffix == ".ipynb" and path.is_file():
            found.append(path)
            continue
        key = f"{int(item):02d}" if str(item).isdigit() else str(item)
        matches = sorted(folder.glob(f"{key}*.ipynb"))
        if len(matches) != 1:
            known = ", ".join(p.stem for p in sorted(folder.glob("*.ipynb"))) or "none"
            raise ValueError(f"notebooks: {item!r} matches {len(matches)} notebooks in "
                             f"{str(folder)!r}; expected one. Known: {known}")
        found.append(matches[0])
    return found


def _get_msg_in_slices(channel, slice_s: float = 1.0) -> None:
    """Make ``channel.get_msg(timeout)`` wait in short polls instead of one long one.

    Why: with nbclient's async client a reply can sit unread in its socket while
    the wait for it sleeps on (a missed wake-up; here about one kernel start in
    seven stalled for as long as the cell timeout, 15 minutes, with both the
    kernel and the client idle). A fresh poll looks at the socket again, so
    polling every second bounds the stall to a second.
    """
    from queue import Empty
    get_msg = channel.get_msg

    async def get_msg_in_slices(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = slice_s if deadline is None else min(slice_s, max(0.0, deadline - time.monotonic()))
            try:
                return await get_msg(timeout=wait)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg_in_slices


_ATX = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(?:=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _plain(markdown: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)        # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"(\*\*|\*|`)(.+?)\1", r"\2", text)
    # Underscores are left alone: names like __init__ or snake_case are common in
    # titles, '_emphasis_' is not.
    return " ".join(html.unescape(text).split())


def notebook_title(notebook, default: str | None = None) -> str | None:
    r"""The text of a notebook's first markdown heading, as plain text.

    Parameters
    ----------
    notebook : path or NotebookNode
        An ``.ipynb`` file, or a notebook read by :mod:`nbformat`.
    default : str, optional
        What to return when no markdown cell has a heading.

    Headings are ATX (``# Title``) or setext (``Title`` over ``=====``); HTML
    comments and fenced code are skipped, and links, emphasis and code are
    reduced to their text.

    >>> import nbformat
    >>> cell = nbformat.v4.new_markdown_cell("<!-- generated -->\n# 01 · *Warping* and the [STN](#)")
    >>> notebook_title(nbformat.v4.new_notebook(cells=[cell]))
    '01 · Warping and the STN'
    """
    if isinstance(notebook, (str, Path)):
        import nbformat
        path = Path(notebook)
        if not path.is_file():
            raise FileNotFoundError(f"notebook: no notebook file at {str(path)!r}")
        notebook = nbformat.read(path, as_version=4)
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = re.sub(r"<!--.*?-->", "", "".join(cell.get("source", "")), flags=re.S)
        fenced, previous = False, ""
        for line in source.splitlines():
            if _FENCE.match(line):
                fenced, previous = not fenced, ""
                continue
            if fenced:
                continue
            match = _ATX.match(line)
            if match and _plain(match.group(1)):
                return _plain(match.group(1))
            if _SETEXT.match(line) and previous.strip() and _plain(previous):
                return _plain(previous)
            previous = line
    return default


# The scripts nbconvert's template loads from unpkg.com and cdnjs to draw widgets and
# formulas, pinned (npm registry tarballs, sha256 of the files downloaded 2026-12-07).
_SCRIPT_PACKAGES = (
    ("html-manager-1.0.15", "https://registry.npmjs.org/@jupyter-widgets/html-manager/-/html-manager-1.0.15.tgz",
     "2b9d65cb7913e1c7d671757a10008b32c9c2448d4429513371e55c07d6107638", 5142829,
     "BSD-3-Clause (Project Jupyter)"),
    ("requirejs-2.3.8", "https://registry.npmjs.org/requirejs/-/requirejs-2.3.8.tgz",
     "777158e89275e16bd51aec3ef714fbcb5dc45789e7078659933bc814916d7dec", 251788,
     "MIT (the jQuery Foundation and other contributors)"),
    ("mathjax-3.2.2", "https://registry.npmjs.org/mathjax/-/mathjax-3.2.2.tgz",
     "1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09", 6132118,
     "Apache-2.0 (MathJax Consortium)"),
)
STATIC = "_static"     # the site's folder for them, beside the pages
_REQUIRE_JS = "require.js"
_EMBED_JS = "html-manager/embed-amd.js"
_MATHJAX_JS = "mathjax/tex-chtml-full.js"
# nbconvert's template configures MathJax 2 (a text/x-mathjax-config block, which
# MathJax 3 ignores); MathJax 3 reads window.MathJax, set before it loads: the same
# delimiters, escapes and AMS equation numbers. The widget manager typesets its labels
# with MathJax 2's MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]): a stand-in
# until MathJax 3 is ready (the page is typeset then), MathJax 3's typesetting after.
_MATHJAX_CONFIG = r"""<script>
window.MathJax = {
  tex: {inlineMath: [['$', '$'], ['\\(', '\\)']], displayMath: [['$$', '$$'], ['\\[', '\\]']],
        processEscapes: true, processEnvironments: true, tags: 'ams'},
  Hub: {Queue: function () {}},
  startup: {ready: function () {
    MathJax.startup.defaultReady();
    MathJax.Hub = {Queue: function (job) {
      var element = Array.isArray(job) ? job[2] : undefined;
      MathJax.startup.promise = MathJax.startup.promise.then(function () {
        return MathJax.typesetPromise(element ? [element] : undefined);
      });
    }};
  }}
};
</script>
"""


def _script_records():
    from .datasets.fetch import DatasetInfo
    return [DatasetInfo(name=name, url=url, filename=url.rsplit("/", 1)[1], sha256=sha256, size=size,
                        approx_size=f"{size / 1e6:.1f} MB", license=terms, extract=True)
            for name, url, sha256, size, terms in _SCRIPT_PACKAGES]


def site_scripts(*, download: bool = True, cache_dir=None, mirror=None) -> dict[str, Path]:
    """The files a static page needs to draw its widgets and formulas with no network.

    Jupyter's widget manager for static pages (``@jupyter-widgets/html-manager``,
    its ``embed-amd.js`` and the icon fonts it points at), ``require.js``, and
    MathJax 3 (``tex-chtml-full.js`` and its fonts), from the npm registry's
    tarballs of pinned versions, checked against their sha256 and unpacked in
    the regedu cache by :func:`regedu.datasets.fetch` (the same cache, mirror
    and atomic writes as the datasets; 11 MB to download, 8 MB in a site).

    Parameters
    ----------
    download : bool
        False: use only what the cache or the mirror holds, never the network.
    cache_dir, mirror : path, optional
        As for :func:`regedu.datasets.fetch`.

    Returns
    -------
    dict
        ``{path under the site's _static/: file in the cache}``.

    Raises
    ------
    regedu.datasets.DataUnavailableError
        Not cached, and ``download`` is False or the registry cannot be reached.
    regedu.datasets.ChecksumError
        A copy that is not the pinned file.
    """
    from .datasets.fetch import fetch

    manager, requirejs, mathjax = (fetch(r, cache_dir=cache_dir, mirror=mirror, download=download)
                                   / "package" for r in _script_records())
    dist, es5 = manager / "dist", mathjax / "es5"
    files = {_REQUIRE_JS: requirejs / "require.js", _EMBED_JS: dist / "embed-amd.js",
             "html-manager/LICENSE.txt": dist / "embed.js.LICENSE.txt",
             _MATHJAX_JS: es5 / "tex-chtml-full.js", "mathjax/LICENSE": mathjax / "LICENSE"}
    # embed-amd.js names its fonts by content hash, relative to itself; MathJax finds
    # its fonts at output/chtml/fonts/woff-v2 under its own folder.
    files.update({f"html-manager/{p.name}": p for p in sorted(dist.iterdir())
                  if p.suffix in (".woff2", ".woff", ".ttf", ".eot", ".svg")})
    fonts = es5 / "output" / "chtml" / "fonts" / "woff-v2"
    files.update({f"mathjax/{p.relative_to(es5).as_posix()}": p for p in sorted(fonts.iterdir())})
    return files


def _install_static(files: dict, folder: Path) -> None:
    """Replace ``folder`` with ``files`` (``{relative path: source}``), whole or not at all."""
    import shutil

    def copy(tmp: Path) -> None:
        for rel, source in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / rel)
        for path in [tmp, *tmp.rglob("*")]:
            _public(path)

    replace_folder(folder, copy)


# With the widget scripts from unpkg.com, offline, the widgets' outputs would stay
# blank with no word of why.
_WIDGET_FALLBACK = """<script>
window.addEventListener("error", function (event) {
  var src = event.target && event.target.src;
  if (!src || !/@jupyter-widgets|jupyter-js-widgets/.test(src)) return;
  document.querySelectorAll("div.jupyter-widgets").forEach(function (div) {
    var note = document.createElement("p");
    note.className = "regedu-widget-offline";
    note.style.cssText = "color: #666; font-style: italic; font-family: sans-serif; margin: 4px 0;";
    note.textContent = "[An interactive widget: drawing it needs " + src.split("/")[2] +
      ", which did not load. Run the notebook to use it.]";
    div.appendChild(note);
  });
}, true);
</script>
"""


def _render_page(nb, *, folder: Path, title: str, profile: str, index: str | None,
                 scripts: str | None) -> str:
    from nbconvert import HTMLExporter

    # embed_images: markdown images (![](figures/x.png)) become data: URLs like the
    # outputs' figures, so that a page is one file and the site works offline.
    urls = {} if scripts is None else dict(require_js_url=f"{scripts}/{_REQUIRE_JS}",
                                           widget_renderer_url=f"{scripts}/{_EMBED_JS}",
                                           mathjax_url=f"{scripts}/{_MATHJAX_JS}")
    exporter = HTMLExporter(template_name="lab", embed_images=True, **urls)
    body, _ = exporter.from_notebook_node(
        nb, resources={"metadata": {"path": str(folder), "name": title}})
    if scripts is not None:
        tag = f'<script src="{scripts}/{_MATHJAX_JS}">'
        if tag not in body:
            raise RuntimeError(f"nbconvert's page no longer loads MathJax as {tag!r}: "
                               "regedu.course cannot configure MathJax 3 for it")
        body = body.replace(tag, _MATHJAX_CONFIG + tag, 1)
    if scripts is None and WIDGET_STATE in nb.metadata.get("widgets", {}):
        body = body.replace("</body>", _WIDGET_FALLBACK + "</body>", 1)
    if index is None:
        return body
    nav = ("<nav class=\"regedu-nav\" style=\"font-family: sans-serif; font-size: 14px; "
           "padding: 8px 16px; border-bottom: 1px solid #ddd; background: #f6f6f6;\">"
           f"<a href=\"{html.escape(index)}\">&larr; course index</a>"
           f" &middot; profile {html.escape(profile)}</nav>")
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, body, count=1)


def _public(path: Path) -> None:
    # Temporary files and folders are private (0600, 0700); a site is read by a web
    # server's user: the modes a plain open() or mkdir() would give.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _write_text(path, text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        _public(tmp)

    return write_atomic(path, write, suffix=Path(path).suffix or ".tmp")


def execute_notebook(path, html_path, *, profile: str = "ci", timeout: int = 900,
                     index: str | None = "index.html", scripts: str | None = None) -> dict:
    """Execute one notebook in a fresh kernel (in this process) and write its HTML page.

    Returns ``{"status": "ok" | "error", "error": str, "seconds": float, "title": str}``.
    The kernel gets ``REGEDU_PROFILE=profile`` and runs in the notebook's folder.
    The page holds everything it shows: figures as ``data:`` URLs and the
    widgets' final state (see the module docstring). Its title is the
    notebook's first heading (:func:`notebook_title`), and it starts with a
    link to ``index``, a URL relative to the page (None: no link). ``scripts``
    is the folder of :func:`site_scripts`' files, relative to the page
    (None: unpkg.com and cdnjs). A notebook
    that fails still gets its page, which shows the error; the page is
    written whole or not at all.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    path, html_path = Path(path), Path(html_path)
    nb = nbformat.read(path, as_version=4)
    title = notebook_title(nb, default=path.stem)
    # A notebook saved from JupyterLab may carry the widget state of that session:
    # the page must show this run's widgets, not those.
    nb.metadata.pop("widgets", None)
    os.environ["REGEDU_PROFILE"] = profile
    # Progress bars written to a file-like stderr would only clutter the pages.
    os.environ.setdefault("TQDM_DISABLE", "1")

    class Client(NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            _get_msg_in_slices(kc.shell_channel)
            _get_msg_in_slices(kc.iopub_channel)
            return kc

    client = Client(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                    resources={"metadata": {"path": str(path.parent)}})
    status, error = "ok", ""
    start = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        status = "error"
        # Tracebacks come with terminal colours, which a table cell would print as codes.
        lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
        error = lines[-1] if lines else type(e).__name__
    except Exception as e:  # a dead kernel, a missing kernel spec: report, keep going
        status, error = "error", f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    if status == "error":
        # nbclient saves the widget state after the last cell only; a notebook that
        # stopped early keeps what its widgets showed up to the error.
        client.set_widgets_metadata()
    _write_text(html_path, _render_page(nb, folder=path.parent, title=title, profile=profile,
                                        index=index, scripts=scripts))
    return {"status": status, "error": error, "seconds": seconds, "title": title}


def _peak_child_mb() -> float:
    import resource
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _format_mb(mb: float) -> str:
    if not math.isfinite(mb):
        return "–"
    return f"{mb:.0f} MB" if mb < 1024 else f"{mb / 1024:.2f} GB"


@dataclass
class CourseSummary:
    """What :func:`run_course` returns: one row per notebook.

    ``rows``: dicts with ``notebook`` (the file's stem), ``title`` (its first
    heading), ``status`` ("ok" or "error"), ``seconds``, ``peak_mb`` (the
    kernel's peak resident memory), ``error`` and ``html`` (the page
    written). ``profile`` and ``out_dir`` say how and where, ``date`` when the
    run started (UTC, ISO 8601), ``scripts`` where the pages get the scripts
    that draw widgets and formulas: ``"local"`` (the site's ``_static/``) or
    ``"cdn"``.
    """

    profile: str
    out_dir: Path
    rows: list = field(default_factory=list)
    date: str = ""
    scripts: str = "cdn"

    @property
    def ok(self) -> bool:
        """Every notebook ran without error."""
        return all(r["status"] == "ok" for r in self.rows)

    def table(self):
        """The rows as a pandas DataFrame."""
        import pandas as pd
        return pd.DataFrame(self.rows, columns=["notebook", "title", "status", "seconds", "peak_mb",
                                                "error", "html"])

    def to_markdown(self) -> str:
        """A Markdown table: notebook, status, time and peak memory (the README's table)."""
        lines = [f"| notebook | status | time ({self.profile}) | peak memory ({self.profile}) |",
                 "| --- | --- | ---: | ---: |"]
        for r in self.rows:
            status = r["status"] if r["status"] == "ok" else f"error: {r['error'][:60]}"
            lines.append(f"| {r['notebook']} | {status} | {r['seconds']:.0f} s | "
                         f"{r['peak_mb'] / 1024:.2f} GB |")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return self.to_markdown()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


_INDEX_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #ddd; vertical-align: top; }
td.time, td.memory, th.num { text-align: right; white-space: nowrap; }
td.file, div.error { font-size: 85%; color: #666; }
tr.error td.status { color: #b00; font-weight: bold; }
tr.ok td.status { color: #070; }
"""


def _index_page(summary: CourseSummary) -> str:
    """The site's table of contents: the run (profile, date, totals), then a linked row per page."""
    from . import __version__

    rows = []
    for r in summary.rows:
        page = Path(r["html"]).name
        title = r.get("title") or r["notebook"]
        error = f"<div class=\"error\">{html.escape(r['error'])}</div>" if r["error"] else ""
        rows.append(
            f"<tr class=\"{html.escape(r['status'])}\" id=\"{html.escape(r['notebook'])}\">"
            f"<td class=\"title\"><a href=\"{html.escape(urllib.parse.quote(page))}\">"
            f"{html.escape(title)}</a></td>"
            f"<td class=\"file\">{html.escape(r['notebook'])}.ipynb</td>"
            f"<td class=\"status\">{html.escape(r['status'])}{error}</td>"
            f"<td class=\"time\" data-seconds=\"{r['seconds']:.3f}\">"
            f"{_format_seconds(r['seconds'])}</td>"
            f"<td class=\"memory\" data-mb=\"{r['peak_mb']:.1f}\">{_format_mb(r['peak_mb'])}</td>"
            "</tr>")
    ran = sum(r["status"] == "ok" for r in summary.rows)
    total = sum(r["seconds"] for r in summary.rows if math.isfinite(r["seconds"]))
    profile = html.escape(summary.profile)
    date = html.escape(summary.date)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>regedu course (profile {profile})</title>\n<style>{_INDEX_CSS}</style>\n"
        "</head>\n<body>\n<h1>regedu: the executed course</h1>\n"
        f"<p class=\"run\">Profile <b class=\"profile\">{profile}</b>, run on "
        f"<time datetime=\"{date}\">{date[:16].replace('T', ' ')} UTC</time> with regedu "
        f"{html.escape(__version__)}: {ran} of {len(summary.rows)} notebooks ran without error, in {_format_seconds(total)} in all. Time is the notebook's "
        "wall-clock time, memory its kernel's peak resident memory. "
        + ("Widgets and formulas are drawn by scripts in this site's <code>_static/</code> folder, "
           "with no network.</p>\n" if summary.scripts == "local" else
           "Widgets and formulas are drawn by scripts from unpkg.com and cdnjs: offline, each "
           "widget says it could not be drawn and formulas show their TeX source.</p>\n")
        + "<table>\n<thead><tr><th>notebook</th><th>file</th><th>status</th><th class=\"num\">time"
        "</th><th class=\"num\">peak memory</th></tr></thead>\n<tbody>\n"
        + "\n".join(rows) + "\n</tbody>\n</table>\n</body>\n</html>\n")


def _write_summary(summary: CourseSummary) -> None:
    # Written again after each notebook: a run that dies midway leaves a site
    # whose index lists the pages finished so far.
    out = summary.out_dir
    _write_text(out / "summary.md", summary.to_markdown())
    _write_text(out / "summary.json", json.dumps(
        {"profile": summary.profile, "date": summary.date, "scripts": summary.scripts,
         "rows": summary.rows}, indent=1))
    _write_text(out / "index.html", _index_page(summary))


def run_course(notebooks=None, profile: str = "ci", out_dir="_course_html", timeout: int = 900,
               *, folder=None, progress: bool = True, scripts: str = "auto") -> CourseSummary:
    """Execute notebooks headless and write them as a static site.

    Parameters
    ----------
    notebooks : None, path, name or number, or a sequence of them
        Default: every ``NN_*.ipynb`` of the course (see :func:`find_notebooks`).
    profile : {"ci", "cpu", "gpu"}
        ``REGEDU_PROFILE`` for the kernels.
    out_dir : path
        The site's folder: one page per notebook (``<notebook>.html``, see
        :func:`execute_notebook`), ``index.html`` (the table of contents:
        title, status, time and peak memory of each, the profile and the
        date), ``summary.md`` and ``summary.json``. Created if missing; pages
        of notebooks not run this time are left as they are.
    timeout : int
        Seconds allowed per cell.
    folder : path, optional
        Where to look notebooks up by name (default: the repository's ``notebooks/``).
    progress : bool
        Print one line per notebook as it finishes.
    scripts : {"auto", "local", "cdn"}
        Where the pages get the scripts that draw widgets and formulas (:func:`site_scripts`):
        "local" copies them into ``out_dir/_static/``, downloading them once
        if the cache lacks them (an error if that fails); "auto" does so when
        the cache or the mirror holds them, never downloading, and otherwise
        falls back to "cdn" (and says so); "cdn" leaves them on unpkg.com and
        cdnjs, as nbconvert does.

    Returns
    -------
    CourseSummary
        One row per notebook: title, status, seconds, peak memory of its kernel.
        A notebook that fails is recorded (its page shows the error) and the
        run goes on.
    """
    # Imported here, not at the top: they import torch, which each notebook's
    # worker (python -m regedu.course) would otherwise load for nothing.
    from ._checks import check_choice, check_positive
    from .profiles import PROFILES

    check_choice(profile, tuple(PROFILES), "profile")
    check_choice(scripts, ("auto", "local", "cdn"), "scripts")
    check_positive(timeout, "timeout", integer=True)
    paths = find_notebooks(notebooks, folder=folder)
    if not paths:
        raise ValueError(f"notebooks: nothing to run; expected at least one notebook, got "
                         f"{notebooks!r} (folder {str(folder or _default_folder())!r})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir: expected a folder for the site, got the file {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    static = None
    if scripts != "cdn":
        from .datasets.fetch import DataUnavailableError
        try:
            _install_static(site_scripts(download=scripts == "local"), out / STATIC)
            static = STATIC
        except DataUnavailableError as err:
            if scripts == "local":
                raise
            print(f"regedu course: the pages load their scripts from unpkg.com and cdnjs ({err})",
                  file=sys.stderr)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary = CourseSummary(profile, out, date=date, scripts="cdn" if static is None else "local")
    env = dict(os.environ, REGEDU_PROFILE=profile)
    # The worker must import this regedu, installed or not.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for path in paths:
        page = out / f"{path.stem}.html"
        cmd = [sys.executable, "-m", "regedu.course", str(path.resolve()), str(page.resolve()),
               profile, str(timeout), static or ""]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            result = {"status": "error", "error": f"worker failed ({proc.returncode}): {tail}",
                      "seconds": wall, "peak_mb": float("nan"),
                      "title": _title_or_stem(path)}
            # No page from the worker, or one from an earlier run: either way the
            # index must not link to something other than this run's outcome.
            _write_text(page, _error_page(result["title"], result["error"], proc.stderr))
        row = {"notebook": path.stem, "title": result["title"], "status": result["status"],
               "seconds": result["seconds"], "peak_mb": result["peak_mb"],
               "error": result["error"], "html": str(page)}
        summary.rows.append(row)
        _write_summary(summary)
        if progress:
            print(f"{path.stem:<40} {row['status']:<6} {row['seconds']:7.1f} s "
                  f"{row['peak_mb']:8.0f} MB {row['error'][:80]}", flush=True)
    return summary


def _error_page(title: str, error: str, log: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n<body>\n"
            "<nav><a href=\"index.html\">&larr; course index</a></nav>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>This notebook did not run: "
            f"{html.escape(error)}</p>\n<pre>{html.escape(log[-20000:])}</pre>\n</body>\n</html>\n")


def _title_or_stem(path: Path) -> str:
    try:
        return notebook_title(path, default=path.stem)
    except Exception:  # an unreadable notebook: its worker's error says why
        return path.stem


def _worker(argv) -> int:
    path, page, profile, timeout, scripts = argv
    result = execute_notebook(path, page, profile=profile, timeout=int(timeout), scripts=scripts or None)
    result["peak_mb"] = _peak_child_mb()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
