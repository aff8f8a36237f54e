"""Losses for registration: similarity, regularity, label overlap, and the objective they make.

Every loss is *lower is better*, so a training loop simply adds weighted terms.
Similarities take ``(fixed, warped)``, both ``(B, C, *spatial)``; regularisers
take the displacement ``(B, ndim, *spatial)`` (voxels, tensor-axis order).
``reduction="mean"`` gives a scalar, ``"none"`` one value per batch item.
Functional forms do the work; the ``nn.Module`` classes only store options.
Inputs may be tensors or numpy arrays; results are tensors.

The objective of a training run is a weighted sum of terms chosen by name
(:data:`LOSSES`, :data:`DEFAULT_LOSSES`): :func:`loss_terms` computes every
weighted term of one batch and their sum, which :func:`regedu.train.train_step`
minimises.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import (as_tensor, check_choice, check_field, check_finite, check_image, check_label_list,
                      check_labels, check_positive, check_same_shape, check_shape, check_tensor)
from .metrics import labels_present
from .spatial import compose, warp

__all__ = ["mse", "ncc_local", "ncc_reference", "ncc_global", "mutual_information", "diffusion",
           "bending_energy", "edge_aware_smoothness", "soft_dice", "one_hot", "field_mse",
           "MSE", "NCC", "MI", "Diffusion", "BendingEnergy", "EdgeAwareSmoothness", "SoftDice",
           "FieldMSE", "inverse_consistency", "bidirectional", "InverseConsistency",
           "LOSSES", "DEFAULT_LOSSES", "Term", "build_terms", "loss_terms"]

_REDUCTIONS = ("mean", "none")


# Intensity images have a channel or a few (RGB); a 4-axis tensor with more
# channels is far more often a volume that lost an axis than a 2D image.
_MAX_IMAGE_CHANNELS = 4


def _check_pair(fixed, warped, *, images: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a pair of images (``images=False``: one-hot maps, any channel count)."""
    fixed, warped = as_tensor(fixed, "fixed"), as_tensor(warped, "warped")
    for name, x in (("fixed", fixed), ("warped", warped)):
        check_image(x, name, max_channels=_MAX_IMAGE_CHANNELS if images else None)
    check_same_shape(fixed, warped, ("fixed", "warped"))
    return fixed, warped


def _mean_per_item(per_voxel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    dims = tuple(range(1, per_voxel.dim()))
    if mask is None:
        return per_voxel.mean(dim=dims)
    m = mask.to(per_voxel.dtype).expand_as(per_voxel)
    return (per_voxel * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1)


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    # One value per batch item: their mean (a scalar to minimise) or the values themselves.
    return per_item.mean() if reduction == "mean" else per_item


def _check_mask(mask, like: torch.Tensor):
    if mask is None:
        return None
    check_tensor(mask, "mask")
    if mask.dim() != like.dim() or mask.shape[2:] != like.shape[2:] or mask.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"mask: expected shape (B or 1, 1 or C, {', '.join(map(str, like.shape[2:]))}) "
                         f"to match the images {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask


def mse(fixed, warped, *, mask=None, reduction: str = "mean"):
    """Mean squared intensity difference (lower is better).

    ``mask`` (same spatial size, 0/1) restricts the mean to a region such as the
    fundus field of view (Shan et al. 2017's ROI mask).
    """
    fixed, warped = _check_pair(fixed, warped)
    check_choice(reduction, _REDUCTIONS, "reduction")
    return _reduce(_mean_per_item((fixed - warped).square(), _check_mask(mask, fixed)), reduction)


@functools.lru_cache(maxsize=32)
def _band(n: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # (n, n) matrix of ones where |i - j| <= window // 2: multiplying by it sums
    # a centred window along one axis, with zeros outside the image.
    i = torch.arange(n, device=device)
    return ((i[:, None] - i[None, :]).abs() <= window // 2).to(dtype)


def _box_sum_by_definition(x: torch.Tensor, window: int) -> torch.Tensor:
    # The sum over the window around each voxel as one dense convolution with a
    # cube of ones (zero padding), every (b, c) volume on its own: what _box_sum computes fast.
    B, C, *spatial = x.shape
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    ones = x.new_ones(1, 1, *[window] * len(spatial))
    return conv(x.reshape(B * C, 1, *spatial), ones, padding=window // 2).reshape(x.shape)


_BOX_BLOCK = 64  # output rows per product: fastest of 16, 32, 64, 128 and unblocked at 160x192x224 (CPU)


def _box_sum(x: torch.Tensor, window: int, *, overwrite: bool = False) -> torch.Tensor:
    """Sum over a ``window``-wide cube around each voxel, zero outside the image.

    ``x`` is ``(B, C, *spatial)``; every ``(b, c)`` volume is filtered on its own.
    With ``overwrite=True`` the memory of ``x`` is reused as scratch (its values
    are lost), which saves an allocation of the size of ``x``.
    """
    # The cube is separable: one pass per axis. Each pass is a matrix product
    # with a banded matrix of ones, done in blocks of _BOX_BLOCK output rows so
    # that only the band (window - 1 + block wide) is multiplied, not the zeros.
    # A product is one BLAS call over a whole volume, which on CPU beats a
    # grouped convolution or avg_pool by several times (few, large, vectorised
    # kernels; no per-row dispatch). Each pass reads the volume as (n, rest),
    # filtering its first axis, and writes (rest, n): the axes rotate, so after
    # ndim passes every axis has been filtered and the layout is back to the
    # start, with no transpose copies.
    shape = x.shape
    spatial = list(shape[2:])
    volumes = x.reshape(-1, *spatial)
    if not volumes.is_contiguous():
        volumes, overwrite = volumes.contiguous(), True  # a copy of our own
    r = window // 2
    src, spare = volumes, None
    for _ in spatial:
        n, rest = spatial[0], math.prod(spatial[1:])
        dst = spare if spare is not None else torch.empty(volumes.shape, dtype=x.dtype, device=x.device)
        band = _band(n, window, x.dtype, x.device)
        for p in range(volumes.shape[0]):
            a, out = src[p].reshape(n, rest), dst[p].view(rest, n)
            for start in range(0, n, _BOX_BLOCK):
                stop = min(start + _BOX_BLOCK, n)
                lo, hi = max(start - r, 0), min(stop + r, n)
                torch.mm(a[lo:hi].T, band[lo:hi, start:stop], out=out[:, start:stop])
        spatial = spatial[1:] + spatial[:1]
        spare = src if (src is not volumes or overwrite) else None
        src = dst
    return src.view(shape)


class _LocalNCCMap(torch.autograd.Function):
    """Squared local correlation per voxel (:func:`ncc_reference`), with a hand-written backward.

    Forward, per window of ``N`` voxels (sums ``S`` over the window)::

        cross = S_IJ - S_I S_J / N,  var_I = S_II - S_I^2 / N,  var_J likewise
        cc    = cross^2 / (var_I var_J + eps)

    (the formula of neurite's ``ncc``, to which voxelmorph 0.3.4 delegates).

    Backward: ``cc`` of the window at ``p`` depends on ``J(x)`` for every ``x``
    in it through ``d cross = I(x) - S_I/N`` and ``d var_J = 2 (J(x) - S_J/N)``.
    With ``q = cross / D``, ``D = var_I var_J + eps`` and ``G = dL/dcc``::

        a = 2 q G            (= G dcc/dcross)
        b = 2 q^2 G var_I    (= -2 G dcc/dvar_J)
        dL/dJ(x) = box(a)(x) I(x) - box(b)(x) J(x) - box(a S_I - b S_J)(x) / N

    since the box sum is its own adjoint. Three box sums per image, and only
    six volumes kept for the backward, instead of autograd's every intermediate.
    """

    @staticmethod
    def forward(ctx, I, J, window: int, eps: float):
        B, C, *spatial = I.shape
        I1, J1 = I.reshape(B * C, *spatial), J.reshape(B * C, *spatial)
        moments = I.new_empty(B * C, 5, *spatial)
        moments[:, 0], moments[:, 1] = I1, J1
        torch.mul(I1, I1, out=moments[:, 2])
        torch.mul(J1, J1, out=moments[:, 3])
        torch.mul(I1, J1, out=moments[:, 4])
        S_I, S_J, var_I, var_J, cross = _box_sum(moments, window, overwrite=True).unbind(1)
        n = float(window ** len(spatial))
        # In place: every full-size temporary costs a pass over memory.
        cross.addcmul_(S_I, S_J, value=-1 / n)
        var_I.addcmul_(S_I, S_I, value=-1 / n)
        var_J.addcmul_(S_J, S_J, value=-1 / n)
        q = torch.addcmul(torch.tensor(eps, dtype=I.dtype, device=I.device), var_I, var_J)
        torch.div(cross, q, out=q)
        ctx.save_for_backward(I, J, S_I, S_J, var_I, var_J, q)
        ctx.window, ctx.n = window, n
        return cross.mul_(q).view(I.shape)

    @staticmethod
    def backward(ctx, grad):
        I, J, S_I, S_J, var_I, var_J, q = ctx.saved_tensors
        volumes = S_I.shape

        def image_grad(this, other, S_this, S_other, var_other):
            maps = q.new_empty(volumes[0], 3, *volumes[1:])
            a, b, c = maps.unbind(1)
            torch.mul(q, grad.reshape(volumes), out=a).mul_(2)
            torch.mul(a, q, out=b).mul_(var_other)
            torch.mul(a, S_other, out=c).addcmul_(b, S_this, value=-1)
            box_a, box_b, box_c = _box_sum(maps, ctx.window, overwrite=True).unbind(1)
            g = box_a.mul_(other.reshape(volumes)).addcmul_(box_b, this.reshape(volumes), value=-1)
            return g.add_(box_c, alpha=-1 / ctx.n).view(this.shape)

        gI = image_grad(I, J, S_I, S_J, var_J) if ctx.needs_input_grad[0] else None
        gJ = image_grad(J, I, S_J, S_I, var_I) if ctx.needs_input_grad[1] else None
        return gI, gJ, None, None


def ncc_local(fixed, warped, *, window: int = 9, eps: float = 1e-5, reduction: str = "mean"):
    """Negative local normalised cross-correlation (lower is better, -1 is perfect).

    The squared correlation coefficient in a ``window``-wide cube around each
    voxel (zero padding, as in VoxelMorph), averaged over voxels, negated.
    Invariant to a positive affine change of intensities in windows inside the
    image; windows that overlap the border see the zero padding, which a scale
    leaves alone but an offset does not.

    Parameters
    ----------
    fixed, warped : Tensor, shape (B, C, *spatial)
    window : int
        Odd window width in voxels (default 9, as VoxelMorph).
    eps : float
        Added to the variance product so flat regions give 0, not NaN.
    """
    fixed, warped = _check_ncc_args(fixed, warped, window, reduction)
    return _reduce(_mean_per_item(-_LocalNCCMap.apply(fixed, warped, window, eps)), reduction)


def ncc_reference(fixed, warped, *, window: int = 9, eps: float = 1e-5, reduction: str = "mean"):
    """:func:`ncc_local` written as its definition: plain, slow, differentiated by autograd.

    With ``S(x)`` the sum of ``x`` over the window of ``n = window ** ndim``
    voxels around each voxel (zero outside the image)::

        cross = S(F W) - S(F) S(W) / n        (n times the local covariance)
        var_F = S(F F) - S(F)^2 / n           (n times the local variances)
        var_W = S(W W) - S(W)^2 / n
        cc    = cross^2 / (var_F var_W + eps)

    and the loss is ``-mean(cc)``. ``ncc_local`` computes the same numbers
    several times faster and with a fraction of the memory (``tests/test_ncc_fast.py``
    holds the two, and their gradients, equal).
    """
    fixed, warped = _check_ncc_args(fixed, warped, window, reduction)
    return _reduce(_mean_per_item(-_local_cc_by_definition(fixed, warped, window, eps)), reduction)


def _local_cc_by_definition(f, w, window: int, eps: float) -> torch.Tensor:
    n = window ** (f.dim() - 2)

    def S(x):  # the sum over the window around each voxel
        return _box_sum_by_definition(x, window)

    cross = S(f * w) - S(f) * S(w) / n
    var_f = S(f * f) - S(f) ** 2 / n
    var_w = S(w * w) - S(w) ** 2 / n
    return cross ** 2 / (var_f * var_w + eps)


def _check_ncc_args(fixed, warped, window, reduction):
    fixed, warped = _check_pair(fixed, warped)
    check_choice(reduction, _REDUCTIONS, "reduction")
    check_positive(window, "window", integer=True)
    if window % 2 == 0:
        raise ValueError(f"window: expected an odd width so the window is centred on the voxel, got {window}")
    if min(fixed.shape[2:]) < 1:
        raise ValueError(f"fixed: expected at least one voxel along each axis, got shape "
                         f"{tuple(fixed.shape)}")
    return fixed, warped


def ncc_global(fixed, warped, *, eps: float = 1e-5, reduction: str = "mean"):
    """Negative global correlation coefficient over each image (lower is better)."""
    fixed, warped = _check_pair(fixed, warped)
    check_choice(reduction, _REDUCTIONS, "reduction")
    f = fixed.flatten(1) - fixed.flatten(1).mean(1, keepdim=True)
    w = warped.flatten(1) - warped.flatten(1).mean(1, keepdim=True)
    cc = (f * w).sum(1) / torch.sqrt(f.square().sum(1) * w.square().sum(1) + eps)
    return _reduce(-cc, reduction)


def _parzen_weights(x: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    # (B, N) intensities -> (B, N, bins) soft bin memberships that sum to one.
    w = torch.exp(-0.5 * ((x.unsqueeze(-1) - centres) / sigma).square())
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def mutual_information(fixed, warped, *, bins: int = 32, value_range=(0.0, 1.0), mask=None,
                       reduction: str = "mean"):
    """Negative mutual information with Parzen (Gaussian) windows; lower is better.

    Each intensity belongs softly to ``bins`` Gaussian bins of width one bin
    spacing over ``value_range`` (images are expected in ``[0, 1]``), which makes
    the joint histogram, and so MI, differentiable. Insensitive to any one-to-one
    intensity mapping, so it works across contrasts. Memory grows as
    voxels x bins: use it on 2D images or downsampled volumes.
    """
    fixed, warped = _check_pair(fixed, warped)
    check_positive(bins, "bins", integer=True)
    check_choice(reduction, _REDUCTIONS, "reduction")
    lo, hi = map(float, value_range)
    if not hi > lo:
        raise ValueError(f"value_range: expected (low, high) with high > low, got {value_range}")
    mask = _check_mask(mask, fixed)
    centres = torch.linspace(lo, hi, bins, device=fixed.device, dtype=fixed.dtype)
    sigma = (hi - lo) / max(bins - 1, 1)
    wf = _parzen_weights(fixed.flatten(1), centres, sigma)
    ww = _parzen_weights(warped.flatten(1), centres, sigma)
    if mask is not None:
        m = mask.to(fixed.dtype).expand_as(fixed).flatten(1).unsqueeze(-1)
        wf = wf * m
    joint = torch.einsum("bni,bnj->bij", wf, ww)
    joint = joint / joint.sum((1, 2), keepdim=True).clamp_min(1e-12)
    pf, pw = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    mi = (joint * (torch.log(joint + 1e-10) - torch.log(pf * pw + 1e-10))).sum((1, 2))
    return _reduce(-mi, reduction)


def _forward_differences(u: torch.Tensor) -> list[torch.Tensor]:
    return [torch.diff(u, dim=axis) for axis in range(2, u.dim())]


def diffusion(disp, *, penalty: str = "l2", reduction: str = "mean"):
    """Diffusion regulariser: mean squared (``"l2"``) or absolute (``"l1"``)
    forward difference of the displacement, averaged over axes (VoxelMorph's
    ``Grad``). Zero for any translation; lower is smoother."""
    disp = check_field(as_tensor(disp, "disp"), "disp")
    check_choice(penalty, ("l2", "l1"), "penalty")
    check_choice(reduction, _REDUCTIONS, "reduction")
    f = torch.square if penalty == "l2" else torch.abs
    terms = [f(d).flatten(1).mean(1) for d in _forward_differences(disp)]
    return _reduce(torch.stack(terms).mean(0), reduction)


def bending_energy(disp, *, reduction: str = "mean"):
    """Bending energy: mean of squared second derivatives (central differences),
    ``sum_ij (d^2 u / dx_i dx_j)^2``; zero for any affine field."""
    disp = check_field(as_tensor(disp, "disp"), "disp")
    check_choice(reduction, _REDUCTIONS, "reduction")
    nd = disp.dim() - 2
    if min(disp.shape[2:]) < 3:
        raise ValueError(f"disp: bending energy needs at least 3 voxels along each axis, got "
                         f"shape {tuple(disp.shape)}")
    first = [torch.gradient(disp, dim=2 + i)[0] for i in range(nd)]
    total = 0
    for i in range(nd):
        for j in range(nd):
            second = torch.gradient(first[i], dim=2 + j)[0]
            total = total + second.square().flatten(1).mean(1)
    return _reduce(total, reduction)


def edge_aware_smoothness(disp, image, *, alpha: float = 1.0, reduction: str = "mean"):
    """Edge-aware smoothness (Shan et al. 2017): ``|grad u|^2 exp(-alpha |grad I|)``.

    The displacement may change quickly across image edges (vessel borders)
    and is kept smooth in flat regions. ``image`` is the fixed image
    ``(B, C, *spatial)``; gradients are forward differences, averaged over channels.
    """
    disp = check_field(as_tensor(disp, "disp"), "disp")
    image = check_tensor(as_tensor(image, "image"), "image", floating=True)
    check_finite(image, "image")
    if image.dim() != disp.dim() or image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"image: expected spatial size {tuple(disp.shape[2:])} to match disp, "
                         f"got shape {tuple(image.shape)}")
    check_choice(reduction, _REDUCTIONS, "reduction")
    terms = []
    for du, dI in zip(_forward_differences(disp), _forward_differences(image)):
        weight = torch.exp(-alpha * dI.abs().mean(1, keepdim=True))
        terms.append((du.square() * weight).flatten(1).mean(1))
    return _reduce(torch.stack(terms).mean(0), reduction)


def field_mse(disp, true_disp, *, reduction: str = "mean"):
    """Mean squared difference of two displacement fields (voxels squared; lower is better).

    The supervised loss of RegNet (Sokooti et al. 2017): a network trained on
    pairs made with a known field ``true_disp`` learns to predict it. Both are
    ``(B, ndim, *spatial)``; the mean runs over channels and voxels.
    """
    disp = check_field(as_tensor(disp, "disp"), "disp")
    true_disp = check_field(as_tensor(true_disp, "true_disp"), "true_disp")
    check_same_shape(disp, true_disp, ("disp", "true_disp"))
    check_choice(reduction, _REDUCTIONS, "reduction")
    return _reduce((disp - true_disp).square().flatten(1).mean(1), reduction)


def one_hot(labels, label_list) -> torch.Tensor:
    """Integer label map ``(B, 1, *spatial)`` -> float one-hot ``(B, L, *spatial)``
    over ``label_list`` (background and unlisted labels get all zeros)."""
    labels = check_tensor(as_tensor(labels, "labels"), "labels")
    check_labels(labels, "labels")
    check_shape(labels, "B 1 *S", "labels")
    label_list = check_label_list(label_list, "label_list")
    if not label_list:
        raise ValueError("label_list: expected at least one label, got an empty list")
    ids = torch.as_tensor(label_list, device=labels.device).view(1, -1, *([1] * (labels.dim() - 2)))
    return (labels.long() == ids.long()).float()


def soft_dice(fixed_onehot, warped_onehot, *, eps: float = 1e-5, reduction: str = "mean"):
    """1 - mean soft Dice over channels of one-hot (or probabilistic) label maps.

    Use :func:`one_hot` on both label maps, warp the moving one with linear
    interpolation so the loss is differentiable (label maps are warped with
    nearest neighbour only for evaluation).
    """
    fixed_onehot, warped_onehot = _check_pair(fixed_onehot, warped_onehot, images=False)
    check_choice(reduction, _REDUCTIONS, "reduction")
    dims = tuple(range(2, fixed_onehot.dim()))
    top = 2 * (fixed_onehot * warped_onehot).sum(dims)
    bottom = (fixed_onehot + warped_onehot).sum(dims)
    return _reduce(1 - (top / (bottom + eps)).mean(1), reduction)


class MSE(nn.Module):
    """Module form of :func:`mse`: ``forward(fixed, warped, mask=None)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, fixed, warped, mask=None):
        return mse(fixed, warped, mask=mask, reduction=self.reduction)


class NCC(nn.Module):
    """Module form of :func:`ncc_local` (``kind="local"``) or :func:`ncc_global`."""

    def __init__(self, window: int = 9, kind: str = "local", reduction: str = "mean"):
        super().__init__()
        self.window, self.kind, self.reduction = window, check_choice(kind, ("local", "global"), "kind"), reduction

    def forward(self, fixed, warped):
        if self.kind == "global":
            return ncc_global(fixed, warped, reduction=self.reduction)
        return ncc_local(fixed, warped, window=self.window, reduction=self.reduction)


class MI(nn.Module):
    """Module form of :func:`mutual_information`."""

    def __init__(self, bins: int = 32, value_range=(0.0, 1.0), reduction: str = "mean"):
        super().__init__()
        self.bins, self.value_range, self.reduction = bins, value_range, reduction

    def forward(self, fixed, warped, mask=None):
        return mutual_information(fixed, warped, bins=self.bins, value_range=self.value_range,
                                  mask=mask, reduction=self.reduction)


class Diffusion(nn.Module):
    """Module form of :func:`diffusion`: ``forward(disp)``."""

    def __init__(self, penalty: str = "l2", reduction: str = "mean"):
        super().__init__()
        self.penalty, self.reduction = penalty, reduction

    def forward(self, disp):
        return diffusion(disp, penalty=self.penalty, reduction=self.reduction)


class BendingEnergy(nn.Module):
    """Module form of :func:`bending_energy`: ``forward(disp)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, disp):
        return bending_energy(disp, reduction=self.reduction)


class EdgeAwareSmoothness(nn.Module):
    """Module form of :func:`edge_aware_smoothness`: ``forward(disp, image)``."""

    def __init__(self, alpha: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.alpha, self.reduction = alpha, reduction

    def forward(self, disp, image):
        return edge_aware_smoothness(disp, image, alpha=self.alpha, reduction=self.reduction)


class SoftDice(nn.Module):
    """Module form of :func:`soft_dice`: ``forward(fixed_onehot, warped_onehot)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, fixed_onehot, warped_onehot):
        return soft_dice(fixed_onehot, warped_onehot, reduction=self.reduction)


class FieldMSE(nn.Module):
    """Module form of :func:`field_mse`: ``forward(disp, true_disp)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, disp, true_disp):
        return field_mse(disp, true_disp, reduction=self.reduction)


# --------------------------------------------------------- inverse consistency

def inverse_consistency(u_ab, u_ba, *, kind: str = "icon", reduction: str = "mean"):
    """Inverse-consistency penalty for a pair of fields (lower is better, 0 for exact inverses).

    With ``w = compose(u_ab, u_ba)``, the displacement of ``phi_ab o phi_ba - id``,
    and ``w' = compose(u_ba, u_ab)`` the other way round:

    * ``kind="icon"`` (Greer et al., ICCV 2021): the mean of ``|w|^2``;
    * ``kind="gradicon"`` (Tian et al., CVPR 2023): the mean of
      ``||grad w||_F^2``, the squared Frobenius norm of the Jacobian of the
      composition minus the identity (central differences, as
      :func:`regedu.metrics.jacobian_determinant`). It ignores a constant
      offset between the two maps and, as its paper shows, regularises less
      strongly, so the fields can follow the images more closely.

    averaged over ``w`` and ``w'`` so that swapping a and b gives the same value.

    Parameters
    ----------
    u_ab : Tensor, shape (B, ndim, *spatial)
        The field of ``model(moving=a, fixed=b)`` (on b's grid).
    u_ba : Tensor, shape (B, ndim, *spatial)
        The field of ``model(moving=b, fixed=a)`` (on a's grid);
        :func:`bidirectional` returns both.
    kind : {"icon", "gradicon"}
    reduction : {"mean", "none"}

    Returns
    -------
    Tensor: a scalar, or ``(B,)`` with ``reduction="none"``; in voxels squared
    (``"icon"``) or unitless (``"gradicon"``).

    Convention: docs/conventions.md, "Conventions" (``compose``, voxels).

    >>> u = torch.zeros(1, 2, 6, 6); u[:, 0] = 1.0
    >>> float(inverse_consistency(u, -u)), float(inverse_consistency(u, u))   # |2 u|^2 = 4
    (0.0, 4.0)
    >>> float(inverse_consistency(u, u, kind="gradicon"))   # blind to a constant offset
    0.0
    """
    u_ab = check_field(as_tensor(u_ab, "u_ab"), "u_ab")
    u_ba = check_field(as_tensor(u_ba, "u_ba"), "u_ba", spatial=tuple(u_ab.shape[2:]))
    check_choice(kind, ("icon", "gradicon"), "kind")
    check_choice(reduction, _REDUCTIONS, "reduction")
    nd = u_ab.dim() - 2
    if kind == "gradicon" and min(u_ab.shape[2:]) < 2:
        raise ValueError(f"u_ab: GradICON needs at least 2 voxels along each axis for derivatives, "
                         f"got shape {tuple(u_ab.shape)}")
    per_item = 0
    for w in (compose(u_ab, u_ba), compose(u_ba, u_ab)):
        if kind == "icon":
            per_voxel = w.square().sum(1)
        else:
            # grad of phi o phi' - id is the Jacobian of the composition minus I.
            per_voxel = sum(g.square().sum(1) for g in torch.gradient(w, dim=tuple(range(2, 2 + nd))))
        per_item = per_item + per_voxel.flatten(1).mean(1) / 2
    return _reduce(per_item, reduction)


def bidirectional(model, a, b):
    """Run ``model`` both ways round in one batch: ``(u_ab, u_ba)``.

    ``u_ab`` is the field of ``model(moving=a, fixed=b)`` and ``u_ba`` that of
    ``model(moving=b, fixed=a)``, ready for :func:`inverse_consistency` and for a
    similarity term on each direction. The two directions go through the model
    as one batch of ``2 B`` (one forward pass; a model with batch norm sees both).

    Parameters
    ----------
    model : callable
        ``model(moving, fixed)`` returning a displacement ``(B, ndim, *spatial)`` or
        an object with ``.disp`` (a regedu network's ``RegistrationOutput``).
    a, b : Tensor, shape (B, C, *spatial)

    Returns
    -------
    (Tensor, Tensor), each (B, ndim, *spatial).

    Convention: docs/conventions.md, "Conventions" (fields pull moving into fixed).

    >>> shift = lambda moving, fixed: torch.ones(moving.shape[0], 2, *moving.shape[2:])
    >>> u_ab, u_ba = bidirectional(shift, torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    >>> tuple(u_ab.shape), tuple(u_ba.shape)
    ((1, 2, 4, 4), (1, 2, 4, 4))
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable (moving, fixed) -> displacement, got a "
                        f"{type(model).__name__}")
    a = check_tensor(as_tensor(a, "a"), "a", floating=True)
    b = check_tensor(as_tensor(b, "b"), "b", floating=True)
    check_shape(a, "B C *S", "a")
    check_same_shape(a, b, ("a", "b"))
    out = model(torch.cat([a, b]), torch.cat([b, a]))
    disp = getattr(out, "disp", out)
    if not isinstance(disp, torch.Tensor):
        raise TypeError(f"model: expected it to return a displacement tensor or an object with "
                        f".disp, got a {type(out).__name__}")
    check_field(disp, "model's displacement", spatial=tuple(a.shape[2:]), batch=2 * a.shape[0])
    return disp[:a.shape[0]], disp[a.shape[0]:]


class InverseConsistency(nn.Module):
    """Module form of :func:`inverse_consistency`: ``forward(u_ab, u_ba)``."""

    def __init__(self, kind: str = "icon", reduction: str = "mean"):
        super().__init__()
        self.kind, self.reduction = check_choice(kind, ("icon", "gradicon"), "kind"), reduction

    def forward(self, u_ab, u_ba):
        return inverse_consistency(u_ab, u_ba, kind=self.kind, reduction=self.reduction)


# ---------------------------------------------------------------- the objective of a training run

#: The terms a training run can weigh, by name: ``name -> (kind, class)``.
#: The class's defaults are the term's (NCC: 9-voxel windows, as VoxelMorph).
#: The kind says what a term is computed on:
#:
#: - ``"similarity"``: ``fn(fixed, warped)``;
#: - ``"regulariser"``: ``fn(field)`` (the velocity when the model integrates one);
#: - ``"edge"``: ``fn(disp, fixed)``, smoothness that follows the fixed image's edges;
#: - ``"dice"``: ``fn(fixed_onehot, warped_onehot)``, needs ``moving_seg`` and ``fixed_seg``;
#: - ``"field"``: ``fn(disp, true_disp)``, needs the true displacement (supervised training).
LOSSES: dict[str, tuple[str, Callable[[], Callable]]] = {
    "mse": ("similarity", MSE),
    "ncc": ("similarity", NCC),
    "ncc_global": ("similarity", functools.partial(NCC, kind="global")),
    "mi": ("similarity", MI),
    "diffusion": ("regulariser", Diffusion),
    "bending": ("regulariser", BendingEnergy),
    "edge_aware": ("edge", EdgeAwareSmoothness),
    "dice": ("dice", SoftDice),
    "field": ("field", FieldMSE),
}

#: The objective when none is given (``regedu.train.fit``, ``regedu train``):
#: VoxelMorph's unsupervised loss, local NCC + diffusion.
DEFAULT_LOSSES = MappingProxyType({"ncc": 1.0, "diffusion": 1.0})

# A term that compares with data; without one nothing ties the field to the images.
_DATA_KINDS = ("similarity", "dice", "field")


@dataclass(frozen=True)
class Term:
    """One weighted term of an objective (see :func:`build_terms`)."""
    name: str
    kind: str
    fn: Callable
    weight: float


def build_terms(losses=DEFAULT_LOSSES, *, require_data: bool = True) -> list[Term]:
    """The terms of an objective: ``{"ncc": 1.0, "diffusion": 1.0}`` -> a list of :class:`Term`.

    A value is a weight, or a ``(callable, weight)`` pair that replaces the
    default callable (``{"ncc": (NCC(window=5), 1.0)}``). Names are the keys
    of :data:`LOSSES`; weights are finite and non-negative (every term is lower
    is better). A list of terms is returned as it is. An objective needs a data
    term (a similarity, Dice or field error) unless ``require_data=False``: a
    caller that supplies its own (``regedu.adversarial``'s discriminator) asks
    for the regularisers alone.
    """
    if isinstance(losses, list) and all(isinstance(t, Term) for t in losses):
        return losses
    if not isinstance(losses, Mapping) or not losses:
        raise TypeError(f"losses: expected a non-empty dict such as {{'ncc': 1.0, 'diffusion': 1.0}}, "
                        f"got {losses!r}")
    terms = []
    for name, spec in losses.items():
        if name not in LOSSES:
            raise ValueError(f"losses: unknown term {name!r}; expected names from "
                             f"{', '.join(map(repr, LOSSES))}")
        kind, default = LOSSES[name]
        fn, weight = spec if isinstance(spec, tuple) else (default(), spec)
        if not callable(fn) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"losses[{name!r}]: expected a weight or a (callable, weight) pair, "
                            f"got {spec!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"losses[{name!r}]: expected a finite weight >= 0 (every term is "
                             f"lower-is-better), got {weight!r}")
        terms.append(Term(name, kind, fn, float(weight)))
    if require_data and not any(t.kind in _DATA_KINDS for t in terms):
        raise ValueError(f"losses: no similarity term in {list(losses)}; add one of "
                         f"'mse', 'ncc', 'ncc_global', 'mi' (or 'dice' with label maps, or 'field' "
                         f"with true displacements)")
    return terms


def _field_terms(terms, field, reg_field, moving, fixed, moving_onehot, fixed_onehot, true_disp):
    """Weighted terms for one field: similarity, regulariser(s), Dice, field error."""
    out = {}
    warped = None
    for t in terms:
        if t.weight == 0:
            continue
        if t.kind == "similarity":
            warped = warp(moving, field) if warped is None else warped
            value = t.fn(fixed, warped)
        elif t.kind == "regulariser":
            value = t.fn(reg_field)
        elif t.kind == "edge":
            value = t.fn(field, fixed)
        elif t.kind == "field":
            if true_disp is None:
                raise ValueError(f"losses[{t.name!r}]: the batch holds no true displacement "
                                 f"('disp'); supervise with pairs made from a known field (e.g. "
                                 f"regedu.datasets.FundusPairs) or drop the term")
            value = t.fn(field, true_disp)
        else:
            if moving_onehot is None:
                continue
            value = t.fn(fixed_onehot, warp(moving_onehot, field))
        out[t.name] = t.weight * value
    return out


def loss_terms(output, moving: torch.Tensor, fixed: torch.Tensor, *, losses=DEFAULT_LOSSES,
               moving_seg: torch.Tensor | None = None, fixed_seg: torch.Tensor | None = None,
               true_disp: torch.Tensor | None = None, labels=None,
               deep_weight: float = 1.0, require_data: bool = True) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one batch and their sum.

    Parameters
    ----------
    output : RegistrationOutput
        What the model returned for ``(moving, fixed)``.
    moving, fixed : Tensor, shape (B, C, *spatial)
    losses : dict or list of Term
        Term name -> weight, e.g. ``{"ncc": 1.0, "diffusion": 1.0, "dice": 0.1}``;
        a value may also be a ``(callable, weight)`` pair to replace the default
        callable (``{"ncc": (regedu.losses.NCC(window=5), 1.0)}``). Names are the
        keys of :data:`LOSSES`. Default :data:`DEFAULT_LOSSES`.
    moving_seg, fixed_seg : Tensor, shape (B, 1, *spatial), integer, optional
        Label maps. The ``"dice"`` term compares ``fixed_seg`` with the one-hot
        ``moving_seg`` warped linearly (differentiable); it is skipped without them.
    true_disp : Tensor, shape (B, ndim, *spatial), optional
        The true displacement of a pair made from a known field, for the ``"field"`` term.
    labels : sequence of int, optional
        Structures for the Dice term; default every non-zero label in the batch.
    deep_weight : float
        Weight of the deep-supervision term: each field in ``output.deep`` is
        supervised exactly like the final one (same terms, same weights), and the
        ``"deep"`` term is ``deep_weight`` times their mean.
    require_data : bool
        As for :func:`build_terms`: ``False`` allows regularisers alone.

    Returns
    -------
    dict
        ``{name: weighted term}`` for every active term, ``"deep"`` when the model
        has deep-supervision fields, and ``"loss"``, their sum (what is minimised).

    Notes
    -----
    The regulariser acts on ``output.velocity`` when the model integrates one
    (as VoxelMorph regularises its pre-integration field) and on the
    displacement otherwise. Edge-aware smoothness always acts on the displacement.

    Examples
    --------
    >>> from regedu import nets
    >>> model = nets.create("unet", spatial_dims=2)
    >>> moving, fixed = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    >>> terms = loss_terms(model(moving, fixed), moving, fixed, losses={"mse": 1.0, "diffusion": 0.1})
    >>> sorted(terms)
    ['diffusion', 'loss', 'mse']
    >>> bool(terms["loss"] == terms["mse"] + terms["diffusion"])
    True
    """
    terms = build_terms(losses, require_data=require_data)
    moving_onehot = fixed_onehot = None
    if moving_seg is not None and fixed_seg is not None and any(t.kind == "dice" for t in terms):
        label_list = check_label_list(labels) if labels is not None else labels_present(moving_seg, fixed_seg)
        moving_onehot = one_hot(moving_seg, label_list).to(moving.dtype)
        fixed_onehot = one_hot(fixed_seg, label_list).to(moving.dtype)
    fields = (moving, fixed, moving_onehot, fixed_onehot, true_disp)
    reg_field = output.velocity if output.velocity is not None else output.disp
    out = _field_terms(terms, output.disp, reg_field, *fields)
    if output.deep and deep_weight:
        deep = [sum(_field_terms(terms, d, d, *fields).values()) for d in output.deep]
        out["deep"] = deep_weight * sum(deep) / len(deep)
    out["loss"] = sum(out.values())
    return out
