"""The ``regedu`` command: ``doctor``, ``fetch``, ``train``, ``register``, ``evaluate``, ``course``.

Run ``regedu COMMAND --help`` for each command's options. Errors a user can
fix (a missing file, images of different shapes, a 2D model given a volume)
are printed as one line, ``regedu: error: ...``, with exit status 2.

Image files are NIfTI (``.nii``, ``.nii.gz``), NumPy ``.npy`` or ``.npz``
(the array under ``vol``, ``image`` or the only key; a label map under
``seg``; optionally a 4x4 ``affine``). A folder of training or evaluation
images holds one image per file; the label map of ``NAME.nii.gz`` is
``NAME_seg.nii.gz`` beside it.

Nothing silently wrong: images with NaN or infinite voxels or no contrast,
label maps that are not whole numbers (or look like intensity images),
structures in no label map, images of other voxel sizes, and inputs that
would not fit in memory are refused before any work. A checkpoint records the
voxel size it was trained at; ``register`` and ``evaluate`` run it on the
images' grid coarsened by the whole ratio of the two (``--factor`` overrides).

No work lost: ``train`` checks ``--out`` before training, never replaces a
checkpoint without ``--resume`` or ``--force``, saves every tenth of the run
(at least every 10 minutes) and, on Ctrl-C or SIGTERM, after the step it is
in. Outputs are written atomically and never over an input.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from ._checks import (available_memory, check_finite, check_labels, check_memory, check_output_path,
                      format_bytes, format_spacing)

__all__ = ["main", "read_image", "write_image", "write_displacement", "PairFolder", "OfflinePairs"]

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".npz", ".npy")
_SEG_MARK = "_seg"


class CLIError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits; one line naming the fix reads better.
    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------- image files

def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in _IMAGE_SUFFIXES if name.endswith(s)), path.suffix.lower())


def _stem(path: Path) -> str:
    return path.name[:-len(_suffix(path))]


# A label map holds structures, a few dozen to a few hundred; an intensity
# image stored as integers has thousands of distinct values.
_MAX_LABELS = 1000
# Beyond the tensors a forward pass creates, CPU convolutions use workspaces:
# measured peaks of the U-Net and VV-Net at 160x192x224 were 1.26x and 1.3x
# what regedu.nets.inference_bytes counts.
_WORKSPACE = 1.3


@dataclass
class _Image:
    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...] | None  # mm per array axis, when the file says
    header: object | None               # the NIfTI header, carried into outputs
    path: Path


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def _check_fits(what: str, path: Path, shape, itemsize: int, stored: int | None = None) -> None:
    # Bytes to read, plus the float32 copy every image gets (normalised or warped).
    needed = math.prod(shape) * (itemsize + 4)
    lie = ""
    if stored is not None and stored < math.prod(shape) * itemsize // 2:
        lie = (f" (the file holds {format_bytes(stored)}: its header may be wrong or the file "
               f"truncated)")
    try:
        check_memory(needed, f"{what}: reading {str(path)!r} ({_shape_text(shape)} voxels)",
                     f"crop or downsample it first{lie}")
    except MemoryError as e:
        raise CLIError(str(e)) from None


def _npz_shape(path: Path, key: str):
    # The shape and dtype of an .npz member from its header, before reading it.
    import zipfile
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    return shape, dtype


def _spacing_mm(affine: np.ndarray, axes, scale: float = 1.0) -> tuple[float, ...]:
    sizes = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0)) * scale
    return tuple(float(sizes[a]) for a in axes if a < 3)


_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def _read_image(path, what: str = "image", *, key: str | None = None) -> _Image:
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what}: no file {str(path)!r}")
    if path.is_dir():
        raise CLIError(f"{what}: {str(path)!r} is a folder; expected an image file")
    suffix = _suffix(path)
    if suffix not in _IMAGE_SUFFIXES:
        raise CLIError(f"{what}: {str(path)!r} is not an image file this command reads "
                       f"(expected {', '.join(_IMAGE_SUFFIXES)})")
    affine, header, spacing = np.eye(4), None, None
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib
            img = nib.load(str(path))
            proxy = img.dataobj
            scaled = getattr(proxy, "slope", 1) != 1 or getattr(proxy, "inter", 0) != 0
            _check_fits(what, path, img.header.get_data_shape(),
                        8 if scaled else img.get_data_dtype().itemsize,
                        path.stat().st_size if suffix == ".nii" else None)
            array, affine, header = np.asarray(proxy), img.affine, img.header
            kept = [i for i, n in enumerate(array.shape) if n != 1]
            unit = _UNIT_MM.get(header.get_xyzt_units()[0] or "unknown", 1.0)
            zooms = header.get_zooms()
            spacing = tuple(float(zooms[a]) * unit for a in kept if a < 3)
        elif suffix == ".npy":
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            _check_fits(what, path, mapped.shape, mapped.dtype.itemsize)
            array = np.array(mapped)
        else:
            with np.load(path, allow_pickle=False) as data:
                keys = [key] if key else [k for k in ("vol", "image") if k in data.files]
                if not keys and len([k for k in data.files if k != "affine"]) == 1:
                    keys = [k for k in data.files if k != "affine"]
                if not keys or keys[0] not in data.files:
                    wanted = repr(key) if key else "'vol' or 'image' (or a single array)"
                    raise CLIError(f"{what}: {str(path)!r} holds arrays {data.files}; "
                                   f"expected {wanted}")
                try:
                    shape, dtype = _npz_shape(path, keys[0])
                except (KeyError, ValueError, OSError):
                    shape, dtype = None, None  # compressed oddly: the read below will tell
                if shape is not None:
                    _check_fits(what, path, shape, dtype.itemsize)
                array = data[keys[0]]
                if "affine" in data.files:
                    affine = np.asarray(data["affine"], dtype=np.float64)
                    if affine.shape != (4, 4):
                        raise CLIError(f"{what}: the 'affine' in {str(path)!r} has shape "
                                       f"{affine.shape}; expected a 4x4 matrix")
                    spacing = "affine"
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"{what}: cannot read {str(path)!r} ({type(e).__name__}: {e})") from None
    if spacing == "affine":
        spacing = _spacing_mm(affine, [i for i, n in enumerate(array.shape) if n != 1])
    array = np.squeeze(array)
    if array.ndim not in (2, 3):
        raise CLIError(f"{what}: expected a 2D or 3D image, {str(path)!r} has shape {array.shape}")
    if spacing is not None and (len(spacing) != array.ndim or not all(s > 0 for s in spacing)):
        spacing = None  # a header that does not describe these axes says nothing
    return _Image(array, np.asarray(affine, dtype=np.float64), spacing, header, path)


def read_image(path, what: str = "image", *, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 2D or 3D image or label map: ``(array, 4x4 affine)``.

    NIfTI files give their own affine; NumPy files an ``affine`` array if they
    hold one, else the identity. ``key`` picks the array of an ``.npz``
    (default ``vol``, ``image``, or the only array). A file too large for the
    available memory is refused before it is read.
    """
    image = _read_image(path, what, key=key)
    return image.array, image.affine


def _seg_path(path: Path) -> Path | None:
    for suffix in _IMAGE_SUFFIXES:
        candidate = path.with_name(_stem(path) + _SEG_MARK + suffix)
        if candidate.exists():
            return candidate
    return None


def _as_labels(array: np.ndarray, what: str, path: Path, image: np.ndarray | None = None) -> np.ndarray:
    """A label map as int64, refusing what is not one (fractions, NaN, an intensity image)."""
    if image is not None and array.shape == image.shape and np.array_equal(array, image):
        raise CLIError(f"{what}: {str(path)!r} holds the same values as its image; expected a "
                       f"label map of structures (e.g. FreeSurfer's aseg), not the image itself")
    try:
        check_labels(array, f"{what} ({str(path)!r})", max_labels=_MAX_LABELS)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    same, distinct = _regionality(array)
    if same < _MIN_REGIONALITY and distinct > 32:
        raise CLIError(f"{what}: {str(path)!r} does not look like a label map: inside it only "
                       f"{100 * same:.0f}% of neighbouring voxels share a value (a label map is made "
                       f"of regions, where most do) and it holds {distinct} distinct values; is it "
                       f"an intensity image?")
    return array.astype(np.int64)


# Neighbouring voxels inside a label map mostly share their label (FreeSurfer's
# aseg at 1 mm: 91%, the MNI parcels at 4 mm: 71%); in an intensity image
# quantised to integers few do (the voxelmorph scan at 8 bits: 11%, at 6 bits: 31%).
_MIN_REGIONALITY = 0.4


def _regionality(array: np.ndarray) -> tuple[float, int]:
    """The fraction of neighbour pairs (last axis, both non-zero) with equal values; distinct values."""
    a, b = array[..., :-1], array[..., 1:]
    both = (a != 0) & (b != 0)
    n = int(both.sum())
    same = float((a[both] == b[both]).sum()) / n if n else 1.0
    return same, len(np.unique(array))


def _read_labels(path, what: str, image: np.ndarray | None = None) -> np.ndarray:
    path = Path(path)
    return _as_labels(read_image(path, what)[0], what, path, image)


def _read_seg(path: Path, what: str) -> np.ndarray | None:
    """The label map of an image: ``seg`` inside an ``.npz``, else a ``NAME_seg`` file."""
    if _suffix(path) == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "seg" in data.files:
                return _as_labels(np.squeeze(data["seg"]), f"{what} labels", path)
    seg = _seg_path(path)
    return None if seg is None else _read_labels(seg, f"{what} labels")


def _normalise(array: np.ndarray, what: str = "image", path=None) -> np.ndarray:
    # Min-max to [0, 1], the range the losses (MI's bins, VV-Net's /255) assume;
    # training and registration use the same rule. Min-max of an image with a
    # NaN is NaN, and of a constant image nothing: both would register as zeros.
    name = f"{what} {str(path)!r}" if path is not None else what
    array = array.astype(np.float32)
    try:
        check_finite(array, name)
    except ValueError:
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        raise CLIError(f"{name}: expected finite intensities, got {n_nan} NaN and {n_inf} infinite "
                       f"voxels of {array.size}; replace them (e.g. numpy.nan_to_num) or crop "
                       f"them away first") from None
    lo, hi = float(array.min()), float(array.max())
    if not hi > lo:
        raise CLIError(f"{name}: every voxel is {lo:g}; an image with no contrast has nothing to "
                       f"register: check that it is the right file")
    return (array - lo) / (hi - lo)


def _header_for(array: np.ndarray, affine: np.ndarray, template, *, intent: str | None = None):
    import nibabel as nib
    img = nib.Nifti1Image(array, affine)
    hdr = img.header
    if template is not None:
        # What says where the voxels are and in which units, from the fixed image;
        # not its data type or scaling, which belong to its own values.
        qform, qcode = template.get_qform(coded=True)
        sform, scode = template.get_sform(coded=True)
        if qform is not None:
            img.set_qform(qform, code=int(qcode))
        else:
            img.set_qform(None, code=0)
        if sform is not None:
            img.set_sform(sform, code=int(scode))
        else:
            img.set_sform(affine, code=0)
        hdr.set_xyzt_units(*template.get_xyzt_units())
        hdr["descrip"] = template["descrip"]
    else:
        hdr["descrip"] = b"regedu"
    if intent:
        hdr.set_intent(intent)
    hdr.set_data_dtype(array.dtype)
    return img


def _atomic(path: Path, write) -> Path:
    # Written beside the target and renamed when complete: an interrupted write
    # leaves the old file (or none), never half of one. The temporary name keeps
    # the suffix, which says the format to nibabel and numpy.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_suffix(path), dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _output(path, name: str = "output") -> Path:
    path = Path(path)
    if _suffix(path) not in (".nii.gz", ".nii", ".npz"):
        raise CLIError(f"{name}: {str(path)!r} should end in .nii.gz, .nii or .npz")
    return path


def write_image(path, array: np.ndarray, affine: np.ndarray, *, header=None) -> Path:
    """Write an image as NIfTI (``.nii``/``.nii.gz``) or ``.npz`` (``vol`` + ``affine``).

    ``header`` (a NIfTI header, e.g. the fixed image's) gives the output its
    qform and sform codes, units and description. The file is written atomically.
    """
    path = _output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _suffix(path) == ".npz":
        return _atomic(path, lambda tmp: np.savez_compressed(tmp, vol=array, affine=affine))
    import nibabel as nib
    return _atomic(path, lambda tmp: nib.save(_header_for(array, affine, header), str(tmp)))


def write_displacement(path, disp: np.ndarray, affine: np.ndarray, *, header=None) -> Path:
    """Write a displacement ``(ndim, *spatial)`` (voxels, channel k along array axis k).

    NIfTI stores a vector field as ``(X, Y, Z, 1, ndim)`` with the vector intent
    (2D fields get a Z of 1); ``.npz`` stores ``disp`` as it is, plus ``affine``.
    The values are voxel displacements in array-axis order (regedu's
    convention), not millimetres: multiply by the voxel size for physical units.
    ``header`` as for :func:`write_image`; written atomically.
    """
    path = _output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _suffix(path) == ".npz":
        return _atomic(path, lambda tmp: np.savez_compressed(tmp, disp=disp, affine=affine))
    import nibabel as nib
    ndim, spatial = disp.shape[0], disp.shape[1:]
    field = np.moveaxis(disp, 0, -1).reshape(*spatial, *([1] * (3 - ndim)), 1, ndim).astype(np.float32)
    return _atomic(path, lambda tmp: nib.save(_header_for(field, affine, header, intent="vector"),
                                              str(tmp)))


def _spacings_agree(a, b) -> bool:
    return a is None or b is None or (len(a) == len(b) and np.allclose(a, b, rtol=1e-3))


class PairFolder(torch.utils.data.Dataset):
    """(moving, fixed) pairs from a folder of images, normalised to [0, 1].

    Every ordered pair of different images, or each image against ``atlas``.
    Items are dicts with ``moving``, ``fixed`` ``(1, *spatial)`` and, when every
    image has labels, ``moving_seg``, ``fixed_seg``; plus the file names.
    ``spacing`` is the voxel size every image shares (mm), or None when no
    file says. Images with NaN, no contrast, other shapes or other voxel sizes
    are refused, and so are label maps that are not whole numbers.
    """

    def __init__(self, folder, atlas=None, *, what: str = "data", progress: bool = False):
        folder = Path(folder)
        if not folder.is_dir():
            raise CLIError(f"{what}: no folder {str(folder)!r}")
        files = sorted(p for p in folder.iterdir()
                       if _suffix(p) in _IMAGE_SUFFIXES and not _stem(p).endswith(_SEG_MARK))
        atlas = Path(atlas) if atlas else None
        if atlas is not None and not atlas.is_file():
            raise CLIError(f"--atlas: no file {str(atlas)!r}")
        files = [f for f in files if atlas is None or f.resolve() != atlas.resolve()]
        if len(files) < (1 if atlas else 2):
            raise CLIError(f"{what}: {str(folder)!r} holds {len(files)} image files; need at least "
                           f"{'one' if atlas else 'two'} (.nii.gz, .nii, .npz or .npy)")
        paths = files + ([atlas] if atlas else [])
        self.images, spacings = {}, {}
        for p in tqdm(paths, desc=f"reading {what}", disable=not progress, leave=False):
            image = _read_image(p, "--atlas" if p == atlas else what)
            self.images[p] = _normalise(image.array, "--atlas" if p == atlas else what, p)
            spacings[p] = image.spacing
            self._check_memory(len(paths))
        shapes = {p.name: a.shape for p, a in self.images.items()}
        if len(set(shapes.values())) > 1:
            raise CLIError(f"{what}: all images must have the same shape (resample them to one grid "
                           f"first), got {shapes}")
        known = {p.name: s for p, s in spacings.items() if s is not None}
        if any(not _spacings_agree(s, next(iter(known.values()))) for s in known.values()):
            raise CLIError(f"{what}: all images must have the same voxel size (resample them to "
                           f"one grid first), got {dict((k, format_spacing(v)) for k, v in known.items())}")
        self.spacing = next(iter(known.values())) if len(known) == len(spacings) else None
        segs = {p: _read_seg(p, what) for p in self.images}
        for p, seg in segs.items():
            if seg is not None and seg.shape != self.images[p].shape:
                raise CLIError(f"{what}: the labels of {p.name} have shape {seg.shape}, the image "
                               f"{self.images[p].shape}; expected the same grid")
        self.segs = segs if all(s is not None for s in segs.values()) else None
        self.pairs = ([(f, atlas) for f in files] if atlas else
                      [(m, f) for m in files for f in files if m != f])

    def _check_memory(self, n_files: int) -> None:
        # After the first image: every image is kept, as float32, and its labels as int64.
        if len(self.images) == 1:
            voxels = next(iter(self.images.values())).size
            try:
                check_memory((n_files - 1) * voxels * 12, f"holding {n_files} images of "
                             f"{voxels:,} voxels with their labels",
                             "use fewer images, or coarser ones")
            except MemoryError as e:
                raise CLIError(str(e)) from None

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


class OfflinePairs(torch.utils.data.Dataset):
    """Pairs made from data shipped with the dependencies, sized by the profile.

    ``"fundus"``: FIRE-like pairs (categories S, P, A in turn;
    ``regedu.datasets.make_fire_pair``) of *procedural* retinas, so that the
    real photograph ``skimage.data.retina()`` stays held out for testing, as
    vessel contrast (``regedu.datasets.vessel_contrast``): a model trained on
    them registers images prepared the same way. ``"brain"``: synthetic
    subjects (the MNI template under random diffeomorphisms and intensity
    changes, ``regedu.datasets.synth_subject``) as moving images, the template
    as the fixed one (atlas-based, as VV-Net), with labels. Pair ``i`` is drawn
    from seed ``first_seed + i``, so a run is reproducible; up to 256 pairs are
    kept once made, fewer when they would take more than a quarter of the
    available memory (the rest are made again when needed). ``spacing``: the
    brain's voxel size (mm), None for the fundus pixels.
    """

    def __init__(self, source: str, n: int, *, first_seed: int = 0):
        from . import datasets
        from .profiles import get_profile
        if source not in ("fundus", "brain"):
            raise CLIError(f"data: expected 'fundus', 'brain' or a folder, got {source!r}")
        self.source, self.n, self.first_seed = source, n, first_seed
        self.profile = get_profile()
        shape = ((self.profile.fundus_size,) * 2 if source == "fundus" else
                 tuple(self.profile.brain_shape))
        # moving and fixed as float32, labels as int64 (brain); the shuffled order, int64 each.
        item_bytes = math.prod(shape) * (8 if source == "fundus" else 12)
        # torch's RandomSampler shuffles all n at once, as an int64 permutation turned
        # into a Python list: 8 bytes, plus a pointer and an int object per pair.
        try:
            check_memory(48 * n, f"--pairs {n}: shuffling {n:,} pairs",
                         "ask for fewer pairs: a run only sees steps x batch-size of them")
        except MemoryError as e:
            raise CLIError(str(e)) from None
        self.keep = max(0, min(256, int(available_memory() * 0.25 // item_bytes)))
        self.atlas = datasets.mni_brain() if source == "brain" else None
        self.spacing = ((float(self.profile.brain_spacing_mm),) * 3 if source == "brain" else None)
        self._items: dict[int, dict] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self[0]["fixed"].shape[1:])

    def labels_present(self) -> set[int]:
        return set(np.unique(self.atlas.seg).tolist()) - {0} if self.atlas is not None else set()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i not in self._items:
            from . import datasets
            seed = self.first_seed + i
            if self.source == "fundus":
                pair = datasets.make_fire_pair("SPA"[i % 3], size=self.profile.fundus_size, seed=seed,
                                               source="procedural")
                item = {"moving": datasets.vessel_contrast(pair.moving, pair.moving_mask),
                        "fixed": datasets.vessel_contrast(pair.fixed, pair.fixed_mask)}
            else:
                subject = datasets.synth_subject(self.atlas, seed=seed)
                item = {"moving": subject["image"], "moving_seg": subject["seg"],
                        "fixed": torch.as_tensor(self.atlas.image),
                        "fixed_seg": torch.as_tensor(self.atlas.seg)[None]}
            if self.n > 256 or len(self._items) >= self.keep:
                return item
            self._items[i] = item
        return self._items[i]


# ---------------------------------------------------------------- doctor

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _doctor(args) -> int:
    from .profiles import get_profile
    rows = [("regedu", __version__), ("python", platform.python_version()),
            ("platform", platform.platform())]
    for dist in ("torch", "numpy", "scipy", "nibabel", "scikit-image", "matplotlib", "tqdm",
                 "voxelmorph", "antspyx"):
        rows.append((dist, _version(dist) or "not installed"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cuda = (f"yes: {torch.cuda.device_count()} device(s), {props.name}, "
                f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        cuda = "no (training runs on the CPU; the ci and cpu profiles are sized for that)"
    rows.append(("CUDA", cuda))
    env = os.environ.get("REGEDU_PROFILE")
    profile = get_profile()
    rows.append(("profile", f"{profile.name} ({'REGEDU_PROFILE=' + env if env else 'default for this hardware'})"
                            f": 2D {profile.fundus_size}px, 3D {'x'.join(map(str, profile.brain_shape))}"))
    try:
        from .datasets.fetch import data_dir
        cache = data_dir()
        entries = sorted(cache.iterdir())
        size = sum(f.stat().st_size for e in entries for f in ([e] if e.is_file() else e.rglob("*"))
                   if f.is_file())
        listing = ", ".join(e.name for e in entries[:8]) + (" ..." if len(entries) > 8 else "")
        rows.append(("data cache", f"{cache} ({len(entries)} entries, {size / 2**20:.1f} MiB)"
                                   + (f": {listing}" if entries else ": empty")))
    except (ImportError, OSError) as e:
        rows.append(("data cache", f"unavailable ({e})"))
    widgets = _version("ipywidgets")
    lab = _version("jupyterlab_widgets")
    if widgets and widgets.split(".")[0] >= "8" and lab:
        support = f"yes: ipywidgets {widgets}, jupyterlab_widgets {lab} (sliders work in JupyterLab and Notebook 7)"
    elif widgets:
        support = f"partial: ipywidgets {widgets} without jupyterlab_widgets (sliders may not render)"
    else:
        support = "no: install ipywidgets to get the interactive viewers"
    rows.append(("widgets", support))
    rows.append(("jupyterlab", _version("jupyterlab") or "not installed"))
    if args.json:
        print(json.dumps(dict(rows), indent=2))
    else:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    return 0


# ---------------------------------------------------------------- fetch

def _fetch(argv: list[str]) -> int:
    try:
        datasets = importlib.import_module(".datasets", __package__)
        fetch_main = datasets.fetch_main
    except (ImportError, AttributeError):
        try:
            from .datasets.fetch import fetch_main
        except ImportError:
            raise CLIError("fetch: regedu.datasets is not installed in this version") from None
    return fetch_main(argv)


# ---------------------------------------------------------------- train

_TRAIN_DEFAULTS = {"model": "unet", "data": None, "atlas": None, "steps": None, "epochs": None,
                   "lr": 1e-4, "batch_size": 1, "losses": {"ncc": 1.0, "diffusion": 1.0},
                   "labels": None, "val_data": None, "val_every": None, "out": "regedu_model.pt",
                   "checkpoint_every": None, "resume": False, "force": False, "init_from": None,
                   "seed": 0, "device": None, "progress": True, "model_args": {}, "pairs": None,
                   "grad_clip": None}
# Options a resumed run takes from its checkpoint unless given again: from the
# training settings, and from what the command line recorded.
_FROM_TRAIN_CONFIG = ("lr", "losses", "batch_size", "labels", "grad_clip", "seed", "steps", "epochs")
_FROM_COMMAND = ("data", "atlas", "val_data", "pairs", "val_every", "checkpoint_every")


def _parse_weights(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise CLIError(f"--losses: expected NAME=WEIGHT pairs such as 'ncc=1,diffusion=1', "
                           f"got {part!r}") from None
    return out


def _freesurfer_30():
    from .datasets import FREESURFER_30
    return FREESURFER_30


def _parse_labels(text):
    from ._checks import check_label_list
    if text is None:
        return None
    if text == "freesurfer30":
        return list(_freesurfer_30())
    try:
        if isinstance(text, str):
            text = [v.strip() for v in text.split(",") if v.strip()]
            labels = check_label_list([int(v) for v in text], "--labels")
        else:
            labels = check_label_list(text, "--labels")
    except (TypeError, ValueError):
        raise CLIError(f"--labels: expected integers separated by commas, each once (e.g. 2,3,4), "
                       f"or 'freesurfer30', got {text!r}") from None
    if not labels or labels == [0]:
        raise CLIError(f"--labels: expected at least one structure other than background 0, "
                       f"got {text!r}")
    return labels


def _note(text: str) -> None:
    # Remarks go where warnings go, so that stdout holds only results (tables, paths).
    print(text, file=sys.stderr, flush=True)


def _check_labels_present(labels, present: set, what: str) -> None:
    """Refuse structures found in no label map; name those missing from some."""
    if labels is None:
        return
    absent = [v for v in labels if v not in present and v != 0]
    if absent and len(absent) == len([v for v in labels if v != 0]):
        shown = sorted(present)
        raise CLIError(f"--labels: none of {', '.join(map(str, absent))} is in the label maps of "
                       f"{what} (they hold {', '.join(map(str, shown[:20]))}"
                       f"{' ...' if len(shown) > 20 else ''}); give labels that are there")
    if absent:
        _note(f"note: labels {', '.join(map(str, absent))} are in no label map of {what}; "
              f"they count in no Dice")


def _parse_model_args(items) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--model-arg: expected KEY=VALUE (e.g. integrate_steps=7), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _read_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--config: no file {str(path)!r}")
    text = path.read_text()
    toml = path.suffix.lower() == ".toml"
    try:
        if toml:
            import tomllib
            config = tomllib.loads(text)
        else:
            config = json.loads(text)
    except ImportError:
        raise CLIError("--config: TOML files need Python 3.11 or later; write the config as "
                       "JSON instead") from None
    except ValueError as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise CLIError(f"--config: {str(path)!r} is not valid {'TOML' if toml else 'JSON'} "
                       f"({e})") from None
    if not isinstance(config, dict):
        raise CLIError(f"--config: {str(path)!r} should hold a table of options, got "
                       f"a {type(config).__name__}")
    config = {k.replace("-", "_"): v for k, v in config.items()}
    unknown = sorted(set(config) - set(_TRAIN_DEFAULTS))
    if unknown:
        raise CLIError(f"--config: unknown keys {unknown}; known keys: {sorted(_TRAIN_DEFAULTS)}")
    return config


def _load_state(path: Path, flag: str) -> dict:
    from .checkpoints import load_checkpoint
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"{flag}: {e}") from None


def _describe_state(state: dict) -> str:
    return f"a {(state.get('config') or {}).get('name', 'model')} checkpoint at step {state.get('step', '?')}"


def _check_train_memory(model, shape, batch_size: int) -> None:
    from .nets import summary
    voxels = math.prod(shape) * batch_size
    if voxels <= 2**20:  # small enough for any machine that runs torch: skip the probe
        return
    estimate = summary(model, shape, batch=batch_size).train_bytes * _WORKSPACE
    try:
        check_memory(estimate, f"training on {batch_size} x {_shape_text(shape)} voxels",
                     "train on coarser images (e.g. --model rescaled --model-arg factor=2) or a "
                     "smaller --batch-size")
    except MemoryError as e:
        raise CLIError(str(e)) from None


def _train(args) -> int:
    from . import nets
    from .profiles import get_profile
    from .checkpoints import check_complete, load_model
    from .train import TrainingInterrupted, fit, seed_everything
    config = dict(_TRAIN_DEFAULTS)
    explicit: set[str] = set()
    if args.config:
        file_config = _read_config(args.config)
        config.update(file_config)
        explicit |= set(file_config)
    flags = {k: v for k, v in vars(args).items() if k in _TRAIN_DEFAULTS and v is not None}
    if isinstance(flags.get("losses"), str):
        flags["losses"] = _parse_weights(flags["losses"])
    if "model_args" in flags:
        flags["model_args"] = {**config["model_args"], **_parse_model_args(flags["model_args"])}
    config.update(flags)
    explicit |= set(flags)

    # The checkpoint file first: a run that cannot save, or would replace
    # another run without being asked to, must not start.
    out = Path(config["out"])
    try:
        check_output_path(out, "--out")
    except ValueError as e:
        raise CLIError(str(e)) from None
    if config["resume"] and config["force"]:
        raise CLIError("--resume and --force contradict each other: --resume continues --out, "
                       "--force replaces it")
    state = None
    if out.exists():
        if config["resume"]:
            state = _load_state(out, "--resume")
            try:
                check_complete(state, out)
            except ValueError as e:
                raise CLIError(str(e)) from None
            if config["init_from"]:
                raise CLIError(f"--init-from and --resume: {str(out)!r} exists and --resume "
                               f"continues it; drop --init-from (or give another --out)")
            command = (state.get("metadata") or {}).get("cli") or {}
            saved = state.get("train_config") or {}
            for key in _FROM_TRAIN_CONFIG:
                if key not in explicit and saved.get(key) is not None:
                    config[key] = saved[key]
            for key in _FROM_COMMAND:
                if key not in explicit and command.get(key) is not None:
                    config[key] = command[key]
        elif not config["force"]:
            raise CLIError(f"--out: {str(out)!r} already exists ({_describe_state(_load_state(out, '--out'))}"
                           f"); continue it with --resume, replace it with --force, or choose "
                           f"another --out")
    if config["data"] is None:
        raise CLIError("train: give the training images with --data FOLDER (or 'data' in --config)")
    device = _device(config["device"])
    profile = get_profile()
    if config["pairs"] is not None and (not isinstance(config["pairs"], int) or config["pairs"] < 1):
        raise CLIError(f"--pairs: expected a positive number of pairs, got {config['pairs']!r}")
    if config["pairs"] is not None and config["data"] not in ("fundus", "brain"):
        raise CLIError(f"--pairs: only for the offline data (--data fundus or brain); a folder "
                       f"({config['data']!r}) gives its own pairs")
    progress = bool(config["progress"]) and sys.stderr.isatty()
    if config["data"] in ("fundus", "brain"):
        data = OfflinePairs(config["data"], config["pairs"] or profile.n_train_pairs)
        val = (OfflinePairs(config["data"], profile.n_test_pairs, first_seed=10_000)
               if config["val_data"] in (None, config["data"]) else
               PairFolder(config["val_data"], what="--val-data", progress=progress))
        if config["data"] == "brain" and config["labels"] is None:
            config["labels"] = list(_freesurfer_30())
    else:
        data = PairFolder(config["data"], atlas=config["atlas"], progress=progress)
        val = (PairFolder(config["val_data"], atlas=config["atlas"], what="--val-data",
                          progress=progress) if config["val_data"] else None)
    if val is not None and tuple(val.shape) != tuple(data.shape):
        raise CLIError(f"--val-data: its images are {_shape_text(val.shape)}, the training images "
                       f"{_shape_text(data.shape)}; validate on images of the training grid")
    labels = _parse_labels(config["labels"])
    losses = config["losses"]
    if isinstance(losses, dict) and losses.get("dice") and not data.labels_present():
        raise CLIError(f"--losses: the dice term needs label maps, and the training images of "
                       f"{config['data']!r} have none (NAME_seg files or an npz 'seg'); drop "
                       f"dice or add the labels")
    if data.labels_present():
        _check_labels_present(labels, data.labels_present(), f"the training data {config['data']!r}")
    if config["steps"] is None and config["epochs"] is None:
        config["steps"] = profile.steps_2d if len(data.shape) == 2 else profile.steps_3d
    seed_everything(config["seed"])
    model_args = {"spatial_dims": len(data.shape), **config["model_args"]}
    try:
        if config["init_from"]:
            if {"model", "model_args"} & explicit:
                raise CLIError("--init-from builds the model its checkpoint holds; drop --model "
                               "and --model-arg")
            init = Path(config["init_from"])
            _load_state(init, "--init-from")
            model = load_model(init).train()
        elif state is not None and not {"model", "model_args"} & explicit:
            model = nets.from_config(state["config"])  # the model the checkpoint holds
        else:
            model = nets.create(config["model"], **model_args)
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(f"train: cannot build model {config['model']!r} with {model_args} ({e})") from None
    dims = model.config.get("spatial_dims", len(data.shape))
    if dims != len(data.shape):
        raise CLIError(f"the model is {dims}D (spatial_dims={dims}) but the training images are "
                       f"{len(data.shape)}D ({_shape_text(data.shape)})")
    _check_train_memory(model, data.shape, config["batch_size"])
    name = model.config.get("name", config["model"])
    every = ("tenth of the run" if config["checkpoint_every"] is None
             else f"{config['checkpoint_every']} steps")
    print(f"training {name} ({dims}D) on {len(data)} pairs of {_shape_text(data.shape)} from "
          f"{config['data']}; checkpoint -> {out} (saved every {every}, at the end and on Ctrl-C)",
          flush=True)
    command = {k: config[k] for k in _FROM_COMMAND}
    command.update(model=name, model_args=config["model_args"], init_from=config["init_from"])
    try:
        history = fit(model, data, val_data=val, losses=losses, steps=config["steps"],
                      epochs=config["epochs"], lr=config["lr"], batch_size=config["batch_size"],
                      labels=labels, val_every=config["val_every"], checkpoint=out,
                      checkpoint_every=config["checkpoint_every"], resume=bool(config["resume"]),
                      overwrite=bool(config["force"]), seed=config["seed"], device=device,
                      progress=config["progress"], grad_clip=config["grad_clip"],
                      spacing=data.spacing, metadata={"cli": command})
    except TrainingInterrupted as stop:
        print(f"regedu: interrupted after step {stop.step}; saved {stop.checkpoint}: continue "
              f"with the same command plus --resume", file=sys.stderr)
        return 128 + stop.signum
    loss = history["train"]["loss"]
    if not loss:
        return 0
    print(f"done: {history['train']['step'][-1]} steps, loss {loss[0]:.4g} -> {loss[-1]:.4g}; "
          f"saved {out}")
    return 0


# ---------------------------------------------------------------- register and evaluate

def _load(args):
    """The checkpoint of ``--model``: (model, state), on the ``--device``."""
    from .checkpoints import load_model
    path = Path(args.model)
    if not path.is_file():
        raise CLIError(f"--model: no checkpoint file {str(path)!r} (train one with 'regedu train')")
    state = _load_state(path, "--model")
    try:
        model = load_model(path, map_location="cpu")
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"--model: {e}") from None
    return model, state


def _scaled(model, state: dict, args, spacing, shape):
    """``model`` at the right scale for images of voxel size ``spacing``.

    A checkpoint records the voxel size it was trained at; the images' comes
    from their headers. A whole ratio picks the Rescaled factor (and says so),
    ``--factor`` overrides, anything else is refused.
    """
    from . import nets
    from .checkpoints import choose_factor, trained_spacing
    trained = trained_spacing(state)
    trained_shape = (state.get("train_config") or {}).get("shape")
    suggested = None
    if trained is not None and spacing is not None:
        try:
            suggested = choose_factor(trained, spacing, hint="--factor N")
        except ValueError as e:
            if args.factor is None:
                raise CLIError(f"--model {args.model}: {e}") from None
    if args.factor is not None:
        if args.factor < 1:
            raise CLIError(f"--factor: expected a positive whole number, got {args.factor}")
        factor = args.factor
        if suggested is not None and suggested != factor:
            _note(f"note: --factor {factor} although the model was trained at {format_spacing(trained)} "
                  f"and the images have {format_spacing(spacing)} (which suggests {suggested})")
    elif suggested is not None:
        factor = suggested
        if factor > 1:
            _note(f"the model was trained at {format_spacing(trained)} voxels and the images have "
                  f"{format_spacing(spacing)}: running it on their grid coarsened {factor} times "
                  f"(--factor overrides)")
    else:
        factor = 1
        if trained is None:
            ratio = ([n / t for n, t in zip(shape, trained_shape)]
                     if trained_shape and len(trained_shape) == len(shape) else None)
            if ratio and all(abs(r - round(ratio[0])) < 1e-6 for r in ratio) and round(ratio[0]) > 1:
                hint = (f"the images are {round(ratio[0])} times the size it was trained on "
                        f"({_shape_text(trained_shape)}): if they are that much finer, pass "
                        f"--factor {round(ratio[0])}")
            else:
                hint = ("if it was trained on coarser voxels than these, pass --factor (e.g. "
                        "--factor 4 for a 4 mm model on 1 mm images)")
            _note(f"note: {args.model} does not record the voxel size it was trained at; running "
                  f"it on the images' grid ({format_spacing(spacing)}); {hint}")
        elif spacing is None:
            _note(f"note: the images do not say their voxel size (no NIfTI header or affine); the "
                  f"model was trained at {format_spacing(trained)}: if the images are finer, pass "
                  f"--factor")
    if factor > 1:
        if any(n % factor for n in shape):
            raise CLIError(f"--factor {factor}: every image size must be a multiple of {factor} to "
                           f"coarsen the grid, got {_shape_text(shape)}; crop or pad the images")
        model = nets.Rescaled(model, factor)
    return model


def _device(name: str | None) -> torch.device:
    from .train import default_device
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here (see 'regedu doctor'); "
                       f"use --device cpu")
    return device


def _check_pair(fixed: np.ndarray, moving: np.ndarray, config: dict, names=("fixed", "moving")):
    if fixed.shape != moving.shape:
        raise CLIError(f"{names[0]} and {names[1]} must have the same shape (resample the moving "
                       f"image onto the fixed grid first), got {fixed.shape} and {moving.shape}")
    dims = config.get("spatial_dims")
    if dims is not None and fixed.ndim != dims:
        raise CLIError(f"the model is {dims}D (spatial_dims={dims}) but {names[0]} is a "
                       f"{fixed.ndim}D image of shape {fixed.shape}")


def _check_spacings(fixed: _Image, moving: _Image) -> tuple[float, ...] | None:
    if not _spacings_agree(fixed.spacing, moving.spacing):
        raise CLIError(f"--fixed and --moving have different voxel sizes ({format_spacing(fixed.spacing)} "
                       f"and {format_spacing(moving.spacing)}); resample the moving image onto the fixed "
                       f"grid first")
    return fixed.spacing if fixed.spacing is not None else moving.spacing


def _check_model_memory(model, shape, what: str) -> None:
    from .nets import inference_bytes
    voxels = math.prod(shape)
    if voxels <= 2**20:
        return
    estimate = inference_bytes(model, shape) * _WORKSPACE
    try:
        check_memory(estimate, f"{what}: running the model on {_shape_text(shape)} voxels",
                     "run it on a coarser grid (--factor 2 halves every axis) or crop the images")
    except MemoryError as e:
        raise CLIError(str(e)) from None


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text


def _run_model(model, device, fixed: np.ndarray, moving: np.ndarray):
    """``model(moving, fixed)`` on images normalised by :func:`_normalise`."""
    batch = (torch.from_numpy(moving)[None, None].to(device),
             torch.from_numpy(fixed)[None, None].to(device))
    try:
        with torch.no_grad():
            return model(*batch)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise CLIError(f"ran out of memory running the model on {_shape_text(fixed.shape)} voxels "
                       f"(about {format_bytes(available_memory())} free now); run it on a coarser "
                       f"grid (--factor 2 halves every axis) or crop the images") from None


def _check_outputs(outputs: dict, inputs) -> None:
    seen = {}
    for name, path in outputs.items():
        if not path:
            continue
        if Path(path).resolve() in seen:
            raise CLIError(f"{name}: {path!r} is also {seen[Path(path).resolve()]}; give each "
                           f"output its own file")
        seen[Path(path).resolve()] = name
        try:
            check_output_path(path, name, inputs=inputs)
        except ValueError as e:
            raise CLIError(str(e)) from None


def _register(args) -> int:
    from .spatial import warp
    # Check every input and output name before computing or writing anything.
    if bool(args.moving_seg) != bool(args.warped_seg):
        raise CLIError("--moving-seg and --warped-seg go together (the labels to warp and where "
                       "to write them)")
    for name, path in (("--warped", args.warped), ("--disp", args.disp), ("--warped-seg", args.warped_seg)):
        if path:
            _output(path, name)
    inputs = [args.fixed, args.moving, args.moving_seg, args.model]
    _check_outputs({"--warped": args.warped, "--disp": args.disp, "--warped-seg": args.warped_seg},
                   inputs)
    fixed = _read_image(args.fixed, "--fixed")
    moving = _read_image(args.moving, "--moving")
    model, state = _load(args)
    config = model.config
    _check_pair(fixed.array, moving.array, config)
    normalised = (_normalise(fixed.array, "--fixed", fixed.path),
                  _normalise(moving.array, "--moving", moving.path))
    seg = _read_labels(args.moving_seg, "--moving-seg", moving.array) if args.moving_seg else None
    if seg is not None:
        _check_pair(fixed.array, seg, config, ("fixed", "moving-seg"))
    spacing = _check_spacings(fixed, moving)
    model = _scaled(model, state, args, spacing, fixed.array.shape)
    _check_model_memory(model, fixed.array.shape, "register")
    device = _device(args.device)
    model = model.to(device)

    start = time.perf_counter()
    disp = _run_model(model, device, *normalised).disp
    seconds = time.perf_counter() - start
    # The warped image keeps the moving image's intensities (not the normalised ones).
    raw = torch.from_numpy(moving.array.astype(np.float32))[None, None].to(device)
    header = fixed.header
    written = [write_image(args.warped, warp(raw, disp)[0, 0].cpu().numpy(), fixed.affine,
                           header=header)]
    if args.disp:
        written.append(write_displacement(args.disp, disp[0].cpu().numpy(), fixed.affine,
                                          header=header))
    if seg is not None:
        labels = torch.from_numpy(seg)[None, None].to(device)
        warped_seg = warp(labels, disp)[0, 0].cpu().numpy().astype(np.int32)
        written.append(write_image(args.warped_seg, warped_seg, fixed.affine, header=header))
    print(f"registered in {seconds:.2f} s; wrote {', '.join(map(str, written))}")
    return 0


def _evaluate(args) -> int:
    from .evaluate import evaluate
    if args.csv:
        if not str(args.csv).lower().endswith(".csv"):
            raise CLIError(f"--csv: {args.csv!r} should end in .csv")
        _check_outputs({"--csv": args.csv}, [args.model, args.fixed, args.moving, args.fixed_seg,
                                            args.moving_seg])
    model, state = _load(args)
    config = model.config
    progress = sys.stderr.isatty()
    if args.pairs:
        data = PairFolder(args.pairs, atlas=args.atlas, what="--pairs", progress=progress)
        _check_pair(np.empty(data.shape), np.empty(data.shape), config, ("images", "images"))
        spacing, shape = data.spacing, data.shape
        pairs = []
        for item in data:
            pair = {k: v for k, v in item.items() if not k.endswith("_name")}
            pair["meta"] = {"id": f"{item['moving_name']} -> {item['fixed_name']}"}
            pairs.append(pair)
        present = data.labels_present()
    elif args.fixed and args.moving:
        if bool(args.fixed_seg) != bool(args.moving_seg):
            raise CLIError("evaluate: give both --fixed-seg and --moving-seg, or neither")
        fixed, moving = _read_image(args.fixed, "--fixed"), _read_image(args.moving, "--moving")
        _check_pair(fixed.array, moving.array, config)
        spacing, shape = _check_spacings(fixed, moving), fixed.array.shape
        pair = {"fixed": torch.from_numpy(_normalise(fixed.array, "--fixed", fixed.path))[None],
                "moving": torch.from_numpy(_normalise(moving.array, "--moving", moving.path))[None],
                "meta": {"id": f"{Path(args.moving).name} -> {Path(args.fixed).name}"}}
        present = set()
        if args.fixed_seg:
            for key, path, image in (("fixed_seg", args.fixed_seg, fixed.array),
                                     ("moving_seg", args.moving_seg, moving.array)):
                seg = _read_labels(path, f"--{key.replace('_', '-')}", image)
                _check_pair(fixed.array, seg, config, ("fixed", key.replace("_", "-")))
                pair[key] = torch.from_numpy(seg)[None]
            present = set(np.unique(pair["fixed_seg"].numpy()).tolist()) - {0}
        pairs = [pair]
    else:
        raise CLIError("evaluate: give --pairs FOLDER, or --fixed and --moving "
                       "(with --fixed-seg and --moving-seg for Dice)")
    labels = _parse_labels(args.labels)
    if labels is not None and "fixed_seg" not in pairs[0]:
        raise CLIError("--labels: the images have no label maps to score (--fixed-seg and "
                       "--moving-seg, or NAME_seg files beside the images in --pairs)")
    if "fixed_seg" not in pairs[0]:
        _note("note: the images have no label maps (--fixed-seg and --moving-seg, or NAME_seg "
              "files): no Dice, only folding and runtime")
    if labels is None and "fixed_seg" in pairs[0]:
        labels = sorted(present)
        if not labels:
            raise CLIError("evaluate: the fixed label maps hold only background 0; nothing to score")
    _check_labels_present(labels, present, "the fixed images")
    model = _scaled(model, state, args, spacing, shape)
    _check_model_memory(model, shape, "evaluate")
    device = _device(args.device)
    model = model.to(device)
    try:
        with warnings.catch_warnings():  # the absent labels were named above
            warnings.filterwarnings("ignore", message="labels: .* in no label map")
            result = evaluate(model, pairs, labels=labels, name=config.get("name", "model"),
                              device=device, spatial_dims=len(shape), warmup=True,
                              progress=progress)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise CLIError(f"ran out of memory running the model on {_shape_text(shape)} voxels; run it "
                       f"on a coarser grid (--factor 2 halves every axis) or crop the images") from None
    table = result.table()
    columns = ["pair", "dice_before", "dice_mean", "dice_std", "percent_folding", "sdlogj", "seconds"]
    table = table[[c for c in columns if c in table and not table[c].isna().all()]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if len(table) > 1 and "dice_mean" in table:
        print(f"mean Dice {table['dice_mean'].mean():.4f} (std over pairs "
              f"{table['dice_mean'].std():.4f}); before registration {table['dice_before'].mean():.4f}")
    if args.csv:
        _atomic(Path(args.csv), lambda tmp: result.table().to_csv(tmp, index=False))
        print(f"wrote {args.csv}")
    return 0


# ---------------------------------------------------------------- course

def _course(args) -> int:
    from .course import run_course
    summary = run_course(args.notebooks or None, profile=args.profile, out_dir=args.out,
                         timeout=args.timeout)
    print(summary.to_markdown())
    print(f"HTML pages in {args.out}/ (open index.html)")
    return 0 if summary.ok else 1


# ---------------------------------------------------------------- the parser

_FACTOR_HELP = ("run the model on the images' grid coarsened N times (nets.Rescaled). Default: "
                "the ratio of the voxel size the checkpoint was trained at to the images' "
                "(from their headers), e.g. 4 for a 4 mm model on 1 mm images")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="regedu", description=(
        "regedu: deep-learning image registration, taught by doing it. "
        "Run 'regedu COMMAND --help' for a command's options."))
    parser.add_argument("--version", action="version", version=f"regedu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("doctor", help="check the installation: versions, CUDA, data cache, widgets",
                       description="Print versions, whether CUDA works, the active profile, the data "
                                   "cache and whether notebook widgets will render.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    sub.add_parser("fetch", help="download and verify datasets into the cache", add_help=False,
                   description="Download datasets (run 'regedu fetch --help').")

    p = sub.add_parser("train", help="train a registration network and save a checkpoint",
                       description="Train a registration network on a folder of images (pairs of "
                                   "different images, or each image to --atlas). Options can come "
                                   "from a JSON or TOML --config file whose keys are the option "
                                   "names (batch_size, losses = {ncc = 1.0, diffusion = 1.0}, ...); "
                                   "flags override it.")
    p.add_argument("--config", help="JSON or TOML file with any of the options below")
    p.add_argument("--data", help="folder of training images (.nii.gz, .nii, .npz, .npy), or "
                                  "'fundus' / 'brain' for the offline data sized by the profile "
                                  "(fundus pairs as vessel contrast, regedu.datasets.vessel_contrast)")
    p.add_argument("--atlas", help="register every image to this fixed image (atlas-based)")
    p.add_argument("--val-data", dest="val_data", help="folder of validation images")
    p.add_argument("--model", help="network name from regedu.nets (default unet)")
    p.add_argument("--model-arg", dest="model_args", action="append", metavar="KEY=VALUE",
                   help="network argument, e.g. integrate_steps=7 (repeat for several)")
    p.add_argument("--losses", help="weighted terms, e.g. 'ncc=1,diffusion=1' or 'mse=1,diffusion=0.01,dice=0.1' "
                                    "(default ncc=1,diffusion=1)")
    p.add_argument("--labels", help="structures for the Dice term and validation: 2,3,4 or freesurfer30")
    p.add_argument("--pairs", type=int, help="with --data fundus/brain: how many different training "
                                             "pairs to draw (default: the profile's n_train_pairs)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: the profile's, 2D or 3D)")
    p.add_argument("--epochs", type=int, help="passes over the pairs, instead of --steps")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="pairs per step (default 1)")
    p.add_argument("--grad-clip", dest="grad_clip", type=float,
                   help="clip the gradient norm to this value (default: no clipping)")
    p.add_argument("--val-every", dest="val_every", type=int, help="steps between validations")
    p.add_argument("--out", help="checkpoint file (default regedu_model.pt); an existing one is "
                                 "kept unless --resume or --force says otherwise")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="save every N steps (default: every tenth of the run, at least every "
                        "10 minutes; always at the end and on Ctrl-C)")
    p.add_argument("--resume", action="store_const", const=True, default=None,
                   help="continue from --out if it exists, exactly; options not given again are "
                        "taken from the checkpoint (--lr may change, the objective may not)")
    p.add_argument("--force", action="store_const", const=True, default=None,
                   help="start a new run over an existing --out")
    p.add_argument("--init-from", dest="init_from", metavar="CHECKPOINT",
                   help="start a new run from the weights (and model) of this checkpoint, e.g. "
                        "one saved without its optimiser state")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no progress bar")

    p = sub.add_parser("register", help="register a moving image to a fixed one with a trained model",
                       description="Register MOVING to FIXED with a trained checkpoint; write the "
                                   "warped image and the displacement field (voxels, channel k "
                                   "along array axis k) as NIfTI carrying the fixed image's affine.")
    p.add_argument("--model", required=True, help="checkpoint written by 'regedu train' or regedu.train.fit")
    p.add_argument("--fixed", required=True, help="fixed image (.nii.gz, .nii, .npz, .npy)")
    p.add_argument("--moving", required=True, help="moving image, same shape as the fixed one")
    p.add_argument("--warped", required=True, help="output: the moving image warped (.nii.gz or .npz)")
    p.add_argument("--disp", help="output: the displacement field (.nii.gz or .npz)")
    p.add_argument("--moving-seg", dest="moving_seg", help="labels of the moving image to warp too")
    p.add_argument("--warped-seg", dest="warped_seg", help="output: the warped labels")
    p.add_argument("--factor", type=int, help=_FACTOR_HELP)
    p.add_argument("--device", help="cpu, cuda ... (default: CUDA when available)")

    p = sub.add_parser("evaluate", help="Dice, folding and runtime of a trained model on labelled pairs",
                       description="Evaluate a checkpoint on labelled pairs: mean Dice over structures "
                                   "before and after registration, % folding voxels, SDlogJ, runtime.")
    p.add_argument("--model", required=True, help="checkpoint file")
    p.add_argument("--pairs", help="folder of labelled images (all ordered pairs, or each to --atlas)")
    p.add_argument("--atlas", help="fixed image for every pair from --pairs")
    p.add_argument("--fixed", help="fixed image (instead of --pairs)")
    p.add_argument("--moving", help="moving image")
    p.add_argument("--fixed-seg", dest="fixed_seg", help="fixed labels (for Dice)")
    p.add_argument("--moving-seg", dest="moving_seg", help="moving labels (for Dice)")
    p.add_argument("--labels", help="structures: 2,3,4 or freesurfer30 (default: all in the fixed labels)")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.add_argument("--factor", type=int, help=_FACTOR_HELP)
    p.add_argument("--device", help="cpu, cuda ... (default: CUDA when available)")

    p = sub.add_parser("course", help="run the course notebooks headless and write HTML pages",
                       description="Execute the course notebooks in fresh kernels under a profile, "
                                   "write an HTML page per notebook and a summary of time and peak "
                                   "memory (index.html, summary.md).")
    p.add_argument("notebooks", nargs="*", help="notebooks to run: paths or numbers (default: all)")
    p.add_argument("--profile", default="ci", choices=["ci", "cpu", "gpu"], help="default ci")
    p.add_argument("--out", default="_course_html", help="output folder (default _course_html)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default 900)")
    return parser


_COMMANDS = {"doctor": _doctor, "train": _train, "register": _register, "evaluate": _evaluate,
             "course": _course}


def main(argv=None) -> int:
    """Run the ``regedu`` command; return its exit status (0 ok, 2 a usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "fetch":
            return _fetch(argv[1:])
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _COMMANDS[args.command](args)
    except SystemExit as e:  # --help and --version exit through argparse
        return e.code if isinstance(e.code, int) else 0
    except CLIError as e:
        print(f"regedu: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        # regedu's own checks name the argument and what was expected: show them as they are.
        if os.environ.get("REGEDU_DEBUG"):
            raise
        print(f"regedu: error: {e} (set REGEDU_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission refused: the system's words, on one line
        if os.environ.get("REGEDU_DEBUG"):
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"regedu: error: {e.strerror or e}{where}; nothing was left half-written "
              f"(set REGEDU_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    except MemoryError as e:
        if os.environ.get("REGEDU_DEBUG"):
            raise
        print(f"regedu: error: {e or 'out of memory'}; use smaller or coarser images "
              f"(set REGEDU_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regedu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
