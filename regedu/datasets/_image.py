"""Resizing images and the points that live on them, one convention for both.

Voxel centres at the corners map exactly (``align_corners=True``), as in
:func:`regedu.spatial.warp`: index ``i`` of an axis of ``n`` voxels maps to
``i * (m - 1) / (n - 1)`` on an axis of ``m``. Images shrink with an
anti-aliasing filter so that small vessels do not alias.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import check_labels

__all__ = ["resize_image", "resize_labels", "scale_points", "to_unit_range"]


def resize_image(image, size) -> np.ndarray:
    """Resize a 2D ``(H, W)`` or 3D ``(D, H, W)`` float array to ``size`` (float32)."""
    arr = np.asarray(image, dtype=np.float32)
    size = _check_size(size, arr, "image")
    if arr.shape == size:
        return arr.copy()
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    if arr.ndim == 2:
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=True,
                            antialias=any(s < n for s, n in zip(size, arr.shape)))
    else:
        # No anti-aliased trilinear in torch: average-pool by whole factors first.
        factors = [max(1, n // s) for n, s in zip(arr.shape, size)]
        if max(factors) > 1:
            t = F.avg_pool3d(t, kernel_size=factors, stride=factors, ceil_mode=True)
        out = F.interpolate(t, size=size, mode="trilinear", align_corners=True)
    return out[0, 0].numpy()


def _check_size(size, arr: np.ndarray, name: str) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(size) != arr.ndim or min(size) < 1:
        raise ValueError(f"size: expected {arr.ndim} positive sizes for the {arr.ndim}D {name} of "
                         f"shape {arr.shape}, got {size}")
    return size


def resize_labels(labels, size) -> np.ndarray:
    """Resize a label map with nearest neighbour (same voxel-centre convention)."""
    arr = np.asarray(labels)
    check_labels(arr, "labels")
    size = _check_size(size, arr, "label map")
    idx = [np.rint(np.arange(s) * (n - 1) / max(s - 1, 1)).astype(np.int64)
           for s, n in zip(size, arr.shape)]
    return arr[np.ix_(*idx)]


def scale_points(points, from_shape, to_shape) -> np.ndarray:
    """Map points ``(N, ndim)`` (tensor-axis order) from one grid size to another.

    >>> scale_points([[0, 0], [2911, 2911]], (2912, 2912), (256, 256))
    array([[  0.,   0.],
           [255., 255.]])
    """
    pts = np.asarray(points, dtype=np.float64)
    factor = np.array([(t - 1) / max(f - 1, 1) for f, t in zip(from_shape, to_shape)])
    return pts * factor


def to_unit_range(image, *, mask=None, percentile: float = 99.5) -> np.ndarray:
    """Scale intensities to [0, 1]: 0 stays 0, the ``percentile`` (in ``mask``) becomes 1."""
    arr = np.asarray(image, dtype=np.float32)
    ref = arr[mask] if mask is not None else arr
    top = float(np.percentile(ref, percentile)) if ref.size else 1.0
    return np.clip(arr / max(top, 1e-8), 0.0, 1.0).astype(np.float32)
