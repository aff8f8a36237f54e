"""Automatic checks for the homework (notebook 12).

Each exercise compares the student's answer with regedu's own implementation
on a known case and on random inputs, and says what to fix::

    from regedu import exercises
    exercises.check("ncc", my_local_ncc)      # prints feedback, returns a CheckResult
    exercises.report()                        # one line per exercise

An answer that is not written yet (its function raises ``NotImplementedError``
or returns ``None``, or the answer itself is ``None``) is reported as
"not done yet": :func:`check` never raises, so a half-finished notebook still
runs from top to bottom.

An answer to an exercise that asks for an implementation (``dice``, ``ncc``,
``jacobian``, ``compose``, ``tre``, ``windows``, ``pca``) must not call regedu's own implementation of
it (the function the check compares with): such an answer fails with a message
that names the function it called. Helpers the exercise suggests
(``regedu.spatial.warp``, ``regedu.spatial.warp_points``) remain allowed.

Exercises (:data:`EXERCISES`):

- ``dice``: Dice per label, background excluded, NaN for absent labels;
- ``ncc``: local normalised cross-correlation, as :func:`regedu.losses.ncc_local`;
- ``jacobian``: determinant of the Jacobian of ``x + u(x)``, as
  :func:`regedu.metrics.jacobian_determinant`;
- ``compose``: composition of two displacement fields, as :func:`regedu.spatial.compose`;
- ``tre``: target registration error of landmarks, as :func:`regedu.metrics.tre`;
- ``windows``: a Swin transformer's window partition of a token map, as
  :func:`regedu.nets.transmorph.window_partition` (notebook 17);
- ``pca``: a statistical deformation model (mean, modes, variances of a set of
  fields), as :func:`regedu.augment.fit_deformation_model` (notebook 15);
- ``sweep``: a regularisation sweep, checked for the trade-off it must show;
- ``network``: a changed registration network, checked for the model contract and
  that it learns.

Convention: the same as the library's (docs/conventions.md, "Conventions"): displacements
``(B, ndim, *spatial)`` in voxels, channel ``k`` along axis ``k``; warping
pulls, ``warped(x) = moving(x + u(x))``; points ``(N, ndim)`` in voxel
coordinates, tensor-axis order.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import augment, losses, metrics, spatial
from .nets import transmorph

__all__ = ["check", "report", "reset", "all_passed", "CheckResult", "Exercise", "EXERCISES",
           "NotDone"]

PASSED, FAILED, NOT_DONE = "passed", "failed", "not done yet"


class NotDone(Exception):
    """The answer is not written yet (raised internally; reported as "not done yet")."""


class _Fail(Exception):
    """A check failed; the message says which input, expected vs got, and a hint."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one :func:`check`.

    Attributes
    ----------
    name : str
        The exercise.
    status : {"passed", "failed", "not done yet"}
    message : str
        Feedback: which input failed, what was expected and what came, a hint.
    """

    name: str
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def __str__(self) -> str:
        mark = {PASSED: "[passed]", FAILED: "[FAILED]", NOT_DONE: "[not done yet]"}[self.status]
        return f"{mark} {self.name}: {self.message}"


@dataclass(frozen=True)
class Exercise:
    """One exercise: a title, what to write, and the function that checks it."""

    name: str
    title: str
    task: str
    checker: Callable


# ----------------------------------------------------------------------------- helpers

# The library's own implementation of each exercise that asks the student to
# write it. The checks compare the answer with these functions, so an answer that
# calls one of them passes without teaching anything; _call refuses it.
# Why watch the calls (sys.setprofile) instead of patching the module attribute
# or reading the answer's code: a patched ``regedu.metrics.dice`` is not what a
# student's ``from regedu.metrics import dice`` (done before the check) refers
# to, and the names in a code object miss aliases, helpers and classes that
# reach the implementation (``losses.NCC()(f, w)`` calls ``ncc_local``). Every
# route ends in the same code objects, and the profiler sees each call of them
# while the answer runs, and only then (the checks' own calls are not watched).
# The helpers the exercises suggest (``warp``, ``warp_points``,
# ``torch.gradient``) stay allowed: only these implementations are refused.
def _implementations() -> dict[str, list]:
    return {
        "dice": [("regedu.metrics.dice", metrics.dice)],
        "ncc": [("regedu.losses.ncc_local", losses.ncc_local),
                ("regedu.losses.ncc_reference", losses.ncc_reference),
                # its kernel, reached by losses.NCC and every other route to the fast path
                ("regedu.losses.ncc_local", losses._LocalNCCMap.forward)],
        "jacobian": [("regedu.metrics.jacobian_determinant", spatial.jacobian_determinant)],
        "compose": [("regedu.spatial.compose", spatial.compose)],
        "tre": [("regedu.metrics.tre", metrics.tre)],
        "windows": [("regedu.nets.transmorph.window_partition", transmorph.window_partition)],
        "pca": [("regedu.augment.fit_deformation_model", augment.fit_deformation_model)],
    }


_FORBIDDEN: dict = {}      # code object -> public name, for the exercise being checked


def _watching(fn, args, reached: list):
    """``fn(*args)``; appends to ``reached`` the forbidden implementations it called."""
    if not _FORBIDDEN:
        return fn(*args)

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in _FORBIDDEN and _FORBIDDEN[frame.f_code] not in reached:
            reached.append(_FORBIDDEN[frame.f_code])

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        return fn(*args)
    finally:
        sys.setprofile(previous)


def _delegation(reached: list[str], what: str) -> _Fail:
    return _Fail(f"your function calls {', '.join(reached)} (seen on {what}): that is the library's own "
                 f"implementation, the one this exercise asks you to write and the check compares "
                 f"with, so calling it proves nothing. Expected your own code, got a call to "
                 f"regedu's. Hint: write it with numpy/torch operations")


def _call(fn, *args, what: str):
    """Call the student's function; translate 'not written yet', delegation and crashes into feedback."""
    reached: list[str] = []
    try:
        out = _watching(fn, args, reached)
    except NotImplementedError:
        raise NotDone("the function still raises NotImplementedError: replace that line "
                      "with your code") from None
    except Exception as e:  # any error in student code is feedback, not a crash
        if reached:         # the delegation is the thing to fix, even if it then crashed
            raise _delegation(reached, what) from None
        raise _Fail(f"on {what} your function raised {type(e).__name__}: {e}") from None
    if reached:
        raise _delegation(reached, what)
    if out is None:
        raise NotDone(f"the function returned None on {what}: finish it and `return` the result")
    return out


def _as_float_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif isinstance(x, (float, int, np.floating, np.integer)):
        x = torch.tensor(float(x))
    if not isinstance(x, torch.Tensor):
        raise _Fail(f"on {what} expected a torch.Tensor (or numpy array), got a {type(x).__name__}")
    return x.detach().to(torch.float64).cpu()


def _compare(got, expected: torch.Tensor, what: str, *, atol: float, rtol: float = 1e-4,
             hint: str = "") -> None:
    got = _as_float_tensor(got, what)
    expected = expected.detach().to(torch.float64).cpu()
    if got.shape != expected.shape:
        if got.numel() == expected.numel():
            got = got.reshape(expected.shape)
        else:
            raise _Fail(f"on {what} expected shape {tuple(expected.shape)}, got "
                        f"{tuple(got.shape)}" + (f". Hint: {hint}" if hint else ""))
    nan_e, nan_g = torch.isnan(expected), torch.isnan(got)
    if not torch.equal(nan_e, nan_g):
        raise _Fail(f"on {what} NaN where expected {int(nan_e.sum())} NaN value(s), got "
                    f"{int(nan_g.sum())}" + (f". Hint: {hint}" if hint else ""))
    diff = (got - expected).abs()[~nan_e]
    bound = atol + rtol * expected.abs()[~nan_e]
    if diff.numel() and bool((diff > bound).any()):
        i = int(torch.argmax(diff - bound))
        flat_e, flat_g = expected[~nan_e], got[~nan_e]
        raise _Fail(f"on {what} values differ: expected {float(flat_e[i]):.6g}, got "
                    f"{float(flat_g[i]):.6g} (largest error {float(diff.max()):.3g}, "
                    f"tolerance {atol:g})" + (f". Hint: {hint}" if hint else ""))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the checks

def _check_dice(fn) -> str:
    a = np.array([[0, 1, 1, 2], [2, 2, 3, 0]])
    b = np.array([[0, 1, 2, 2], [2, 2, 3, 3]])
    labels = [1, 2, 3, 4]
    expected = torch.from_numpy(metrics.dice(a, b, labels).per_label)
    _compare(_call(fn, a, b, labels, what="a known 2x4 case"), expected,
             "a known 2x4 case (labels [1, 2, 3, 4]; label 4 is in neither map)", atol=1e-6,
             hint="Dice = 2|A and B| / (|A| + |B|); a label absent from both maps has no overlap "
                  "to measure: return NaN for it, not 0 or 1")
    rng = np.random.default_rng(0)
    for trial in range(3):
        a = rng.integers(0, 5, (6, 7, 8))
        b = np.where(rng.random(a.shape) < 0.7, a, rng.integers(0, 5, a.shape))
        expected = torch.from_numpy(metrics.dice(a, b, [1, 2, 3, 4]).per_label)
        _compare(_call(fn, a, b, [1, 2, 3, 4], what=f"random 3D label maps #{trial}"), expected,
                 f"random 3D label maps #{trial}", atol=1e-6,
                 hint="count voxels of each label in a, in b and in both")
    return "Dice matches regedu.metrics.dice on a known case and 3 random label maps."


def _check_ncc(fn) -> str:
    g = _generator(1)
    image = torch.rand(1, 1, 24, 28, generator=g)
    expected = losses.ncc_local(image, image, window=9)
    got = _call(fn, image, image, what="two identical 24x28 images")
    _compare(got, expected, "two identical 24x28 images (a perfect match)", atol=1e-3,
             hint="return the NEGATIVE mean of cc = cross^2 / (var_f * var_w + eps), so that a "
                  "perfect match gives about -1 (lower is better, as a loss)")
    for what, shape in (("random 2D images 20x26", (1, 1, 20, 26)),
                        ("random 3D volumes 10x12x14", (1, 1, 10, 12, 14))):
        f = torch.rand(shape, generator=g)
        w = 0.6 * f + 0.4 * torch.rand(shape, generator=g)
        expected = losses.ncc_local(f, w, window=9)
        _compare(_call(fn, f, w, what=what), expected, what, atol=2e-4,
                 hint="sum over each 9-voxel window with zero padding (a convolution with a "
                      "box of ones, padding=window // 2), then cross = S_fw - S_f S_w / n and "
                      "var = S_ff - S_f^2 / n with n = window**ndim; works in 2D and 3D?")
    w = 2.0 * f
    _compare(_call(fn, f, w, what="a volume and twice its intensity"), losses.ncc_local(f, w, window=9),
             "a volume and twice its intensity (NCC ignores contrast scaling)", atol=2e-4,
             hint="local NCC must not change when one image is multiplied by a constant")
    return "local NCC matches regedu.losses.ncc_local in 2D and 3D, and ignores contrast scaling."


def _check_jacobian(fn) -> str:
    for shape in ((12, 14), (8, 9, 10)):
        zero = torch.zeros(1, len(shape), *shape)
        _compare(_call(fn, zero, what=f"the zero field {shape}"), torch.ones(1, *shape),
                 f"the zero field {shape} (identity: det J = 1 everywhere)", atol=1e-6,
                 hint="J = I + grad u: add the identity matrix to the derivatives of u")
    grid = spatial.identity_grid((12, 14))
    scale = 0.1 * grid                       # u = 0.1 x: phi = 1.1 x, det = 1.21 everywhere
    _compare(_call(fn, scale, what="u(x) = 0.1 x in 2D"), torch.full((1, 12, 14), 1.21),
             "u(x) = 0.1 x in 2D (a uniform 10% stretch: det = 1.1^2 = 1.21)", atol=1e-4,
             hint="derivatives are per voxel (spacing 1); det of [[1.1, 0], [0, 1.1]]")
    for seed, shape in ((2, (16, 18)), (3, (10, 12, 14))):
        u = spatial.random_field(shape, 1.5, seed=seed)
        _compare(_call(fn, u, what=f"a random smooth field {shape}"), metrics.jacobian_determinant(u),
                 f"a random smooth field {shape}", atol=1e-4,
                 hint="central differences inside, one-sided at the borders (torch.gradient "
                      "does both); entry (i, j) of J is d phi_i / d x_j, channel i along axis i")
    return "det J matches regedu.metrics.jacobian_determinant in 2D and 3D (identity, stretch, random)."


def _check_compose(fn) -> str:
    shape = (16, 20)
    inside = (Ellipsis, slice(4, -4), slice(4, -4))
    t1 = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, *shape).clone()
    t2 = torch.tensor([0.5, 3.0]).view(1, 2, 1, 1).expand(1, 2, *shape).clone()
    cases = [("two translations (2, -1) and (0.5, 3): the composition is their sum (2.5, 2)",
              t1, t2, t1 + t2, inside)]
    for seed, shp in ((4, (20, 24)), (5, (12, 14, 16))):
        u1, u2 = spatial.random_field(shp, 1.0, seed=seed), spatial.random_field(shp, 1.0, seed=seed + 100)
        cases.append((f"random smooth fields {shp}", u1, u2, spatial.compose(u1, u2),
                      (Ellipsis, *[slice(4, -4)] * len(shp))))
    answers = []
    for what, u1, u2, expected, region in cases:
        got = _as_float_tensor(_call(fn, u1, u2, what=what), what)
        answers.append(got)
        _compare(got[region] if got.shape == expected.shape else got, expected[region],
                 what + " (inside the image)", atol=1e-3,
                 hint="compose(u1, u2)(x) = u2(x) + u1(x + u2(x)): warp u1 by u2 (bilinear, "
                      "warp(u1, u2)) and add u2; phi1 acts first, then phi2")
    for (what, _, _, expected, _), got in zip(cases, answers):
        _compare(got, expected, what + " (at the border)", atol=1e-3,
                 hint="right inside, wrong at the border: a displacement should be extended at "
                      "the edge, not read as 0 outside the image: warp(u1, u2, padding='border')")
    return "compose matches regedu.spatial.compose (translations add; random fields in 2D and 3D)."


def _check_tre(fn) -> str:
    shape = (32, 40)
    fixed_points = torch.tensor([[5.0, 6.0], [10.5, 30.0], [20.0, 12.25], [31.0, 39.0]])
    shift = torch.tensor([2.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, *shape).clone()
    moving_points = fixed_points + torch.tensor([2.0, 1.0])   # error (0, 4): TRE 4 everywhere
    _compare(_call(fn, fixed_points, moving_points, shift, what="a translation by (2, -3)"),
             torch.full((4,), 4.0), "a translation by (2, -3) with the truth at (2, +1): TRE = 4",
             atol=1e-4, hint="a fixed point p lands at p + u(p) in the moving image; TRE is the "
                             "distance from there to the moving point")
    g = _generator(6)
    for seed in (7, 8):
        u = spatial.random_field(shape, 3.0, seed=seed)
        fp = torch.rand(10, 2, generator=g) * torch.tensor([shape[0] - 1.0, shape[1] - 1.0])
        mp = fp + torch.randn(10, 2, generator=g) * 3
        _compare(_call(fn, fp, mp, u, what=f"a random field (seed {seed})"), metrics.tre(fp, mp, u),
                 f"a random smooth field and 10 random non-integer points (seed {seed})", atol=1e-3,
                 hint="points fall between pixels: interpolate u bilinearly at each point "
                      "(regedu.spatial.warp_points does it), and keep (row, col) order")
    return "TRE matches regedu.metrics.tre (known translation; random fields, points between pixels)."


def _check_windows(fn) -> str:
    known = torch.arange(16.0).view(1, 4, 4, 1)              # token (i, j) holds 4 i + j
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15.0]])[..., None]
    _compare(_call(fn, known, 2, what="a 4x4 map of numbered tokens, windows of 2"), expected,
             "a 4x4 map whose token (i, j) holds 4 i + j, windows of 2 (expected the four 2x2 "
             "blocks, top-left, top-right, bottom-left, bottom-right)", atol=0,
             hint="view (B, H, W, C) as (B, H/w, w, W/w, w, C), bring the two window-grid axes "
                  "before the two in-window axes (permute), then reshape to (-1, w*w, C)")
    g = _generator(9)
    for what, shape, window in (("a random 2D map (2, 8, 12, 3), windows of 4", (2, 8, 12, 3), 4),
                                ("a random 3D map (2, 4, 6, 8, 5), windows of 2", (2, 4, 6, 8, 5), 2)):
        x = torch.rand(shape, generator=g)
        _compare(_call(fn, x, window, what=what), transmorph.window_partition(x, window), what, atol=0,
                 hint="every item of the batch, then every window in row-major order; "
                      "the same code should work for 2 and 3 spatial axes")
    return "window_partition matches regedu.nets.transmorph.window_partition in 2D and 3D."


def _check_pca(fn) -> str:
    g = _generator(10)
    # Two known orthonormal modes: fields a u1 + b u2, the sample variances of a and b are 4 and 1.
    u1 = torch.zeros(2, 6, 8)
    u1[0] = 1 / math.sqrt(48)                                 # a uniform shift along axis 0, unit norm
    u2 = torch.zeros(2, 6, 8)
    u2[1, :, :4], u2[1, :, 4:] = 1 / math.sqrt(48), -1 / math.sqrt(48)   # a shear along axis 1, unit norm
    a = torch.tensor([2.0, -2.0, 2.0, -2.0, 0.0])
    b = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])
    known = (a[:, None, None, None] * u1 + b[:, None, None, None] * u2)
    cases = [("5 fields built from two known modes (variances 4 and 1)", known, 2)]
    for trial, shape in enumerate(((10, 12), (6, 8, 10))):
        base = spatial.random_field(shape, 2.0, seed=20 + trial)
        fields = base + 0.5 * torch.randn(7, len(shape), *shape, generator=g) \
            + torch.randn(7, 1, *[1] * len(shape), generator=g) * spatial.random_field(shape, 1.0, seed=40 + trial)
        cases.append((f"7 random fields {shape}", fields, 3))
    for what, fields, k in cases:
        expected = augment.fit_deformation_model(fields, modes=k)
        got = _call(fn, fields, k, what=what)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise _Fail(f"on {what} expected a tuple (mean, modes, variances), got {type(got).__name__}")
        mean, modes, variances = (_as_float_tensor(x, what) for x in got)
        _compare(mean, expected.mean, what + ": the mean field", atol=1e-4,
                 hint="the mean over the fields, shape (1, ndim, *spatial)")
        _compare(variances, expected.variances, what + ": the variances", atol=1e-4, rtol=1e-3,
                 hint="the sample covariance's eigenvalues, largest first: S_i**2 / (n - 1) from the SVD "
                      "of the centred (n, D) matrix (n - 1, not n: a sample variance)")
        if modes.shape != expected.modes.shape:
            raise _Fail(f"on {what} expected modes of shape {tuple(expected.modes.shape)}, got {tuple(modes.shape)}")
        alignment = (modes.reshape(k, -1) * expected.modes.double().reshape(k, -1)).sum(1).abs()
        if bool((alignment < 1 - 1e-3).any()):
            raise _Fail(f"on {what} the modes differ: expected unit vectors along the principal directions "
                        f"(up to sign), got |cosine| {[round(float(c), 4) for c in alignment]} with the "
                        f"expected ones. Hint: the rows of V^T of the SVD, each reshaped to (ndim, *spatial)")
    return "mean, modes (up to sign) and variances match regedu.augment.fit_deformation_model in 2D and 3D."


def _check_sweep(results) -> str:
    if results is None:
        raise NotDone("no results yet: fill the dict {weight: {'similarity', 'roughness', "
                      "'folding'}} by running your sweep")
    if callable(results):
        results = _call(results, what="your sweep (called without arguments)")
    if not isinstance(results, dict):
        raise _Fail(f"expected a dict {{weight: {{'similarity': ..., 'roughness': ..., "
                    f"'folding': ...}}}}, got a {type(results).__name__}")
    if not results:
        raise NotDone("the results dict is empty: run the sweep to fill it")
    weights = sorted(results)
    if len(weights) < 3:
        raise _Fail(f"expected at least 3 regularisation weights, got {weights}; sweep e.g. "
                    f"0, 0.1, 1, 10")
    keys = ("similarity", "roughness", "folding")
    table = {}
    for w in weights:
        row = results[w]
        if not isinstance(row, dict) or any(k not in row for k in keys):
            raise _Fail(f"results[{w!r}]: expected a dict with keys {keys}, got {row!r:.120}")
        try:
            table[w] = {k: float(row[k]) for k in keys}
        except (TypeError, ValueError):
            raise _Fail(f"results[{w!r}]: expected numbers for {keys}, got {row!r:.120}") from None
        bad = [k for k, v in table[w].items() if not math.isfinite(v)]
        if bad:
            raise _Fail(f"results[{w!r}]: {bad} not finite: {table[w]}; did the optimisation diverge?")
    lo, hi = table[weights[0]], table[weights[-1]]
    if not hi["roughness"] < lo["roughness"]:
        raise _Fail(f"the field should get smoother as the weight grows: roughness "
                    f"{lo['roughness']:.4g} at weight {weights[0]} vs {hi['roughness']:.4g} at "
                    f"{weights[-1]}. Hint: is roughness the diffusion term of the field (mean "
                    f"squared gradient), measured on the result of each run?")
    best = min(weights[:-1], key=lambda w: table[w]["similarity"])
    if not hi["similarity"] > table[best]["similarity"]:
        raise _Fail(f"the most regularised field should fit worse than the best of the others: "
                    f"similarity loss {table[best]['similarity']:.4g} at weight {best} vs "
                    f"{hi['similarity']:.4g} at {weights[-1]}. Hint: report the similarity LOSS "
                    f"(lower is better) of the warped image, without the regulariser, and make "
                    f"the largest weight large enough to matter")
    if hi["folding"] > lo["folding"] + 1e-9:
        raise _Fail(f"folding should not grow with regularisation: {lo['folding']:.3g}% at weight "
                    f"{weights[0]} vs {hi['folding']:.3g}% at {weights[-1]}")
    return (f"the sweep shows the trade-off: from weight {weights[0]} to {weights[-1]} roughness "
            f"{lo['roughness']:.3g} -> {hi['roughness']:.3g} and folding {lo['folding']:.2f}% -> "
            f"{hi['folding']:.2f}%, while the similarity loss goes from its best, "
            f"{table[best]['similarity']:.3g} (weight {best}), to {hi['similarity']:.3g}.")


_NETWORK_STEPS = 60


def _blob_pair(size: int = 32, shift: float = 2.0):
    """A smooth 2D image and the same image shifted by ``shift`` pixels along both axes."""
    r, c = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                          torch.arange(size, dtype=torch.float32), indexing="ij")

    def blobs(dr):
        out = torch.zeros(size, size)
        for cr, cc, s in ((0.35, 0.3, 3.5), (0.6, 0.65, 5.0), (0.3, 0.7, 3.0)):
            out += torch.exp(-((r - cr * size - dr) ** 2 + (c - cc * size - dr) ** 2) / (2 * s * s))
        return out[None, None]

    return blobs(shift), blobs(0.0)


def _check_network(fn) -> str:
    import torch.nn as nn
    from .nets import RegistrationOutput, create
    model = _call(fn, what="build_model()")
    if not isinstance(model, nn.Module):
        raise _Fail(f"build_model() should return an nn.Module, got a {type(model).__name__}")
    moving = torch.rand(1, 1, 37, 45, generator=_generator(9))
    fixed = torch.rand(1, 1, 37, 45, generator=_generator(10))
    try:
        with torch.no_grad():
            out = model(moving, fixed)
    except Exception as e:
        raise _Fail(f"model(moving, fixed) on a 2D pair of size 37x45 raised {type(e).__name__}: "
                    f"{e}. Hint: the course's models are 2D here (spatial_dims=2) and work for "
                    f"any size (pad inside, crop back)") from None
    if not isinstance(out, RegistrationOutput):
        raise _Fail(f"the model should return a regedu.nets.RegistrationOutput, got a "
                    f"{type(out).__name__}. Hint: wrap your backbone in regedu.nets.Registration")
    if tuple(out.disp.shape) != (1, 2, 37, 45):
        raise _Fail(f"on a 37x45 pair expected disp of shape (1, 2, 37, 45), got "
                    f"{tuple(out.disp.shape)}")
    _compare(out.warped, spatial.warp(moving, out.disp), "the output's warped image", atol=1e-4,
             hint="warped must be warp(moving, disp)")
    if float(out.disp.abs().max()) > 0.5:
        raise _Fail(f"an untrained model should start near the identity, got |u| up to "
                    f"{float(out.disp.abs().max()):.3g} px. Hint: initialise the flow head with "
                    f"tiny weights (regedu.nets.Registration does)")
    default = sum(p.numel() for p in create("unet", spatial_dims=2).parameters())
    mine = sum(p.numel() for p in model.parameters())
    if mine == default and getattr(model, "config", {}).get("name") == "unet" and \
            not model.config.get("integrate_steps"):
        raise _Fail("this is the default VoxelMorph U-Net: make one change (the backbone, the "
                    "channels, the depth, or a diffeomorphic head)")
    moving, fixed = _blob_pair()
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with torch.no_grad():
        before = float(losses.mse(fixed, model(moving, fixed).warped))
    after, steps = before, 0
    # Stop as soon as the model has shown it learns: the check stays quick.
    while steps < _NETWORK_STEPS and after >= 0.5 * before:
        loss = losses.mse(fixed, model(moving, fixed).warped)
        after = float(loss.detach())
        if after < 0.5 * before:
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
    if not after < 0.5 * before:
        raise _Fail(f"{steps} Adam steps (lr 3e-3) on a pair shifted by 2 px lowered the MSE only "
                    f"from {before:.4g} to {after:.4g} (need < 50%). Hint: does the gradient reach "
                    f"the flow head? Is the receptive field larger than the shift?")
    return (f"the model keeps the contract ({mine:,} parameters vs {default:,} for the default "
            f"U-Net) and learns: MSE {before:.4f} -> {after:.4f} in {steps} steps.")


EXERCISES = {e.name: e for e in [
    Exercise("dice", "Dice per structure",
             "dice(a, b, labels) -> array of one Dice per label (NaN when absent from both)",
             _check_dice),
    Exercise("ncc", "Local normalised cross-correlation",
             "ncc(fixed, warped) -> scalar tensor, -mean local squared correlation, window 9",
             _check_ncc),
    Exercise("jacobian", "Jacobian determinant",
             "jacobian_determinant(disp (B, ndim, *S)) -> det of I + grad u, (B, *S)",
             _check_jacobian),
    Exercise("compose", "Composition of two fields",
             "compose(u1, u2) -> displacement of phi1 o phi2", _check_compose),
    Exercise("tre", "Target registration error",
             "tre(fixed_points (N, 2), moving_points (N, 2), disp (1, 2, H, W)) -> (N,) distances",
             _check_tre),
    Exercise("windows", "Window partition of a transformer",
             "window_partition(x (B, *S, C), window) -> (B * nW, window**nd, C), windows and "
             "tokens in row-major order", _check_windows),
    Exercise("pca", "A statistical deformation model",
             "pca(fields (n, ndim, *S), k) -> (mean (1, ndim, *S), modes (k, ndim, *S), variances (k,))",
             _check_pca),
    Exercise("sweep", "Regularisation sweep",
             "{weight: {'similarity': ..., 'roughness': ..., 'folding': ...}} for >= 3 weights",
             _check_sweep),
    Exercise("network", "A small network change",
             "build_model() -> a 2D registration model that differs from the default U-Net",
             _check_network),
]}

_RESULTS: dict[str, CheckResult] = {}


def check(name: str, answer, *, quiet: bool = False) -> CheckResult:
    """Check an answer to exercise ``name``; print the feedback and return it.

    Parameters
    ----------
    name : str
        One of :data:`EXERCISES` (``"dice"``, ``"ncc"``, ``"jacobian"``,
        ``"compose"``, ``"tre"``, ``"sweep"``, ``"network"``).
    answer : callable or dict
        The student's function (or, for ``"sweep"``, the results dict).
    quiet : bool
        Do not print; only return the result.

    Returns
    -------
    CheckResult
        ``status`` is "passed", "failed" or "not done yet"; never raises for a
        wrong or unfinished answer.

    >>> r = check("jacobian", lambda disp: None, quiet=True)
    >>> r.status
    'not done yet'
    """
    if name not in EXERCISES:
        raise ValueError(f"name: expected one of {', '.join(EXERCISES)}, got {name!r}")
    exercise = EXERCISES[name]
    if answer is None:
        result = CheckResult(name, NOT_DONE, "no answer yet: " + exercise.task)
    else:
        _FORBIDDEN.update({f.__code__: public for public, f in _implementations().get(name, [])})
        try:
            result = CheckResult(name, PASSED, exercise.checker(answer))
        except NotDone as e:
            result = CheckResult(name, NOT_DONE, str(e))
        except _Fail as e:
            result = CheckResult(name, FAILED, str(e))
        finally:
            _FORBIDDEN.clear()
    _RESULTS[name] = result
    if not quiet:
        print(result)
    return result


def reset() -> None:
    """Forget the results recorded by :func:`check` in this session."""
    _RESULTS.clear()


def report(*, quiet: bool = False) -> dict[str, str]:
    """Status of every exercise in this session (``{name: status}``), printed as a table."""
    status = {name: (_RESULTS[name].status if name in _RESULTS else "not checked")
              for name in EXERCISES}
    if not quiet:
        width = max(len(e.title) for e in EXERCISES.values())
        for name, s in status.items():
            print(f"{EXERCISES[name].title:<{width}}  {name:<9} {s}")
        done = sum(s == PASSED for s in status.values())
        print(f"{done} of {len(status)} exercises passed")
    return status


def all_passed() -> bool:
    """Whether every exercise has been checked in this session and passed."""
    return all(name in _RESULTS and _RESULTS[name].passed for name in EXERCISES)
