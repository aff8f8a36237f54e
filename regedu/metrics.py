"""Evaluation metrics: Dice, Jacobian determinant, folding, TRE, FIRE curves.

Pure functions; none of them is a loss (see :mod:`regedu.losses` for those).
Convention: displacements are ``(B, ndim, *spatial)`` in voxels, tensor-axis
order; ``phi(x) = x + u(x)``; points are voxel coordinates in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._checks import as_tensor, check_field, check_finite, check_label_list, check_labels, check_same_shape
from .spatial import warp_points

__all__ = ["DiceResult", "dice", "labels_present", "jacobian_determinant", "folding_stats", "tre",
           "fire_success_curve", "fire_auc", "FIRE_THRESHOLDS"]

FIRE_THRESHOLDS = np.arange(1, 26)


@dataclass(frozen=True)
class DiceResult:
    """Dice per label (``per_label[i]`` belongs to ``labels[i]``) with mean and std.

    A label absent from both maps has Dice NaN and is left out of mean and std.
    """
    labels: np.ndarray
    per_label: np.ndarray
    mean: float
    std: float

    def as_dict(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in zip(self.labels, self.per_label)}


def _label_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a label map as numpy array or torch.Tensor, got a {type(x).__name__}")
    check_labels(x, name)
    return x


def dice(a, b, labels) -> DiceResult:
    """Dice overlap ``2 |A n B| / (|A| + |B|)`` for each label in ``labels``.

    Parameters
    ----------
    a, b : array or Tensor of integer labels, same shape (any shape)
        E.g. the fixed segmentation and the moving one warped with nearest neighbour.
    labels : sequence of int
        The structures to score, explicitly (background 0 is never counted).
        Whole numbers only, each once: ``[1.5]`` or the string ``"123"`` is refused.

    >>> r = dice(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), [1, 2])
    >>> r.per_label.round(4).tolist(), round(r.mean, 4)
    ([0.6667, 0.6667], 0.6667)
    """
    a, b = _label_array(a, "a"), _label_array(b, "b")
    check_same_shape(a, b, ("a", "b"))
    labels = np.asarray([v for v in check_label_list(labels) if v != 0], dtype=np.int64)
    if labels.size == 0:
        raise ValueError("labels: expected at least one non-background label, got none")
    scores = np.empty(len(labels))
    for i, lab in enumerate(labels):
        in_a, in_b = a == lab, b == lab
        total = int(in_a.sum()) + int(in_b.sum())
        scores[i] = 2.0 * np.logical_and(in_a, in_b).sum() / total if total else np.nan
    present = scores[~np.isnan(scores)]
    mean = float(present.mean()) if present.size else float("nan")
    std = float(present.std()) if present.size else float("nan")
    return DiceResult(labels, scores, mean, std)


def labels_present(*label_maps) -> list[int]:
    """Every label other than background 0 found in the label maps, in order:
    the structures to score when no list is given.

    >>> labels_present(torch.tensor([0, 2, 2]), torch.tensor([3, 0, 2]))
    [2, 3]
    """
    maps = [as_tensor(m, f"label_maps[{i}]").flatten() for i, m in enumerate(label_maps)]
    return [int(v) for v in torch.unique(torch.cat(maps)).tolist() if v != 0]


def jacobian_determinant(disp) -> torch.Tensor:
    """Determinant of the Jacobian of ``phi = id + u``, ``(B, *spatial)``.

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


def folding_stats(disp, mask=None) -> dict[str, float]:
    """Folding of a displacement: ``percent_folding`` (% of voxels with det J <= 0)
    and ``sdlogj`` (std of log det J, det clipped to [1e-9, 1e9]).

    ``mask`` (bool, ``(B, *spatial)`` or ``(*spatial)``) restricts both to a region,
    e.g. the brain.

    >>> folding_stats(torch.zeros(1, 3, 4, 4, 4))
    {'percent_folding': 0.0, 'sdlogj': 0.0}
    """
    det = jacobian_determinant(disp)
    if mask is not None:
        mask = as_tensor(mask, "mask").to(torch.bool).to(det.device)
        if tuple(mask.shape[-det.dim() + 1:]) != tuple(det.shape[1:]):
            raise ValueError(f"mask: expected spatial size {tuple(det.shape[1:])}, got {tuple(mask.shape)}")
        det = det[mask.expand_as(det)]
    det = det.double().flatten()
    if det.numel() == 0:
        raise ValueError("mask: selects no voxel")
    logj = det.clamp(1e-9, 1e9).log()
    return {"percent_folding": float((det <= 0).double().mean() * 100),
            "sdlogj": float(logj.std(unbiased=False))}


def tre(fixed_points, moving_points, disp, *, spacing=1.0) -> torch.Tensor:
    """Target registration error per point, in the units of ``spacing``.

    A fixed point ``p`` maps to ``p + u(p)`` in the moving image; TRE is its
    distance to the corresponding moving point, axis ``k`` scaled by
    ``spacing[k]`` (mm per voxel, or 1 for pixels).

    Parameters
    ----------
    fixed_points, moving_points : Tensor, shape (N, ndim) or (B, N, ndim)
        Voxel coordinates, tensor-axis order (row, column in 2D).
    disp : Tensor, shape (B, ndim, *spatial)

    Returns
    -------
    Tensor of shape (N,) or (B, N).
    """
    fixed_points = as_tensor(fixed_points, "fixed_points").to(torch.float64)
    moving_points = as_tensor(moving_points, "moving_points").to(torch.float64)
    check_same_shape(fixed_points, moving_points, ("fixed_points", "moving_points"))
    check_finite(moving_points, "moving_points")
    disp = as_tensor(disp, "disp")
    mapped = warp_points(fixed_points.to(disp.dtype), disp).to(torch.float64)
    nd = disp.shape[1]
    spacing = torch.as_tensor(spacing, dtype=torch.float64).reshape(-1)
    if spacing.numel() not in (1, nd):
        raise ValueError(f"spacing: expected one number or {nd} (one per axis), got {spacing.tolist()}")
    return ((mapped - moving_points.to(mapped.device)) * spacing.to(mapped.device)).norm(dim=-1)


def _pair_errors(errors) -> np.ndarray:
    # One mean error per pair; None or NaN (no result) stays NaN and never succeeds.
    out = []
    for e in errors:
        if e is None:
            out.append(np.nan)
            continue
        e = np.asarray(e.detach().cpu() if isinstance(e, torch.Tensor) else e, dtype=float)
        out.append(float(e.mean()) if e.size else np.nan)
    return np.asarray(out)


def fire_success_curve(errors, thresholds=FIRE_THRESHOLDS):
    """FIRE success curve: for each threshold, the fraction of pairs whose mean
    TRE is below it (Hernandez-Matas et al. 2017).

    ``errors`` is a sequence with one entry per pair: an array of per-point
    errors in pixels (or the pair's mean error), or None when the method gave
    no result (counted as failed). Returns ``(thresholds, success)``.
    """
    pair = _pair_errors(errors)
    if pair.size == 0:
        raise ValueError("errors: expected at least one pair, got none")
    thresholds = np.asarray(thresholds, dtype=float)
    with np.errstate(invalid="ignore"):
        success = np.array([(pair < t).mean() for t in thresholds])
    return thresholds, success


def fire_auc(errors, thresholds=FIRE_THRESHOLDS) -> float:
    """Area under the FIRE success curve, normalised to [0, 1] (the mean of the
    curve over thresholds 1..25 px).

    >>> round(fire_auc([[0.5], [10.5], None]), 4)   # (25 + 15 + 0) / (3 * 25)
    0.5333
    """
    _, success = fire_success_curve(errors, thresholds)
    return float(success.mean())
