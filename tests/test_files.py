"""regedu._files: a file written whole, with the mode a plain write would give it; a folder replaced whole."""
import os
import stat

import pytest

from regedu._files import replace_folder, write_atomic


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_mode_open_gives_and_a_replaced_one_keeps_its_own(tmp_path):
    before = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        new = write_atomic(tmp_path / "new.txt", lambda tmp: tmp.write_text("y"))
        assert new.read_text() == "y" and _mode(new) == _mode(plain) == 0o644
        plain.chmod(0o640)
        write_atomic(plain, lambda tmp: tmp.write_text("z"))
        assert plain.read_text() == "z" and _mode(plain) == 0o640
        os.umask(0o077)
        private = write_atomic(tmp_path / "private.txt", lambda tmp: tmp.write_text("p"))
        assert _mode(private) == 0o600
    finally:
        os.umask(before)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left


def test_replace_folder_is_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "site"

    def fill(files):
        def write(tmp):
            for name, text in files.items():
                (tmp / name).write_text(text)
        return write

    assert replace_folder(folder, fill({"a.js": "one", "b.js": "one"})) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["a.js", "b.js"]

    def fails(tmp):
        (tmp / "a.js").write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        replace_folder(folder, fails)
    assert (folder / "a.js").read_text() == "one", "a failed fill must leave the old folder as it was"
    replace_folder(folder, fill({"a.js": "two"}))
    assert [p.name for p in folder.iterdir()] == ["a.js"] and (folder / "a.js").read_text() == "two", \
        "the new folder replaces the old one whole: no file of the old one stays"
    assert [p.name for p in tmp_path.iterdir()] == ["site"], "no temporary folder may be left"
