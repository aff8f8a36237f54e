"""The ``regedu`` command: ``doctor``, ``fetch``, ``train``, ``register``, ``evaluate``, ``course``.

Run ``regedu COMMAND --help`` for each command's options. Errors a user can
fix (a missing file, images of different shapes, a 2D model given a volume)
are printed as one line, ``regedu: error: ...``, with exit status 2.

Image files are NIfTI (``.nii``, ``.nii.gz``), NumPy ``.npy`` or ``.npz``
(the array under ``vol``, ``image`` or the only key; a label map under
``seg``; optionally a 4x4 ``affine``). A folder of training or evaluation
images holds one image per file; the label map of ``NAME.nii.gz`` is
``NAME_seg.nii.gz`` beside it.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__

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


def read_image(path, what: str = "image", *, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 2D or 3D image or label map: ``(array, 4x4 affine)``.

    NIfTI files give their own affine; NumPy files an ``affine`` array if they
    hold one, else the identity. ``key`` picks the array of an ``.npz``
    (default ``vol``, ``image``, or the only array).
    """
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what}: no file {str(path)!r}")
    suffix = _suffix(path)
    if suffix not in _IMAGE_SUFFIXES:
        raise CLIError(f"{what}: {str(path)!r} is not an image file this command reads "
                       f"(expected {', '.join(_IMAGE_SUFFIXES)})")
    affine = np.eye(4)
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib
            img = nib.load(str(path))
            array, affine = np.asarray(img.dataobj), img.affine
        elif suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as data:
                keys = [key] if key else [k for k in ("vol", "image") if k in data.files]
                if not keys and len([k for k in data.files if k != "affine"]) == 1:
                    keys = [k for k in data.files if k != "affine"]
                if not keys or keys[0] not in data.files:
                    wanted = repr(key) if key else "'vol' or 'image' (or a single array)"
                    raise CLIError(f"{what}: {str(path)!r} holds arrays {data.files}; "
                                   f"expected {wanted}")
                array = data[keys[0]]
                if "affine" in data.files:
                    affine = data["affine"]
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"{what}: cannot read {str(path)!r} ({type(e).__name__}: {e})") from None
    array = np.squeeze(array)
    if array.ndim not in (2, 3):
        raise CLIError(f"{what}: expected a 2D or 3D image, {str(path)!r} has shape {array.shape}")
    return array, np.asarray(affine, dtype=np.float64)


def _seg_path(path: Path) -> Path | None:
    for suffix in _IMAGE_SUFFIXES:
        candidate = path.with_name(_stem(path) + _SEG_MARK + suffix)
        if candidate.exists():
            return candidate
    return None


def _read_seg(path: Path, what: str) -> np.ndarray | None:
    """The label map of an image: ``seg`` inside an ``.npz``, else a ``NAME_seg`` file."""
    if _suffix(path) == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "seg" in data.files:
                return np.squeeze(data["seg"])
    seg = _seg_path(path)
    return None if seg is None else read_image(seg, f"{what} labels")[0]


def _normalise(array: np.ndarray) -> np.ndarray:
    # Min-max to [0, 1], the range the losses (MI's bins, VV-Net's /255) assume;
    # training and registration use the same rule.
    array = array.astype(np.float32)
    lo, hi = float(array.min()), float(array.max())
    return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)


def _nifti(array: np.ndarray, affine: np.ndarray, path: Path, *, intent: str | None = None):
    import nibabel as nib
    img = nib.Nifti1Image(array, affine)
    if intent:
        img.header.set_intent(intent)
    img.header["descrip"] = b"regedu"
    nib.save(img, str(path))


def write_image(path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write an image as NIfTI (``.nii``/``.nii.gz``) or ``.npz`` (``vol`` + ``affine``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _suffix(path) == ".npz":
        np.savez_compressed(path, vol=array, affine=affine)
    elif _suffix(path) in (".nii", ".nii.gz"):
        _nifti(array, affine, path)
    else:
        raise CLIError(f"output: {str(path)!r} should end in .nii.gz, .nii or .npz")
    return path


def write_displacement(path, disp: np.ndarray, affine: np.ndarray) -> Path:
    """Write a displacement ``(ndim, *spatial)`` (voxels, channel k along array axis k).

    NIfTI stores a vector field as ``(X, Y, Z, 1, ndim)`` with the vector intent
    (2D fields get a Z of 1); ``.npz`` stores ``disp`` as it is, plus ``affine``.
    The values are voxel displacements in array-axis order (regedu's
    convention), not millimetres: multiply by the voxel size for physical units.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _suffix(path) == ".npz":
        np.savez_compressed(path, disp=disp, affine=affine)
    elif _suffix(path) in (".nii", ".nii.gz"):
        ndim, spatial = disp.shape[0], disp.shape[1:]
        field = np.moveaxis(disp, 0, -1).reshape(*spatial, *([1] * (3 - ndim)), 1, ndim)
        _nifti(field.astype(np.float32), affine, path, intent="vector")
    else:
        raise CLIError(f"output: {str(path)!r} should end in .nii.gz, .nii or .npz")
    return path


class PairFolder(torch.utils.data.Dataset):
    """(moving, fixed) pairs from a folder of images, normalised to [0, 1].

    Every ordered pair of different images, or each image against ``atlas``.
    Items are dicts with ``moving``, ``fixed`` ``(1, *spatial)`` and, when every
    image has labels, ``moving_seg``, ``fixed_seg``; plus the file names.
    """

    def __init__(self, folder, atlas=None):
        folder = Path(folder)
        if not folder.is_dir():
            raise CLIError(f"data: no folder {str(folder)!r}")
        files = sorted(p for p in folder.iterdir()
                       if _suffix(p) in _IMAGE_SUFFIXES and not _stem(p).endswith(_SEG_MARK))
        atlas = Path(atlas) if atlas else None
        files = [f for f in files if atlas is None or f.resolve() != atlas.resolve()]
        if len(files) < (1 if atlas else 2):
            raise CLIError(f"data: {str(folder)!r} holds {len(files)} image files; need at least "
                           f"{'one' if atlas else 'two'} (.nii.gz, .nii, .npz or .npy)")
        self.images = {p: _normalise(read_image(p, "data")[0]) for p in files + ([atlas] if atlas else [])}
        shapes = {p.name: a.shape for p, a in self.images.items()}
        if len(set(shapes.values())) > 1:
            raise CLIError(f"data: all images must have the same shape (resample them to one grid "
                           f"first), got {shapes}")
        segs = {p: _read_seg(p, "data") for p in self.images}
        self.segs = segs if all(s is not None for s in segs.values()) else None
        self.pairs = ([(f, atlas) for f in files] if atlas else
                      [(m, f) for m in files for f in files if m != f])

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.images.values())).shape

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        moving, fixed = self.pairs[i]
        item = {"moving": torch.from_numpy(self.images[moving])[None],
                "fixed": torch.from_numpy(self.images[fixed])[None],
                "moving_name": moving.name, "fixed_name": fixed.name}
        if self.segs is not None:
            item["moving_seg"] = torch.from_numpy(self.segs[moving].astype(np.int64))[None]
            item["fixed_seg"] = torch.from_numpy(self.segs[fixed].astype(np.int64))[None]
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
    from seed ``first_seed + i``, so a run is reproducible; up to 256 pairs are kept
    once made (more would fill the memory: they are made again when needed).
    """

    def __init__(self, source: str, n: int, *, first_seed: int = 0):
        from . import datasets
        from .profiles import get_profile
        if source not in ("fundus", "brain"):
            raise CLIError(f"data: expected 'fundus', 'brain' or a folder, got {source!r}")
        self.source, self.n, self.first_seed = source, n, first_seed
        self.profile = get_profile()
        self.atlas = datasets.mni_brain() if source == "brain" else None
        self._items: dict[int, dict] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self[0]["fixed"].shape[1:])

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
            if self.n > 256:
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
                   "checkpoint_every": None, "resume": False, "seed": 0, "device": None,
                   "progress": True, "model_args": {}, "pairs": None, "grad_clip": None}


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
    if text is None or isinstance(text, list):
        return text
    if text == "freesurfer30":
        return list(_freesurfer_30())
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"--labels: expected integers separated by commas (e.g. 2,3,4) or "
                       f"'freesurfer30', got {text!r}") from None



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


def _train(args) -> int:
    from . import nets
    from .profiles import get_profile
    from .train import fit, seed_everything
    config = dict(_TRAIN_DEFAULTS)
    if args.config:
        config.update(_read_config(args.config))
    flags = {k: v for k, v in vars(args).items() if k in _TRAIN_DEFAULTS and v is not None}
    if isinstance(flags.get("losses"), str):
        flags["losses"] = _parse_weights(flags["losses"])
    if "model_args" in flags:
        flags["model_args"] = {**config["model_args"], **_parse_model_args(flags["model_args"])}
    config.update(flags)
    if config["data"] is None:
        raise CLIError("train: give the training images with --data FOLDER (or 'data' in --config)")
    device = _device(config["device"])
    profile = get_profile()
    if config["pairs"] is not None and (not isinstance(config["pairs"], int) or config["pairs"] < 1):
        raise CLIError(f"--pairs: expected a positive number of pairs, got {config['pairs']!r}")
    if config["pairs"] is not None and config["data"] not in ("fundus", "brain"):
        raise CLIError(f"--pairs: only for the offline data (--data fundus or brain); a folder "
                       f"({config['data']!r}) gives its own pairs")
    if config["data"] in ("fundus", "brain"):
        data = OfflinePairs(config["data"], config["pairs"] or profile.n_train_pairs)
        val = (OfflinePairs(config["data"], profile.n_test_pairs, first_seed=10_000)
               if config["val_data"] in (None, config["data"]) else PairFolder(config["val_data"]))
        if config["data"] == "brain" and config["labels"] is None:
            config["labels"] = list(_freesurfer_30())
    else:
        data = PairFolder(config["data"], atlas=config["atlas"])
        val = PairFolder(config["val_data"], atlas=config["atlas"]) if config["val_data"] else None
    if config["steps"] is None and config["epochs"] is None:
        config["steps"] = profile.steps_2d if len(data.shape) == 2 else profile.steps_3d
    seed_everything(config["seed"])
    model_args = {"spatial_dims": len(data.shape), **config["model_args"]}
    try:
        model = nets.create(config["model"], **model_args)
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(f"train: cannot build model {config['model']!r} with {model_args} ({e})") from None
    out = Path(config["out"])
    print(f"training {config['model']} ({model_args['spatial_dims']}D) on {len(data)} pairs of "
          f"{'x'.join(map(str, data.shape))} from {config['data']}; checkpoint -> {out}")
    history = fit(model, data, val_data=val, losses=config["losses"], steps=config["steps"],
                  epochs=config["epochs"], lr=config["lr"], batch_size=config["batch_size"],
                  labels=_parse_labels(config["labels"]), val_every=config["val_every"],
                  checkpoint=out, checkpoint_every=config["checkpoint_every"],
                  resume=bool(config["resume"]), seed=config["seed"], device=device,
                  progress=config["progress"], grad_clip=config["grad_clip"])
    loss = history["train"]["loss"]
    print(f"done: {history['train']['step'][-1]} steps, loss {loss[0]:.4g} -> {loss[-1]:.4g}; "
          f"saved {out}")
    return 0


# ---------------------------------------------------------------- register and evaluate

def _load(args):
    from .train import load_model
    path = Path(args.model)
    if not path.is_file():
        raise CLIError(f"--model: no checkpoint file {str(path)!r} (train one with 'regedu train')")
    try:
        model = load_model(path, map_location="cpu")
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CLIError(f"--model: {e}") from None
    return model.to(_device(args.device)), _device(args.device), model.config


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


def _run_model(model, device, fixed: np.ndarray, moving: np.ndarray):
    as_batch = lambda a: torch.from_numpy(_normalise(a))[None, None].to(device)
    with torch.no_grad():
        return model(as_batch(moving), as_batch(fixed))


def _register(args) -> int:
    from .spatial import warp
    # Check every input and output name before computing or writing anything.
    if bool(args.moving_seg) != bool(args.warped_seg):
        raise CLIError("--moving-seg and --warped-seg go together (the labels to warp and where "
                       "to write them)")
    for name, path in (("--warped", args.warped), ("--disp", args.disp), ("--warped-seg", args.warped_seg)):
        if path and _suffix(Path(path)) not in (".nii.gz", ".nii", ".npz"):
            raise CLIError(f"{name}: {path!r} should end in .nii.gz, .nii or .npz")
    fixed, affine = read_image(args.fixed, "--fixed")
    moving, _ = read_image(args.moving, "--moving")
    seg = read_image(args.moving_seg, "--moving-seg")[0] if args.moving_seg else None
    model, device, config = _load(args)
    _check_pair(fixed, moving, config)
    if seg is not None:
        _check_pair(fixed, seg, config, ("fixed", "moving-seg"))

    start = time.perf_counter()
    disp = _run_model(model, device, fixed, moving).disp
    seconds = time.perf_counter() - start
    # The warped image keeps the moving image's intensities (not the normalised ones).
    raw = torch.from_numpy(moving.astype(np.float32))[None, None].to(device)
    written = [write_image(args.warped, warp(raw, disp)[0, 0].cpu().numpy(), affine)]
    if args.disp:
        written.append(write_displacement(args.disp, disp[0].cpu().numpy(), affine))
    if seg is not None:
        labels = torch.from_numpy(np.rint(seg).astype(np.int64))[None, None].to(device)
        warped_seg = warp(labels, disp)[0, 0].cpu().numpy().astype(np.int32)
        written.append(write_image(args.warped_seg, warped_seg, affine))
    print(f"registered in {seconds:.2f} s; wrote {', '.join(map(str, written))}")
    return 0


def _evaluate(args) -> int:
    from .evaluate import evaluate
    model, device, config = _load(args)
    if args.pairs:
        data = PairFolder(args.pairs, atlas=args.atlas)
        _check_pair(np.empty(data.shape), np.empty(data.shape), config, ("images", "images"))
        pairs = []
        for item in data:
            pair = {k: v for k, v in item.items() if not k.endswith("_name")}
            pair["meta"] = {"id": f"{item['moving_name']} -> {item['fixed_name']}"}
            pairs.append(pair)
    elif args.fixed and args.moving:
        fixed, moving = read_image(args.fixed, "--fixed")[0], read_image(args.moving, "--moving")[0]
        _check_pair(fixed, moving, config)
        pair = {"fixed": torch.from_numpy(_normalise(fixed))[None],
                "moving": torch.from_numpy(_normalise(moving))[None],
                "meta": {"id": f"{Path(args.moving).name} -> {Path(args.fixed).name}"}}
        if bool(args.fixed_seg) != bool(args.moving_seg):
            raise CLIError("evaluate: give both --fixed-seg and --moving-seg, or neither")
        if args.fixed_seg:
            for key, path in (("fixed_seg", args.fixed_seg), ("moving_seg", args.moving_seg)):
                seg = read_image(path, f"--{key.replace('_', '-')}")[0]
                _check_pair(fixed, seg, config, ("fixed", key.replace("_", "-")))
                pair[key] = torch.from_numpy(np.rint(seg).astype(np.int64))[None]
        pairs = [pair]
    else:
        raise CLIError("evaluate: give --pairs FOLDER, or --fixed and --moving "
                       "(with --fixed-seg and --moving-seg for Dice)")
    labels = _parse_labels(args.labels)
    if labels is None and "fixed_seg" in pairs[0]:
        labels = sorted(set().union(*(np.unique(p["fixed_seg"].numpy()).tolist() for p in pairs)) - {0})
    result = evaluate(model, pairs, labels=labels, name=config.get("name", "model"), device=device,
                      spatial_dims=len(pairs[0]["fixed"].shape) - 1, warmup=True, progress=False)
    table = result.table()
    columns = ["pair", "dice_before", "dice_mean", "dice_std", "percent_folding", "sdlogj", "seconds"]
    table = table[[c for c in columns if c in table and not table[c].isna().all()]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if len(table) > 1 and "dice_mean" in table:
        print(f"mean Dice {table['dice_mean'].mean():.4f} (std over pairs "
              f"{table['dice_mean'].std():.4f}); before registration {table['dice_before'].mean():.4f}")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        result.table().to_csv(args.csv, index=False)
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
    p.add_argument("--out", help="checkpoint file (default regedu_model.pt)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="also save every N steps (default: at the end)")
    p.add_argument("--resume", action="store_const", const=True, default=None,
                   help="continue from --out if it exists")
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
    except (FileNotFoundError, ValueError, TypeError) as e:
        # regedu's own checks name the argument and what was expected: show them as they are.
        if os.environ.get("REGEDU_DEBUG"):
            raise
        print(f"regedu: error: {e} (set REGEDU_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regedu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
