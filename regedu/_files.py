"""Writing a file whole or not at all: the one way regedu writes files.

Checkpoints, images, displacement fields, tables, downloads and cached
volumes all go through :func:`write_atomic`, so that no crash, Ctrl-C, full
disk or kill ever leaves half a file where a reader expects a whole one.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic", "replace_folder"]


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
    tmp = _new_temporary(path, suffix)
    try:
        write(Path(tmp))
        # Renamed before its data reach the disk, a file can come back empty after a crash.
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.exists():  # a replaced file keeps its mode; a new one has open()'s already
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_folder(folder, fill: Callable[[Path], object]) -> Path:
    """Put in ``folder`` what ``fill(tmp)`` writes into a new folder, whole or not at all; return ``folder``.

    ``tmp`` is a new, private folder beside ``folder`` (same file system, so the
    final rename is one step). Once ``fill`` returns, the old ``folder`` (if
    any) is removed and ``tmp`` renamed into its place: a reader finds the old
    folder, no folder for the time of the removal, or the new one, never a
    part of it. If ``fill`` fails, ``tmp`` is removed and ``folder`` is left as
    it was.
    """
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    try:
        fill(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _new_temporary(path: Path, suffix: str) -> str:
    """Create an empty, new temporary file beside ``path``; return its name.

    Created with mode 0666, so the kernel applies the umask just as for a plain
    open() (tempfile.mkstemp would make it 0600, and reading the umask means
    setting it, which races with other threads).
    """
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


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
