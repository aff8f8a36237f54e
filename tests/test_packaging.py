"""The environment files agree with pyproject.toml, and CI calls the README command."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_deps():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.replace(" ", "") for d in deps}


def test_environment_yml_lists_pyproject_dependencies():
    lines = [l.strip() for l in (ROOT / "environment.yml").read_text().splitlines()]
    pip_block = lines[lines.index("- pip:") + 1:]
    pip_deps = {l[2:].replace(" ", "") for l in pip_block
                if l.startswith("- ") and not l.startswith("- -")}
    assert pip_deps == _pyproject_deps(), (
        f"only in environment.yml: {sorted(pip_deps - _pyproject_deps())}; "
        f"only in pyproject.toml: {sorted(_pyproject_deps() - pip_deps)}")


def test_binder_installs_cpu_torch_and_the_package():
    req = (ROOT / "binder" / "requirements.txt").read_text()
    assert "download.pytorch.org/whl/cpu" in req and re.search(r"^torch==", req, re.M)
    assert "pip install" in (ROOT / "binder" / "postBuild").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, re.M)
    assert "make lab" in commands and "make test" in commands
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_console_script_points_to_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"regedu": "regedu.cli:main"}
