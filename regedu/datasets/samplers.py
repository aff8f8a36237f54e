"""Pair samplers: torch Datasets that return one registration pair per item.

Every item is a dict:

- ``moving``, ``fixed``: ``(C, *spatial)`` float32 tensors;
- ``moving_seg``, ``fixed_seg``: ``(1, *spatial)`` int64 label maps (when the
  source has labels);
- ``moving_points``, ``fixed_points``: ``(N, ndim)`` float32 landmarks,
  (row, col) order (when the source has them);
- ``disp``: the ground-truth displacement ``(ndim, *spatial)`` when it is known
  by construction (``moving(x + disp(x)) = fixed(x)``);
- ``meta``: a dict of strings and numbers (names, category, seed...).

Generated pairs are drawn from ``numpy/torch`` generators seeded with
``(seed, index)``: item ``i`` is the same in every epoch, in every worker of a
``DataLoader`` and on every machine. With ``cache=True`` an item is kept in
memory once made.

The command line's pairs live here too: :class:`PairFolder` (every pair of a
folder of image files, with the file names instead of ``meta``) and
:class:`OfflinePairs` (``regedu train --data fundus`` or ``brain``, drawn
from the seeds the shipped checkpoints were trained on).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .._checks import as_labels, available_memory, check_choice, check_memory, check_positive, format_spacing
from .files import image_files, min_max, read_image_file, read_seg, spacings_agree

__all__ = ["FundusPairs", "BrainPairs", "SubjectPairs", "FIREPairs", "PairFolder", "OfflinePairs",
           "brain_slice"]


def _item_seed(seed: int, index: int) -> int:
    # One integer per (seed, index) pair, well mixed, so that neighbouring
    # items do not get correlated streams.
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _tensor(x, dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dtype)


class _Cached(Dataset):
    """``n`` pairs made on demand by ``_make(index)``; ``keep`` of them kept once made."""

    def __init__(self, n: int, keep: int):
        check_positive(n, "n", integer=True)
        self.n, self.keep = n, keep
        self._items: dict[int, dict] = {}

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} pairs")
        if index in self._items:
            return self._items[index]
        item = self._make(index)
        if len(self._items) < self.keep:
            self._items[index] = item
        return item

    def _make(self, index: int) -> dict:
        raise NotImplementedError


class FundusPairs(_Cached):
    """FIRE-like fundus pairs made on the fly (:func:`regedu.datasets.make_fire_pair`).

    Parameters
    ----------
    n : int
        Number of pairs.
    size : int, optional
        Image side; default: the profile's ``fundus_size``.
    categories : sequence of {"S", "P", "A"}
        Item ``i`` has category ``categories[i % len(categories)]``.
    source : {"retina", "procedural", "mixed"}
        The real photograph, a new procedural retina per pair, or alternate
        (even items procedural, odd items retina).
    seed : int
    cache : bool
        Keep pairs in memory once made.
    pool : int
        Procedural retinas are drawn from a pool of this many (made once each,
        then reused under new views and illumination): drawing a retina costs
        about twice as much as making a pair from it.
    contrast : {"raw", "vessels"}
        ``"vessels"`` replaces both images by their vessel contrast
        (:func:`regedu.datasets.vessel_contrast`: illumination removed inside
        the field of view), which is what a similarity loss should compare.

    Items carry ``disp``, ``moving_points``/``fixed_points`` (10 control
    points), ``fixed_mask``/``moving_mask`` and ``meta`` (category, overlap,
    source, index).
    """

    def __init__(self, n: int, size: int | None = None, *, categories=("S", "P", "A"),
                 source: str = "retina", seed: int = 0, cache: bool = False, pool: int = 16,
                 contrast: str = "raw"):
        super().__init__(n, n if cache else 0)
        check_positive(pool, "pool", integer=True)
        check_choice(contrast, ("raw", "vessels"), "contrast")
        self.contrast = contrast
        check_choice(source, ("retina", "procedural", "mixed"), "source")
        for c in categories:
            check_choice(c, ("S", "P", "A"), "categories")
        if size is None:
            from ..profiles import get_profile
            size = get_profile().fundus_size
        self.size, self.categories, self.source, self.seed = int(size), tuple(categories), source, seed
        self.pool = pool
        self._retinas: dict[int, np.ndarray] = {}

    def _procedural(self, k: int) -> np.ndarray:
        from .fundus import canvas_size, synthetic_fundus
        if k not in self._retinas:
            # A third seed word keeps the retinas' streams apart from the pairs'.
            seed = int(np.random.SeedSequence([int(self.seed), k, 1]).generate_state(1)[0])
            image, _ = synthetic_fundus(canvas_size(self.size), seed)
            self._retinas[k] = image
        return self._retinas[k]

    def _make(self, index):
        from .fundus import make_fire_pair, vessel_contrast
        source = self.source if self.source != "mixed" else ("procedural", "retina")[index % 2]
        category = self.categories[index % len(self.categories)]
        rng = np.random.default_rng(_item_seed(self.seed, index))
        retina = self._procedural(int(rng.integers(self.pool))) if source == "procedural" else "retina"
        pair = make_fire_pair(category, self.size, rng, source=retina)
        moving, fixed = pair.moving, pair.fixed
        if self.contrast == "vessels":
            moving = vessel_contrast(moving, pair.moving_mask)
            fixed = vessel_contrast(fixed, pair.fixed_mask)
        return dict(moving=moving, fixed=fixed, moving_mask=pair.moving_mask,
                    fixed_mask=pair.fixed_mask, moving_points=pair.moving_points,
                    fixed_points=pair.fixed_points, disp=pair.disp,
                    meta=dict(category=category, overlap=pair.overlap, source=source, index=index))


def brain_slice(brain, index: int | None = None) -> dict:
    """A coronal slice of a 3D brain, as a 2D ``{"image", "seg", "name"}``.

    Coronal, as neurite-oasis's 2D slices: the last (anterior) axis is fixed,
    the image is ``(1, D, H)`` (left-right by inferior-superior).
    """
    image = np.asarray(brain["image"] if isinstance(brain, dict) else brain.image)
    seg = np.asarray(brain["seg"] if isinstance(brain, dict) else brain.seg)
    name = brain["name"] if isinstance(brain, dict) else brain.name
    index = image.shape[-1] // 2 if index is None else index
    return dict(image=np.ascontiguousarray(image[..., index]), seg=np.ascontiguousarray(seg[..., index]),
                name=f"{name}[..., {index}]")


class BrainPairs(_Cached):
    """Synthetic brain pairs, 2D or 3D, atlas-to-subject or subject-to-subject.

    Subjects are made by :func:`regedu.datasets.synth_subject` (random
    diffeomorphism, bias field, gamma, noise) from a source brain: the atlas
    itself, or one of ``subjects`` (e.g. the Allen donors of
    :func:`regedu.datasets.donor_brain`, for real inter-subject anatomy).

    Parameters
    ----------
    n : int
    atlas : Brain or dict, optional
        Default: :func:`regedu.datasets.mni_brain` at the profile's resolution.
    mode : {"atlas", "subject"}
        ``"atlas"``: moving = a subject, fixed = the atlas (as VV-Net and
        VoxelMorph's atlas-based training). ``"subject"``: two subjects.
    ndim : {2, 3}
        2 takes the middle coronal slice (:func:`brain_slice`).
    subjects : sequence of Brain or dict, optional
        Anatomies to draw subjects from (default: the atlas alone).
    seed : int
    cache : bool
    **synth_kwargs
        Passed to :func:`regedu.datasets.synth_subject` (``max_velocity``,
        ``control``...); its defaults scale with the grid (the same physical
        deformation at every resolution).
    """

    def __init__(self, n: int, *, atlas=None, mode: str = "atlas", ndim: int = 3, subjects=None,
                 seed: int = 0, cache: bool = False, **synth_kwargs):
        super().__init__(n, n if cache else 0)
        check_choice(mode, ("atlas", "subject"), "mode")
        check_choice(ndim, (2, 3), "ndim")
        if atlas is None:
            from .brain import mni_brain
            atlas = mni_brain()
        self.atlas = self._as_source(atlas, ndim)
        self.subjects = [self._as_source(s, ndim) for s in subjects] if subjects else [self.atlas]
        self.mode, self.ndim, self.seed = mode, ndim, seed
        self.synth_kwargs = synth_kwargs

    @staticmethod
    def _as_source(brain, ndim) -> dict:
        src = brain if isinstance(brain, dict) else brain.as_dict()
        if np.asarray(src["image"]).ndim == 4 and ndim == 2:
            src = brain_slice(src)
        return dict(image=torch.as_tensor(np.asarray(src["image"]), dtype=torch.float32),
                    seg=torch.from_numpy(as_labels(src["seg"], "seg")),
                    name=src.get("name", "brain"))

    def _subject(self, g: torch.Generator) -> tuple[dict, str]:
        from .brain import synth_subject
        k = int(torch.randint(len(self.subjects), (1,), generator=g))
        source = self.subjects[k]
        return synth_subject(source, g, **self.synth_kwargs), source["name"]

    def _make(self, index):
        g = torch.Generator()
        g.manual_seed(_item_seed(self.seed, index))
        moving, moving_name = self._subject(g)
        if self.mode == "atlas":
            fixed = dict(image=self.atlas["image"], seg=self.atlas["seg"][None])
            fixed_name = self.atlas["name"]
        else:
            fixed, fixed_name = self._subject(g)
        return dict(moving=moving["image"], fixed=fixed["image"], moving_seg=moving["seg"],
                    fixed_seg=fixed["seg"],
                    meta=dict(moving=f"synth({moving_name})", fixed=fixed_name if self.mode == "atlas"
                              else f"synth({fixed_name})", mode=self.mode, index=index))


class SubjectPairs(Dataset):
    """Pairs of loaded subjects: a real dataset through one of the readers.

    Parameters
    ----------
    load : callable
        ``load(key) -> {"image": (C, *spatial), "seg": (*spatial) or None}``,
        e.g. ``NeuriteOASIS(root).load``.
    keys : sequence
        Subjects (``reader.subjects``, ``reader.cases``).
    atlas : dict, optional
        Atlas-to-subject: every subject is moving, the atlas fixed.
    pairs : sequence of (moving_key, fixed_key), optional
        Subject-to-subject pairs (e.g. ``Learn2RegOASIS.pairs("val")``, whose
        tuples are (fixed, moving): reverse them). Default: every ordered pair
        of distinct subjects.
    """

    def __init__(self, load, keys, *, atlas=None, pairs=None):
        self.load, self.keys, self.atlas = load, list(keys), atlas
        if atlas is not None:
            self.pairs = [(k, None) for k in self.keys]
        else:
            self.pairs = list(pairs) if pairs is not None else list(itertools.permutations(self.keys, 2))

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        moving_key, fixed_key = self.pairs[index]
        moving = self.load(moving_key)
        fixed = self.atlas if fixed_key is None else self.load(fixed_key)
        item = dict(moving=_tensor(moving["image"], torch.float32), fixed=_tensor(fixed["image"], torch.float32),
                    meta=dict(moving=str(moving.get("name", moving_key)),
                              fixed=str(fixed.get("name", fixed_key)), index=index))
        if moving.get("seg") is not None and fixed.get("seg") is not None:
            item["moving_seg"] = torch.from_numpy(as_labels(moving["seg"], f"{moving_key}: seg")).reshape(
                1, *item["moving"].shape[1:])
            item["fixed_seg"] = torch.from_numpy(as_labels(fixed["seg"], f"{fixed_key}: seg")).reshape(
                1, *item["fixed"].shape[1:])
        return item


class FIREPairs(Dataset):
    """FIRE's real pairs (:class:`regedu.datasets.FIRE`) as sampler items, with control points.

    ``contrast="vessels"``: both images replaced by their vessel contrast, as
    :class:`FundusPairs` (the same code path for the offline and the real pairs).
    """

    def __init__(self, fire, size: int | None = None, *, categories=("S", "P", "A"),
                 contrast: str = "raw"):
        check_choice(contrast, ("raw", "vessels"), "contrast")
        self.fire, self.size, self.contrast = fire, size, contrast
        self.names = [p for p in fire.pairs if fire.category(p) in categories]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        item = self.fire.load(self.names[index], size=self.size)
        out = dict(moving=torch.from_numpy(item["moving"]), fixed=torch.from_numpy(item["fixed"]),
                   moving_points=torch.from_numpy(item["moving_points"]),
                   fixed_points=torch.from_numpy(item["fixed_points"]),
                   meta=dict(category=item["category"], name=item["name"], scale=item["scale"], index=index))
        if item["mask"] is not None:
            out["fixed_mask"] = out["moving_mask"] = torch.from_numpy(item["mask"])
        if self.contrast == "vessels":
            from .fundus import vessel_contrast
            for key in ("moving", "fixed"):
                out[key] = vessel_contrast(out[key], out.get(f"{key}_mask"))
        return out


class PairFolder(Dataset):
    """(moving, fixed) pairs from a folder of image files, normalised to [0, 1] (``--data FOLDER``).

    Every ordered pair of different images, or each image against ``atlas``.
    Items are dicts with ``moving``, ``fixed`` ``(1, *spatial)`` and, when every
    image has labels, ``moving_seg``, ``fixed_seg``; plus the file names.
    ``spacing`` is the voxel size every image shares (mm), or None when no
    file says. Images with NaN, no contrast, other shapes or other voxel sizes
    are refused, and so are label maps that are not whole numbers
    (:mod:`regedu.datasets.files`).
    """

    def __init__(self, folder, atlas=None, *, what: str = "data", progress: bool = False):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: no folder {str(folder)!r}")
        files = image_files(folder)
        atlas = Path(atlas) if atlas else None
        if atlas is not None and not atlas.is_file():
            raise FileNotFoundError(f"--atlas: no file {str(atlas)!r}")
        files = [f for f in files if atlas is None or f.resolve() != atlas.resolve()]
        if len(files) < (1 if atlas else 2):
            raise ValueError(f"{what}: {str(folder)!r} holds {len(files)} image files; need at least "
                           f"{'one' if atlas else 'two'} (.nii.gz, .nii, .npz or .npy)")
        paths = files + ([atlas] if atlas else [])
        self.images, spacings = {}, {}
        for p in tqdm(paths, desc=f"reading {what}", disable=not progress, leave=False):
            image = read_image_file(p, "--atlas" if p == atlas else what)
            self.images[p] = min_max(image.array, "--atlas" if p == atlas else what, p)
            spacings[p] = image.spacing
            self._check_memory(len(paths))
        shapes = {p.name: a.shape for p, a in self.images.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"{what}: all images must have the same shape (resample them to one grid "
                           f"first), got {shapes}")
        known = {p.name: s for p, s in spacings.items() if s is not None}
        if any(not spacings_agree(s, next(iter(known.values()))) for s in known.values()):
            raise ValueError(f"{what}: all images must have the same voxel size (resample them to "
                           f"one grid first), got {dict((k, format_spacing(v)) for k, v in known.items())}")
        self.spacing = next(iter(known.values())) if len(known) == len(spacings) else None
        segs = {p: read_seg(p, what) for p in self.images}
        for p, seg in segs.items():
            if seg is not None and seg.shape != self.images[p].shape:
                raise ValueError(f"{what}: the labels of {p.name} have shape {seg.shape}, the image "
                               f"{self.images[p].shape}; expected the same grid")
        self.segs = segs if all(s is not None for s in segs.values()) else None
        self.pairs = ([(f, atlas) for f in files] if atlas else
                      [(m, f) for m in files for f in files if m != f])

    def _check_memory(self, n_files: int) -> None:
        # After the first image: every image is kept, as float32, and its labels as int64.
        if len(self.images) == 1:
            voxels = next(iter(self.images.values())).size
            check_memory((n_files - 1) * voxels * 12, f"holding {n_files} images of "
                         f"{voxels:,} voxels with their labels", "use fewer images, or coarser ones")

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.images.values())).shape

    def labels_present(self) -> set[int]:
        """Every label of the fixed images' maps (empty without labels)."""
        if self.segs is None:
            return set()
        fixed = {f for _, f in self.pairs}
        return set().union(*(np.unique(self.segs[f]).tolist() for f in fixed)) - {0}

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        moving, fixed = self.pairs[i]
        item = {"moving": torch.from_numpy(self.images[moving])[None],
                "fixed": torch.from_numpy(self.images[fixed])[None],
                "moving_name": moving.name, "fixed_name": fixed.name}
        if self.segs is not None:
            item["moving_seg"] = torch.from_numpy(self.segs[moving])[None]
            item["fixed_seg"] = torch.from_numpy(self.segs[fixed])[None]
        return item


class OfflinePairs(_Cached):
    """The pairs of ``regedu train --data fundus`` and ``--data brain``: offline data sized by the profile.

    ``"fundus"``: FIRE-like pairs (categories S, P, A in turn;
    :func:`regedu.datasets.make_fire_pair`) of *procedural* retinas, so that the
    real photograph ``skimage.data.retina()`` stays held out for testing, as
    vessel contrast (:func:`regedu.datasets.vessel_contrast`): a model trained on
    them registers images prepared the same way. ``"brain"``: synthetic
    subjects (the MNI template under random diffeomorphisms and intensity
    changes, :func:`regedu.datasets.synth_subject`) as moving images, the template
    as the fixed one (atlas-based, as VV-Net), with labels. ``spacing``: the
    brain's voxel size (mm), None for the fundus pixels.

    Pair ``i`` is drawn from seed ``first_seed + i``: the pairs the shipped
    checkpoints were trained on, which their commands reproduce (the other
    samplers mix ``(seed, index)`` instead). Up to 256 pairs are kept once made,
    fewer when they would take more than a quarter of the available memory
    (the rest are made again when needed).
    """

    def __init__(self, source: str, n: int, *, first_seed: int = 0):
        from ..profiles import get_profile
        if source not in ("fundus", "brain"):
            raise ValueError(f"data: expected 'fundus', 'brain' or a folder, got {source!r}")
        self.source, self.first_seed = source, first_seed
        self.profile = get_profile()
        shape = ((self.profile.fundus_size,) * 2 if source == "fundus" else
                 tuple(self.profile.brain_shape))
        # moving and fixed as float32, labels as int64 (brain).
        item_bytes = math.prod(shape) * (8 if source == "fundus" else 12)
        # torch's RandomSampler shuffles all n at once, as an int64 permutation turned
        # into a Python list: 8 bytes, plus a pointer and an int object per pair.
        check_memory(48 * n, f"--pairs {n}: shuffling {n:,} pairs",
                     "ask for fewer pairs: a run only sees steps x batch-size of them")
        keep = 0 if n > 256 else max(0, min(256, int(available_memory() * 0.25 // item_bytes)))
        super().__init__(n, keep)
        if source == "brain":
            from .brain import mni_brain
            self.atlas = mni_brain()
        else:
            self.atlas = None
        self.spacing = ((float(self.profile.brain_spacing_mm),) * 3 if source == "brain" else None)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self[0]["fixed"].shape[1:])

    def labels_present(self) -> set[int]:
        """Every label of the fixed image's map (the atlas; empty for the fundus)."""
        return set(np.unique(self.atlas.seg).tolist()) - {0} if self.atlas is not None else set()

    def _make(self, index: int) -> dict:
        seed = self.first_seed + index
        if self.source == "fundus":
            from .fundus import make_fire_pair, vessel_contrast
            pair = make_fire_pair("SPA"[index % 3], size=self.profile.fundus_size, seed=seed,
                                  source="procedural")
            return {"moving": vessel_contrast(pair.moving, pair.moving_mask),
                    "fixed": vessel_contrast(pair.fixed, pair.fixed_mask)}
        from .brain import synth_subject
        subject = synth_subject(self.atlas, seed=seed)
        return {"moving": subject["image"], "moving_seg": subject["seg"],
                "fixed": torch.as_tensor(self.atlas.image),
                "fixed_seg": torch.as_tensor(self.atlas.seg)[None]}
