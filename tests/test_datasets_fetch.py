"""Fetching: local mirror, checksums, atomic writes, HTML pages, safe extraction.

No test touches the network: downloads use file:// URLs and a local HTTP
server on 127.0.0.1.
"""
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from regedu.cli import main
from regedu.datasets.fetch import (ChecksumError, DataUnavailableError, DatasetInfo,
                                   UnsafeArchiveError, fetch, is_cached, safe_extract)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _info(path: Path, **kw) -> DatasetInfo:
    data = path.read_bytes()
    base = dict(name="toy", url=path.as_uri(), filename=path.name,
                sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    base.update(kw)
    return DatasetInfo(**base)


def _toy_source(tmp_path: Path):
    """A 3000-byte file under src/, its DatasetInfo (a file:// URL) and an empty cache folder's path."""
    src = tmp_path / "src" / "toy.bin"
    src.parent.mkdir()
    src.write_bytes(b"abc" * 1000)
    return src, _info(src), tmp_path / "cache"


def _leftovers(cache: Path):
    return sorted(p.name for p in cache.iterdir())


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_registry_entries_fetch_from_mirror(tmp_path):
    for name in ("vxm-test-scan", "vxm-labels"):
        path = fetch(name, cache_dir=tmp_path, mirror=SHARED)
        assert path.read_bytes() == (SHARED / path.name).read_bytes()
    assert is_cached("vxm-labels", cache_dir=tmp_path)


def test_download_by_file_url_and_cache_reuse(tmp_path):
    src, info, cache = _toy_source(tmp_path)
    assert fetch(info, cache_dir=cache).read_bytes() == src.read_bytes()
    src.unlink()  # the second call must not need the source any more
    assert fetch(info, cache_dir=cache).read_bytes() == b"abc" * 1000


def test_download_false_uses_only_the_cache_and_the_mirror(tmp_path):
    src, info, cache = _toy_source(tmp_path)
    with pytest.raises(DataUnavailableError, match="not in the cache or the mirror, and download=False"):
        fetch(info, cache_dir=cache, download=False)   # the file:// URL would have worked
    assert not (cache / "toy.bin").exists()
    assert fetch(info, cache_dir=cache, mirror=src.parent, download=False).read_bytes() == b"abc" * 1000
    src.unlink()
    assert fetch(info, cache_dir=cache, download=False).read_bytes() == b"abc" * 1000


def test_wrong_checksum_is_clear_and_leaves_no_file(tmp_path):
    src = tmp_path / "mirror" / "toy.bin"
    src.parent.mkdir()
    src.write_bytes(b"hello")
    cache = tmp_path / "cache"
    info = _info(src, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="sha256 checksum mismatch.*expected 0000"):
        fetch(info, cache_dir=cache, mirror=src.parent)
    assert _leftovers(cache) == []
    with pytest.raises(ChecksumError, match="sha256"):
        fetch(info, cache_dir=cache)  # file:// download of the same bad bytes
    assert _leftovers(cache) == []


def test_bad_file_placed_by_hand_is_reported(tmp_path):
    src = tmp_path / "toy.bin"
    src.write_bytes(b"good")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "toy.bin").write_bytes(b"bad!")
    with pytest.raises(ChecksumError, match="in the cache.*Delete it"):
        fetch(_info(src), cache_dir=cache)
    assert _leftovers(cache) == ["toy.bin"]  # the user's file is left alone, nothing else


def test_md5_is_accepted(tmp_path):
    src = tmp_path / "toy.tar"
    with tarfile.open(src, "w") as t:
        data = b"x" * 10
        ti = tarfile.TarInfo("a/b.txt")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    info = _info(src, sha256=None, md5=hashlib.md5(src.read_bytes()).hexdigest(), extract=True)
    folder = fetch(info, cache_dir=tmp_path / "cache")
    assert (folder / "a" / "b.txt").read_bytes() == b"x" * 10


def test_html_error_page_is_recognised(tmp_path):
    page = tmp_path / "mirror" / "data.tar"
    page.parent.mkdir()
    page.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    info = DatasetInfo(name="toy", url="https://example.invalid/data.tar", filename="data.tar",
                       md5="0" * 32)
    with pytest.raises(ChecksumError, match="HTML page"):
        fetch(info, cache_dir=tmp_path / "cache", mirror=page.parent)
    assert _leftovers(tmp_path / "cache") == []


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b"0123456789" * 5000
    cut = None  # send only this many bytes, then drop the connection

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload[: self.cut] if self.cut else self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_interrupted_download_leaves_nothing_then_retries(tmp_path, server, monkeypatch):
    payload = _Handler.payload
    info = DatasetInfo(name="toy", url=f"{server}/toy.bin", filename="toy.bin",
                       sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    cache = tmp_path / "cache"
    monkeypatch.setattr(_Handler, "cut", 1234)
    with pytest.raises((ChecksumError, DataUnavailableError)):
        fetch(info, cache_dir=cache)
    assert _leftovers(cache) == []
    monkeypatch.setattr(_Handler, "cut", None)
    assert fetch(info, cache_dir=cache).read_bytes() == payload
    assert _leftovers(cache) == ["toy.bin", "toy.bin.verified"]


def test_offline_message_names_url_file_and_place(tmp_path):
    info = DatasetInfo(name="toy", url="http://127.0.0.1:9/nowhere/toy.7z", filename="toy.7z",
                       sha256="0" * 64, license="research use")
    cache = tmp_path / "cache"
    with pytest.raises(DataUnavailableError) as err:
        fetch(info, cache_dir=cache)
    msg = str(err.value)
    assert "http://127.0.0.1:9/nowhere/toy.7z" in msg and str(cache / "toy.7z") in msg
    assert "REGEDU_MIRROR" in msg
    assert _leftovers(cache) == []


def test_manual_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(DataUnavailableError, match="by hand.*OASIS.zip"):
        fetch("learn2reg-oasis", cache_dir=tmp_path)


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown name 'nope'.*fire"):
        fetch("nope", cache_dir=tmp_path)


def _tar_with(path: Path, name: str, *, symlink_to=None):
    with tarfile.open(path, "w") as t:
        ti = tarfile.TarInfo(name)
        if symlink_to:
            ti.type, ti.linkname = tarfile.SYMTYPE, symlink_to
            t.addfile(ti)
        else:
            ti.size = 3
            t.addfile(ti, io.BytesIO(b"bad"))


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil_abs.txt", "a/../../evil.txt"])
def test_tar_path_traversal_is_refused(tmp_path, member):
    archive = tmp_path / "x.tar"
    _tar_with(archive, member)
    dest = tmp_path / "out" / "inner"
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(archive, dest)
    assert not (tmp_path / "out" / "evil.txt").exists() and list(dest.iterdir()) == []


def test_tar_symlink_escape_is_refused(tmp_path):
    archive = tmp_path / "x.tar"
    _tar_with(archive, "link", symlink_to="../../etc/passwd")
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out")


def test_zip_path_traversal_is_refused(tmp_path):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok.txt", "fine")
        z.writestr("../evil.txt", "bad")
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "ok.txt").exists()


def test_7z_extracts_and_refuses_traversal(tmp_path, monkeypatch):
    py7zr = pytest.importorskip("py7zr")
    good = tmp_path / "FIRE.7z"
    with py7zr.SevenZipFile(good, "w") as z:
        z.writestr(b"x y", "FIRE/Images/A01_1.jpg")
    assert (safe_extract(good, tmp_path / "ok") / "FIRE" / "Images" / "A01_1.jpg").read_bytes() == b"x y"
    bad = tmp_path / "bad.7z"
    # py7zr refuses to write such a name; a hostile archive would not ask.
    monkeypatch.setattr(py7zr.py7zr, "check_archive_path", lambda name: True)
    with py7zr.SevenZipFile(bad, "w") as z:
        z.writestr(b"evil", "../evil.txt")
    with pytest.raises(UnsafeArchiveError):
        safe_extract(bad, tmp_path / "no")
    assert not (tmp_path / "evil.txt").exists()


def test_regedu_fetch_lists_and_fetches(tmp_path, capsys):
    # On the main parser: its errors read like every command's, with the same exit status.
    assert main(["fetch", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fire" in out and "neurite-oasis-3d" in out and "manual download" in out
    assert main(["fetch", "--cache-dir", str(tmp_path), "learn2reg-oasis"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regedu: error: ") and "by hand" in err


def test_a_cached_file_corrupted_after_verification_is_no_longer_cached(tmp_path, monkeypatch):
    import importlib
    import os
    fetch_module = importlib.import_module("regedu.datasets.fetch")
    src, info, cache = _toy_source(tmp_path)
    monkeypatch.setitem(fetch_module.REGISTRY, "toy", info)
    path = fetch("toy", cache_dir=cache)
    assert is_cached("toy", cache_dir=cache)
    stat = path.stat()
    with open(path, "r+b") as f:  # one byte flipped in place: same size...
        f.write(b"X")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and the old time stamp
    assert not is_cached("toy", cache_dir=cache)
    with pytest.raises(ChecksumError, match="in the cache.*checksum mismatch"):
        fetch("toy", cache_dir=cache)
    # Large files are trusted by size and time stamp; a write changes the time stamp.
    monkeypatch.setattr(fetch_module, "_REHASH_BELOW", 0)
    path.write_bytes(b"abc" * 1000)
    fetch_module._write_marker(path, info)
    assert is_cached("toy", cache_dir=cache)
    with open(path, "r+b") as f:
        f.write(b"X")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not is_cached("toy", cache_dir=cache)


def test_an_archive_that_cannot_be_unpacked_loses_its_verified_mark(tmp_path, capsys):
    src = tmp_path / "src" / "toy.tar"
    src.parent.mkdir()
    src.write_bytes(b"not a tar archive " * 100)  # passes its checksum, but is no archive
    info = _info(src, extract=True)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="toy.tar: cannot be unpacked.*no longer marked verified"):
        fetch(info, cache_dir=cache)
    assert not (cache / "toy.tar.verified").exists()
    assert not is_cached(info, cache_dir=cache)
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


def test_an_unpacked_archive_is_cached_only_with_its_folder(tmp_path):
    src = tmp_path / "toy.tar"
    with tarfile.open(src, "w") as t:
        ti = tarfile.TarInfo("a.txt")
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"x"))
    info = _info(src, extract=True)
    cache = tmp_path / "cache"
    folder = fetch(info, cache_dir=cache)
    assert is_cached(info, cache_dir=cache)
    (folder / ".extracted").unlink()
    assert not is_cached(info, cache_dir=cache)


def test_a_mirror_that_is_not_a_folder_is_an_error(tmp_path, monkeypatch):
    src = tmp_path / "toy.bin"
    src.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"mirror: '.*no_such_mirror' is not a folder"):
        fetch(_info(src), cache_dir=tmp_path / "cache", mirror=tmp_path / "no_such_mirror")
    monkeypatch.setenv("REGEDU_MIRROR", str(tmp_path / "typo"))
    with pytest.raises(ValueError, match="REGEDU_MIRROR: .*typo' is not a folder.*unset REGEDU_MIRROR"):
        fetch(_info(src), cache_dir=tmp_path / "cache")
    assert main(["fetch", "--cache-dir", str(tmp_path / "cache"), "vxm-labels"]) == 2
