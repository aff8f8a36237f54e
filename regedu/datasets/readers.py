"""Readers for the real datasets, in their published layouts.

- FIRE (``FIRE.7z``): ``Images/<pair>_1.jpg`` and ``<pair>_2.jpg``,
  ``Ground Truth/control_points_<pair>_1_2.txt``, ``Masks/mask.png``.
- neurite-oasis 2D/3D: one folder per subject (``OASIS_OAS1_0001_MR1/``) with
  ``slice_norm.nii.gz``/``slice_seg24.nii.gz`` (2D) or
  ``aligned_norm.nii.gz``/``aligned_seg35.nii.gz`` (3D), the label tables
  ``seg24_labels.txt``/``seg35_labels.txt`` and ``subjects.txt``.
- Learn2Reg OASIS: ``imagesTr/OASIS_0001_0000.nii.gz``, ``labelsTr/``, the
  dataset json (``OASIS_dataset.json``) with its registration pairs.
- voxelmorph's ``test_scan.npz`` (keys ``vol``, ``seg``) and ``labels.npz``
  (key ``labels``).

Every loader returns channels-first float32 images in [0, 1] and integer
label maps, as numpy arrays in the file's own array order (no reorientation).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._checks import as_labels
from ._image import resize_image, resize_labels, to_unit_range
from .fetch import fetch
from .freesurfer import FREESURFER_NAMES
from .fundus import parse_fire_lines

__all__ = ["FIRE", "NeuriteOASIS", "Learn2RegOASIS", "load_vxm_scan", "load_vxm_labels",
           "read_label_table"]

_BY_NAME = {v.lower().replace("-proper", ""): k for k, v in FREESURFER_NAMES.items()}


def _freesurfer_id(name: str):
    key = name.lower().replace("-proper", "")
    return _BY_NAME.get(key)


def _missing(path: Path, what: str, dataset: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found: {path}. Is this the root of the {dataset} dataset? "
                             f"Fetch it with `regedu fetch {dataset}` or pass the folder that "
                             f"holds it (see datasets/README.md)")


def _load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib
    return np.asarray(nib.load(str(path)).dataobj)


def _squeeze_to(arr: np.ndarray, ndim: int) -> np.ndarray:
    while arr.ndim > ndim and 1 in arr.shape:
        arr = np.squeeze(arr, axis=arr.shape.index(1))
    if arr.ndim != ndim:
        raise ValueError(f"expected a {ndim}D image, got an array of shape {arr.shape}")
    return arr


def read_label_table(path) -> pd.DataFrame:
    """Read a FreeSurfer-style label table (``index name [R G B A]`` per line).

    Returns a DataFrame with columns ``label`` (the value in the label maps),
    ``name`` and ``freesurfer`` (FreeSurfer's number for that name, or <NA>).
    """
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0].startswith("#") or not re.fullmatch(r"\d+", parts[0]):
            continue
        rows.append((int(parts[0]), parts[1], _freesurfer_id(parts[1])))
    table = pd.DataFrame(rows, columns=["label", "name", "freesurfer"])
    table["freesurfer"] = table["freesurfer"].astype("Int64")
    return table


# ----------------------------------------------------------------------------- FIRE

@dataclass
class FIRE:
    """The FIRE fundus registration dataset (134 pairs, 2912x2912).

    Parameters
    ----------
    root : path, optional
        The folder holding ``Images/`` and ``Ground Truth/`` (or one level
        above it); default: ``fetch("fire")``.

    Convention: image ``_1`` is the fixed (reference), ``_2`` the moving (test)
    image; points are (row, col) in the loaded image's pixels; a fixed point
    ``p`` corresponds to the moving point at the same index. Resizing maps the
    corner pixel centres onto each other (see :func:`regedu.datasets.scale_points`).

    Examples
    --------
    >>> fire = FIRE("/path/to/FIRE")                      # doctest: +SKIP
    >>> item = fire.load("S01", size=256)                 # doctest: +SKIP
    >>> item["fixed"].shape, item["fixed_points"].shape   # doctest: +SKIP
    ((1, 256, 256), (10, 2))
    """

    root: Path | str | None = None

    def __post_init__(self):
        root = Path(self.root) if self.root is not None else fetch("fire")
        if not (root / "Images").is_dir():
            inner = [p.parent for p in root.glob("*/Images") if p.is_dir()]
            if len(inner) == 1:
                root = inner[0]
        if not (root / "Images").is_dir():
            raise _missing(root / "Images", "FIRE's Images/ folder", "fire")
        self.root = root

    @property
    def pairs(self) -> list[str]:
        """Pair names (``"A01"``, ..., ``"S71"``) that have both images."""
        names = sorted(p.name[:-len("_1.jpg")] for p in (self.root / "Images").glob("*_1.jpg"))
        return [n for n in names if (self.root / "Images" / f"{n}_2.jpg").is_file()]

    def category(self, pair: str) -> str:
        """FIRE's category: the first letter of the pair name (S, P or A)."""
        return pair[0].upper()

    def points(self, pair: str, *, size=None):
        """Control points ``(fixed, moving)``, (row, col), rescaled to ``size`` if given."""
        path = self.root / "Ground Truth" / f"control_points_{pair}_1_2.txt"
        if not path.is_file():
            raise _missing(path, f"control points of pair {pair}", "fire")
        native = self._image_shape(pair)
        shape = native if size is None else _as_shape(size)
        return parse_fire_lines(path.read_text().splitlines(), shape=shape, fullres=native)

    def _image_shape(self, pair: str) -> tuple[int, int]:
        from PIL import Image
        with Image.open(self.root / "Images" / f"{pair}_1.jpg") as im:
            return im.height, im.width

    def _image(self, name: str, size, channel: str) -> np.ndarray:
        from PIL import Image
        path = self.root / "Images" / name
        if not path.is_file():
            raise _missing(path, f"image {name}", "fire")
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        img = rgb[..., 1] if channel == "green" else rgb.mean(-1)
        return img if size is None else resize_image(img, _as_shape(size))

    def mask(self, size=None) -> np.ndarray | None:
        """FIRE's field-of-view mask (``Masks/mask.png``), or None if absent."""
        from PIL import Image
        path = self.root / "Masks" / "mask.png"
        if not path.is_file():
            return None
        with Image.open(path) as im:
            m = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        return (m if size is None else resize_image(m, _as_shape(size))) > 0.5

    def load(self, pair: str, *, size=None, channel: str = "green") -> dict:
        """One pair: fixed/moving ``(1, H, W)`` float32 in [0, 1], points, mask, category."""
        if channel not in ("green", "gray"):
            raise ValueError(f"channel: expected 'green' or 'gray', got {channel!r}")
        fixed = self._image(f"{pair}_1.jpg", size, channel)
        moving = self._image(f"{pair}_2.jpg", size, channel)
        fixed_points, moving_points = self.points(pair, size=fixed.shape)
        mask = self.mask(fixed.shape)
        native = self._image_shape(pair)
        return dict(fixed=fixed[None], moving=moving[None], fixed_points=fixed_points.astype(np.float32),
                    moving_points=moving_points.astype(np.float32),
                    mask=None if mask is None else mask[None], category=self.category(pair),
                    name=pair, scale=(native[0] - 1) / (fixed.shape[0] - 1))


def _as_shape(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    return tuple(int(s) for s in size)


# ----------------------------------------------------------------------------- neurite-oasis

_NEURITE = {2: ("slice_norm.nii.gz", "slice_seg24.nii.gz", "seg24_labels.txt", "neurite-oasis-2d"),
            3: ("aligned_norm.nii.gz", "aligned_seg35.nii.gz", "seg35_labels.txt", "neurite-oasis-3d")}


@dataclass
class NeuriteOASIS:
    """neurite-oasis (OASIS-1 processed for the VoxelMorph/HyperMorph tutorials).

    Parameters
    ----------
    root : path, optional
        The folder holding the ``OASIS_OAS1_*`` subject folders; default:
        ``fetch("neurite-oasis-2d")`` or ``fetch("neurite-oasis-3d")``.
    ndim : {2, 3}
        2: ``slice_norm``/``slice_seg24`` (160x192); 3: ``aligned_norm``/
        ``aligned_seg35`` (160x192x224, affinely aligned).
    """

    root: Path | str | None = None
    ndim: int = 2

    def __post_init__(self):
        if self.ndim not in _NEURITE:
            raise ValueError(f"ndim: expected 2 or 3, got {self.ndim!r}")
        self._image_name, self._seg_name, self._table_name, name = _NEURITE[self.ndim]
        root = Path(self.root) if self.root is not None else fetch(name)
        if not any(root.glob(f"*/{self._image_name}")):
            inner = [p for p in root.iterdir() if p.is_dir() and any(p.glob(f"*/{self._image_name}"))]
            if len(inner) == 1:
                root = inner[0]
        if not any(root.glob(f"*/{self._image_name}")):
            raise _missing(root / f"<subject>/{self._image_name}", "neurite-oasis subject folders", name)
        self.root = root

    @property
    def subjects(self) -> list[str]:
        """Subject folders with both image and labels (``subjects.txt`` order when present)."""
        listed = self.root / "subjects.txt"
        names = (listed.read_text().split() if listed.is_file()
                 else sorted(p.parent.name for p in self.root.glob(f"*/{self._image_name}")))
        return [n for n in names if (self.root / n / self._image_name).is_file()
                and (self.root / n / self._seg_name).is_file()]

    @property
    def labels(self) -> pd.DataFrame:
        """The label table (``label``, ``name``, ``freesurfer``)."""
        path = self.root / self._table_name
        if not path.is_file():
            raise _missing(path, "the label table", _NEURITE[self.ndim][3])
        return read_label_table(path)

    def load(self, subject) -> dict:
        """``image`` (1, *spatial) float32 in [0, 1] and ``seg`` (*spatial) int64."""
        name = self.subjects[subject] if isinstance(subject, (int, np.integer)) else subject
        folder = self.root / name
        image = _squeeze_to(_load_nifti(folder / self._image_name).astype(np.float32), self.ndim)
        seg = as_labels(_squeeze_to(_load_nifti(folder / self._seg_name), self.ndim),
                        str(folder / self._seg_name))
        return dict(image=to_unit_range(image, percentile=100)[None], seg=seg, name=name)


# ----------------------------------------------------------------------------- Learn2Reg OASIS

@dataclass
class Learn2RegOASIS:
    """Learn2Reg's OASIS task: ``imagesTr/``, ``labelsTr/`` and the dataset json.

    ``pairs("val")`` gives the json's ``registration_val`` pairs as
    ``(fixed, moving)`` case names (``"OASIS_0438_0000"``).
    """

    root: Path | str | None = None

    def __post_init__(self):
        root = Path(self.root) if self.root is not None else fetch("learn2reg-oasis")
        if not (root / "imagesTr").is_dir():
            inner = [p.parent for p in root.glob("*/imagesTr")]
            if len(inner) == 1:
                root = inner[0]
        if not (root / "imagesTr").is_dir():
            raise _missing(root / "imagesTr", "Learn2Reg's imagesTr/ folder", "learn2reg-oasis")
        self.root = root
        found = sorted(root.glob("*.json"))
        self.meta = json.loads(found[0].read_text()) if found else {}

    @property
    def cases(self) -> list[str]:
        """Case names with an image (``OASIS_0001_0000``...)."""
        return sorted(p.name[:-len(".nii.gz")] for p in (self.root / "imagesTr").glob("*.nii.gz"))

    def pairs(self, split: str = "val") -> list[tuple[str, str]]:
        """``(fixed, moving)`` case names of ``registration_<split>`` in the json."""
        key = f"registration_{split}"
        if key not in self.meta:
            raise ValueError(f"split: the dataset json has no {key!r}; it has "
                             f"{[k for k in self.meta if k.startswith('registration')]}")
        return [(Path(p["fixed"]).name[:-len(".nii.gz")], Path(p["moving"]).name[:-len(".nii.gz")])
                for p in self.meta[key]]

    def load(self, case: str) -> dict:
        """``image`` (1, D, H, W) float32 in [0, 1] and ``seg`` (D, H, W) int64 (None if absent)."""
        path = self.root / "imagesTr" / f"{case}.nii.gz"
        if not path.is_file():
            raise _missing(path, f"case {case}", "learn2reg-oasis")
        image = to_unit_range(_load_nifti(path).astype(np.float32), percentile=100)
        label = self.root / "labelsTr" / f"{case}.nii.gz"
        seg = as_labels(_load_nifti(label), str(label)) if label.is_file() else None
        return dict(image=image[None], seg=seg, name=case)


# ----------------------------------------------------------------------------- voxelmorph npz

def load_vxm_scan(path=None, *, shape=None) -> dict:
    """voxelmorph's ``test_scan.npz``: one T1 scan with FreeSurfer labels, 160x192x224.

    Parameters
    ----------
    path : path, optional
        The npz file; default ``fetch("vxm-test-scan")``.
    shape : tuple of 3 int, optional
        Resize (image trilinear, labels nearest), e.g. ``(80, 96, 112)``.

    Returns
    -------
    dict with ``image`` (1, D, H, W) float32 in [0, 1] and ``seg`` (D, H, W)
    int64 (FreeSurfer numbers).
    """
    path = Path(path) if path is not None else fetch("vxm-test-scan")
    with np.load(path) as data:
        if "vol" not in data or "seg" not in data:
            raise ValueError(f"{path}: expected keys 'vol' and 'seg', got {list(data.keys())}")
        image, seg = data["vol"].astype(np.float32), as_labels(data["seg"], f"{path}: seg")
    if shape is not None:
        image, seg = resize_image(image, shape), resize_labels(seg, shape)
    return dict(image=image[None], seg=seg, name=path.stem)


def load_vxm_labels(path=None) -> np.ndarray:
    """voxelmorph's ``labels.npz``: the 30 FreeSurfer labels evaluated (int64)."""
    path = Path(path) if path is not None else fetch("vxm-labels")
    with np.load(path) as data:
        return data["labels"].astype(np.int64)

