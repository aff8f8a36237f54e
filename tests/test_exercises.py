"""regedu.exercises: right answers pass, wrong ones fail with feedback, unfinished ones are "not done"."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import regedu
from regedu import exercises, metrics, nets, spatial
from regedu.metrics import dice as imported_dice          # imported before the check: no patching catches it
from regedu.spatial import compose as imported_compose


@pytest.fixture(autouse=True)
def fresh():
    exercises.reset()
    yield
    exercises.reset()


def box_ncc(fixed, warped, window=9):
    # An independent implementation with convolutions (the library uses banded matrix products).
    nd = fixed.dim() - 2
    conv = getattr(F, f"conv{nd}d")
    k = torch.ones(1, 1, *[window] * nd, dtype=fixed.dtype)
    n = window ** nd
    s = [conv(x, k, padding=window // 2) for x in (fixed, warped, fixed * fixed, warped * warped,
                                                   fixed * warped)]
    cross = s[4] - s[0] * s[1] / n
    var_f, var_w = s[2] - s[0] ** 2 / n, s[3] - s[1] ** 2 / n
    return -(cross ** 2 / (var_f * var_w + 1e-5)).mean()


def numpy_dice(a, b, labels):
    out = []
    for k in labels:
        total = (a == k).sum() + (b == k).sum()
        out.append(2 * ((a == k) & (b == k)).sum() / total if total else np.nan)
    return np.array(out)


def not_written(*args):
    raise NotImplementedError


def gradient_jacobian(disp):
    # Written out: J = I + grad u from torch.gradient, then its determinant.
    nd = disp.shape[1]
    J = torch.stack(torch.gradient(disp, dim=tuple(range(2, 2 + nd))), dim=2)
    J = J + torch.eye(nd, dtype=disp.dtype).view(1, nd, nd, *[1] * nd)
    return torch.linalg.det(J.movedim((1, 2), (-2, -1)))


def loop_windows(x, window):
    # Written out with loops: every item, every window in row-major order, its tokens row-major.
    B, *sizes, C = x.shape
    starts = torch.cartesian_prod(*[torch.arange(0, n, window) for n in sizes]).reshape(-1, len(sizes))
    offsets = torch.cartesian_prod(*[torch.arange(window)] * len(sizes)).reshape(-1, len(sizes))
    return torch.stack([torch.stack([x[(b, *(s + o).tolist())] for o in offsets])
                        for b in range(B) for s in starts])


def svd_pca(fields, k):
    # Written out: the SVD of the centred (n, D) matrix; variances S**2 / (n - 1).
    x = fields.double().reshape(len(fields), -1)
    mean = x.mean(0, keepdim=True)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    shape = fields.shape[1:]
    return mean.reshape(1, *shape), vt[:k].reshape(k, *shape), s[:k] ** 2 / (len(fields) - 1)


RIGHT = {
    "dice": numpy_dice,
    "ncc": box_ncc,
    "jacobian": gradient_jacobian,
    "compose": lambda u1, u2: u2 + spatial.warp(u1, u2, padding="border"),
    "tre": lambda fp, mp, u: (spatial.warp_points(fp, u) - mp).norm(dim=-1),
    "windows": loop_windows,
    "pca": svd_pca,
}

WRONG = {  # a typical mistake, and words the feedback must contain
    "dice": (lambda a, b, labels: np.nan_to_num(numpy_dice(a, b, labels)), "NaN"),
    "ncc": (lambda f, w: -box_ncc(f, w), "NEGATIVE"),
    "jacobian": (lambda u: gradient_jacobian(u) - 1, "identity"),
    "compose": (lambda u1, u2: u2 + spatial.warp(u1, u2), "border"),
    "tre": (lambda fp, mp, u: (fp - mp).norm(dim=-1), "p + u(p)"),
    "windows": (lambda x, w: x.reshape(-1, w ** (x.dim() - 2), x.shape[-1]), "permute"),
    "pca": (lambda f, k: (lambda m, e, v: (m, e, v * (len(f) - 1) / len(f)))(*svd_pca(f, k)), "n - 1"),
}


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_right_answer_passes(name):
    result = exercises.check(name, RIGHT[name], quiet=True)
    assert result.status == "passed", result.message


@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_answer_fails_with_actionable_feedback(name):
    fn, words = WRONG[name]
    result = exercises.check(name, fn, quiet=True)
    assert result.status == "failed"
    assert words in result.message, result.message
    assert "expected" in result.message and "got" in result.message, result.message


DELEGATING = {  # answers that hand the exercise back to the library, by every route a student might take
    "dice": [lambda a, b, labels: regedu.metrics.dice(a, b, labels).per_label,
             lambda a, b, labels: imported_dice(a, b, labels).per_label],
    "ncc": [lambda f, w: regedu.losses.ncc_local(f, w),
            lambda f, w: regedu.losses.NCC(window=9)(f, w),          # the module reaches the same kernel
            lambda f, w: regedu.losses.ncc_reference(f, w)],
    "jacobian": [regedu.metrics.jacobian_determinant,
                 lambda u: regedu.spatial.jacobian_determinant(u.clone())],
    "compose": [lambda u1, u2: regedu.spatial.compose(u1, u2), imported_compose],
    "tre": [lambda fp, mp, u: regedu.metrics.tre(fp, mp, u),
            lambda fp, mp, u: regedu.metrics.tre(fp, mp, u).numpy()],
    "windows": [lambda x, w: regedu.nets.transmorph.window_partition(x, w),
                lambda x, w: regedu.nets.transmorph.window_partition(x.clone(), w).clone()],
    "pca": [lambda f, k: (lambda m: (m.mean, m.modes, m.variances))(regedu.augment.fit_deformation_model(f, modes=k))],
}
LIBRARY_NAME = {"dice": "regedu.metrics.dice", "ncc": "regedu.losses.ncc_", "jacobian": "jacobian_determinant",
                "compose": "regedu.spatial.compose", "tre": "regedu.metrics.tre",
                "windows": "regedu.nets.transmorph.window_partition",
                "pca": "regedu.augment.fit_deformation_model"}


@pytest.mark.parametrize("name, i", [(n, i) for n in sorted(DELEGATING) for i in range(len(DELEGATING[n]))])
def test_answer_that_calls_the_library_implementation_fails(name, i):
    result = exercises.check(name, DELEGATING[name][i], quiet=True)
    assert result.status == "failed", result.message
    assert "your function calls" in result.message and LIBRARY_NAME[name] in result.message, result.message
    assert "the library's own implementation" in result.message, result.message


def test_delegation_is_reported_even_when_the_answer_then_crashes():
    r = exercises.check("dice", lambda a, b, labels: regedu.metrics.dice(a, b, labels).no_such_field, quiet=True)
    assert r.status == "failed" and "regedu.metrics.dice" in r.message and "AttributeError" not in r.message


def test_only_the_exercise_s_own_implementation_is_refused():
    before = sys.getprofile()
    # compose's and tre's right answers use the suggested warp and warp_points, and the checks
    # themselves call the library to get the expected values: all allowed.
    assert exercises.check("compose", RIGHT["compose"], quiet=True).passed
    assert exercises.check("tre", RIGHT["tre"], quiet=True).passed
    # Another exercise's implementation is a helper here (compose with the zero field is u).
    assert exercises.check("tre", lambda fp, mp, u: RIGHT["tre"](fp, mp, spatial.compose(u, 0 * u)),
                           quiet=True).passed
    assert sys.getprofile() is before, "the check must hand the profiler back"


@pytest.mark.parametrize("name", sorted(exercises.EXERCISES))
def test_unfinished_is_not_done_and_never_raises(name):
    assert exercises.check(name, None, quiet=True).status == "not done yet"
    if name != "sweep":
        r = exercises.check(name, not_written, quiet=True)
        assert r.status == "not done yet" and "NotImplementedError" in r.message
        assert exercises.check(name, lambda *a: None, quiet=True).status == "not done yet"


def test_crash_in_student_code_is_feedback():
    r = exercises.check("jacobian", lambda u: u.no_such_method(), quiet=True)
    assert r.status == "failed" and "AttributeError" in r.message and "zero field" in r.message


def test_sweep_checks_the_trade_off():
    good = {0.0: dict(similarity=-0.8, roughness=0.5, folding=1.0),
            1.0: dict(similarity=-0.7, roughness=0.05, folding=0.0),
            10.0: dict(similarity=-0.5, roughness=0.001, folding=0.0)}
    assert exercises.check("sweep", good, quiet=True).passed
    assert exercises.check("sweep", lambda: good, quiet=True).passed
    backwards = {w: dict(row, roughness=1 / (1 + row["roughness"])) for w, row in good.items()}
    r = exercises.check("sweep", backwards, quiet=True)
    assert r.status == "failed" and "smoother" in r.message
    r = exercises.check("sweep", {0: good[0.0], 1: good[1.0]}, quiet=True)
    assert r.status == "failed" and "at least 3" in r.message
    assert exercises.check("sweep", {}, quiet=True).status == "not done yet"


def test_network_check_accepts_a_change_and_rejects_the_default():
    small = lambda: nets.create("unet", spatial_dims=2, encoder=(8, 16, 16), decoder=(16, 16, 16, 8))
    r = exercises.check("network", small, quiet=True)
    assert r.passed, r.message
    r = exercises.check("network", lambda: nets.create("unet", spatial_dims=2), quiet=True)
    assert r.status == "failed" and "default" in r.message
    r = exercises.check("network", lambda: torch.nn.Conv2d(2, 2, 3), quiet=True)
    assert r.status == "failed"


def test_report_and_all_passed(capsys):
    for name, fn in RIGHT.items():
        exercises.check(name, fn, quiet=True)
    assert not exercises.all_passed()
    status = exercises.report()
    assert status["dice"] == "passed" and status["network"] == "not checked"
    assert f"{len(RIGHT)} of {len(exercises.EXERCISES)} exercises passed" in capsys.readouterr().out


def test_unknown_exercise_is_an_error():
    with pytest.raises(ValueError, match="ncc"):
        exercises.check("nccc", box_ncc)
