"""regedu._files.write_atomic: a file written whole, with the mode a plain write would give it."""
import os
import stat

from regedu._files import write_atomic


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
