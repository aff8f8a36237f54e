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
from .spatial import compose, jacobian_determinant, warp_points

__all__ = ["DiceResult", "dice", "labels_present", "jacobian_determinant", "folding_stats", "tre",
           "fire_success_curve", "fire_auc", "FIRE_THRESHOLDS", "inverse_consistency_map",
           "inverse_consistency_error", "SurfaceResult", "hausdorff95", "average_surface_distance"]

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


# ------------------------------------------------------------ inverse consistency

def _spacing_vector(spacing, nd: int, *, dtype=torch.float64) -> torch.Tensor:
    spacing = torch.as_tensor(spacing, dtype=dtype).reshape(-1)
    if spacing.numel() not in (1, nd) or not bool(torch.isfinite(spacing).all()) \
            or bool((spacing <= 0).any()):
        raise ValueError(f"spacing: expected one positive number or {nd} (one per axis), "
                         f"got {spacing.tolist()}")
    return spacing.expand(nd)


def inverse_consistency_map(u_ab, u_ba, *, spacing=1.0) -> torch.Tensor:
    """Per voxel ``|phi_ab o phi_ba (x) - x|``, the inverse-consistency error map.

    Parameters
    ----------
    u_ab : Tensor, shape (B, ndim, *spatial)
        The field that registers image a (moving) to b (fixed); it lives on b's grid.
    u_ba : Tensor, shape (B, ndim, *spatial)
        The field of the reverse registration, b (moving) to a (fixed), on a's grid.
    spacing : float or sequence of float
        Voxel size per axis; the error is in these units (1: voxels).

    Returns
    -------
    Tensor, shape (B, *spatial), on a's grid: the length of ``compose(u_ab, u_ba)``
    (going a -> b -> a should come back; 0 is perfect, lower is better).

    Convention: docs/conventions.md, "Conventions" (``compose``, voxels).

    >>> u = torch.zeros(1, 2, 4, 5); u[:, 0] = 1.0
    >>> float(inverse_consistency_map(u, -u).max()), float(inverse_consistency_map(u, u).max())
    (0.0, 2.0)
    """
    u_ab, u_ba = as_tensor(u_ab, "u_ab"), as_tensor(u_ba, "u_ba")
    check_field(u_ab, "u_ab")
    check_field(u_ba, "u_ba", spatial=tuple(u_ab.shape[2:]))
    nd = u_ab.shape[1]
    scale = _spacing_vector(spacing, nd, dtype=u_ab.dtype).to(u_ab.device).view(1, nd, *([1] * nd))
    return (compose(u_ab, u_ba) * scale).norm(dim=1)


def inverse_consistency_error(u_ab, u_ba, *, mask=None, spacing=1.0) -> dict[str, float]:
    """Inverse-consistency error of a pair of registrations, both ways round.

    The mean and max of :func:`inverse_consistency_map` over ``compose(u_ab, u_ba)``
    (a -> b -> a, on a's grid) and ``compose(u_ba, u_ab)`` (b -> a -> b, on b's
    grid) pooled. Registering a to b and b to a separately rarely gives inverse
    maps; a symmetric or ICON-trained method should score near 0. Lower is better.

    Parameters
    ----------
    u_ab, u_ba : Tensor, shape (B, ndim, *spatial)
        As in :func:`inverse_consistency_map`.
    mask : bool array, shape (*spatial) or (B, *spatial), optional
        Voxels to count in both maps (e.g. the brain); default all.
    spacing : float or sequence of float
        Voxel size per axis; the error is in its units (1: voxels).

    Returns
    -------
    dict with ``"ice_mean"`` and ``"ice_max"`` (floats).

    Convention: docs/conventions.md, "Conventions".

    >>> u = torch.zeros(1, 2, 4, 5); u[:, 0], u[:, 1] = 1.0, 2.0
    >>> inverse_consistency_error(u, -u)
    {'ice_mean': 0.0, 'ice_max': 0.0}
    >>> round(inverse_consistency_error(u, u)["ice_mean"], 4)   # |2 (1, 2)| = sqrt(20)
    4.4721
    """
    maps = torch.stack([inverse_consistency_map(u_ab, u_ba, spacing=spacing),
                        inverse_consistency_map(u_ba, u_ab, spacing=spacing)])
    if mask is not None:
        mask = as_tensor(mask, "mask").to(device=maps.device, dtype=torch.bool)
        if tuple(mask.shape[-(maps.dim() - 2):]) != tuple(maps.shape[2:]) or mask.dim() > maps.dim() - 1:
            raise ValueError(f"mask: expected spatial size {tuple(maps.shape[2:])} (optionally with "
                             f"a batch axis), got shape {tuple(mask.shape)}")
        values = maps[mask.expand(maps.shape)]
        if values.numel() == 0:
            raise ValueError("mask: selects no voxel")
    else:
        values = maps.flatten()
    values = values.detach().double()
    return {"ice_mean": float(values.mean()), "ice_max": float(values.max())}


# ------------------------------------------------------------ surface distances

@dataclass(frozen=True)
class SurfaceResult:
    """A surface distance per label (``per_label[i]`` belongs to ``labels[i]``), with mean and std.

    ``units`` are those of the spacing (``"voxels"`` for spacing 1). ``missing``
    lists the labels present in exactly one of the two maps: no surface to
    compare with, so their distance is the ``missing`` value asked for (NaN by
    default, left out of mean and std like a label absent from both maps).
    """
    labels: np.ndarray
    per_label: np.ndarray
    mean: float
    std: float
    missing: tuple = ()
    units: str = "voxels"

    def as_dict(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in zip(self.labels, self.per_label)}


def _surface(mask: np.ndarray) -> np.ndarray:
    # Boundary voxels: in the structure, with a face neighbour outside it; outside
    # the image counts as outside (border_value=0), so a structure cut by the
    # image border has a surface there.
    from scipy.ndimage import binary_erosion, generate_binary_structure
    return mask & ~binary_erosion(mask, generate_binary_structure(mask.ndim, 1), border_value=0)


def _directed_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of ``a`` to the surface of ``b``, and back."""
    from scipy.ndimage import distance_transform_edt
    # Both surfaces lie in the bounding box of a | b: crop to it (one voxel wider,
    # so the erosion sees the outside) and the distance transforms cost the
    # structure's size, not the image's.
    idx = np.nonzero(a | b)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    sa, sb = _surface(a[box]), _surface(b[box])
    to_b = distance_transform_edt(~sb, sampling=spacing)
    to_a = distance_transform_edt(~sa, sampling=spacing)
    return to_b[sa], to_a[sb]


def _surface_metric(a, b, labels, spacing, missing, reduce) -> SurfaceResult:
    a, b = _label_array(a, "a"), _label_array(b, "b")
    check_same_shape(a, b, ("a", "b"))
    labels = np.asarray([v for v in check_label_list(labels) if v != 0], dtype=np.int64)
    if labels.size == 0:
        raise ValueError("labels: expected at least one non-background label, got none")
    sp = _spacing_vector(spacing, a.ndim).tolist()
    if not (isinstance(missing, (int, float)) and not isinstance(missing, bool)):
        raise ValueError(f"missing: expected a number (NaN, inf or a distance), got {missing!r}")
    scores, lost = np.full(len(labels), np.nan), []
    for i, lab in enumerate(labels):
        in_a, in_b = a == lab, b == lab
        has_a, has_b = bool(in_a.any()), bool(in_b.any())
        if has_a and has_b:
            scores[i] = reduce(*_directed_distances(in_a, in_b, sp))
        elif has_a or has_b:
            scores[i] = missing
            lost.append(int(lab))
    counted = scores[~np.isnan(scores)]
    mean = float(counted.mean()) if counted.size else float("nan")
    std = float(counted.std()) if counted.size else float("nan")
    units = "voxels" if all(s == 1 for s in sp) else "spacing units"
    return SurfaceResult(labels, scores, mean, std, tuple(lost), units)


def hausdorff95(a, b, labels, *, spacing=1.0, percentile: float = 95.0,
                missing: float = float("nan")) -> SurfaceResult:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of each label.

    For each label, the distances from every surface voxel of ``a`` to the
    nearest surface voxel of ``b`` (``d_ab``) and back (``d_ba``);
    HD95 = ``max(P95(d_ab), P95(d_ba))``, as MedPy's ``hd95`` and DeepMind's
    ``surface-distance`` compute it. The 95th percentile ignores the worst 5 %
    of the surface, where a single stray voxel would set the full Hausdorff
    distance (``percentile=100``). Lower is better; 0 for identical maps.

    Parameters
    ----------
    a, b : array or Tensor of integer labels, same shape, 2D or 3D
        E.g. the fixed segmentation and the warped moving one.
    labels : sequence of int
        The structures to score (background 0 is never counted), as for :func:`dice`.
    spacing : float or sequence of float
        Voxel size per axis (mm); distances are in its units (1: voxels).
    percentile : float
        In (0, 100]; 100 gives the Hausdorff distance.
    missing : float
        The value for a label present in one map only (its ``SurfaceResult.missing``);
        NaN (default) leaves it out of the mean. Some challenges use a large
        number, e.g. the image diagonal, to penalise a lost structure.

    Returns
    -------
    SurfaceResult
        A label absent from both maps gives NaN, left out of mean and std.

    Convention: surfaces are the boundary voxels (voxels of the structure with
    a face neighbour outside it; the image border counts as outside), distances
    are Euclidean between voxel centres (``scipy.ndimage.distance_transform_edt``
    with ``sampling=spacing``); tensor-axis order, as docs/conventions.md, "Conventions".

    >>> a = np.zeros((12, 12), int); a[2:8, 2:8] = 1
    >>> b = np.roll(a, 3, axis=0)                     # the square moved 3 rows down
    >>> hausdorff95(a, b, [1]).per_label.tolist()
    [3.0]
    >>> hausdorff95(a, b, [1], spacing=(2.0, 1.0)).mean   # rows are 2 mm apart
    6.0
    """
    if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
        raise ValueError(f"percentile: expected a number in (0, 100], got {percentile!r}")
    return _surface_metric(a, b, labels, spacing, missing,
                           lambda ab, ba: max(np.percentile(ab, percentile), np.percentile(ba, percentile)))


def average_surface_distance(a, b, labels, *, spacing=1.0,
                             missing: float = float("nan")) -> SurfaceResult:
    """Average symmetric surface distance (ASSD) between the surfaces of each label.

    The mean over both surfaces of the distance to the other one,
    ``(sum d_ab + sum d_ba) / (|S_a| + |S_b|)`` (Heimann et al., IEEE TMI 28(8),
    2009); arguments, result and convention as :func:`hausdorff95`. Lower is better.

    >>> a = np.zeros((12, 12), int); a[2:8, 2:8] = 1
    >>> average_surface_distance(a, np.roll(a, 3, axis=0), [1]).mean
    1.5

    (By hand: of the 20 surface pixels of each square, the 6 of the far edge
    are 3 away from the other surface, the rest 0, 1 or 2: 30 / 20 = 1.5.)
    """
    return _surface_metric(a, b, labels, spacing, missing,
                           lambda ab, ba: float((ab.sum() + ba.sum()) / (ab.size + ba.size)))
