"""Where antspyx has no wheel, notebooks 03, 04 and 10 say so in one line and skip only the ANTs rows."""
import pytest

from regedu.course import find_notebooks, run_course

NOTEBOOKS = ["03", "04", "10"]


@pytest.fixture(scope="module")
def without_ants(tmp_path_factory):
    # A module named `ants` that fails to import, first on the kernels' path: what
    # `import ants` does on a platform where pip found no antspyx wheel.
    stub = tmp_path_factory.mktemp("no_ants")
    (stub / "ants.py").write_text('raise ImportError("no antspyx here (simulated by tests/test_no_ants.py)")\n')
    out = tmp_path_factory.mktemp("html")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(stub), prepend=":")
        summary = run_course(NOTEBOOKS, profile="ci", out_dir=out, timeout=600, progress=False)
    return summary, out


@pytest.mark.parametrize("number", NOTEBOOKS)
def test_notebook_runs_its_checks_without_ants(without_ants, number):
    summary, out = without_ants
    row = next(r for r in summary.rows if r["notebook"].startswith(number))
    assert row["status"] == "ok", f"{row['notebook']} failed without antspyx: {row['error']}"
    page = (out / f"{row['notebook']}.html").read_text()
    assert page.count("ANTs rows skipped: antspyx is not installed here") == 1, \
        "the notebook should say once, in one line, that it skips the ANTs rows"
    assert "all checks passed" in page, "the checks must still run without ANTs"


def test_the_notebooks_exist():
    assert [p.name[:2] for p in find_notebooks(NOTEBOOKS)] == NOTEBOOKS
