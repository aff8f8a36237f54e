"""Download, verify, cache and unpack the datasets of :data:`REGISTRY`.

The rules, in the order ``fetch`` applies them:

1. A verified copy in the cache (``REGEDU_DATA``, default ``~/.cache/regedu``)
   is used as it is, while it is still the file that was verified: the same
   size and modification time, and for files under 64 MiB the same checksum
   (hashed again on every use). A copy changed since is verified again.
2. A local mirror folder (``REGEDU_MIRROR`` or ``mirror=``) holding a file of
   the same name is copied instead of downloading (CI points it at
   ``../shared/data``). A mirror that is not a folder is an error.
3. Otherwise the file is downloaded with ``urllib``.

Every copy is written to a temporary name in the cache folder and renamed only
once its size and checksum match, so an interrupted run leaves nothing
half-written and the next call starts cleanly. An HTML page saved under an
archive's name (hosts answer error or login pages with status 200) is named as
such. Archives are unpacked into a temporary folder, refusing any member whose
path would leave it, then renamed into place; an archive that cannot be
unpacked loses its verified mark.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from .._files import replace_folder, write_atomic
from ._registry import REGISTRY, DatasetInfo

__all__ = ["fetch", "cache_status", "data_dir", "mirror_dir", "verify_file", "safe_extract",
           "is_cached", "DataUnavailableError", "ChecksumError", "UnsafeArchiveError",
           "REGISTRY", "DatasetInfo"]

_CHUNK = 1 << 20
_USER_AGENT = "regedu (https://pypi.org/project/regedu) python-urllib"


class DataUnavailableError(FileNotFoundError):
    """The data is not in the cache or mirror and cannot be downloaded."""


class ChecksumError(ValueError):
    """A file's size or checksum is not the expected one."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target folder."""


def data_dir(cache_dir=None) -> Path:
    """The cache folder: ``cache_dir``, else ``$REGEDU_DATA``, else ``~/.cache/regedu``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set. The folder is created.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("REGEDU_DATA")
    if not cache_dir:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache_dir = Path(base) / "regedu"
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def mirror_dir(mirror=None) -> Path | None:
    """The local mirror folder: ``mirror``, else ``$REGEDU_MIRROR``, else None.

    A mirror that is not a folder raises ``ValueError``: a mistyped path would
    otherwise quietly fall back to the network (or to an offline failure that
    never mentions the mirror).
    """
    source = "mirror" if mirror is not None else "REGEDU_MIRROR"
    mirror = mirror if mirror is not None else os.environ.get("REGEDU_MIRROR")
    if not mirror:
        return None
    path = Path(mirror).expanduser()
    if not path.is_dir():
        raise ValueError(f"{source}: {str(path)!r} is not a folder; give the folder that holds the "
                         f"dataset files"
                         + (", or unset REGEDU_MIRROR" if source == "REGEDU_MIRROR" else ""))
    return path


def _lookup(dataset) -> DatasetInfo:
    if isinstance(dataset, DatasetInfo):
        return dataset
    if dataset not in REGISTRY:
        raise ValueError(f"dataset: unknown name {dataset!r}; known datasets: "
                         f"{', '.join(sorted(REGISTRY))}")
    return REGISTRY[dataset]


def _hash(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _looks_like_html(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1024).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")) or b"<html" in head


_MAGIC = {".7z": (b"7z\xbc\xaf\x27\x1c",), ".zip": (b"PK\x03\x04", b"PK\x05\x06"),
          ".npz": (b"PK\x03\x04", b"PK\x05\x06"), ".gz": (b"\x1f\x8b",)}


def _kind_ok(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return tarfile.is_tarfile(path)
    if suffix not in _MAGIC:
        return True
    with open(path, "rb") as f:
        head = f.read(8)
    return head.startswith(_MAGIC[suffix])


def verify_file(path, info: DatasetInfo) -> None:
    """Raise :class:`ChecksumError` unless ``path`` is the file ``info`` describes.

    Checks, in order: not an HTML page, the exact size when known, the
    checksum when known, else the archive's magic bytes.
    """
    path = Path(path)
    if _looks_like_html(path) and not info.filename.lower().endswith((".html", ".htm")):
        raise ChecksumError(
            f"{path.name}: this is an HTML page, not {info.filename}: the server answered an "
            f"error or login page instead of the file (from {info.url}). Download it in a "
            f"browser and check it opens, or try again later")
    size = path.stat().st_size
    if info.size is not None and size != info.size:
        raise ChecksumError(f"{path.name}: expected {info.size} bytes for {info.filename}, got "
                            f"{size} (an interrupted or wrong download)")
    if info.checksum is not None:
        algorithm, expected = info.checksum
        got = _hash(path, algorithm)
        if got != expected:
            raise ChecksumError(f"{path.name}: {algorithm} checksum mismatch for {info.filename}: "
                                f"expected {expected}, got {got}")
    elif not _kind_ok(path):
        raise ChecksumError(f"{path.name}: not a valid {path.suffix} file ({info.filename}); "
                            f"it may be truncated or an error page")


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


# Files up to this size are hashed again whenever they are used (a fraction of
# a second); larger ones are trusted while their size and modification time
# are those recorded when they were verified.
_REHASH_BELOW = 64 * 2**20


def _write_marker(target: Path, info: DatasetInfo) -> None:
    stat = target.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if info.checksum is not None:
        record[info.checksum[0]] = info.checksum[1]
    _marker(target).write_text(json.dumps(record))


def _verified(target: Path, info: DatasetInfo) -> bool:
    """Whether ``target`` is still the file that was verified (see :data:`_REHASH_BELOW`)."""
    marker = _marker(target)
    if not (target.is_file() and marker.is_file()):
        return False
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        return False  # an older marker (a bare size): verify once more
    stat = target.stat()
    if not isinstance(record, dict) or record.get("size") != stat.st_size \
            or record.get("mtime_ns") != stat.st_mtime_ns:
        return False
    if info.checksum is not None:
        algorithm, expected = info.checksum
        if record.get(algorithm) != expected:
            return False
        if stat.st_size < _REHASH_BELOW and _hash(target, algorithm) != expected:
            return False
    return True


def cache_status(dataset, *, cache_dir=None) -> str:
    """What the cache holds of ``dataset`` (``regedu fetch`` lists it): ``"cached"``,
    ``"not unpacked"`` (a verified archive), ``"unverified"`` (a file put there or
    changed since), ``"manual download"`` or ``"not fetched"``."""
    info = _lookup(dataset)
    cache = data_dir(cache_dir)
    target = cache / info.filename
    if is_cached(info, cache_dir=cache):
        return "cached"
    if _verified(target, info):
        return "not unpacked"
    if target.is_file():
        return "unverified"
    return "manual download" if info.manual else "not fetched"


def is_cached(dataset, *, cache_dir=None) -> bool:
    """Whether a verified copy of ``dataset`` sits in the cache (and, for an
    archive to unpack, its unpacked folder)."""
    info = _lookup(dataset)
    cache = data_dir(cache_dir)
    target = cache / info.filename
    if not _verified(target, info):
        return False
    return not info.extract or _extracted(target, cache / info.name)


def _install(source_writer, target: Path, info: DatasetInfo) -> None:
    """Write via ``source_writer(tmp_path)``, verify, then rename to ``target`` (atomically)."""
    def write(tmp: Path) -> None:
        source_writer(tmp)
        verify_file(tmp, info)
        _marker(target).unlink(missing_ok=True)  # never a marker of the old file over the new one

    write_atomic(target, write, suffix=".part")
    _write_marker(target, info)


def _download(url: str, dest: Path, *, progress: bool, total: int | None) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
        total = total or int(response.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name.split(".part")[0])
        try:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()


def _where_to_put(info: DatasetInfo, target: Path) -> str:
    return (f"download {info.url} by hand ({info.approx_size or 'size unknown'}; terms: "
            f"{info.license}) and put it at {target}, or in a folder named by REGEDU_MIRROR "
            f"as {info.filename}")


def fetch(dataset, *, cache_dir=None, mirror=None, extract: bool | None = None,
          progress: bool = False, download: bool = True) -> Path:
    """Return a verified local copy of ``dataset``, getting it if needed.

    Parameters
    ----------
    dataset : str or DatasetInfo
        A name of :data:`REGISTRY` (``"fire"``, ``"vxm-test-scan"``, ...) or a record.
    cache_dir : path, optional
        Cache folder (default :func:`data_dir`).
    mirror : path, optional
        Folder tried before the network (default ``$REGEDU_MIRROR``).
    extract : bool, optional
        Unpack an archive (default: the record's ``extract``).
    progress : bool
        Show a progress bar while downloading.
    download : bool
        False: use only the cache and the mirror, never the network.

    Returns
    -------
    Path
        The file, or for an unpacked archive the folder it was unpacked into
        (``<cache>/<name>/``).

    Raises
    ------
    DataUnavailableError
        Not cached, not in the mirror, and the download failed or was not
        allowed (the message names the URL, the file and where to put a copy
        made by hand).
    ChecksumError
        The mirror's copy or the download is not the expected file; nothing is
        left in the cache.
    UnsafeArchiveError
        The archive holds a path that would leave the target folder.
    """
    info = _lookup(dataset)
    cache = data_dir(cache_dir)
    target = cache / info.filename
    if not _verified(target, info):
        if target.is_file():
            # Put there by hand, or verified by an older run: check it once.
            try:
                _install(lambda tmp: shutil.copyfile(target, tmp), target, info)
            except ChecksumError as err:
                raise ChecksumError(f"{target} (in the cache) is not valid: {err}. Delete it and "
                                    f"fetch again, or replace it with a good copy") from None
        else:
            _obtain(info, target, mirror_dir(mirror), progress, download)
    extract = info.extract if extract is None else extract
    if not extract:
        return target
    return _extract_once(target, cache / info.name)


def _obtain(info: DatasetInfo, target: Path, mirror: Path | None, progress: bool,
            download: bool) -> None:
    if mirror is not None and (mirror / info.filename).is_file():
        source = mirror / info.filename
        try:
            _install(lambda tmp: shutil.copyfile(source, tmp), target, info)
        except ChecksumError as err:
            raise ChecksumError(f"mirror copy {source} is not valid: {err}") from None
        return
    if info.manual:
        raise DataUnavailableError(
            f"{info.name}: {info.filename} is not in the cache and must be downloaded by hand: "
            + _where_to_put(info, target))
    if not download:
        raise DataUnavailableError(
            f"{info.name}: {info.filename} is not in the cache or the mirror, and download=False: "
            f"fetch it once with downloads allowed, or " + _where_to_put(info, target))
    try:
        _install(lambda tmp: _download(info.url, tmp, progress=progress, total=info.size),
                 target, info)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataUnavailableError(
            f"{info.name}: could not download {info.url} ({reason}). You may be offline or the "
            f"host may be down: " + _where_to_put(info, target)) from None


def _extracted(archive: Path, folder: Path) -> bool:
    done = folder / ".extracted"
    return done.is_file() and done.read_text().strip() == archive.name


def _extract_once(archive: Path, folder: Path) -> Path:
    if _extracted(archive, folder):
        return folder

    def unpack(tmp: Path) -> None:
        try:
            safe_extract(archive, tmp)
        except ImportError:
            raise  # a missing unpacker says nothing about the archive
        except Exception as err:
            # The archive is not usable as it is: it must not stay marked verified.
            _marker(archive).unlink(missing_ok=True)
            if isinstance(err, UnsafeArchiveError):
                raise
            raise ChecksumError(f"{archive.name}: cannot be unpacked ({type(err).__name__}: "
                                f"{err}); it is no longer marked verified. Delete {archive} and "
                                f"fetch it again") from None
        (tmp / ".extracted").write_text(archive.name)

    return replace_folder(folder, unpack)


def _check_member(name: str, dest: Path) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    resolved = (dest / pure).resolve()
    if pure.is_absolute() or ".." in pure.parts or not resolved.is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {dest}; "
                                 f"refusing to extract this archive")


def safe_extract(archive, dest) -> Path:
    """Unpack a ``.tar``(``.gz``), ``.zip`` or ``.7z`` archive into ``dest``.

    Every member is checked first: an absolute path, a ``..`` component, or a
    link pointing outside ``dest`` raises :class:`UnsafeArchiveError` and
    nothing is written.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".7z"):
        import py7zr
        with py7zr.SevenZipFile(archive, "r") as z:
            for member in z.getnames():
                _check_member(member, dest)
            z.extractall(path=dest)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                _check_member(member, dest)
            z.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _check_member(m.name, dest)
                if m.issym() or m.islnk():
                    link = m.linkname if m.islnk() else str(PurePosixPath(m.name).parent / m.linkname)
                    _check_member(link, dest)
                if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    raise UnsafeArchiveError(f"archive member {m.name!r} is a device or fifo; "
                                             f"refusing to extract this archive")
            t.extractall(dest, members=members, filter="data")
    else:
        raise ValueError(f"archive: {archive} is not a tar, zip or 7z archive")
    return dest
