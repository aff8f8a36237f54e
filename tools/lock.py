"""One environment for everyone: write and check ``requirements/lock.txt``.

The lock pins one version of every package that ``make lab``, Binder,
``environment.yml`` and ``make test`` install. Its ``[runtime]`` section is
regedu's dependencies and everything they pull in (what students get); its
``[test]`` section is what the ``test`` extra adds on top. Both are resolved
together, so the extra never changes a runtime package's version.

Usage (from the repository root)::

    python tools/lock.py refresh        # `make lock`: resolve afresh in a new venv, rewrite the lock
    python tools/lock.py check          # the running environment is the lock's, all of it
    python tools/lock.py check --runtime  # ... the runtime section plus only the test runner

``refresh`` builds a throw-away virtual environment with the Python that runs
it (Binder's is in ``binder/runtime.txt``), installs torch's CPU build at the
lock's torch version (``--torch`` to move it), then ``pip install -e .[test]``
with nothing pinned, and writes what pip chose.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Installer tooling: whatever the venv brings; never part of the lock.
TOOLING = {"pip", "setuptools", "wheel"}
# What `make test` adds to the students' environment to run the notebooks.
RUNNER = ("pytest", "nbval")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the lock pins the release, the build is the installer's choice."""
    return version.split("+", 1)[0]


def read_lock(path: Path = LOCK) -> dict[str, dict[str, str]]:
    """The lock as ``{"runtime": {name: version}, "test": {name: version}}`` (canonical names)."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in path.read_text().splitlines():
        header = re.match(r"#\s*\[(\w+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if current is None or not version:
            raise ValueError(f"{path}: expected `name==version` lines under a `# [section]` header, "
                             f"got {line!r}")
        current[canonical(name)] = version.strip()
    return sections


def lock_python(path: Path = LOCK) -> str:
    """The ``major.minor`` Python the lock was resolved with (from its header)."""
    match = re.search(r"^# resolved with Python (\d+\.\d+)", path.read_text(), re.M)
    if not match:
        raise ValueError(f"{path}: no '# resolved with Python X.Y' line in the header")
    return match.group(1)


def _installed() -> dict[str, metadata.Distribution]:
    return {canonical(d.metadata["Name"]): d for d in metadata.distributions()}


def _closure(roots, dists: dict[str, metadata.Distribution]) -> set[str]:
    """Names reachable from ``roots`` (requirement strings) through installed metadata.

    Markers are evaluated for this interpreter, with the extras each requirement asks for.
    """
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonical(req.name)
        if name not in dists:
            raise LookupError(f"{req} is required but not installed")
        key_extras = [(name, e) for e in sorted(req.extras) or [""]]
        for dist_name, dist_extra in key_extras:
            key = f"{dist_name}[{dist_extra}]"
            if key in seen:
                continue
            seen.add(key)
            for sub in dists[dist_name].requires or []:
                todo.append((Requirement(sub), dist_extra))
    return {k.split("[", 1)[0] for k in seen}


def runtime_closure(dists=None) -> set[str]:
    """regedu's runtime dependencies, transitively, as installed here (regedu itself excluded)."""
    dists = _installed() if dists is None else dists
    return _closure(["regedu"], dists) - {"regedu"} - TOOLING


def check(runtime_only: bool) -> list[str]:
    """Differences between the running environment and the lock (empty when they agree)."""
    lock = read_lock()
    pinned = {**lock["runtime"], **lock["test"]}
    dists = _installed()
    problems = []
    for name, dist in sorted(dists.items()):
        if name in TOOLING or name == "regedu":
            continue
        version = public_version(dist.version)
        if name not in pinned:
            problems.append(f"{name} {version} is installed but not in the lock")
        elif pinned[name] != version:
            problems.append(f"{name} is {version}, the lock says {pinned[name]}")
    for name in lock["runtime"]:
        if name not in dists:
            problems.append(f"{name} (runtime) is in the lock but not installed")
    if runtime_only:
        allowed = set(lock["runtime"]) | _closure(RUNNER, dists)
        extra = sorted(set(dists) - allowed - TOOLING - {"regedu"})
        if extra:
            problems.append("the students' environment holds test packages beyond the runner "
                            f"({', '.join(RUNNER)}): {', '.join(extra)}")
    return problems


def render(runtime: dict[str, str], test: dict[str, str], python: str) -> str:
    def lines(pins):
        return [f"{name}=={pins[name]}" for name in sorted(pins)]
    return "\n".join([
        "# One version of every package regedu's environments install: `make lab`, Binder",
        "# (binder/), environment.yml and `make test` all install with `-c` this file.",
        "# Generated by `make lock` (python tools/lock.py refresh); do not edit by hand.",
        f"# resolved with Python {python} on {platform.system().lower()} {platform.machine()}",
        "#",
        "# [runtime] regedu's dependencies and what they pull in: what students get",
        *lines(runtime),
        "#",
        "# [test] what the test extra adds (the voxelmorph reference, pytest, nbval, playwright)",
        *lines(test),
        "",
    ])


def _dump_env() -> None:
    """Run inside the fresh venv: print its packages and regedu's runtime closure as JSON."""
    dists = _installed()
    print(json.dumps({
        "python": "%d.%d" % sys.version_info[:2],
        "versions": {n: public_version(d.version) for n, d in dists.items()},
        "runtime": sorted(runtime_closure(dists)),
    }))


def refresh(torch: str | None) -> None:
    torch = torch or (read_lock()["runtime"]["torch"] if LOCK.exists() else None)
    if torch is None:
        raise SystemExit("tools/lock.py refresh: there is no lock yet; say which torch to lock with --torch")
    with tempfile.TemporaryDirectory(prefix="regedu-lock-") as tmp:
        py = Path(tmp) / "venv" / "bin" / "python"

        def run(*args):
            subprocess.run([str(py), *args], check=True, cwd=ROOT)

        subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
        run("-m", "pip", "install", "-q", "--upgrade", "pip", "packaging")
        # A +cpu wheel pip can already see (a local wheel house) first, then torch's CPU index.
        try:
            run("-m", "pip", "install", "-q", f"torch=={torch}+cpu")
        except subprocess.CalledProcessError:
            run("-m", "pip", "install", "-q", f"torch=={torch}", "--extra-index-url", TORCH_CPU_INDEX)
        run("-m", "pip", "install", "-q", "-e", ".[test]")
        out = subprocess.run([str(py), __file__, "_dump"], check=True, capture_output=True,
                             text=True, cwd=ROOT).stdout
    env = json.loads(out)
    versions = {n: v for n, v in env["versions"].items() if n not in TOOLING and n != "regedu"}
    runtime = {n: versions[n] for n in env["runtime"]}
    test = {n: v for n, v in versions.items() if n not in runtime}
    LOCK.parent.mkdir(exist_ok=True)
    LOCK.write_text(render(runtime, test, env["python"]))
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(runtime)} runtime and {len(test)} test packages "
          f"(Python {env['python']}, torch {runtime['torch']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/lock.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_refresh = sub.add_parser("refresh", help="resolve afresh and rewrite requirements/lock.txt")
    p_refresh.add_argument("--torch", help="torch version to lock (default: the lock's)")
    p_check = sub.add_parser("check", help="compare the running environment with the lock")
    p_check.add_argument("--runtime", action="store_true",
                         help="the students' environment: runtime section plus only the test runner")
    sub.add_parser("_dump")
    args = parser.parse_args(argv)
    if args.command == "_dump":
        _dump_env()
        return 0
    if args.command == "refresh":
        refresh(args.torch)
        return 0
    problems = check(args.runtime)
    for p in problems:
        print(f"lock check: {p}", file=sys.stderr)
    if problems:
        print("lock check: rebuild the environment (make clean-venv) or refresh the lock (make lock)",
              file=sys.stderr)
        return 1
    print(f"lock check: the environment matches {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
