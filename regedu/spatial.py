"""Spatial transforms: warping, grids, affine fields, composition, integration.

Convention (the one every function of regedu follows):

* Images are ``(B, C, *spatial)``; spatial is ``(H, W)`` in 2D and
  ``(D, H, W)`` in 3D.
* A displacement ``u`` is ``(B, ndim, *spatial)``, in voxels; channel ``k``
  moves along spatial axis ``k`` (tensor-axis ``ij`` order, not ``xy``).
* The transform is ``phi(x) = x + u(x)`` and warping *pulls*:
  ``warped(x) = moving(x + u(x))``. ``u`` lives on the fixed image's grid.
* Voxel centres map exactly: index ``i`` is the normalised coordinate
  ``-1 + 2 i / (n - 1)`` (``align_corners=True``). Outside the image the
  value is 0 (``padding="zeros"``) or the nearest edge value (``"border"``).
* ``compose(u1, u2)`` is the displacement of ``phi1 o phi2``: warping by it
  equals warping by ``phi1`` first and then by ``phi2``.

Every function takes tensors or numpy arrays (wrapped without copying) and
returns tensors.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import (as_tensor, check_choice, check_field, check_finite, check_image, check_positive,
                      check_shape, check_tensor)

__all__ = ["warp", "SpatialTransformer", "identity_grid", "affine_to_displacement",
           "compose", "integrate_velocity", "IntegrateVelocity", "invert_field", "jacobian_determinant",
           "resize_field", "warp_points", "gaussian_blur", "random_field", "diffusion_fit"]

_MODES = ("bilinear", "nearest")
_PADDINGS = ("zeros", "border")


@functools.lru_cache(maxsize=16)
def _cached_grid(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def identity_grid(shape, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel, ``(1, ndim, *shape)``.

    Channel ``k`` holds the index along spatial axis ``k``, so
    ``identity_grid(shape) + u`` are the points that ``warp`` samples.

    >>> identity_grid((2, 3))[0, 1]
    tensor([[0., 1., 2.],
            [0., 1., 2.]])
    """
    shape = tuple(int(n) for n in shape)
    for n in shape:
        check_positive(n, "shape", integer=True)
    # A cached grid is shared: hand out a tensor the caller cannot corrupt in place.
    return _cached_grid(shape, torch.device(device or "cpu"), dtype).clone()


def _grid_sample_locations(points: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    # grid_sample wants locations normalised to [-1, 1] (with align_corners=True,
    # -1 and 1 are the centres of the first and last voxel, our convention) and
    # the coordinate axis last, in x, y(, z) order: the reverse of our tensor-axis
    # channel order. This is the only place that flip happens.
    # Scaling, flipping and moving the axis last are one product with an
    # anti-diagonal matrix of scales 2 / (n - 1): it writes, in one pass, the
    # contiguous grid that grid_sample reads fastest (elementwise ops and a
    # flip cost four passes and leave a strided grid). In place "- 1" is safe:
    # bmm's backward does not need its output.
    B, nd = points.shape[:2]
    scales = [2.0 / max(n - 1, 1) for n in spatial]
    to_xyz = torch.diag(torch.tensor(scales, device=points.device, dtype=points.dtype)).flip(1)
    columns = points.reshape(B, nd, -1).transpose(1, 2)
    grid = torch.bmm(columns, to_xyz.expand(B, nd, nd)).sub_(1)
    return grid.view(B, *points.shape[2:], nd)


def _is_whole(disp: torch.Tensor) -> bool:
    # A field with fractional values almost always shows one in its first few
    # thousand values: decide on those before paying three passes over all of it.
    head = disp.reshape(-1)[:4096]
    return bool((head == torch.round(head)).all()) and bool((disp == torch.round(disp)).all())


def _warp_integer(image: torch.Tensor, u: torch.Tensor, padding: str) -> torch.Tensor:
    # A whole-voxel displacement needs no interpolation: look the values up.
    # This is exact (grid_sample's normalise/unnormalise round trip is not, by
    # ~1e-5 in float32) and keeps label dtypes as they are.
    B, C, *spatial = image.shape
    idx = (identity_grid(spatial, device=u.device, dtype=u.dtype) + u).long()
    inside = torch.ones_like(idx[:, 0], dtype=torch.bool)
    linear = torch.zeros_like(idx[:, 0])
    for k, n in enumerate(spatial):
        inside &= (idx[:, k] >= 0) & (idx[:, k] < n)
        linear = linear * n + idx[:, k].clamp(0, n - 1)
    linear = linear.reshape(B, 1, -1).expand(B, C, -1)
    out = image.reshape(B, C, -1).gather(2, linear).reshape(image.shape)
    if padding == "zeros":
        out = out * inside.unsqueeze(1).to(out.dtype) if out.is_floating_point() else \
            torch.where(inside.unsqueeze(1), out, torch.zeros_like(out))
    return out


def warp(image: torch.Tensor, disp: torch.Tensor, *, mode: str | None = None,
         padding: str = "zeros") -> torch.Tensor:
    """Warp ``image`` by the displacement ``disp``: ``out(x) = image(x + disp(x))``.

    Parameters
    ----------
    image : Tensor, shape (B, C, *spatial)
        The moving image (float), or a label map (integer or bool dtype).
    disp : Tensor, shape (B, ndim, *spatial)
        Displacement in voxels on the fixed grid, channels in tensor-axis order.
        A batch of 1 on either side is broadcast against the other.
    mode : {"bilinear", "nearest", None}
        Interpolation. ``None`` picks ``"nearest"`` for integer or bool images
        (label maps keep their values and dtype) and ``"bilinear"`` (trilinear in
        3D) otherwise. A float label map needs ``mode="nearest"``.
    padding : {"zeros", "border"}
        Value outside the image: 0, or the nearest edge value.

    Returns
    -------
    Tensor, shape (B, C, *spatial), the dtype of ``image``.

    Convention: pulls the moving image into the fixed image's space; voxel units;
    tensor-axis order; voxel centres map exactly (``align_corners=True``).
    Whole-voxel displacements are applied by indexing and are exact.

    Examples
    --------
    A displacement of +1 along the last axis samples the right neighbour, so
    the image content moves one pixel to the left:

    >>> img = torch.tensor([[[[0., 1., 2., 3.]]]])
    >>> u = torch.zeros(1, 2, 1, 4); u[:, 1] = 1
    >>> warp(img, u)
    tensor([[[[1., 2., 3., 0.]]]])
    """
    image, disp = as_tensor(image, "image"), as_tensor(disp, "disp")
    spatial = check_image(image, "image", floating=False)
    check_field(disp, "disp", spatial=spatial)
    check_choice(padding, _PADDINGS, "padding")
    labels = not image.is_floating_point()
    if mode is None:
        mode = "nearest" if labels else "bilinear"
    check_choice(mode, _MODES, "mode")
    if labels and mode != "nearest":
        raise ValueError(f"image: a {image.dtype} label map can only be warped with "
                         f"mode='nearest' (or mode=None), got mode={mode!r}; "
                         f"for a differentiable warp of labels, one-hot encode them as floats")
    B = max(image.shape[0], disp.shape[0])
    if image.shape[0] != disp.shape[0] and 1 not in (image.shape[0], disp.shape[0]):
        raise ValueError(f"image and disp: batch sizes {image.shape[0]} and {disp.shape[0]} "
                         f"do not match (a batch of 1 is broadcast)")
    image = image.expand(B, *image.shape[1:])
    disp = disp.expand(B, *disp.shape[1:]).to(image.dtype if not labels else disp.dtype)

    if not disp.requires_grad and _is_whole(disp):
        return _warp_integer(image, disp, padding)

    # The cached grid is only read here: no defensive copy as identity_grid makes.
    points = _cached_grid(spatial, disp.device, disp.dtype) + disp
    grid = _grid_sample_locations(points, spatial)
    source = image.to(disp.dtype) if labels else image
    out = F.grid_sample(source, grid, mode=mode, padding_mode=padding, align_corners=True)
    return out.round().to(image.dtype) if labels else out


class SpatialTransformer(nn.Module):
    """Module form of :func:`warp` (same convention); ``forward(image, disp)``."""

    def __init__(self, mode: str | None = None, padding: str = "zeros"):
        super().__init__()
        self.mode, self.padding = mode, padding

    def forward(self, image: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        return warp(image, disp, mode=self.mode, padding=self.padding)


def affine_to_displacement(matrix: torch.Tensor, shape, *, center: str = "origin") -> torch.Tensor:
    """Displacement of an affine map given in voxel coordinates.

    Parameters
    ----------
    matrix : Tensor, shape (B, ndim, ndim + 1) or (B, ndim + 1, ndim + 1)
        ``[A | t]``: the fixed point ``x`` maps to ``A (x - c) + c + t`` in the
        moving image, coordinates in tensor-axis order.
    shape : tuple of int
        Spatial size of the fixed image.
    center : {"origin", "image"}
        ``c``: voxel 0, or the image centre ``(n - 1) / 2`` (rotate about the middle).

    Returns
    -------
    Tensor, shape (B, ndim, *shape): ``u(x) = A (x - c) + c + t - x``.

    >>> m = torch.tensor([[[1., 0., 2.], [0., 1., -1.]]])
    >>> affine_to_displacement(m, (3, 4))[0, :, 0, 0].tolist()
    [2.0, -1.0]
    """
    matrix = check_tensor(as_tensor(matrix, "matrix"), "matrix", floating=True)
    check_choice(center, ("origin", "image"), "center")
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    if nd not in (2, 3):
        raise ValueError(f"shape: expected a 2D or 3D spatial size, got {shape}")
    check_shape(matrix, "B R C", "matrix")
    if matrix.shape[2] != nd + 1 or matrix.shape[1] not in (nd, nd + 1):
        raise ValueError(f"matrix: a {nd}D affine needs shape (B, {nd}, {nd + 1}) or "
                         f"(B, {nd + 1}, {nd + 1}), got {tuple(matrix.shape)}")
    check_finite(matrix, "matrix")
    A, t = matrix[:, :nd, :nd], matrix[:, :nd, nd]
    x = identity_grid(shape, device=matrix.device, dtype=matrix.dtype)
    c = torch.zeros(nd, device=matrix.device, dtype=matrix.dtype)
    if center == "image":
        c = torch.tensor([(n - 1) / 2 for n in shape], device=matrix.device, dtype=matrix.dtype)
    c = c.view(1, nd, *([1] * nd))
    y = torch.einsum("bij,bj...->bi...", A, (x - c).expand(matrix.shape[0], *x.shape[1:]))
    return y + c + t.view(-1, nd, *([1] * nd)) - x


def compose(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Displacement of ``phi1 o phi2``: ``u2 + warp(u1, u2)``.

    ``warp(warp(m, u1), u2) == warp(m, compose(u1, u2))`` up to interpolation:
    a cascade that warps by ``phi1`` first and then by ``phi2`` has the total
    field ``compose(u1, u2)``. Fields are extended at the border (``padding=
    "border"``) rather than by zero, which keeps motion near the edges.
    """
    u1, u2 = as_tensor(u1, "u1"), as_tensor(u2, "u2")
    check_field(u1, "u1")
    check_field(u2, "u2", spatial=tuple(u1.shape[2:]))
    return u2 + warp(u1, u2, mode="bilinear", padding="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    ``u = v / 2**steps``, then ``steps`` times ``u = compose(u, u)``; the result
    approximates ``exp(v)``, a diffeomorphism when ``v`` is smooth enough.
    ``steps=0`` returns ``v`` itself (a plain displacement).
    """
    velocity = check_field(as_tensor(velocity, "velocity"), "velocity")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    u = velocity / (2 ** steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


class IntegrateVelocity(nn.Module):
    """Module form of :func:`integrate_velocity`; ``forward(velocity)``."""

    def __init__(self, steps: int = 7):
        super().__init__()
        self.steps = steps

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return integrate_velocity(velocity, self.steps)


def jacobian_determinant(disp) -> torch.Tensor:
    """Determinant of the Jacobian of ``phi = id + u``, ``(B, *spatial)``.

    A property of the transform, so it lives here; :mod:`regedu.metrics`
    offers it among the measures (``metrics.jacobian_determinant``).

    Derivatives by central differences (one-sided at the borders, as
    ``np.gradient``). det = 1: volume kept; > 1: expansion; <= 0: folding.

    >>> jacobian_determinant(torch.zeros(1, 2, 4, 5)).unique()
    tensor([1.])
    """
    disp = as_tensor(disp, "disp")
    check_field(disp, "disp")
    nd = disp.shape[1]
    if min(disp.shape[2:]) < 2:
        raise ValueError(f"disp: need at least 2 voxels along each axis for derivatives, got "
                         f"shape {tuple(disp.shape)}")
    # J[:, i, j] = d phi_i / d x_j = delta_ij + d u_i / d x_j
    grads = torch.gradient(disp, dim=tuple(range(2, 2 + nd)))
    J = torch.stack(grads, dim=2)
    J = J + torch.eye(nd, dtype=disp.dtype, device=disp.device).view(1, nd, nd, *([1] * nd))
    J = J.movedim((1, 2), (-2, -1))
    if nd == 2:
        return J[..., 0, 0] * J[..., 1, 1] - J[..., 0, 1] * J[..., 1, 0]
    return (J[..., 0, 0] * (J[..., 1, 1] * J[..., 2, 2] - J[..., 1, 2] * J[..., 2, 1])
            - J[..., 0, 1] * (J[..., 1, 0] * J[..., 2, 2] - J[..., 1, 2] * J[..., 2, 0])
            + J[..., 0, 2] * (J[..., 1, 0] * J[..., 2, 1] - J[..., 1, 1] * J[..., 2, 0]))


def invert_field(disp: torch.Tensor, *, iterations: int = 50, tol: float = 1e-4,
                 folding: str = "warn") -> torch.Tensor:
    """The inverse displacement ``v`` of ``u``, by fixed-point iteration.

    ``phi_u o phi_v = id`` reads ``v(x) + u(x + v(x)) = 0``, i.e. ``v = -warp(u, v)``:
    start from ``v = -u`` and repeat ``v <- -warp(u, v)`` (Chen et al., Med. Phys.
    35(1), 2008). Each step shrinks the error by about the largest derivative of
    ``u``, so it converges quickly for a smooth field with ``|grad u| < 1`` and
    not at all where the field folds (there no inverse exists).

    Parameters
    ----------
    disp : Tensor, shape (B, ndim, *spatial)
        The displacement ``u`` to invert (voxels, tensor-axis order).
    iterations : int
        At most this many steps.
    tol : float
        Stop when no voxel of ``v`` changes by more than ``tol`` voxels in a step;
        the change is also the residual ``|compose(u, v)|`` of the last iterate.
    folding : {"warn", "raise", "ignore"}
        What to do when ``det J <= 0`` somewhere (see
        :func:`regedu.metrics.jacobian_determinant`): the result is then not an inverse.

    Returns
    -------
    Tensor, shape (B, ndim, *spatial)
        ``v`` with ``compose(u, v) ~ 0`` and ``compose(v, u) ~ 0`` away from the
        borders (``u`` is extended at the border, as in :func:`compose`).
        Differentiable with respect to ``disp``.

    Warns (RuntimeWarning) when the iteration has not converged to ``tol``.

    Convention: fields pull (docs/conventions.md, "Conventions"); if ``u`` maps
    fixed to moving coordinates, ``v`` maps moving to fixed, on the moving grid.

    Examples
    --------
    A translation inverts to the opposite translation:

    >>> u = torch.zeros(1, 2, 5, 6); u[:, 0] = 1.5; u[:, 1] = -0.5
    >>> invert_field(u)[0, :, 2, 3].tolist()
    [-1.5, 0.5]
    """
    disp = check_field(as_tensor(disp, "disp"), "disp")
    check_positive(iterations, "iterations", integer=True)
    check_positive(tol, "tol")
    check_choice(folding, ("warn", "raise", "ignore"), "folding")
    if folding != "ignore":
        with torch.no_grad():
            folded = int((jacobian_determinant(disp) <= 0).sum())
        if folded:
            message = (f"disp: det J <= 0 at {folded} of {disp[:, 0].numel()} voxels; a folding "
                       f"field has no inverse there, and the result is not one (smooth or "
                       f"regularise the field first, or pass folding='ignore')")
            if folding == "raise":
                raise ValueError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    v = -disp
    change = float("inf")
    for _ in range(iterations):
        # compose(u, v) = v + warp(u, v): the new iterate differs from v by exactly
        # the residual of the old one, so the step size measures convergence.
        new = -warp(disp, v, mode="bilinear", padding="border")
        change = float((new - v).detach().abs().max())
        v = new
        if change <= tol:
            return v
    warnings.warn(f"disp: the inverse did not converge in {iterations} iterations (last change "
                  f"{change:.3g} voxels > tol={tol:g}); raise iterations, or the field is too "
                  f"strongly deformed to invert", RuntimeWarning, stacklevel=2)
    return v


def resize_field(disp: torch.Tensor, size) -> torch.Tensor:
    """Resample a displacement to a new spatial ``size``, rescaling its values.

    With voxel centres mapped exactly, axis ``k`` stretches by
    ``(size[k] - 1) / (n[k] - 1)``, and so does channel ``k`` (a field of one
    voxel at 64^2 is one of ~2 voxels at 128^2).
    """
    disp = check_field(as_tensor(disp, "disp"), "disp")
    old = tuple(disp.shape[2:])
    size = tuple(int(n) for n in size)
    if len(size) != len(old):
        raise ValueError(f"size: expected {len(old)} sizes for a {len(old)}D field, got {size}")
    for n in size:
        check_positive(n, "size", integer=True)
    factors = torch.tensor([(s - 1) / max(n - 1, 1) for s, n in zip(size, old)],
                           device=disp.device, dtype=disp.dtype).view(1, -1, *([1] * len(old)))
    interp = "bilinear" if len(old) == 2 else "trilinear"
    return F.interpolate(disp, size=size, mode=interp, align_corners=True) * factors


def warp_points(points: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Map fixed-image points to the moving image: ``p -> p + u(p)``.

    Parameters
    ----------
    points : Tensor, shape (N, ndim) or (B, N, ndim)
        Voxel coordinates in the fixed image, in tensor-axis order (row, column
        in 2D), not x-y.
    disp : Tensor, shape (B, ndim, *spatial)

    Returns
    -------
    Tensor of the shape of ``points``: where each point lies in the moving
    image. ``u`` is interpolated linearly and extended at the border.
    """
    points = check_tensor(as_tensor(points, "points"), "points", floating=True)
    disp = check_field(as_tensor(disp, "disp"), "disp")
    nd = disp.shape[1]
    squeeze = points.dim() == 2
    pts = points[None] if squeeze else points
    check_shape(pts, f"B N {nd}", "points")
    check_finite(pts, "points")
    if pts.shape[0] != disp.shape[0] and 1 not in (pts.shape[0], disp.shape[0]):
        raise ValueError(f"points and disp: batch sizes {pts.shape[0]} and {disp.shape[0]} differ")
    B = max(pts.shape[0], disp.shape[0])
    pts = pts.to(disp.dtype).expand(B, *pts.shape[1:])
    # Sample u at the points: the points become a (B, nd, N, 1[, 1]) "image" of locations.
    loc = pts.transpose(1, 2).reshape(B, nd, -1, *([1] * (nd - 1)))
    grid = _grid_sample_locations(loc, tuple(disp.shape[2:]))
    u = F.grid_sample(disp.expand(B, *disp.shape[1:]), grid, mode="bilinear",
                      padding_mode="border", align_corners=True)
    out = pts + u.reshape(B, nd, -1).transpose(1, 2)
    return out[0] if squeeze else out


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` over the spatial axes, edges replicated.

    ``sigma`` in voxels; the kernel reaches 3 sigma.

    >>> x = torch.zeros(1, 1, 9, 9); x[0, 0, 4, 4] = 1
    >>> round(float(gaussian_blur(x, 1.0).sum()), 4)
    1.0
    """
    image = check_tensor(as_tensor(image, "image"), "image", floating=True)
    check_shape(image, "B C *S", "image")
    check_positive(sigma, "sigma")
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = (g / g.sum()).view(1, 1, -1)
    out = image
    for dim in range(2, image.dim()):
        moved = out.movedim(dim, -1)
        flat = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (radius, radius), mode="replicate")
        out = F.conv1d(flat, g).reshape(moved.shape).movedim(-1, dim)
    return out


def random_field(shape, amplitude: float, points=4, *, channels: int | None = None, cubic: bool = False,
                 seed=0) -> torch.Tensor:
    """A smooth random field ``(1, channels, *shape)``: Gaussian noise at control points, interpolated.

    Noise of standard deviation ``amplitude`` at ``points`` control points per
    axis (a number, or one per axis; the corner points sit on the corner
    voxels) is interpolated to ``shape``: (bi/tri)linearly, or with
    ``cubic=True`` by cubic convolution along each axis, whose derivatives,
    and so the Jacobian of a displacement, are continuous too (no creases
    along the control grid). Fewer points give a smoother field.
    ``channels`` defaults to ``len(shape)``: a displacement in voxels.
    ``seed`` is an int or a ``torch.Generator`` to draw from (several fields
    from one stream, as :func:`regedu.datasets.synth_subject` does).

    >>> u = random_field((32, 40), 2.0, seed=1)
    >>> tuple(u.shape), bool(torch.equal(u, random_field((32, 40), 2.0, seed=1)))
    ((1, 2, 32, 40), True)
    """
    shape = tuple(int(n) for n in shape)
    for n in shape:
        check_positive(n, "shape", integer=True)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape: expected 2 or 3 sizes, got {shape}")
    points = [int(points)] * len(shape) if isinstance(points, (int, float)) else [int(k) for k in points]
    if len(points) != len(shape) or min(points) < 2:
        raise ValueError(f"points: expected at least 2 control points along each of the {len(shape)} "
                         f"axes, got {points}")
    if not amplitude >= 0:
        raise ValueError(f"amplitude: expected a non-negative number, got {amplitude}")
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    coarse = torch.randn(1, channels or len(shape), *points, generator=generator) * amplitude
    if not cubic:
        return F.interpolate(coarse, size=shape, mode=("bilinear", "trilinear")[len(shape) - 2],
                             align_corners=True)
    if len(shape) == 2:
        return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)
    # torch has no tricubic mode: bicubic over (H, W), then over (D, W) with W at its size,
    # where the cubic weights at the samples are (0, 1, 0, 0) and leave it as it is.
    c, (d, h, w), (D, H, W) = coarse.shape[1], points, shape
    x = F.interpolate(coarse.reshape(c * d, 1, h, w), size=(H, W), mode="bicubic", align_corners=True)
    x = x.reshape(c, d, H, W).permute(0, 2, 1, 3).reshape(c * H, 1, d, W)
    x = F.interpolate(x, size=(D, W), mode="bicubic", align_corners=True)
    return x.reshape(1, c, H, D, W).permute(0, 1, 3, 2, 4).contiguous()


def diffusion_fit(disp, weight: float) -> torch.Tensor:
    """The smoothest field close to ``disp``: diffusion-regularised least squares.

    Solves ``min_v ||v - u||^2 + weight * sum_k ||D_k v||^2`` exactly, ``D_k``
    the forward difference along axis ``k`` with mirrored borders (the
    diffusion regulariser of :func:`regedu.losses.diffusion`, as a sum). The
    normal equations ``(I + weight * L) v = u`` are diagonal in the DCT basis,
    where the Laplacian ``L`` has eigenvalues ``sum_k 2 - 2 cos(pi j_k / n_k)``.
    ``weight = 0`` returns ``u``; a large weight leaves only the mean
    (translation), which no smoothness penalty touches.

    >>> u = random_field((16, 16), 2.0)
    >>> bool(torch.allclose(diffusion_fit(u, 0.0), u, atol=1e-6))
    True
    """
    from scipy.fft import dctn, idctn
    u = check_field(as_tensor(disp, "disp").detach().cpu(), "disp")
    if not weight >= 0:
        raise ValueError(f"weight: expected a non-negative number, got {weight}")
    spatial = u.shape[2:]
    eig = sum((2 - 2 * np.cos(np.pi * np.arange(n) / n)).reshape([-1 if a == k else 1
                                                                   for a in range(len(spatial))])
              for k, n in enumerate(spatial))
    axes = tuple(range(2, u.dim()))
    coef = dctn(u.double().numpy(), type=2, norm="ortho", axes=axes) / (1.0 + weight * eig)
    return torch.from_numpy(idctn(coef, type=2, norm="ortho", axes=axes).astype(np.float32))
