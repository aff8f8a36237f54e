"""Image files: reading and writing the images, label maps and displacement fields of users.

Formats: NIfTI (``.nii``, ``.nii.gz``), NumPy ``.npy`` or ``.npz`` (the array
under ``vol``, ``image`` or the only key; a label map under ``seg``; optionally
a 4x4 ``affine``). The label map of ``NAME.nii.gz`` is ``NAME_seg.nii.gz``
beside it. Voxel sizes come from the NIfTI header (in its units) or the
``affine``.

Nothing silently wrong: files too large for the memory are refused before
they are read, label maps that are not whole numbers (or look like intensity
images) are refused, and images with NaN or no contrast are refused by
:func:`min_max`. Outputs keep the fixed image's header (qform and sform codes,
units, description) and are written atomically (:func:`regedu._files.write_atomic`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._checks import check_finite, check_labels, check_memory, format_bytes, format_shape
from .._files import write_atomic

__all__ = ["read_image", "read_image_file", "read_labels", "write_image", "write_displacement",
           "ImageFile", "ImageFileError", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".npz", ".npy")
_SEG_MARK = "_seg"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), path.suffix.lower())


def _stem(path: Path) -> str:
    return path.name[:-len(_suffix(path))]


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted; label maps (``NAME_seg`` files) left out."""
    return sorted(p for p in Path(folder).iterdir()
                  if _suffix(p) in IMAGE_SUFFIXES and not _stem(p).endswith(_SEG_MARK))


# A label map holds structures, a few dozen to a few hundred; an intensity
# image stored as integers has thousands of distinct values.
_MAX_LABELS = 1000


class ImageFileError(ValueError):
    """A file that is not an image this module reads (wrong kind, missing arrays, a bad affine)."""


@dataclass
class ImageFile:
    """An image read by :func:`read_image_file`, with what its file says about it."""
    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...] | None  # mm per array axis, when the file says
    header: object | None               # the NIfTI header, carried into outputs
    path: Path


def _check_fits(what: str, path: Path, shape, itemsize: int, stored: int | None = None) -> None:
    # Bytes to read, plus the float32 copy every image gets (normalised or warped).
    needed = math.prod(shape) * (itemsize + 4)
    lie = ""
    if stored is not None and stored < math.prod(shape) * itemsize // 2:
        lie = (f" (the file holds {format_bytes(stored)}: its header may be wrong or the file "
               f"truncated)")
    check_memory(needed, f"{what}: reading {str(path)!r} ({format_shape(shape)} voxels)",
                 f"crop or downsample it first{lie}")


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


def read_image_file(path, what: str = "image", *, key: str | None = None) -> ImageFile:
    """Read a 2D or 3D image with its affine, voxel size and NIfTI header (see :func:`read_image`).

    ``what`` names the image in messages (``"--fixed"``). Refused: a missing
    file, a folder, another kind of file, a file too large for the memory
    (before it is read), and arrays that are not 2D or 3D.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: no file {str(path)!r}")
    if path.is_dir():
        raise ImageFileError(f"{what}: {str(path)!r} is a folder; expected an image file")
    suffix = _suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageFileError(f"{what}: {str(path)!r} is not an image file regedu reads "
                       f"(expected {', '.join(IMAGE_SUFFIXES)})")
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
                    raise ImageFileError(f"{what}: {str(path)!r} holds arrays {data.files}; "
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
                        raise ImageFileError(f"{what}: the 'affine' in {str(path)!r} has shape "
                                       f"{affine.shape}; expected a 4x4 matrix")
                    spacing = "affine"
    except (ImageFileError, MemoryError):
        raise  # refused above
    except Exception as e:
        raise ImageFileError(f"{what}: cannot read {str(path)!r} ({type(e).__name__}: {e})") from None
    if spacing == "affine":
        spacing = _spacing_mm(affine, [i for i, n in enumerate(array.shape) if n != 1])
    array = np.squeeze(array)
    if array.ndim not in (2, 3):
        raise ImageFileError(f"{what}: expected a 2D or 3D image, {str(path)!r} has shape {array.shape}")
    if spacing is not None and (len(spacing) != array.ndim or not all(s > 0 for s in spacing)):
        spacing = None  # a header that does not describe these axes says nothing
    return ImageFile(array, np.asarray(affine, dtype=np.float64), spacing, header, path)


def read_image(path, what: str = "image", *, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 2D or 3D image or label map: ``(array, 4x4 affine)``.

    NIfTI files give their own affine; NumPy files an ``affine`` array if they
    hold one, else the identity. ``key`` picks the array of an ``.npz``
    (default ``vol``, ``image``, or the only array). A file too large for the
    available memory is refused before it is read.
    """
    image = read_image_file(path, what, key=key)
    return image.array, image.affine


def _seg_path(path: Path) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = path.with_name(_stem(path) + _SEG_MARK + suffix)
        if candidate.exists():
            return candidate
    return None


def as_label_map(array: np.ndarray, what: str, path: Path, image: np.ndarray | None = None) -> np.ndarray:
    """A label map as int64, refusing what is not one (fractions, NaN, an intensity image,
    the image itself)."""
    if image is not None and array.shape == image.shape and np.array_equal(array, image):
        raise ValueError(f"{what}: {str(path)!r} holds the same values as its image; expected a "
                       f"label map of structures (e.g. FreeSurfer's aseg), not the image itself")
    check_labels(array, f"{what} ({str(path)!r})", max_labels=_MAX_LABELS)
    same, distinct = _regionality(array)
    if same < _MIN_REGIONALITY and distinct > 32:
        raise ValueError(f"{what}: {str(path)!r} does not look like a label map: inside it only "
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


def read_labels(path, what: str = "labels", image: np.ndarray | None = None) -> np.ndarray:
    """Read a label map as int64, refusing what is not one (see :func:`as_label_map`)."""
    path = Path(path)
    return as_label_map(read_image(path, what)[0], what, path, image)


def read_seg(path: Path, what: str = "image") -> np.ndarray | None:
    """The label map of an image: ``seg`` inside an ``.npz``, else a ``NAME_seg`` file."""
    if _suffix(path) == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "seg" in data.files:
                return as_label_map(np.squeeze(data["seg"]), f"{what} labels", path)
    seg = _seg_path(path)
    return None if seg is None else read_labels(seg, f"{what} labels")


def min_max(array: np.ndarray, what: str = "image", path=None) -> np.ndarray:
    """Intensities scaled to [0, 1] by their minimum and maximum, as float32.

    The range the losses assume (MI's bins, VV-Net's /255); ``regedu train``,
    ``register`` and ``evaluate`` use the same rule. Refused: NaN or infinite
    voxels (min-max would make the image NaN) and images with no contrast
    (min-max would make them nothing), both of which would register as zeros.
    """
    name = f"{what} {str(path)!r}" if path is not None else what
    array = array.astype(np.float32)
    try:
        check_finite(array, name)
    except ValueError:
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        raise ValueError(f"{name}: expected finite intensities, got {n_nan} NaN and {n_inf} infinite "
                       f"voxels of {array.size}; replace them (e.g. numpy.nan_to_num) or crop "
                       f"them away first") from None
    lo, hi = float(array.min()), float(array.max())
    if not hi > lo:
        raise ValueError(f"{name}: every voxel is {lo:g}; an image with no contrast has nothing to "
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


def check_image_output(path, name: str = "output") -> Path:
    """Refuse an output name that :func:`write_image` cannot write (by its ending)."""
    path = Path(path)
    if _suffix(path) not in (".nii.gz", ".nii", ".npz"):
        raise ValueError(f"{name}: {str(path)!r} should end in .nii.gz, .nii or .npz")
    return path


def write_image(path, array: np.ndarray, affine: np.ndarray, *, header=None) -> Path:
    """Write an image as NIfTI (``.nii``/``.nii.gz``) or ``.npz`` (``vol`` + ``affine``).

    ``header`` (a NIfTI header, e.g. the fixed image's) gives the output its
    qform and sform codes, units and description. The file is written atomically.
    """
    path = check_image_output(path)
    if _suffix(path) == ".npz":
        return _write(path, lambda tmp: np.savez_compressed(tmp, vol=array, affine=affine))
    import nibabel as nib
    return _write(path, lambda tmp: nib.save(_header_for(array, affine, header), str(tmp)))


def write_displacement(path, disp: np.ndarray, affine: np.ndarray, *, header=None) -> Path:
    """Write a displacement ``(ndim, *spatial)`` (voxels, channel k along array axis k).

    NIfTI stores a vector field as ``(X, Y, Z, 1, ndim)`` with the vector intent
    (2D fields get a Z of 1); ``.npz`` stores ``disp`` as it is, plus ``affine``.
    The values are voxel displacements in array-axis order (regedu's
    convention), not millimetres: multiply by the voxel size for physical units.
    ``header`` as for :func:`write_image`; written atomically.
    """
    path = check_image_output(path)
    if _suffix(path) == ".npz":
        return _write(path, lambda tmp: np.savez_compressed(tmp, disp=disp, affine=affine))
    import nibabel as nib
    ndim, spatial = disp.shape[0], disp.shape[1:]
    field = np.moveaxis(disp, 0, -1).reshape(*spatial, *([1] * (3 - ndim)), 1, ndim).astype(np.float32)
    return _write(path, lambda tmp: nib.save(_header_for(field, affine, header, intent="vector"),
                                             str(tmp)))


def _write(path: Path, write) -> Path:
    # The temporary file keeps the ending, which says the format to nibabel and numpy.
    return write_atomic(path, write, suffix=_suffix(path))


def spacings_agree(a, b) -> bool:
    """Whether two voxel sizes are the same (to 0.1 %); an unknown one agrees with any."""
    return a is None or b is None or (len(a) == len(b) and np.allclose(a, b, rtol=1e-3))
