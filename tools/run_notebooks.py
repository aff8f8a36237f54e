"""Run every notebook under nbval, several at a time, one thread each: ``make notebooks``.

The course's notebooks are mostly small tensors and Python: one kernel gains
little from a second thread (in ci, notebooks 10 and 15 took 67 s and 24 s
with one thread beside a training run, 66 s and 27 s with two threads on the
quiet machine), while two kernels side by side use both cores of a 2-core
machine. So the notebooks are dealt round-robin, in name order,
into ``--jobs`` groups (default: the number of cores, at most 4), and each
group runs in its own ``pytest --nbval-lax`` with ``OMP_NUM_THREADS=1``.
Threads are pinned to one because two kernels whose OpenMP pools together
ask for more threads than there are cores spin against each other and run
many times slower.

Every ``*.ipynb`` under the folder is run (the collection ``pytest
notebooks/`` makes), and each group's output is printed whole when it ends.
The exit status is the first non-zero status of the groups, else 0.

Usage (from the repository root, in the students' environment)::

    REGEDU_PROFILE=ci python tools/run_notebooks.py notebooks [--jobs N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def notebooks(folder: Path) -> list[Path]:
    """Every notebook under ``folder`` in name order, Jupyter's checkpoints left out."""
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def groups(paths: list[Path], jobs: int) -> list[list[Path]]:
    """``paths`` dealt round-robin into at most ``jobs`` non-empty groups."""
    if jobs < 1:
        raise ValueError(f"jobs: expected at least 1, got {jobs}")
    return [g for g in (paths[k::jobs] for k in range(jobs)) if g]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4),
                    help="notebooks run at once (default: the cores, at most 4)")
    args = ap.parse_args(argv)
    paths = notebooks(args.folder)
    if not paths:
        print(f"no notebooks under {args.folder}", file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    parts = groups(paths, args.jobs)
    print(f"{len(paths)} notebooks in {len(parts)} group(s) at once, one thread each", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        running = []
        for k, part in enumerate(parts):
            log = open(Path(tmp) / f"group{k}.log", "w+")
            cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", *map(str, part)]
            running.append((part, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        status = 0
        for k, (part, log, proc) in enumerate(running):
            code = proc.wait()
            log.seek(0)
            print(f"\n===== group {k + 1} of {len(running)}: {', '.join(p.name for p in part)} (exit {code})")
            print(log.read(), flush=True)
            log.close()
            status = status or code
    print(f"all groups done in {time.perf_counter() - start:.0f} s; exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
