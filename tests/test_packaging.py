"""One environment: the lock, the Makefile, Binder and environment.yml agree, and CI calls the README command."""
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock_tool", ROOT / "tools" / "lock.py")
lock_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_tool)

LOCK = lock_tool.read_lock()
PINNED = {**LOCK["runtime"], **LOCK["test"]}
# The platform the lock was resolved on (its header), for evaluating markers.
LOCK_ENV = {"python_version": lock_tool.lock_python(), "platform_machine": "x86_64",
            "sys_platform": "linux", "extra": ""}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lines(path):
    return [l.split("#", 1)[0].strip() for l in (ROOT / path).read_text().splitlines()]


def _environment_pip_block():
    lines = [l.strip() for l in (ROOT / "environment.yml").read_text().splitlines()]
    return [l[2:].strip() for l in lines[lines.index("- pip:") + 1:] if l.startswith("- ")]


def test_lock_sections_are_disjoint_and_pin_every_declared_dependency():
    assert LOCK["runtime"] and LOCK["test"]
    both = set(LOCK["runtime"]) & set(LOCK["test"])
    assert not both, f"in both sections of the lock (the test extra would change them): {sorted(both)}"
    project = _pyproject()
    for section, reqs in [("runtime", project["dependencies"]),
                          ("test", project["optional-dependencies"]["test"])]:
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(LOCK_ENV):
                continue
            name = lock_tool.canonical(req.name)
            assert name in LOCK[section], f"{req.name} ({section} dependency) is not in the lock's [{section}]"
            assert req.specifier.contains(LOCK[section][name], prereleases=True), (
                f"the lock pins {name}=={LOCK[section][name]}, outside pyproject.toml's {text!r}")


def test_binder_installs_cpu_torch_under_the_lock():
    req = _lines("binder/requirements.txt")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in req
    assert "-c ../requirements/lock.txt" in req
    assert f"torch=={LOCK['runtime']['torch']}" in req
    post = _lines("binder/postBuild")
    assert "python -m pip install --no-cache-dir -c requirements/lock.txt -e ." in post
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    assert runtime == f"python-{lock_tool.lock_python()}", (runtime, lock_tool.lock_python())


def test_environment_yml_installs_the_same_under_the_lock():
    block = _environment_pip_block()
    assert block == ["--extra-index-url https://download.pytorch.org/whl/cpu", "-c requirements/lock.txt",
                     f"torch=={LOCK['runtime']['torch']}", "-e ."], block
    text = (ROOT / "environment.yml").read_text()
    assert re.search(rf"^\s*- python={re.escape(lock_tool.lock_python())}\s*$", text, re.M)


def test_makefile_builds_both_environments_the_binder_way():
    make = (ROOT / "Makefile").read_text()
    build = (ROOT / "tools" / "build_env.sh").read_text()
    assert "LOCK := requirements/lock.txt" in make
    assert "-r binder/requirements.txt" in build and "bash binder/postBuild" in build
    # Both environments come from build_env.sh; the test one adds the extra under the lock.
    assert make.count("tools/build_env.sh $(VENV)") == 1 and make.count("tools/build_env.sh $(TEST_VENV)") == 1
    assert '-c $(LOCK) -e ".[test]"' in make and "-c $(LOCK) pytest nbval" in make
    assert "tools/lock.py check --runtime" in make and "tools/lock.py check\n" in make


def test_the_running_environment_is_the_locked_one():
    problems = lock_tool.check(runtime_only=False)
    assert not problems, "\n".join(problems)


def test_runtime_closure_is_the_lock_runtime_section():
    """What regedu pulls in here is exactly the lock's [runtime]: nothing missing, nothing stale."""
    closure = lock_tool.runtime_closure()
    assert closure == set(LOCK["runtime"]), (
        f"only in the environment's closure: {sorted(closure - set(LOCK['runtime']))}; "
        f"only in the lock: {sorted(set(LOCK['runtime']) - closure)}")


def test_check_reports_a_version_that_differs(monkeypatch):
    fake = dict(LOCK)
    fake["runtime"] = {**LOCK["runtime"], "numpy": "0.0.1"}
    monkeypatch.setattr(lock_tool, "read_lock", lambda path=None: fake)
    problems = lock_tool.check(runtime_only=False)
    assert any(p.startswith("numpy is ") and "the lock says 0.0.1" in p for p in problems), problems


def test_runtime_check_refuses_test_packages(monkeypatch):
    """In the full test environment, the students'-environment check must see the extra."""
    problems = lock_tool.check(runtime_only=True)
    assert any("voxelmorph" in p for p in problems), problems


@pytest.mark.parametrize("line", ["numpy>=2", "# [runtime]\nnumpy"])
def test_read_lock_rejects_unpinned_lines(tmp_path, line):
    path = tmp_path / "lock.txt"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match="name==version"):
        lock_tool.read_lock(path)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, re.M)
    assert "make lab" in commands and "make test" in commands
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_console_script_points_to_cli():
    assert _pyproject()["scripts"] == {"regedu": "regedu.cli:main"}
