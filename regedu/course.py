"""Run the whole course headless: execute the notebooks, write HTML pages and a summary.

``regedu course`` (or ``make course``) calls :func:`run_course`: every notebook
runs top to bottom in a fresh Jupyter kernel under the chosen profile, its
executed copy is saved as an HTML page, and a summary table gives, per
notebook, whether it ran, the wall-clock time and the kernel's peak memory::

    from regedu.course import run_course
    table = run_course(profile="ci")        # all notebooks in notebooks/
    print(table.to_markdown())

Each notebook runs in its own worker process (``python -m regedu.course``),
whose only child is the kernel: the kernel's peak resident memory is then the
worker's ``RUSAGE_CHILDREN`` maximum once the kernel has exited.
"""
from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._checks import check_choice, check_positive
from .profiles import PROFILES

__all__ = ["run_course", "find_notebooks", "CourseSummary", "execute_notebook"]


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


def execute_notebook(path, html_path, *, profile: str = "ci", timeout: int = 900) -> dict:
    """Execute one notebook in a fresh kernel (in this process) and write its HTML page.

    Returns ``{"status": "ok" | "error", "error": str, "seconds": float}``.
    The kernel gets ``REGEDU_PROFILE=profile`` and runs in the notebook's folder.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    from nbconvert import HTMLExporter

    path, html_path = Path(path), Path(html_path)
    nb = nbformat.read(path, as_version=4)
    os.environ["REGEDU_PROFILE"] = profile
    # Progress bars written to a file-like stderr would only clutter the pages.
    os.environ.setdefault("TQDM_DISABLE", "1")
    class Client(NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            _get_msg_in_slices(kc.shell_channel)
            _get_msg_in_slices(kc.iopub_channel)
            return kc

    client = Client(nb, timeout=timeout, kernel_name="python3",
                    resources={"metadata": {"path": str(path.parent)}})
    status, error = "ok", ""
    start = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        status = "error"
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        error = lines[-1] if lines else type(e).__name__
    except Exception as e:  # a dead kernel, a missing kernel spec: report, keep going
        status, error = "error", f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    body, _ = HTMLExporter().from_notebook_node(nb)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")
    return {"status": status, "error": error, "seconds": seconds}


def _peak_child_mb() -> float:
    import resource
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024


@dataclass
class CourseSummary:
    """What :func:`run_course` returns: one row per notebook.

    ``rows``: dicts with ``notebook``, ``status`` ("ok" or "error"),
    ``seconds``, ``peak_mb`` (the kernel's peak resident memory), ``error``
    and ``html`` (the page written). ``profile`` and ``out_dir`` say how and where.
    """

    profile: str
    out_dir: Path
    rows: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every notebook ran without error."""
        return all(r["status"] == "ok" for r in self.rows)

    def table(self):
        """The rows as a pandas DataFrame."""
        import pandas as pd
        return pd.DataFrame(self.rows, columns=["notebook", "status", "seconds", "peak_mb", "error",
                                                "html"])

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


def _index_page(summary: CourseSummary) -> str:
    rows = "".join(
        f"<tr><td><a href=\"{html.escape(Path(r['html']).name)}\">{html.escape(r['notebook'])}</a>"
        f"</td><td>{html.escape(r['status'])}</td><td>{r['seconds']:.0f} s</td>"
        f"<td>{r['peak_mb']:.0f} MB</td><td>{html.escape(r['error'])}</td></tr>"
        for r in summary.rows)
    return (f"<!doctype html><meta charset=\"utf-8\"><title>regedu course ({summary.profile})"
            f"</title><h1>regedu course, profile {summary.profile}</h1><table border=\"1\" "
            f"cellpadding=\"4\"><tr><th>notebook</th><th>status</th><th>time</th>"
            f"<th>peak memory</th><th>error</th></tr>{rows}</table>")


def run_course(notebooks=None, profile: str = "ci", out_dir="_course_html", timeout: int = 900,
               *, folder=None, progress: bool = True) -> CourseSummary:
    """Execute notebooks headless, write one HTML page each and a summary table.

    Parameters
    ----------
    notebooks : None, path, name or number, or a sequence of them
        Default: every ``NN_*.ipynb`` of the course (see :func:`find_notebooks`).
    profile : {"ci", "cpu", "gpu"}
        ``REGEDU_PROFILE`` for the kernels.
    out_dir : path
        Where the pages go (``<notebook>.html``), with ``index.html``,
        ``summary.md`` and ``summary.json``.
    timeout : int
        Seconds allowed per cell.
    folder : path, optional
        Where to look notebooks up by name (default: the repository's ``notebooks/``).
    progress : bool
        Print one line per notebook as it finishes.

    Returns
    -------
    CourseSummary
        One row per notebook: status, seconds, peak memory of its kernel.
        A notebook that fails is recorded (its page shows the error) and the
        run goes on.
    """
    check_choice(profile, tuple(PROFILES), "profile")
    check_positive(timeout, "timeout", integer=True)
    paths = find_notebooks(notebooks, folder=folder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = CourseSummary(profile, out)
    env = dict(os.environ, REGEDU_PROFILE=profile)
    # The worker must import this regedu, installed or not.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for path in paths:
        page = out / f"{path.stem}.html"
        cmd = [sys.executable, "-m", "regedu.course", str(path.resolve()), str(page.resolve()),
               profile, str(timeout)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            result = {"status": "error", "error": f"worker failed ({proc.returncode}): {tail}",
                      "seconds": wall, "peak_mb": float("nan")}
        row = {"notebook": path.stem, "status": result["status"], "seconds": result["seconds"],
               "peak_mb": result["peak_mb"], "error": result["error"], "html": str(page)}
        summary.rows.append(row)
        if progress:
            print(f"{path.stem:<40} {row['status']:<6} {row['seconds']:7.1f} s "
                  f"{row['peak_mb']:8.0f} MB {row['error'][:80]}", flush=True)
    (out / "summary.md").write_text(summary.to_markdown())
    (out / "summary.json").write_text(json.dumps({"profile": profile, "rows": summary.rows}, indent=1))
    (out / "index.html").write_text(_index_page(summary), encoding="utf-8")
    return summary


def _worker(argv) -> int:
    path, page, profile, timeout = argv
    result = execute_notebook(path, page, profile=profile, timeout=int(timeout))
    result["peak_mb"] = _peak_child_mb()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
