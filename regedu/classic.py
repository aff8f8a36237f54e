"""Classical registration: ANTs Affine and SyN, and instance optimisation in torch.

These are the "traditional iterative" methods the seed papers compare learning
with. Every function returns a displacement in regedu's convention, so the
result plugs into :func:`regedu.spatial.warp`, :mod:`regedu.metrics` and
:func:`regedu.evaluate.evaluate` exactly like a network's prediction.

Convention: a displacement ``u`` is ``(B, ndim, *spatial)``, in voxels of the
fixed image, channel ``k`` along spatial axis ``k`` (tensor-axis order), and
warping pulls: ``warped(x) = moving(x + u(x))`` (docs/conventions.md, "Conventions").

ANTs comes from antspyx, a regedu dependency wherever antspyx has a wheel
(x86-64 Linux and Windows, macOS; Python up to 3.13). Elsewhere
:func:`ants_missing` says so in one line, and the notebooks skip only their
ANTs rows.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import as_tensor, check_choice, check_field, check_finite, check_positive, \
    check_same_shape, check_shape
from .losses import MSE, Diffusion
from .spatial import affine_to_displacement, gaussian_blur, resize_field, warp

__all__ = ["ants_missing", "ants_register", "ants_affine", "ants_syn", "ants_to_displacement",
           "affine_register", "displacement_to_affine",
           "bspline_upsample", "instance_optimisation", "InstanceOptimisationResult",
           "similarity_search", "SYN_SETTINGS"]

#: :func:`ants_syn`'s settings on the course's brain grids (mm -> keyword arguments), chosen
#: on training anatomy only (``python benchmarks/eval_prealign.py --spacing S --anatomy train
#: --select``): at 4 mm, local CC with a short schedule beat antspyx's MI default; at 2 mm
#: the default held. Held-out anatomy and the real scan never chose anything.
SYN_SETTINGS = {2: {}, 4: dict(syn_metric="CC", reg_iterations=(40, 20, 10))}


def _no_ants_here() -> str:
    return (f"antspyx is not installed here ({platform.system()} {platform.machine()}, Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}); regedu installs it wherever it has a wheel "
            f"(x86-64 Linux and Windows, macOS; Python up to 3.13); elsewhere `pip install antspyx` "
            f"builds it from source")


def _import_ants():
    # ITK reads its thread count once, before its first multi-threaded step.
    # Several threads split ANTs' sums differently from run to run, so the same
    # call gave fields differing by hundredths of a voxel (a Dice in the third
    # decimal): one thread, unless the user chose otherwise, gives one answer.
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    try:
        import ants
    except ImportError as err:
        raise ImportError(f"regedu.classic: {_no_ants_here()}") from err
    return ants


@functools.cache
def ants_missing() -> str | None:
    """Why ANTs cannot run here, as one readable line, or ``None`` when it can.

    The notebooks print this line and skip only their ANTs rows.
    """
    try:
        _import_ants()
    except ImportError:
        return f"ANTs rows skipped: {_no_ants_here()}."
    return None


# --------------------------------------------------------------------------- ANTs

def _as_volumes(x, name: str) -> list[np.ndarray]:
    """A bare ``(*spatial)`` array or a ``(B, 1, *spatial)`` batch -> list of float32 arrays."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or torch.Tensor, got a {type(x).__name__}")
    if x.ndim in (2, 3):
        x = x[None, None]
    if x.ndim not in (4, 5) or x.shape[1] != 1:
        raise ValueError(f"{name}: expected a single-channel image, (H, W), (D, H, W), "
                         f"(B, 1, H, W) or (B, 1, D, H, W), got shape {x.shape}; ANTs registers "
                         f"one channel at a time")
    check_finite(torch.from_numpy(np.ascontiguousarray(x)), name)
    return [np.ascontiguousarray(v[0], dtype=np.float32) for v in x]


def ants_to_displacement(transforms, fixed) -> torch.Tensor:
    """Turn ANTs forward transforms into a regedu displacement.

    Parameters
    ----------
    transforms : list of str
        Transform files as ANTs lists them for ``ants.apply_transforms(fixed,
        moving, transforms)``, e.g. ``ants.registration(...)["fwdtransforms"]``.
        They map fixed-space points to moving-space points.
    fixed : ants.ANTsImage
        The fixed image (its grid, origin, spacing and direction). The moving
        image must lie on the same grid (one voxel array shape and header).

    Returns
    -------
    Tensor, shape (1, ndim, *spatial), float32: ``warp(moving, u)`` equals
    ``ants.apply_transforms(fixed, moving, transforms)`` up to interpolation.

    Convention: ANTs composes the transforms into one displacement field in
    physical units (mm, along the image's physical axes, ITK's LPS frame).
    The voxel displacement is ``(direction @ diag(spacing))^-1 @ d``, and axis
    ``k`` of the array ``fixed.numpy()`` is ITK index ``k``, so the result is in
    tensor-axis order already. The sign needs no change: both ANTs and regedu
    describe where a fixed point lands in the moving image.
    """
    ants = _import_ants()
    if not ants.is_image(fixed):
        raise TypeError(f"fixed: expected an ants.ANTsImage, got a {type(fixed).__name__}")
    if isinstance(transforms, str):
        transforms = [transforms]
    with tempfile.TemporaryDirectory(prefix="regedu_ants_") as tmp:
        path = ants.apply_transforms(fixed, fixed, list(transforms),
                                     compose=os.path.join(tmp, "fwd"))
        if path is None:
            raise RuntimeError(f"ANTs could not compose the transforms {transforms} "
                               f"into a displacement field")
        d = ants.image_read(path).numpy()  # (*spatial, ndim), physical units
    ndim = fixed.dimension
    to_voxels = np.linalg.inv(np.asarray(fixed.direction) @ np.diag(fixed.spacing))
    u = np.einsum("kj,...j->k...", to_voxels, d.astype(np.float64))
    return torch.from_numpy(u.astype(np.float32))[None].reshape(1, ndim, *fixed.shape)


@contextlib.contextmanager
def _ants_seed(ants, seed):
    # antspyx reads its seed from a module global (set by set_ants_deterministic,
    # which would also force one thread); set it only for this call.
    # antsRegistration's --random-seed takes "any nonzero int": 0 means "seed
    # from the clock", so passing seed 0 through made every call differ (up to
    # a voxel on a 2 mm brain pair). Shift by one so that every seed >= 0 is fixed.
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed: expected a non-negative integer or None, got {seed!r}")
    old = ants.config._random_seed
    ants.config._random_seed = None if seed is None else int(seed) + 1
    try:
        yield
    finally:
        ants.config._random_seed = old


def ants_register(moving, fixed, transform: str = "SyN", *, spacing=1.0, seed: int | None = 0,
                  **ants_kwargs) -> torch.Tensor:
    """Register ``moving`` to ``fixed`` with ``ants.registration``; return our displacement.

    Parameters
    ----------
    moving, fixed : ndarray or Tensor, shape (*spatial), or (B, 1, *spatial)
        Single-channel 2D or 3D images on the same grid. A batch is registered
        pair by pair.
    transform : str
        ANTs' ``type_of_transform``: "Translation", "Rigid", "Affine", "SyN",
        "SyNCC", "SyNOnly", "ElasticSyN", ... (see ``ants.registration``).
    spacing : float or tuple of float
        Voxel size in mm, so that ANTs' smoothing and step sizes act in mm as
        they would on a real scan; the returned field is in voxels anyway.
    seed : int or None
        Seed of ANTs' random metric sampling; the same seed gives the same
        field (ANTs receives ``seed + 1``: it reads 0 as "seed from the
        clock"). None: seeded from the clock, not reproducible.
    **ants_kwargs
        Passed to ``ants.registration`` (``reg_iterations``, ``aff_metric``,
        ``syn_metric``, ``grad_step``, ``flow_sigma``, ...).

    Returns
    -------
    Tensor, shape (B, ndim, *spatial), float32 (B = 1 for a bare image).

    Raises
    ------
    ImportError
        If antspyx is missing (with the command that installs it).
    ValueError
        If the images are not single-channel 2D/3D of one shape.

    Convention: the field pulls ``moving`` into ``fixed`` space
    (``warp(moving, u)``); voxel units; tensor-axis order. ANTs runs on one
    thread, so that the same call gives the same field every time, unless
    ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` was set before regedu first
    called ANTs.
    """
    ants = _import_ants()
    movings, fixeds = _as_volumes(moving, "moving"), _as_volumes(fixed, "fixed")
    if len(movings) != len(fixeds):
        raise ValueError(f"moving and fixed: expected the same number of images, got "
                         f"{len(movings)} and {len(fixeds)}")
    check_same_shape(movings[0], fixeds[0], ("moving", "fixed"))
    ndim = movings[0].ndim
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)))
    for s in spacing:
        check_positive(s, "spacing")
    fields = []
    for m, f in zip(movings, fixeds):
        fi = ants.from_numpy(f, spacing=spacing)
        mi = ants.from_numpy(m, spacing=spacing)
        with tempfile.TemporaryDirectory(prefix="regedu_ants_") as tmp, _ants_seed(ants, seed):
            out = ants.registration(fi, mi, type_of_transform=transform,
                                    outprefix=os.path.join(tmp, "reg_"), **ants_kwargs)
            fields.append(ants_to_displacement(out["fwdtransforms"], fi))
    return torch.cat(fields)


def ants_affine(moving, fixed, **kwargs) -> torch.Tensor:
    """ANTs affine registration (``type_of_transform="Affine"``): see :func:`ants_register`."""
    return ants_register(moving, fixed, "Affine", **kwargs)


def ants_syn(moving, fixed, **kwargs) -> torch.Tensor:
    """ANTs SyN (affine then symmetric normalisation, mutual information): see :func:`ants_register`.

    ``ants_syn(m, f, syn_metric="CC")`` uses local cross-correlation, the choice
    of the VoxelMorph paper's SyN baseline (slower). Its window radius is
    ``syn_sampling``, which antspyx defaults to 32 (the bin count it means for
    MI): a 65-voxel window, minutes per 4 mm brain. With CC and no
    ``syn_sampling`` given, regedu uses radius 2 (5^3 windows; ANTs' own SyNCC
    uses 4 at 1 mm).
    """
    if str(kwargs.get("syn_metric", "")).lower() == "cc":
        kwargs.setdefault("syn_sampling", 2)
    return ants_register(moving, fixed, "SyN", **kwargs)


# ------------------------------------------------------------ affine in torch

def displacement_to_affine(disp) -> np.ndarray:
    """The affine matrix of an affine displacement, by least squares.

    Parameters
    ----------
    disp : Tensor, shape (1, ndim, *spatial)
        E.g. :func:`ants_affine`'s result.

    Returns
    -------
    ndarray (ndim + 1, ndim + 1), float64: voxel ``x`` of the fixed grid maps
    to ``M @ [x, 1]`` in the moving image (``x + disp(x)``). Exact for an
    affine field; for any other field, its best affine fit.
    """
    disp = as_tensor(disp, "disp")
    check_field(disp, "disp")
    if disp.shape[0] != 1:
        raise ValueError(f"disp: expected one field (batch 1), got batch {disp.shape[0]}")
    nd, spatial = disp.shape[1], tuple(disp.shape[2:])
    # Every 2nd voxel along each axis is plenty for 12 unknowns (and 8x cheaper in 3D).
    step = tuple(slice(None, None, 2 if n > 8 else 1) for n in spatial)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64)[s] for n, s in zip(spatial, step)],
                                indexing="ij")).reshape(nd, -1).T
    target = grid + disp[0][(slice(None),) + step].detach().cpu().double().reshape(nd, -1).T.numpy()
    solution, *_ = np.linalg.lstsq(np.c_[grid, np.ones(len(grid))], target, rcond=None)
    matrix = np.eye(nd + 1)
    matrix[:nd] = solution.T
    return matrix


def _centre_of_mass(image: torch.Tensor) -> torch.Tensor:
    w = image.clamp_min(0)[0, 0].double()
    total = w.sum().clamp_min(1e-12)
    return torch.stack([(w * torch.arange(n, dtype=torch.float64).view(*[-1 if k == a else 1 for k in
                         range(w.dim())])).sum() / total for a, n in enumerate(w.shape)])


def affine_register(moving, fixed, *, similarity=None, levels=(4, 2, 1), iterations=(150, 80, 40),
                    lr: float = 0.02, init: str = "centre_of_mass") -> torch.Tensor:
    """Affine registration in torch: 12 (3D) or 6 (2D) parameters, coarse to fine, Adam.

    The affine is ``x -> A (x - c) + c + t`` about the image centre ``c``,
    started from the translation that aligns the centres of mass (as ANTs
    starts its affine stage), then optimised on images blurred and averaged
    down by each factor of ``levels`` in turn.

    Parameters
    ----------
    moving, fixed : Tensor or ndarray, shape (1, 1, *spatial) or (*spatial)
        One 2D or 3D pair on the same grid, intensities normalised alike.
    similarity : callable (fixed, warped) -> scalar Tensor, optional
        Lower is better; default global NCC (:func:`regedu.losses.ncc_global`),
        insensitive to a global gain and offset.
    levels, iterations : tuple of int
        Downsampling factors, coarse to fine, and Adam steps at each.
    lr : float
        Adam's initial step at the coarsest level: ``lr`` for the matrix
        entries, ``lr`` times the image size in voxels (halved) for the
        translation; proportional to the factor at finer levels, and decayed
        to 5% over each level (cosine).
    init : {"centre_of_mass", "identity"}

    Returns
    -------
    Tensor (1, ndim, *spatial): the displacement (``warp(moving, u)`` aligns
    it to ``fixed``), like :func:`ants_affine`'s.
    """
    from .losses import ncc_global

    def as_pair_image(x, name):
        x = check_finite(as_tensor(x, name), name)
        if x.dim() in (2, 3):
            x = x[None, None]
        if x.dim() not in (4, 5) or tuple(x.shape[:2]) != (1, 1):
            raise ValueError(f"{name}: expected one single-channel image, (*spatial) or (1, 1, *spatial), "
                             f"got shape {tuple(x.shape)}")
        return x.float()

    m, f = as_pair_image(moving, "moving"), as_pair_image(fixed, "fixed")
    check_same_shape(m, f, ("moving", "fixed"))
    check_choice(init, ("centre_of_mass", "identity"), "init")
    levels = tuple(levels) if isinstance(levels, (tuple, list)) else (levels,)
    iterations = tuple(iterations) if isinstance(iterations, (tuple, list)) else (iterations,) * len(levels)
    if len(iterations) != len(levels):
        raise ValueError(f"iterations: expected one number or one per level ({len(levels)}), got {iterations}")
    for factor in levels:
        check_positive(factor, "levels", integer=True)
    check_positive(lr, "lr")
    similarity = ncc_global if similarity is None else similarity
    spatial = tuple(f.shape[2:])
    nd = len(spatial)
    A = torch.eye(nd, dtype=torch.float64)
    t = (_centre_of_mass(m) - _centre_of_mass(f)) if init == "centre_of_mass" else torch.zeros(nd, dtype=torch.float64)
    for factor, n_iter in zip(levels, iterations):
        f_l, m_l = _downsample(f, factor), _downsample(m, factor)
        size = tuple(f_l.shape[2:])
        r = torch.tensor([(n - 1) / max(s - 1, 1) for n, s in zip(spatial, size)], dtype=torch.float64)
        dA = torch.zeros(nd, nd, dtype=torch.float64, requires_grad=True)
        dt = torch.zeros(nd, dtype=torch.float64, requires_grad=True)
        # Translation steps in full-resolution voxels, scaled to the image
        # size, so both parameter groups move a comparable distance per step.
        # Finer levels start near the optimum: smaller steps (Adam's first
        # steps have the full rate whatever the gradient).
        lr_l = lr * factor / max(levels)
        optimiser = torch.optim.Adam([{"params": [dA], "lr": lr_l},
                                      {"params": [dt], "lr": lr_l * max(spatial) / 2}])

        def level_field(A_full, t_full):
            # The full-resolution affine in this level's voxels: R^-1 A R, t / r.
            A_l = A_full * r.view(1, -1) / r.view(-1, 1)
            matrix = torch.cat([A_l, (t_full / r)[:, None]], 1).float()[None]
            return affine_to_displacement(matrix, size, center="image")

        base_lrs = [group["lr"] for group in optimiser.param_groups]
        for k in range(n_iter):
            # Adam's steps keep their size at a constant rate, so the parameters
            # would jitter around the optimum (~0.3 voxel on a 3D brain): decay
            # the rate to 5% over each level (cosine) so they settle.
            for group, base in zip(optimiser.param_groups, base_lrs):
                group["lr"] = base * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * k / max(n_iter, 1))))
            loss = similarity(f_l, warp(m_l, level_field(A + dA, t + dt)))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        A, t = (A + dA).detach(), (t + dt).detach()
    matrix = torch.cat([A, t[:, None]], 1).float()[None]
    return affine_to_displacement(matrix, spatial, center="image")


# ------------------------------------------------------------ instance optimisation

def _bspline_matrix(n: int, spacing: int, dtype, device) -> torch.Tensor:
    # W[x, j] = B3((x - x_j) / spacing), the cubic B-spline of control point j
    # (at voxel x_j = (j - 1) * spacing) evaluated at voxel x.
    x = torch.arange(n, dtype=torch.float64)[:, None]
    xj = (torch.arange((n - 1) // spacing + 4, dtype=torch.float64)[None] - 1) * spacing
    t = ((x - xj) / spacing).abs()
    w = torch.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, (2 - t).clamp(min=0) ** 3 / 6)
    return w.to(dtype=dtype, device=device)


def _control_shape(shape, spacing: int) -> tuple[int, ...]:
    # Control point j sits at voxel (j - 1) * spacing; a voxel x needs the four
    # control points around it, so the grid runs from -spacing to past the end.
    return tuple((n - 1) // spacing + 4 for n in shape)


def bspline_upsample(control: torch.Tensor, shape, spacing: int) -> torch.Tensor:
    """Dense field from a cubic B-spline control grid.

    Parameters
    ----------
    control : Tensor, shape (B, C, *grid)
        Control-point values; point ``j`` along an axis sits at voxel
        ``(j - 1) * spacing``, so ``grid[k] = (shape[k] - 1) // spacing + 4``
        points cover ``shape``.
    shape : tuple of int
        Spatial size of the dense field.
    spacing : int
        Control-point spacing in voxels (the same along every axis).

    Returns
    -------
    Tensor, shape (B, C, *shape): ``sum_j control_j B3((x - x_j) / spacing)``.

    Notes
    -----
    Exact cubic B-spline interpolation (not ``F.interpolate``'s bicubic, which
    is a cubic *convolution* kernel and has no 3D form). The tensor-product
    spline is separable: one small ``(n, grid)`` matrix of B-spline weights is
    applied along each axis in turn (a matrix product, fast forward and
    backward; a strided transposed convolution computes the same thing).

    Cubic B-splines sum to one, so constant control values give a constant:

    >>> u = bspline_upsample(torch.ones(1, 1, 6), (9,), 4)  # 6 = (9 - 1) // 4 + 4
    >>> tuple(u.shape), bool(torch.allclose(u, torch.ones(1, 1, 9), rtol=0, atol=1e-6))
    ((1, 1, 9), True)
    """
    spacing = check_positive(spacing, "spacing", integer=True)
    shape = tuple(int(n) for n in shape)
    expected = _control_shape(shape, spacing)
    if tuple(control.shape[2:]) != expected:
        raise ValueError(f"control: a grid with spacing {spacing} for size {shape} needs "
                         f"spatial shape {expected}, got {tuple(control.shape[2:])}")
    out = control
    for axis, n in enumerate(shape):
        w = _bspline_matrix(n, spacing, control.dtype, control.device)
        out = torch.matmul(out.movedim(2 + axis, -1), w.T).movedim(-1, 2 + axis)
    return out


def _downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return image
    spatial = image.shape[2:]
    # Keep voxel centres aligned the way resize_field assumes (align_corners).
    size = tuple(max(2, round((n - 1) / factor) + 1) for n in spatial)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(gaussian_blur(image, factor / 2), size=size, mode=mode, align_corners=True)


@dataclass
class InstanceOptimisationResult:
    """What :func:`instance_optimisation` returns.

    Attributes
    ----------
    disp : Tensor, shape (B, ndim, *spatial)
        The optimised displacement at full resolution (detached).
    warped : Tensor, shape (B, C, *spatial)
        ``warp(moving, disp)``.
    history : dict of lists
        Per iteration: ``"loss"``, ``"similarity"``, ``"regularisation"`` (its
        value before the weight) and ``"level"`` (the downsampling factor).
    seconds : float
        Wall-clock time of the optimisation.
    """

    disp: torch.Tensor
    warped: torch.Tensor
    history: dict = field(default_factory=dict)
    seconds: float = 0.0


def instance_optimisation(moving, fixed, *, similarity=None, regulariser=None,
                          weight: float = 1.0, transform: str = "dense", control_spacing: int = 4,
                          levels=(1,), iterations=100, lr: float = 0.1, init=None,
                          progress: bool = True) -> InstanceOptimisationResult:
    """Register one pair (or a batch) by optimising its field directly with Adam.

    Minimises ``similarity(fixed, warp(moving, u)) + weight * regulariser(u)``
    over ``u``: the "traditional iterative" registration that learning
    replaces by one forward pass, and a way to refine a network's prediction
    (``init=model(moving, fixed).disp``).

    Parameters
    ----------
    moving, fixed : Tensor or ndarray, shape (B, C, *spatial)
        Float images, 2D or 3D, of the same shape.
    similarity : callable (fixed, warped) -> scalar Tensor, optional
        Any regedu loss, e.g. ``losses.NCC(window=9)`` or ``losses.MI()``;
        lower is better. Default ``losses.MSE()``.
    regulariser : callable (disp) -> scalar Tensor, optional
        Default ``losses.Diffusion("l2")``; ``losses.BendingEnergy()`` suits
        B-splines. For the edge-aware term, close over the image:
        ``lambda u: losses.edge_aware_smoothness(u, fixed)``.
    weight : float
        Regularisation weight lambda (>= 0).
    transform : {"dense", "bspline"}
        "dense": one free vector per voxel. "bspline": a cubic B-spline control
        grid every ``control_spacing`` voxels (see :func:`bspline_upsample`).
    control_spacing : int
        B-spline control-point spacing, in voxels of the level being optimised.
    levels : tuple of int
        Downsampling factors, coarse to fine, e.g. ``(4, 2, 1)``. Each level
        optimises a correction on top of the field of the previous one.
    iterations : int or tuple of int
        Adam steps per level (one number for all levels, or one per level).
    lr : float
        Adam learning rate, in voxels of the level (dense) or control-point units.
    init : Tensor, shape (B or 1, ndim, *spatial), optional
        Starting field (e.g. a network's prediction); default zero.
    progress : bool
        Show a progress bar (tqdm.auto: a widget in a notebook).

    Returns
    -------
    InstanceOptimisationResult
        ``disp`` (B, ndim, *spatial), ``warped``, ``history``, ``seconds``.

    Convention: ``disp`` pulls ``moving`` into ``fixed`` space
    (``warp(moving, disp)``), in full-resolution voxels, tensor-axis order.
    Coarse levels see images blurred (sigma = factor / 2) and resampled with
    voxel centres aligned (``align_corners=True``); fields move between levels
    with :func:`regedu.spatial.resize_field`.
    """
    from tqdm.auto import tqdm

    moving = check_finite(as_tensor(moving, "moving"), "moving")
    fixed = check_finite(as_tensor(fixed, "fixed"), "fixed")
    for x, name in ((moving, "moving"), (fixed, "fixed")):
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point image, got dtype {x.dtype}")
    spatial = check_shape(fixed, "B C *S", "fixed")["S"]
    check_same_shape(moving, fixed, ("moving", "fixed"))
    if len(spatial) not in (2, 3):
        raise ValueError(f"fixed: expected (B, C, H, W) or (B, C, D, H, W), got shape "
                         f"{tuple(fixed.shape)}")
    check_choice(transform, ("dense", "bspline"), "transform")
    levels = tuple(levels) if isinstance(levels, (tuple, list)) else (levels,)
    for f in levels:
        check_positive(f, "levels", integer=True)
    iterations = tuple(iterations) if isinstance(iterations, (tuple, list)) \
        else (iterations,) * len(levels)
    if len(iterations) != len(levels):
        raise ValueError(f"iterations: expected one number or one per level ({len(levels)}), "
                         f"got {iterations}")
    for n in iterations:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"iterations: expected non-negative integers, got {iterations}")
    check_positive(lr, "lr")
    if not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"weight: expected a non-negative number, got {weight!r}")
    if transform == "bspline":
        check_positive(control_spacing, "control_spacing", integer=True)
    similarity = MSE() if similarity is None else similarity
    regulariser = Diffusion("l2") if regulariser is None else regulariser
    B, nd = fixed.shape[0], len(spatial)
    disp = torch.zeros(B, nd, *spatial, dtype=fixed.dtype, device=fixed.device)
    if init is not None:
        init = check_field(as_tensor(init, "init"), "init", spatial=spatial, batch=B)
        disp = disp + init.detach().to(disp)

    history = {"loss": [], "similarity": [], "regularisation": [], "level": []}
    start = time.perf_counter()
    bar = tqdm(total=sum(iterations), disable=not progress, desc="instance optimisation")
    for factor, n_iter in zip(levels, iterations):
        fixed_l, moving_l = _downsample(fixed, factor), _downsample(moving, factor)
        size = tuple(fixed_l.shape[2:])
        base = resize_field(disp, size).detach()
        if transform == "dense":
            param = torch.zeros_like(base, requires_grad=True)
        else:
            param = torch.zeros(B, nd, *_control_shape(size, control_spacing), dtype=base.dtype,
                                device=base.device, requires_grad=True)
        optimiser = torch.optim.Adam([param], lr=lr)
        for _ in range(n_iter):
            u = base + (param if transform == "dense" else
                        bspline_upsample(param, size, control_spacing))
            sim = similarity(fixed_l, warp(moving_l, u))
            reg = regulariser(u)
            loss = sim + weight * reg
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            for key, value in (("loss", loss), ("similarity", sim), ("regularisation", reg)):
                history[key].append(float(value.detach()))
            history["level"].append(factor)
            bar.update()
        with torch.no_grad():
            u = base + (param if transform == "dense" else
                        bspline_upsample(param, size, control_spacing))
            disp = resize_field(u, spatial)
    bar.close()
    disp = disp.detach()
    return InstanceOptimisationResult(disp=disp, warped=warp(moving, disp), history=history,
                                      seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- global search

def _xcorr(a_hat: torch.Tensor, b_hat: torch.Tensor, shape) -> torch.Tensor:
    """``sum_x a(x) b(x + t)`` for every shift ``t`` (index ``t`` modulo the padded size)."""
    return torch.fft.irfft2(a_hat.conj() * b_hat, s=shape)


def similarity_search(moving, fixed, *, moving_mask=None, fixed_mask=None,
                      angles=tuple(range(-16, 17, 2)), scales=(0.92, 0.96, 1.0, 1.04, 1.08),
                      size: int = 128, min_overlap: float = 0.25) -> torch.Tensor:
    """Global 2D alignment by exhaustive search over rotation, scale and *every* translation.

    For each rotation and scale the moving image is turned about its centre,
    and the masked normalised cross-correlation with the fixed image is
    computed for all translations at once with FFTs (Padfield's masked NCC:
    only the overlap of the two fields of view counts). The best candidate,
    refined to sub-pixel translation, is returned as a displacement.

    Why: gradient-based registration (ANTs, instance optimisation, a network
    trained with a local loss) only sees a motion the similarity's basin
    reaches. Fundus pairs of FIRE's category P are shifted by a quarter of the
    image; their similarity is flat at the identity, and every local method
    stays there. A global search finds the basin, and the local method refines
    from it (``compose(search, refinement)``), as FIRE's best methods do.

    Parameters
    ----------
    moving, fixed : Tensor or ndarray, shape (H, W), (1, H, W) or (1, 1, H, W)
        One 2D pair on the same grid; vessel contrast
        (:func:`regedu.datasets.vessel_contrast`) for fundus photographs.
    moving_mask, fixed_mask : optional, same shape
        Fields of view. Default: where the image is not zero.
    angles : sequence of float
        Rotations to try, in degrees.
    scales : sequence of float
        Isotropic scales to try.
    size : int
        The search runs on images averaged down to this side (the translation
        is refined to sub-pixel, and a local method refines the rest).
    min_overlap : float
        A translation counts only where the fields of view overlap by at least
        this fraction of the smaller one (tiny overlaps correlate by chance).

    Returns
    -------
    Tensor, shape (1, 2, H, W): the displacement of the similarity map
    ``x -> s R (x - c + t) + c`` (``c`` the image centre), in pixels,
    ``warped(x) = moving(x + u(x))``.

    >>> f = gaussian_blur(torch.randn(1, 1, 64, 64, generator=torch.manual_seed(0)), 2.0)
    >>> m = torch.roll(f, (5, -7), dims=(2, 3))    # warped(x) = m(x + u) = f(x) for u = (5, -7)
    >>> u = similarity_search(m, f, angles=(0,), scales=(1,), moving_mask=torch.ones(64, 64),
    ...                       fixed_mask=torch.ones(64, 64))
    >>> [round(float(v)) for v in u[0, :, 0, 0]]
    [5, -7]
    """
    def as_image(x, name):
        x = as_tensor(x, name)
        if x.dim() < 2 or x.dim() > 4 or any(n != 1 for n in x.shape[:-2]):
            raise ValueError(f"{name}: expected one 2D image, (H, W), (1, H, W) or (1, 1, H, W), "
                             f"got shape {tuple(x.shape)}")
        x = x.reshape(1, 1, *x.shape[-2:]).float()
        check_finite(x, name)
        return x

    m, f = as_image(moving, "moving"), as_image(fixed, "fixed")
    check_same_shape(m, f, ("moving", "fixed"))
    mm = (m != 0).float() if moving_mask is None else as_image(moving_mask, "moving_mask")
    fm = (f != 0).float() if fixed_mask is None else as_image(fixed_mask, "fixed_mask")
    check_same_shape(mm, m, ("moving_mask", "moving"))
    check_same_shape(fm, f, ("fixed_mask", "fixed"))
    check_positive(size, "size")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap: expected a fraction in (0, 1], got {min_overlap}")
    H, W = f.shape[2:]
    r = min(1.0, size / max(H, W))
    small = (max(2, round(H * r)), max(2, round(W * r)))
    if small != (H, W):
        m, f, mm, fm = (F.interpolate(x, size=small, mode="area") for x in (m, f, mm, fm))
    mm, fm = (mm > 0.5).float(), (fm > 0.5).float()
    for mask, name in ((mm, "moving_mask"), (fm, "fixed_mask")):
        if not mask.any():
            raise ValueError(f"{name}: the field of view is empty (no pixel is inside); "
                             f"expected a mask that is nonzero over the image")
    f = f * fm
    pad = (2 * small[0], 2 * small[1])
    rfft = lambda x: torch.fft.rfft2(x[0, 0], s=pad)  # noqa: E731 - one zero-padded transform
    F_fm, F_f, F_ff = rfft(fm), rfft(f), rfft(f * f)
    n_fixed = float(fm.sum())
    best = (-np.inf, None, None, None)
    for angle in angles:
        for scale in scales:
            c, s = np.cos(np.deg2rad(angle)) * scale, np.sin(np.deg2rad(angle)) * scale
            A = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=torch.float32)
            d = affine_to_displacement(A, small, center="image")
            mask_r = (warp(mm, d) > 0.5).float()
            g = warp(m, d) * mask_r
            F_mr, F_g, F_gg = rfft(mask_r), rfft(g), rfft(g * g)
            overlap = _xcorr(F_fm, F_mr, pad)
            n = overlap.clamp_min(1)
            sf, sg = _xcorr(F_f, F_mr, pad), _xcorr(F_fm, F_g, pad)
            num = _xcorr(F_f, F_g, pad) - sf * sg / n
            var_f = _xcorr(F_ff, F_mr, pad) - sf * sf / n
            var_g = _xcorr(F_fm, F_gg, pad) - sg * sg / n
            score = num / (var_f * var_g).clamp_min(1e-12).sqrt()
            score[overlap < max(1.0, min_overlap * min(n_fixed, float(mask_r.sum())))] = -np.inf
            k = int(score.argmax())
            top = float(score.view(-1)[k])
            if top > best[0]:
                best = (top, score, divmod(k, pad[1]), A[0, :, :2])
    value, score, (i, j), A = best
    if value == -np.inf:
        raise ValueError(f"similarity_search: no rotation, scale and translation makes the fields of "
                         f"view overlap by min_overlap={min_overlap}; lower it, or check the masks")

    def refine(s_minus, s0, s_plus):
        # Vertex of the parabola through three neighbours: sub-pixel translation.
        if not np.isfinite(s_minus + s_plus):
            return 0.0
        denom = s_minus - 2 * s0 + s_plus
        return float(np.clip(0.5 * (s_minus - s_plus) / denom, -0.5, 0.5)) if denom < 0 else 0.0

    P0, P1 = pad
    t0 = (i if i < P0 // 2 else i - P0) + refine(float(score[(i - 1) % P0, j]), value,
                                                 float(score[(i + 1) % P0, j]))
    t1 = (j if j < P1 // 2 else j - P1) + refine(float(score[i, (j - 1) % P1]), value,
                                                 float(score[i, (j + 1) % P1]))
    t = torch.tensor([t0 * H / small[0], t1 * W / small[1]], dtype=torch.float32)
    matrix = torch.cat([A, (A @ t)[:, None]], dim=1)[None]
    return affine_to_displacement(matrix, (H, W), center="image")
