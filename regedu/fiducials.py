"""Point-based registration: fitting a transform to fiducials, FLE, FRE and TRE.

A *fiducial* is a point located in both images (a marker, a landmark); the
transform is fitted to the fiducial pairs by least squares. Three errors
(Fitzpatrick, West and Maurer, IEEE TMI 17(5), 1998):

* FLE, fiducial localisation error: how far a located fiducial is from where it
  really is (the noise of clicking a point);
* FRE, fiducial registration error: the RMS distance, after the fit, between
  the mapped fiducials and their partners (what the fit minimises, and what
  software reports);
* TRE, target registration error: the distance between the mapped and the
  true position of a *target*, a point that was not used in the fit (what the
  clinician cares about).

For a rigid fit with isotropic FLE, ``<FRE^2> = (1 - 2/N) <FLE^2>`` in 3D
(:func:`expected_fre`), ``<TRE^2>`` grows with the target's distance from the
fiducials' centroid (:func:`expected_tre`), and FRE and TRE are *uncorrelated*
(Fitzpatrick, IEEE TMI 28(8), 2009): a small FRE in one registration says
nothing about its TRE. :func:`simulate` shows all three.

Convention: points are ``(N, ndim)`` arrays in tensor-axis order, in any unit
(voxels, or mm for physical distances); transforms are ``(ndim + 1, ndim + 1)``
homogeneous matrices ``[[A, t], [0, 1]]`` mapping ``x -> A x + t``. Fitted from
fixed points (source) to moving points (target), a matrix is the ``[A | t]`` of
:func:`regedu.spatial.affine_to_displacement` (``center="origin"``), as
docs/conventions.md, "Conventions" maps a fixed point ``p`` to the moving image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_choice, check_finite, check_positive

__all__ = ["fit_rigid", "fit_affine", "apply_transform", "fre", "tre", "expected_fre",
           "expected_tre", "simulate", "FiducialSimulation"]

_KINDS = ("rigid", "affine")


def _points(x, name: str, *, batch: bool = False) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim < 2 or (a.ndim > 2 and not batch) or a.shape[-1] not in (2, 3):
        raise ValueError(f"{name}: expected points of shape (N, 2) or (N, 3)"
                         f"{' (with leading batch axes)' if batch else ''}, got shape {a.shape}")
    return check_finite(a, name)


def _pairs(source, target) -> tuple[np.ndarray, np.ndarray]:
    s, t = _points(source, "source", batch=True), _points(target, "target", batch=True)
    if s.shape[-2:] != t.shape[-2:]:
        raise ValueError(f"source and target: expected the same number of points in the same "
                         f"dimension, got shapes {s.shape} and {t.shape}")
    return s, t


def _check_spread(centred: np.ndarray, needed: int, kind: str) -> None:
    # A rigid fit needs the points to span ndim - 1 directions (not all on one
    # line in 3D), an affine fit all ndim (not all in one plane): otherwise the
    # least-squares transform is not unique.
    sv = np.linalg.svd(centred, compute_uv=False)
    rank = (sv > 1e-9 * np.maximum(sv[..., :1], 1e-300)).sum(-1)
    if np.any(rank < needed):
        d = centred.shape[-1]
        where = {1: "at one point", 2: "on one line", 3: "in one plane"}[needed]
        raise ValueError(f"source: the points lie {where}; a {kind} fit in {d}D needs them to "
                         f"span {needed} direction{'s' if needed > 1 else ''}: add fiducials "
                         f"off that {where.split()[-1]}")


def _homogeneous(A: np.ndarray, t: np.ndarray) -> np.ndarray:
    d = A.shape[-1]
    out = np.zeros(A.shape[:-2] + (d + 1, d + 1))
    out[..., :d, :d], out[..., :d, d], out[..., d, d] = A, t, 1.0
    return out


def fit_rigid(source, target) -> np.ndarray:
    """The rotation and translation that best map ``source`` onto ``target``.

    Minimises ``sum_i |R s_i + t - t_i|^2`` over rotations ``R`` (no reflection)
    and translations ``t``, in closed form: the SVD of the cross-covariance of
    the centred points (Arun, Huang and Blostein, IEEE TPAMI 9(5), 1987, with
    Umeyama's correction against reflections, IEEE TPAMI 13(4), 1991).

    Parameters
    ----------
    source, target : array, shape (..., N, ndim)
        Corresponding points, ndim 2 or 3, N >= ndim; leading axes are a batch
        of independent fits.

    Returns
    -------
    ndarray, shape (..., ndim + 1, ndim + 1): ``[[R, t], [0, 1]]``.

    Convention: see the module docstring (tensor-axis order, ``x -> R x + t``).

    >>> src = np.array([[0., 0.], [1., 0.], [0., 2.]])
    >>> rot90 = np.array([[0., -1.], [1., 0.]])
    >>> fit_rigid(src, src @ rot90.T + [5., 1.]).round(6) + 0.0   # + 0.0: no "-0." 
    array([[ 0., -1.,  5.],
           [ 1.,  0.,  1.],
           [ 0.,  0.,  1.]])
    """
    s, t = _pairs(source, target)
    d = s.shape[-1]
    if s.shape[-2] < d:
        raise ValueError(f"source: a rigid fit in {d}D needs at least {d} points, got {s.shape[-2]}")
    mu_s, mu_t = s.mean(-2, keepdims=True), t.mean(-2, keepdims=True)
    _check_spread(s - mu_s, d - 1, "rigid")
    H = np.swapaxes(s - mu_s, -1, -2) @ (t - mu_t)           # (..., d, d) = sum_i s_i t_i^T
    U, _, Vt = np.linalg.svd(H)
    V = np.swapaxes(Vt, -1, -2)
    # If V U^T is a reflection, flip the axis of the smallest singular value: the
    # best proper rotation (Umeyama 1991).
    sign = np.sign(np.linalg.det(V @ np.swapaxes(U, -1, -2)))
    D = np.broadcast_to(np.eye(d), H.shape).copy()
    D[..., d - 1, d - 1] = np.where(sign == 0, 1.0, sign)
    R = V @ D @ np.swapaxes(U, -1, -2)
    trans = mu_t[..., 0, :] - (R @ mu_s[..., 0, :, None])[..., 0]
    return _homogeneous(R, trans)


def fit_affine(source, target) -> np.ndarray:
    """The affine map ``x -> A x + t`` that best maps ``source`` onto ``target`` (least squares).

    Parameters
    ----------
    source, target : array, shape (..., N, ndim)
        Corresponding points, N >= ndim + 1, not all in one plane (3D) or line (2D).

    Returns
    -------
    ndarray, shape (..., ndim + 1, ndim + 1): ``[[A, t], [0, 1]]``.

    >>> src = np.array([[0., 0.], [1., 0.], [0., 1.], [1., 1.]])
    >>> fit_affine(src, src @ np.array([[2., 0.], [0.5, 1.]]).T + [0., 3.]).round(6) + 0.0
    array([[2. , 0. , 0. ],
           [0.5, 1. , 3. ],
           [0. , 0. , 1. ]])
    """
    s, t = _pairs(source, target)
    d = s.shape[-1]
    if s.shape[-2] < d + 1:
        raise ValueError(f"source: an affine fit in {d}D needs at least {d + 1} points, "
                         f"got {s.shape[-2]}")
    _check_spread(s - s.mean(-2, keepdims=True), d, "affine")
    X = np.concatenate([s, np.ones(s.shape[:-1] + (1,))], -1)   # (..., N, d + 1)
    # Normal equations, batched: (X^T X) P = X^T T; P = [A | t]^T.
    Xt = np.swapaxes(X, -1, -2)
    P = np.linalg.solve(Xt @ X, Xt @ t)
    P = np.swapaxes(P, -1, -2)                                   # (..., d, d + 1)
    return _homogeneous(P[..., :d], P[..., d])


def apply_transform(matrix, points) -> np.ndarray:
    """``A x + t`` for each point: ``(..., N, ndim)`` mapped by ``(..., ndim + 1, ndim + 1)``.

    >>> apply_transform(np.array([[1., 0., 2.], [0., 1., -1.], [0., 0., 1.]]), [[0., 0.]])
    array([[ 2., -1.]])
    """
    m = np.asarray(matrix, dtype=np.float64)
    p = _points(points, "points", batch=True)
    d = p.shape[-1]
    if m.shape[-2:] != (d + 1, d + 1):
        raise ValueError(f"matrix: expected shape (..., {d + 1}, {d + 1}) for {d}D points, "
                         f"got {m.shape}")
    return (p @ np.swapaxes(m[..., :d, :d], -1, -2)) + m[..., None, :d, d]


def fre(source, target, matrix):
    """Fiducial registration error: the RMS of ``|T(s_i) - t_i|`` over the fiducials.

    In the units of the points; lower is better, but see the module docstring:
    a low FRE does not mean a low TRE.

    Returns
    -------
    float, or an array of the batch shape for batched points.

    >>> src = np.array([[0., 0.], [2., 0.], [0., 2.]])
    >>> fre(src, src + [[1., 0.], [-1., 0.], [0., 0.]], np.eye(3))   # sqrt((1 + 1 + 0) / 3)
    0.816496580927726
    """
    s, t = _pairs(source, target)
    r = np.sqrt(np.square(apply_transform(matrix, s) - t).sum(-1).mean(-1))
    return float(r) if r.ndim == 0 else r


def tre(matrix, targets, true_targets) -> np.ndarray:
    """Target registration error per target: ``|T(p) - q|``, ``p`` mapped, ``q`` its true partner.

    Parameters
    ----------
    matrix : array, shape (..., ndim + 1, ndim + 1)
        The fitted transform.
    targets, true_targets : array, shape (..., M, ndim)
        Target points in the source space and where they truly are in the target space.

    Returns
    -------
    ndarray, shape (..., M), in the units of the points; lower is better.

    >>> tre(np.eye(3), [[0., 0.], [3., 4.]], [[0., 0.], [0., 0.]])
    array([0., 5.])
    """
    p, q = _pairs(targets, true_targets)
    return np.sqrt(np.square(apply_transform(matrix, p) - q).sum(-1))


def _parameters(kind: str, d: int) -> int:
    return (d * (d + 1) // 2) if kind == "rigid" else d * (d + 1)


def expected_fre(n: int, fle: float, *, ndim: int = 3, kind: str = "rigid") -> float:
    """Expected RMS FRE for ``n`` fiducials with RMS localisation error ``fle``.

    A least-squares fit of ``K`` parameters to ``n ndim`` noisy coordinates
    leaves ``n ndim - K`` degrees of freedom in the residual, so
    ``<FRE^2> = (1 - K / (n ndim)) <FLE^2>``: ``K = 6`` for a rigid fit in 3D
    gives Fitzpatrick's ``(1 - 2/n)``; rigid 2D ``K = 3``, affine ``ndim (ndim + 1)``.
    Exact for an affine fit (a linear model), first order in FLE for a rigid one.

    Returns the square root, ``sqrt(<FRE^2>)``, in the units of ``fle``.

    >>> round(expected_fre(6, 1.0) ** 2, 4)    # 1 - 2/6
    0.6667
    """
    check_positive(n, "n", integer=True)
    check_positive(fle, "fle")
    check_choice(ndim, (2, 3), "ndim")
    check_choice(kind, _KINDS, "kind")
    K = _parameters(kind, ndim)
    if n * ndim <= K:
        raise ValueError(f"n: a {kind} fit in {ndim}D has {K} parameters; {n} fiducials "
                         f"({n * ndim} coordinates) leave no residual: use more than {K // ndim}")
    return float(fle * np.sqrt(1 - K / (n * ndim)))


def _design(points: np.ndarray, kind: str) -> np.ndarray:
    """Linearised transform at ``points``: ``(N, ndim, K)``, the displacement per parameter.

    Rigid: translation, then small rotations (about the centroid of the points
    the fit used: the caller centres them); affine: translation, then the
    entries of ``A - I``.
    """
    n, d = points.shape
    cols = [np.broadcast_to(np.eye(d), (n, d, d))]
    if kind == "rigid":
        if d == 2:
            cols.append(np.stack([-points[:, 1], points[:, 0]], -1)[:, :, None])
        else:
            # A small rotation w moves p by w x p: columns are e_k x p.
            cols.append(np.stack([np.cross(np.eye(3)[k], points) for k in range(3)], -1))
    else:
        cols.append(np.einsum("ij,nk->nijk", np.eye(d), points).reshape(n, d, d * d))
    return np.concatenate(cols, -1)


def expected_tre(fiducials, targets, fle: float, *, kind: str = "rigid") -> np.ndarray:
    """Expected RMS TRE at each target for fiducials with isotropic RMS localisation error ``fle``.

    The first-order propagation of the localisation noise through the
    least-squares fit: with ``G`` the derivative of the fiducial positions
    with respect to the transform's parameters and ``G_r`` that of the target,
    ``<TRE^2(r)> = sigma^2 trace(G_r (G^T G)^-1 G_r^T)``, ``sigma^2 = FLE^2 / ndim``.
    For a rigid fit in 3D this is Fitzpatrick et al.'s (1998)
    ``<FLE^2> / N (1 + 1/3 sum_k d_k^2 / f_k^2)`` (``d_k``: the target's distance
    from the k-th principal axis of the fiducials, ``f_k``: the fiducials' RMS
    distance from it): TRE is smallest at the centroid and grows away from it.

    Parameters
    ----------
    fiducials : array, shape (N, ndim)
    targets : array, shape (M, ndim)
    fle : float
        RMS length of the localisation error vector.
    kind : {"rigid", "affine"}

    Returns
    -------
    ndarray, shape (M,): ``sqrt(<TRE^2>)`` in the units of the points.

    >>> square = np.array([[0., 0.], [2., 0.], [0., 2.], [2., 2.]])
    >>> expected_tre(square, [[1., 1.]], 1.0).round(4)    # at the centroid: FLE / sqrt(N)
    array([0.5])
    """
    f = _points(fiducials, "fiducials")
    r = _points(targets, "targets")
    check_positive(fle, "fle")
    check_choice(kind, _KINDS, "kind")
    d = f.shape[1]
    if r.shape[1] != d:
        raise ValueError(f"targets: expected {d}D points like the fiducials, got shape {r.shape}")
    centroid = f.mean(0)
    _check_spread(f - centroid, d - 1 if kind == "rigid" else d, kind)
    G = _design(f - centroid, kind).reshape(-1, _parameters(kind, d))
    cov = np.linalg.inv(G.T @ G)
    Gr = _design(r - centroid, kind)                           # (M, d, K)
    var = np.einsum("mik,kl,mil->m", Gr, cov, Gr)
    return np.sqrt(var * fle ** 2 / d)


@dataclass(frozen=True)
class FiducialSimulation:
    """FRE and TRE of many simulated registrations (see :func:`simulate`).

    Attributes
    ----------
    fre : ndarray, shape (trials,)
        RMS FRE of each trial.
    tre : ndarray, shape (trials, M)
        TRE at each target in each trial.
    fle : ndarray, shape (trials,)
        The RMS localisation error that trial actually drew (over its fiducials).
    expected_fre : float
        :func:`expected_fre` for this set-up.
    expected_tre : ndarray, shape (M,)
        :func:`expected_tre` at each target.
    """
    fre: np.ndarray
    tre: np.ndarray
    fle: np.ndarray
    expected_fre: float
    expected_tre: np.ndarray

    def correlation(self) -> np.ndarray:
        """Pearson correlation of FRE and TRE across trials, one per target, ``(M,)``."""
        f = self.fre - self.fre.mean()
        t = self.tre - self.tre.mean(0)
        return (f @ t) / np.sqrt((f @ f) * (t * t).sum(0))


def simulate(fiducials, targets, fle: float, *, trials: int = 2000, kind: str = "rigid",
             seed: int = 0) -> FiducialSimulation:
    """Register noisy fiducials many times and measure FRE and TRE.

    In each trial every fiducial is displaced by isotropic Gaussian noise of RMS
    length ``fle`` (per axis ``fle / sqrt(ndim)``), a transform is fitted from
    the true fiducials to the noisy ones, and the errors are measured: FRE at
    the fiducials, TRE at the ``targets`` (whose true transform is the identity;
    FRE and TRE do not depend on which rigid transform is the true one).

    Parameters
    ----------
    fiducials : array, shape (N, ndim)
    targets : array, shape (M, ndim)
    fle : float
        RMS localisation error. Noise is added to one set of points; for errors
        in both images pass ``sqrt(fle_a^2 + fle_b^2)``.
    trials : int
    kind : {"rigid", "affine"}
    seed : int
        Seed of the noise (numpy's ``default_rng``): the same seed, the same result.

    Returns
    -------
    FiducialSimulation

    >>> fid = np.array([[0., 0., 0.], [40., 0., 0.], [0., 40., 0.], [0., 0., 40.], [30., 30., 30.]])
    >>> sim = simulate(fid, [[10., 10., 10.]], 1.0, trials=4000)
    >>> round(float(np.sqrt((sim.fre ** 2).mean())), 2), round(sim.expected_fre, 2)   # (1 - 2/5)
    (0.77, 0.77)
    """
    f = _points(fiducials, "fiducials")
    r = _points(targets, "targets")
    check_positive(trials, "trials", integer=True)
    check_choice(kind, _KINDS, "kind")
    n, d = f.shape
    expected = expected_fre(n, fle, ndim=d, kind=kind)      # also checks n against the parameters
    expected_t = expected_tre(f, r, fle, kind=kind)
    rng = np.random.default_rng(seed)
    noise = rng.normal(scale=fle / np.sqrt(d), size=(trials, n, d))
    located = f + noise
    fit = fit_rigid if kind == "rigid" else fit_affine
    T = fit(np.broadcast_to(f, located.shape), located)
    trial_fre = fre(np.broadcast_to(f, located.shape), located, T)
    trial_tre = tre(T, np.broadcast_to(r, (trials,) + r.shape), np.broadcast_to(r, (trials,) + r.shape))
    trial_fle = np.sqrt(np.square(noise).sum(-1).mean(-1))
    return FiducialSimulation(trial_fre, trial_tre, trial_fle, expected, expected_t)
