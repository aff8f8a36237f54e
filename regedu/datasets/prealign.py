"""Preprocessing as the VV-Net paper does it before learning: affine pre-alignment and normalisation.

The VV-Net paper (seed 000, section 1.3) resamples every scan to 1 mm, skull-strips it, crops
it to 160x192x224, divides by the maximum (255) and affinely aligns it to the
atlas with ANTs; learning only has to model what remains. Our subjects are
skull-stripped already (:func:`regedu.datasets.realistic_subject`,
:func:`regedu.datasets.vxm_subject`), so :func:`preprocess` does the rest:

1. intensity normalisation (:func:`normalise_intensity`): divide by the
   99.9th percentile of the nonzero voxels and clip to [0, 1], the rule that
   made the template's intensities. A percentile rather than the maximum
   (the paper's 255): one hot voxel of noise or artefact must not darken the
   whole scan;
2. affine registration of the subject to the atlas (ANTs, or regedu's own
   :func:`regedu.classic.affine_register`);
3. resampling of the image (linear) and the labels (nearest) onto the
   atlas's grid.

The subject may have a larger field of view than the atlas (any shape at
least as large, the atlas's grid centred in it): the registration runs on the
subject's grid with the atlas padded into it, and the result is cropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .._checks import as_tensor, check_choice, check_finite, check_positive

__all__ = ["preprocess", "normalise_intensity", "Preprocessed", "atlas_pair"]


def normalise_intensity(image, *, percentile: float = 99.9) -> torch.Tensor:
    """``image`` divided by the ``percentile`` of its nonzero voxels, clipped to [0, 1].

    >>> normalise_intensity(torch.tensor([0., 1., 2., 4.]), percentile=50).tolist()
    [0.0, 0.5, 1.0, 1.0]
    """
    x = check_finite(as_tensor(image, "image"), "image").float()
    return (x / _top(x, percentile, "image")).clamp(0, 1)


def _top(x: torch.Tensor, percentile: float, name: str) -> float:
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile: expected a number in (0, 100], got {percentile!r}")
    inside = x[x > 0]
    if inside.numel() == 0:
        raise ValueError(f"{name}: no voxel above zero; expected a skull-stripped scan with the brain > 0")
    return float(np.percentile(inside.detach().cpu().numpy(), percentile))


@dataclass
class Preprocessed:
    """What :func:`preprocess` returns.

    Attributes
    ----------
    image : Tensor (1, *atlas) float32 in [0, 1]
        The subject normalised and affinely aligned onto the atlas's grid.
    seg : Tensor (1, *atlas) int64 or None
        Its labels, resampled with nearest neighbour.
    matrix : ndarray (4, 4) float64
        Atlas voxel ``x`` -> subject voxel ``matrix @ [x, 1]`` (subject's own
        grid, before cropping): the pre-alignment.
    scale : float
        The intensity divisor of the normalisation.
    method : str
    seconds : float
        Wall-clock time of the registration alone.
    """

    image: torch.Tensor
    seg: torch.Tensor | None
    matrix: np.ndarray
    scale: float
    method: str
    seconds: float

    def apply(self, volume, *, labels: bool = False) -> torch.Tensor:
        """Resample another volume of the subject's grid the same way: ``(1, *atlas)``."""
        return _resample(volume, self.matrix, tuple(self.image.shape[1:]), labels=labels)


def _volume(x, name: str) -> torch.Tensor:
    x = check_finite(as_tensor(x, name), name)
    while x.dim() > 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"{name}: expected one 3D volume, (D, H, W), (1, D, H, W) or (1, 1, D, H, W), "
                         f"got shape {tuple(as_tensor(x, name).shape)}")
    return x


def _resample(volume, matrix: np.ndarray, shape, *, labels: bool) -> torch.Tensor:
    v = _volume(volume, "volume")
    arr = v.numpy()
    out = ndimage.affine_transform(arr.astype(np.float64 if not labels else arr.dtype), matrix[:3, :3],
                                   matrix[:3, 3], output_shape=tuple(shape), order=0 if labels else 1,
                                   mode="constant", cval=0)
    out = torch.from_numpy(np.ascontiguousarray(out))
    return (out.long() if labels else out.float())[None]


def preprocess(moving, fixed, *, moving_seg=None, spacing_mm=1.0, method: str = "ants",
               normalise: bool = True, seed: int = 0, **kwargs) -> Preprocessed:
    """Affinely pre-align a subject to the atlas and normalise it, as the paper does before learning.

    Parameters
    ----------
    moving : array or Tensor, (D, H, W), (1, D, H, W) or (1, 1, D, H, W)
        The subject (skull-stripped; any intensity units). Its grid is the
        atlas's or larger, with the atlas's grid in its middle (an even
        margin per axis).
    fixed : array or Tensor, the same forms
        The atlas, intensities in [0, 1] (e.g. ``mni_brain().image``).
    moving_seg : array or Tensor, optional
        The subject's labels on its grid, resampled alongside.
    spacing_mm : float or tuple of float
        Voxel size (ANTs' smoothing and steps act in mm).
    method : {"ants", "regedu"}
        :func:`regedu.classic.ants_affine` (Mattes MI, ANTs' default
        schedule) or :func:`regedu.classic.affine_register` (torch, global NCC).
    normalise : bool
        Apply :func:`normalise_intensity` to the subject first.
    seed : int
        ANTs' sampling seed (reproducible results).
    **kwargs
        Passed to the registration function.

    Returns
    -------
    Preprocessed: ``image`` and ``seg`` on the atlas's grid, ``matrix`` (atlas
    voxel -> subject voxel), ``scale``, ``method``, ``seconds``.

    Examples
    --------
    >>> atlas = mni_brain(2)                                            # doctest: +SKIP
    >>> s = realistic_subject("15496", seed=0, spacing_mm=2)            # doctest: +SKIP
    >>> p = preprocess(s["image"], atlas.image, moving_seg=s["seg"], spacing_mm=2)  # doctest: +SKIP
    >>> p.image.shape, p.seg.shape                                      # doctest: +SKIP
    (torch.Size([1, 80, 96, 112]), torch.Size([1, 80, 96, 112]))
    """
    from .. import classic
    check_choice(method, ("ants", "regedu"), "method")
    m = _volume(moving, "moving").float()
    f = _volume(fixed, "fixed").float()
    margin = [(a - b) for a, b in zip(m.shape, f.shape)]
    if any(d < 0 or d % 2 for d in margin):
        raise ValueError(f"moving: expected a grid at least as large as fixed's with an even margin per axis "
                         f"(fixed's grid in its middle), got moving {tuple(m.shape)} and fixed {tuple(f.shape)}")
    for s in np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)):
        check_positive(float(s), "spacing_mm")
    seg = None
    if moving_seg is not None:
        seg = _volume(moving_seg, "moving_seg")
        if tuple(seg.shape) != tuple(m.shape):
            raise ValueError(f"moving_seg: expected the shape of moving {tuple(m.shape)}, got {tuple(seg.shape)}")
        if seg.is_floating_point():
            raise TypeError(f"moving_seg: expected integer labels, got dtype {seg.dtype}")
    scale = 1.0
    if normalise:
        scale = _top(m, 99.9, "moving")
        m = (m / scale).clamp(0, 1)
    half = [d // 2 for d in margin]
    f_canvas = torch.nn.functional.pad(f, [p for d in reversed(half) for p in (d, d)])
    start = time.perf_counter()
    if method == "ants":
        u = classic.ants_affine(m, f_canvas, spacing=spacing_mm, seed=seed, **kwargs)
    else:
        u = classic.affine_register(m, f_canvas, **kwargs)
    seconds = time.perf_counter() - start
    shift = np.eye(4)
    shift[:3, 3] = half  # atlas voxel x sits at x + margin / 2 on the subject's grid
    matrix = classic.displacement_to_affine(u) @ shift
    image = _resample(m, matrix, f.shape, labels=False)
    out_seg = _resample(seg, matrix, f.shape, labels=True) if seg is not None else None
    return Preprocessed(image=image, seg=out_seg, matrix=matrix, scale=scale, method=method, seconds=seconds)


def atlas_pair(subject, atlas, *, prealign: str | None = "ants", meta: dict | None = None, seed: int = 0) -> dict:
    """The pair that registers a subject (moving) to the atlas (fixed), prepared as the paper prepares its data.

    Parameters
    ----------
    subject, atlas : Brain
        Of one voxel size (e.g. :func:`regedu.datasets.vxm_subject` and
        :func:`regedu.datasets.mni_brain`).
    prealign : {"ants", "regedu", None}
        :func:`preprocess` with that method, or None: the subject normalised
        only (:func:`normalise_intensity`), as scanned, the "before
        registration" baseline; it must then be on the atlas's grid.
    meta : dict, optional
        Kept in the pair's ``meta`` (an ``id``, a ``dataset`` name).
    seed : int
        ANTs' sampling seed.

    Returns
    -------
    dict: ``moving``, ``fixed`` (1, *atlas) float32; ``moving_seg``,
    ``fixed_seg`` (1, *atlas) int64; ``meta`` with ``prealign`` and ``seconds``
    (the pre-alignment's cost, 0 without it), the form of
    :class:`regedu.datasets.RealisticPairs`' items.
    """
    if prealign is not None:
        check_choice(prealign, ("ants", "regedu"), "prealign")
    if float(subject.spacing_mm) != float(atlas.spacing_mm):
        raise ValueError(f"subject: expected the atlas's voxel size, {atlas.spacing_mm:g} mm, got "
                         f"{subject.spacing_mm:g} mm ({subject.name})")
    fixed = dict(fixed=torch.as_tensor(atlas.image).float(), fixed_seg=torch.as_tensor(atlas.seg)[None].long())
    seg = torch.as_tensor(subject.seg)
    if prealign is None:
        if tuple(seg.shape) != tuple(atlas.seg.shape):
            raise ValueError(f"subject: without prealign it must be on the atlas's grid {tuple(atlas.seg.shape)}, "
                             f"got {tuple(seg.shape)}")
        moving, moving_seg, seconds = normalise_intensity(subject.image), seg[None].long(), 0.0
    else:
        p = preprocess(subject.image, atlas.image, moving_seg=seg, spacing_mm=atlas.spacing_mm, method=prealign,
                       seed=seed)
        moving, moving_seg, seconds = p.image, p.seg, p.seconds
    return dict(fixed, moving=moving, moving_seg=moving_seg,
                meta=dict(meta or {}, prealign=prealign, seconds=float(seconds)))
