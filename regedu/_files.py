"""Writing a file whole or not at all: the one way regedu writes files.

Checkpoints, images, displacement fields, tables, downloads and cached
volumes all go through :func:`write_atomic`, so that no crash, Ctrl-C, full
disk or kill ever leaves half a file where a reader expects a whole one.
"""
from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path, write: Callable[[Path], object], *, suffix: str = ".tmp") -> Path:
    """Write ``path`` through ``write(tmp)``, all or nothing; return ``path``.

    ``write`` writes a temporary file beside ``path`` (same folder, so the
    final rename cannot cross file systems); its name ends in ``suffix``, which
    tells writers that go by the name (nibabel, ``numpy.savez``) the format.
    Once ``write`` returns, the file is flushed to disk and moved over ``path``
    with ``os.replace``, which readers see happen at once. If anything fails
    or interrupts it, the temporary file is removed and ``path`` keeps its
    previous content (or stays absent). Missing parent folders are created.

    A write killed outright (SIGKILL, power loss) cannot clean up after
    itself; its temporary file carries the writer's pid, so a later write of
    the same ``path`` removes it once that process is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # Renamed before its data reach the disk, a file can come back empty after a crash.
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # mkstemp makes the file private (0600): give it the mode open() would have given.
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else _open_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _open_mode() -> int:
    """The mode of a file that open() creates: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _remove_stale_temporaries(path: Path) -> None:
    for tmp in path.parent.glob(f".{path.name}.*"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive but another user's: not ours to remove
            pass
