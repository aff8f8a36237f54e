"""RegNet's synthetic displacement fields, and pairs made from them with the field as label.

Sokooti et al. (MICCAI 2017) train RegNet supervised: for each training patch
they pick random points, displace them, smooth the displacements with a
Gaussian kernel and keep the resulting field (the DVF) as the label of the
pair it makes. They draw fields at several scales, coarse to fine (large
smoothing and large displacements, small smoothing and small ones), each
normalised to a maximum displacement. :func:`point_field` is one scale,
:func:`regnet_field` the sum over scales, and :class:`SyntheticPairs` the
pairs they make.

Convention (``docs/conventions.md``, "Conventions"): a field ``u`` is
``(1, ndim, *spatial)`` in voxels; a pair is ``moving = source``,
``fixed = warp(source, u)``, so that ``warp(moving, u) == fixed`` exactly
and ``u`` is the pair's true registration field (``disp``, what the
``"field"`` term of :mod:`regedu.losses` reads). Making the fixed image from
the moving one is what keeps the label exact: the other way round the label
would be the field's inverse, which only an iteration approximates.
"""
from __future__ import annotations

import numpy as np
import torch

from .._checks import as_labels, as_tensor, check_field, check_image, check_positive
from ..spatial import gaussian_blur, warp
from .samplers import _Cached, _item_seed

__all__ = ["REGNET_SCALES", "point_field", "regnet_field", "SyntheticPairs"]

#: Default scales, coarse to fine, as ``(sigma, max_disp)`` in voxels of a
#: 40-voxel-wide image: a broad motion of up to 3 voxels, a finer one of up to
#: 1.5 and a local one of up to 0.75. Ours, not the paper's (it gives none in
#: the review we follow); pass your own for another grid.
REGNET_SCALES = ((8.0, 3.0), (4.0, 1.5), (2.0, 0.75))


def _generator(seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def point_field(shape, sigma: float, max_disp: float, *, points: int = 8, mask=None, seed=0) -> torch.Tensor:
    """One scale of RegNet's generator: random points displaced, smoothed, normalised.

    ``points`` voxels (drawn from ``mask`` when given, else anywhere) get a
    displacement drawn uniformly in ``[-1, 1]`` per axis; every other voxel
    gets 0; the field is blurred with a Gaussian of ``sigma`` voxels
    (:func:`regedu.spatial.gaussian_blur`) and scaled so that its longest
    vector is exactly ``max_disp`` voxels. Larger ``sigma`` is smoother: a
    single point makes a Gaussian bump of that width.

    Parameters
    ----------
    shape : tuple of int
        Spatial size, 2D or 3D.
    sigma, max_disp : float
        Smoothing (voxels, > 0) and the maximum displacement (voxels, >= 0).
    points : int
        How many points are displaced.
    mask : Tensor or ndarray, shape ``shape``, optional
        Where points may be drawn (e.g. the brain: motion where there is anatomy).
    seed : int or torch.Generator

    Returns
    -------
    Tensor, shape (1, ndim, *shape), float32: a displacement in voxels.

    >>> u = point_field((32, 40), 4.0, 2.0, seed=1)
    >>> tuple(u.shape), round(float(u.norm(dim=1).max()), 4)
    ((1, 2, 32, 40), 2.0)
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape: expected 2 or 3 sizes, got {shape}")
    for n in shape:
        check_positive(n, "shape", integer=True)
    check_positive(sigma, "sigma")
    check_positive(points, "points", integer=True)
    if not (isinstance(max_disp, (int, float)) and np.isfinite(max_disp) and max_disp >= 0):
        raise ValueError(f"max_disp: expected a finite number >= 0 (voxels), got {max_disp!r}")
    g = _generator(seed)
    allowed = torch.arange(int(np.prod(shape)))
    if mask is not None:
        mask = as_tensor(mask, "mask")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask: expected the field's spatial size {shape}, got shape {tuple(mask.shape)}")
        allowed = allowed[mask.reshape(-1).bool()]
        if len(allowed) == 0:
            raise ValueError("mask: no voxel is set; points are drawn from the mask's voxels")
    where = allowed[torch.randint(len(allowed), (points,), generator=g)]
    sparse = torch.zeros(len(shape), int(np.prod(shape)))
    # index_add_: two points drawn on the same voxel add up, as two pushes would.
    sparse.index_add_(1, where, torch.rand(len(shape), points, generator=g) * 2 - 1)
    u = gaussian_blur(sparse.reshape(1, len(shape), *shape), sigma)
    longest = float(u.norm(dim=1).max())
    return u * (max_disp / longest) if longest > 0 else u


def regnet_field(shape, scales=REGNET_SCALES, *, points: int = 8, mask=None, seed=0) -> torch.Tensor:
    """A multi-scale synthetic field: the sum of one :func:`point_field` per scale.

    Parameters
    ----------
    shape : tuple of int
    scales : sequence of (sigma, max_disp)
        Coarse to fine, voxels (:data:`REGNET_SCALES` by default). Scale ``k``
        has its longest vector exactly ``max_disp``, so the sum's longest is at
        most the sum of the ``max_disp``.
    points, mask, seed
        As for :func:`point_field` (one generator feeds every scale).

    Returns
    -------
    Tensor, shape (1, ndim, *shape), float32.

    >>> u = regnet_field((32, 40), ((8.0, 2.0), (2.0, 0.5)), seed=0)
    >>> bool(u.norm(dim=1).max() <= 2.5 + 1e-5)
    True
    """
    pairs = hasattr(scales, "__iter__") and all(hasattr(s, "__len__") and len(s) == 2 for s in scales)
    if not pairs or not len(scales):
        raise ValueError(f"scales: expected a non-empty sequence of (sigma, max_disp) pairs such as "
                         f"((8.0, 3.0), (2.0, 1.0)), got {scales!r}")
    g = _generator(seed)
    return sum(point_field(shape, sigma, d, points=points, mask=mask, seed=g) for sigma, d in scales)


class SyntheticPairs(_Cached):
    """Pairs with a known field (RegNet): ``moving`` a source image, ``fixed`` it warped.

    Item ``i`` takes source ``i % len(images)``, draws a field ``u`` (from
    :func:`regnet_field`, or from ``sampler``) and returns ``moving = source``,
    ``fixed = warp(source, u)`` and ``disp = u``: ``warp(moving, disp)`` is
    ``fixed`` exactly, so ``disp`` is the label of supervised training
    (``regedu.train.fit(model, pairs, losses={"field": 1.0})``). With
    ``segs``, ``moving_seg`` and ``fixed_seg`` (warped with nearest
    neighbour) come too, for Dice.

    Parameters
    ----------
    images : Tensor or ndarray, shape (N, C, *spatial), or (C, H, W) for one 2D image
        The sources.
    n : int
        Number of pairs.
    segs : Tensor or ndarray, shape (N, *spatial) or (N, 1, *spatial), optional
        Label maps of the sources.
    sampler : callable, optional
        ``sampler(generator) -> (1, ndim, *spatial)`` field, replacing RegNet's
        generator, e.g. a statistical deformation model's
        ``lambda g: model.sample(1, seed=g)`` (:mod:`regedu.augment`).
    seed : int
    cache : bool
        Keep pairs in memory once made.
    **field_kwargs
        ``scales``, ``points``, ``mask`` for :func:`regnet_field` (not with ``sampler``).

    Items: ``moving``, ``fixed`` ``(C, *spatial)``, ``disp`` ``(ndim, *spatial)``,
    optionally ``moving_seg``, ``fixed_seg`` ``(1, *spatial)`` int64, and
    ``meta`` (source, index).
    """

    def __init__(self, images, n: int, *, segs=None, sampler=None, seed: int = 0, cache: bool = False,
                 **field_kwargs):
        super().__init__(n, n if cache else 0)
        images = as_tensor(images, "images").float()
        # (C, H, W) is one 2D image; a 3D one needs its batch axis, (1, C, D, H, W).
        images = images[None] if images.dim() == 3 else images
        check_image(images, "images")
        self.images = images
        self.segs = None
        if segs is not None:
            segs = torch.as_tensor(as_labels(segs, "segs"))
            segs = segs if segs.dim() == images.dim() else segs.unsqueeze(1)
            if segs.shape[0] != images.shape[0] or tuple(segs.shape[2:]) != tuple(images.shape[2:]):
                raise ValueError(f"segs: expected one label map per image, shape "
                                 f"({images.shape[0]}, 1, {', '.join(map(str, images.shape[2:]))}), "
                                 f"got {tuple(segs.shape)}")
            self.segs = segs
        if sampler is not None and field_kwargs:
            raise ValueError(f"sampler: give either a sampler or RegNet's options, not both "
                             f"(got {sorted(field_kwargs)} too)")
        if sampler is not None and not callable(sampler):
            raise TypeError(f"sampler: expected a callable generator -> field, got {type(sampler).__name__}")
        self.sampler, self.field_kwargs, self.seed = sampler, field_kwargs, seed
        if sampler is None:  # bad options fail here, not in a DataLoader worker
            regnet_field(self.images.shape[2:], seed=0, **field_kwargs)

    def _make(self, index):
        g = torch.Generator().manual_seed(_item_seed(self.seed, index))
        k = index % self.images.shape[0]
        spatial = tuple(self.images.shape[2:])
        if self.sampler is None:
            u = regnet_field(spatial, seed=g, **self.field_kwargs)
        else:
            u = check_field(as_tensor(self.sampler(g), "sampler(generator)").float(), "sampler(generator)",
                            spatial=spatial, batch=1)[:1]
        source = self.images[k:k + 1]
        item = dict(moving=source[0], fixed=warp(source, u)[0], disp=u[0], meta=dict(source=k, index=index))
        if self.segs is not None:
            item.update(moving_seg=self.segs[k], fixed_seg=warp(self.segs[k:k + 1], u)[0])
        return item
