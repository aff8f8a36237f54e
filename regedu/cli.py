"""The ``regedu`` command: ``doctor``, ``fetch``, ``train``, ``register``, ``evaluate``, ``course``.

Run ``regedu COMMAND --help`` for each command's options. Errors a user can
fix (a missing file, images of different shapes, a 2D model given a volume)
are printed as one line, ``regedu: error: ...``, with exit status 2.

Image files are NIfTI (``.nii``, ``.nii.gz``), NumPy ``.npy`` or ``.npz``
(read and written by :mod:`regedu.datasets.files`). A folder of training or
evaluation images holds one image per file; the label map of ``NAME.nii.gz``
is ``NAME_seg.nii.gz`` beside it (:class:`regedu.datasets.PairFolder`).

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
import contextlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__
from ._checks import (available_memory, check_memory, check_output_path, format_bytes, format_shape,
                      format_spacing)
from ._files import write_atomic
from .losses import DEFAULT_LOSSES
from .profiles import PROFILES

__all__ = ["main"]


class CLIError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits; one line naming the fix reads better.
    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')")


@contextlib.contextmanager
def _user_input():
    """Errors in the user's files and folders (missing, unreadable, not an image, too
    large to hold) print as one line, like the command's own, without the debugging hint."""
    try:
        yield
    except (FileNotFoundError, ValueError, TypeError, MemoryError) as e:
        if isinstance(e, MemoryError) and not str(e):
            raise  # the system's own, not a refusal: main() says what to do
        raise CLIError(str(e)) from None


# Beyond the tensors a forward pass creates, CPU convolutions use workspaces:
# measured peaks of the U-Net and VV-Net at 160x192x224 were 1.26x and 1.3x
# what regedu.nets.inference_bytes counts.
_WORKSPACE = 1.3


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

def _fetch(args) -> int:
    from .datasets.fetch import (REGISTRY, ChecksumError, DataUnavailableError, UnsafeArchiveError,
                                 cache_status, data_dir, fetch)
    cache = data_dir(args.cache_dir)
    if not args.names:
        print(f"cache: {cache}")
        for info in REGISTRY.values():
            state = cache_status(info, cache_dir=cache)
            print(f"  {info.name:18s} {info.approx_size:>8s}  {state:15s} {info.license}")
        return 0
    status = 0
    for name in args.names:
        try:
            path = fetch(name, cache_dir=cache, mirror=args.mirror,
                         extract=False if args.no_extract else None, progress=True)
        except (DataUnavailableError, ChecksumError, UnsafeArchiveError, ValueError) as err:
            # One line for each dataset that failed; the others are still fetched.
            print(f"regedu: error: {err}", file=sys.stderr)
            status = 2
            continue
        print(f"{name}: {path}")
    return status


# ---------------------------------------------------------------- train

# The options of regedu train that only the command line has; the others are
# fit's and take its defaults (fit's signature is their one home).
_COMMAND_DEFAULTS = {"model": "unet", "data": None, "atlas": None, "val_data": None,
                     "out": "regedu_model.pt", "resume": False, "force": False, "init_from": None,
                     "device": None, "progress": True, "model_args": {}, "pairs": None,
                     "misalign": False}
_FIT_OPTIONS = ("steps", "epochs", "lr", "batch_size", "losses", "labels", "val_every",
                "checkpoint_every", "seed", "grad_clip")


def _train_defaults() -> dict:
    from .train import fit
    parameters = inspect.signature(fit).parameters
    return {**_COMMAND_DEFAULTS, **{k: parameters[k].default for k in _FIT_OPTIONS}}


# Options a resumed run takes from its checkpoint unless given again: from the
# training settings, and from what the command line recorded.
_FROM_TRAIN_CONFIG = ("lr", "losses", "batch_size", "labels", "grad_clip", "seed", "steps", "epochs")
_FROM_COMMAND = ("data", "atlas", "val_data", "pairs", "misalign", "val_every", "checkpoint_every")


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


def _parse_labels(text):
    from ._checks import check_label_list
    if text is None:
        return None
    if text == "freesurfer30":
        from .datasets import FREESURFER_30
        return list(FREESURFER_30)
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
    known = _train_defaults()
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise CLIError(f"--config: unknown keys {unknown}; known keys: {sorted(known)}")
    return config


def _load_state(path: Path, flag: str) -> dict:
    from .checkpoints import load_checkpoint
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"{flag}: {e}") from None


def _check_train_memory(model, shape, batch_size: int) -> None:
    from .nets import summary
    voxels = math.prod(shape) * batch_size
    if voxels <= 2**20:  # small enough for any machine that runs torch: skip the probe
        return
    estimate = summary(model, shape, batch=batch_size).train_bytes * _WORKSPACE
    try:
        check_memory(estimate, f"training on {batch_size} x {format_shape(shape)} voxels",
                     "train on coarser images (e.g. --model rescaled --model-arg factor=2) or a "
                     "smaller --batch-size")
    except MemoryError as e:
        raise CLIError(str(e)) from None


def _train_options(args) -> tuple[dict, set[str]]:
    """The options of this run: the defaults, under --config, under the flags; and those given."""
    config = _train_defaults()
    explicit: set[str] = set()
    if args.config:
        file_config = _read_config(args.config)
        config.update(file_config)
        explicit |= set(file_config)
    flags = {k: v for k, v in vars(args).items() if k in config and v is not None}
    if isinstance(flags.get("losses"), str):
        flags["losses"] = _parse_weights(flags["losses"])
    if "model_args" in flags:
        flags["model_args"] = {**config["model_args"], **_parse_model_args(flags["model_args"])}
    config.update(flags)
    return config, explicit | set(flags)


def _settle_out(config: dict, explicit: set[str]) -> dict | None:
    """Check --out before anything else: a run that cannot save, or would replace another
    run without being asked to, must not start. With --resume, the options not given
    again come from the checkpoint; return its state (None for a new run)."""
    from .checkpoints import check_complete, describe_checkpoint
    out = Path(config["out"])
    try:
        check_output_path(out, "--out")
    except ValueError as e:
        raise CLIError(str(e)) from None
    if config["resume"] and config["force"]:
        raise CLIError("--resume and --force contradict each other: --resume continues --out, "
                       "--force replaces it")
    if not out.exists():
        return None
    if not config["resume"]:
        if not config["force"]:
            raise CLIError(f"--out: {str(out)!r} already exists ({describe_checkpoint(out)}"
                           f"); continue it with --resume, replace it with --force, or choose "
                           f"another --out")
        return None
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
    return state


_OFFLINE = ("fundus", "brain", "subjects")


def _training_pairs(config: dict, profile):
    """The training and validation pairs of --data and --val-data."""
    from .datasets import FREESURFER_30, Misaligned, OfflinePairs, PairFolder, RealisticPairs
    if config["misalign"] and config["data"] != "subjects":
        raise CLIError(f"--misalign: only for --data subjects (pre-aligned pairs it can misalign "
                       f"again), got --data {config['data']!r}")
    if config["pairs"] is not None and (not isinstance(config["pairs"], int) or config["pairs"] < 1):
        raise CLIError(f"--pairs: expected a positive number of pairs, got {config['pairs']!r}")
    if config["pairs"] is not None and config["data"] not in _OFFLINE:
        raise CLIError(f"--pairs: only for the offline data (--data {', '.join(_OFFLINE)}); a folder "
                       f"({config['data']!r}) gives its own pairs")
    progress = bool(config["progress"]) and sys.stderr.isatty()
    with _user_input():
        if config["data"] == "subjects":
            # The paper's data: subjects of the training anatomy, pre-aligned to the atlas;
            # validation on other subjects of the same anatomy (the held-out brains stay unseen).
            data = RealisticPairs(config["pairs"] or profile.n_train_pairs, anatomy="train", seed=0)
            val = RealisticPairs(profile.n_test_pairs, anatomy="train", seed=10_000)
            if config["misalign"]:
                # A known pose for an affine stage to learn; other seeds for validation.
                data, val = Misaligned(data, seed=1), Misaligned(val, seed=2)
            if config["val_data"] not in (None, "subjects"):
                val = PairFolder(config["val_data"], what="--val-data", progress=progress)
            if config["labels"] is None:
                config["labels"] = list(FREESURFER_30)
        elif config["data"] in ("fundus", "brain"):
            data = OfflinePairs(config["data"], config["pairs"] or profile.n_train_pairs)
            val = (OfflinePairs(config["data"], profile.n_test_pairs, first_seed=10_000)
                   if config["val_data"] in (None, config["data"]) else
                   PairFolder(config["val_data"], what="--val-data", progress=progress))
            if config["data"] == "brain" and config["labels"] is None:
                config["labels"] = list(FREESURFER_30)
        else:
            data = PairFolder(config["data"], atlas=config["atlas"], progress=progress)
            val = (PairFolder(config["val_data"], atlas=config["atlas"], what="--val-data",
                              progress=progress) if config["val_data"] else None)
    if val is not None and tuple(val.shape) != tuple(data.shape):
        raise CLIError(f"--val-data: its images are {format_shape(val.shape)}, the training images "
                       f"{format_shape(data.shape)}; validate on images of the training grid")
    return data, val


def _training_model(config: dict, explicit: set[str], state: dict | None, shape: tuple[int, ...]):
    """A new model of --model, the one of --init-from, or the one the resumed checkpoint holds."""
    from . import nets
    from .checkpoints import load_model
    model_args = {"spatial_dims": len(shape), **config["model_args"]}
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
    dims = model.config.get("spatial_dims", len(shape))
    if dims != len(shape):
        raise CLIError(f"the model is {dims}D (spatial_dims={dims}) but the training images are "
                       f"{len(shape)}D ({format_shape(shape)})")
    return model


def _train(args) -> int:
    from .profiles import get_profile
    from .train import TrainingInterrupted, fit, seed_everything
    config, explicit = _train_options(args)
    state = _settle_out(config, explicit)
    if config["data"] is None:
        raise CLIError("train: give the training images with --data FOLDER (or 'data' in --config)")
    device = _device(config["device"])
    profile = get_profile()
    data, val = _training_pairs(config, profile)
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
    model = _training_model(config, explicit, state, tuple(data.shape))
    _check_train_memory(model, data.shape, config["batch_size"])
    out, name = Path(config["out"]), model.config.get("name", config["model"])
    every = ("tenth of the run" if config["checkpoint_every"] is None
             else f"{config['checkpoint_every']} steps")
    print(f"training {name} ({len(data.shape)}D) on {len(data)} pairs of {format_shape(data.shape)} "
          f"from {config['data']}; checkpoint -> {out} (saved every {every}, at the end and on "
          f"Ctrl-C)", flush=True)
    command = {k: config[k] for k in _FROM_COMMAND}
    command.update(model=name, model_args=config["model_args"], init_from=config["init_from"])
    start = time.perf_counter()
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
    print(f"done: {history['train']['step'][-1]} steps, loss {loss[0]:.4g} -> {loss[-1]:.4g}; saved {out} "
          f"({(time.perf_counter() - start) / 60:.1f} min in this command)")
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
                        f"({format_shape(trained_shape)}): if they are that much finer, pass "
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
                           f"coarsen the grid, got {format_shape(shape)}; crop or pad the images")
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


def _check_spacings(fixed, moving) -> tuple[float, ...] | None:
    from .datasets.files import spacings_agree
    if not spacings_agree(fixed.spacing, moving.spacing):
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
        check_memory(estimate, f"{what}: running the model on {format_shape(shape)} voxels",
                     "run it on a coarser grid (--factor 2 halves every axis) or crop the images")
    except MemoryError as e:
        raise CLIError(str(e)) from None


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text


def _run_model(model, device, fixed: np.ndarray, moving: np.ndarray):
    """``model(moving, fixed)`` on images normalised by :func:`regedu.datasets.files.min_max`."""
    batch = (torch.from_numpy(moving)[None, None].to(device),
             torch.from_numpy(fixed)[None, None].to(device))
    try:
        with torch.no_grad():
            return model(*batch)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise CLIError(f"ran out of memory running the model on {format_shape(fixed.shape)} voxels "
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
    from .datasets.files import (check_image_output, min_max, read_image_file, read_labels,
                                  write_displacement, write_image)
    from .spatial import warp
    # Check every input and output name before computing or writing anything.
    if bool(args.moving_seg) != bool(args.warped_seg):
        raise CLIError("--moving-seg and --warped-seg go together (the labels to warp and where "
                       "to write them)")
    with _user_input():
        for name in ("--warped", "--disp", "--warped-seg"):
            path = getattr(args, name[2:].replace("-", "_"))
            if path:
                check_image_output(path, name)
    inputs = [args.fixed, args.moving, args.moving_seg, args.model]
    _check_outputs({"--warped": args.warped, "--disp": args.disp, "--warped-seg": args.warped_seg},
                   inputs)
    with _user_input():
        fixed = read_image_file(args.fixed, "--fixed")
        moving = read_image_file(args.moving, "--moving")
    model, state = _load(args)
    config = model.config
    _check_pair(fixed.array, moving.array, config)
    with _user_input():
        normalised = (min_max(fixed.array, "--fixed", fixed.path),
                      min_max(moving.array, "--moving", moving.path))
        seg = read_labels(args.moving_seg, "--moving-seg", moving.array) if args.moving_seg else None
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
    from .datasets import PairFolder
    from .datasets.files import min_max, read_image_file, read_labels
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
        with _user_input():
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
        with _user_input():
            fixed, moving = read_image_file(args.fixed, "--fixed"), read_image_file(args.moving, "--moving")
        _check_pair(fixed.array, moving.array, config)
        spacing, shape = _check_spacings(fixed, moving), fixed.array.shape
        with _user_input():
            pair = {"fixed": torch.from_numpy(min_max(fixed.array, "--fixed", fixed.path))[None],
                    "moving": torch.from_numpy(min_max(moving.array, "--moving", moving.path))[None],
                    "meta": {"id": f"{Path(args.moving).name} -> {Path(args.fixed).name}"}}
        present = set()
        if args.fixed_seg:
            for key, path, image in (("fixed_seg", args.fixed_seg, fixed.array),
                                     ("moving_seg", args.moving_seg, moving.array)):
                with _user_input():
                    seg = read_labels(path, f"--{key.replace('_', '-')}", image)
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
        raise CLIError(f"ran out of memory running the model on {format_shape(shape)} voxels; run it "
                       f"on a coarser grid (--factor 2 halves every axis) or crop the images") from None
    table = result.table()
    columns = ["pair", "dice_before", "dice_mean", "dice_std", "percent_folding", "sdlogj", "seconds"]
    table = table[[c for c in columns if c in table and not table[c].isna().all()]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if len(table) > 1 and "dice_mean" in table:
        print(f"mean Dice {table['dice_mean'].mean():.4f} (std over pairs "
              f"{table['dice_mean'].std():.4f}); before registration {table['dice_before'].mean():.4f}")
    if args.csv:
        write_atomic(args.csv, lambda tmp: result.table().to_csv(tmp, index=False), suffix=".csv")
        print(f"wrote {args.csv}")
    return 0


# ---------------------------------------------------------------- course

def _course(args) -> int:
    from .course import run_course
    summary = run_course(args.notebooks or None, profile=args.profile, out_dir=args.out,
                         timeout=args.timeout, scripts=args.scripts)
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

    p = sub.add_parser("fetch", help="download and verify datasets into the cache",
                       description="Download and verify datasets into the regedu cache (REGEDU_DATA). "
                                   "Without a name, list the datasets and whether they are cached.")
    p.add_argument("names", nargs="*", help="datasets to fetch (see the list)")
    p.add_argument("--cache-dir", dest="cache_dir",
                   help="cache folder (default: $REGEDU_DATA or ~/.cache/regedu)")
    p.add_argument("--mirror", help="folder tried before the network ($REGEDU_MIRROR)")
    p.add_argument("--no-extract", dest="no_extract", action="store_true", help="keep archives packed")

    p = sub.add_parser("train", help="train a registration network and save a checkpoint",
                       description="Train a registration network on a folder of images (pairs of "
                                   "different images, or each image to --atlas). Options can come "
                                   "from a JSON or TOML --config file whose keys are the option "
                                   "names (batch_size, losses = {ncc = 1.0, diffusion = 1.0}, ...); "
                                   "flags override it.")
    p.add_argument("--config", help="JSON or TOML file with any of the options below")
    p.add_argument("--data", help="folder of training images (.nii.gz, .nii, .npz, .npy), or "
                                  "'fundus' / 'brain' / 'subjects' for the offline data sized by the profile "
                                  "(fundus pairs as vessel contrast, regedu.datasets.vessel_contrast; brain: the "
                                  "template under random warps; subjects: realistic subjects of the training "
                                  "anatomy, pre-aligned to the atlas, regedu.datasets.RealisticPairs)")
    p.add_argument("--atlas", help="register every image to this fixed image (atlas-based)")
    p.add_argument("--val-data", dest="val_data", help="folder of validation images")
    p.add_argument("--model", help="network name from regedu.nets (default unet)")
    p.add_argument("--model-arg", dest="model_args", action="append", metavar="KEY=VALUE",
                   help="network argument, e.g. integrate_steps=7 (repeat for several)")
    default = ",".join(f"{k}={v:g}" for k, v in DEFAULT_LOSSES.items())
    p.add_argument("--losses", help=f"weighted terms from regedu.losses.LOSSES, e.g. 'ncc=1,diffusion=1' or "
                                    f"'mse=1,diffusion=0.01,dice=0.1' (default {default})")
    p.add_argument("--labels", help="structures for the Dice term and validation: 2,3,4 or freesurfer30")
    p.add_argument("--pairs", type=int, help="with --data fundus/brain: how many different training "
                                             "pairs to draw (default: the profile's n_train_pairs)")
    p.add_argument("--misalign", action="store_const", const=True, default=None,
                   help="with --data subjects: add a small known affine misalignment to each pre-aligned "
                        "pair (regedu.datasets.Misaligned), for training an affine stage")
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
    p.add_argument("--profile", default="ci", choices=list(PROFILES), help="default ci")
    p.add_argument("--out", default="_course_html", help="output folder (default _course_html)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default 900)")
    p.add_argument("--scripts", default="auto", choices=("auto", "local", "cdn"),
                   help="where pages get the scripts that draw widgets and formulas: local copies "
                        "them into OUT/_static (downloaded once from registry.npmjs.org, verified), "
                        "so pages need no network; auto does so when they are cached, else cdn "
                        "(unpkg.com, cdnjs); default auto")
    return parser


_COMMANDS = {"doctor": _doctor, "fetch": _fetch, "train": _train, "register": _register,
             "evaluate": _evaluate, "course": _course}


def main(argv=None) -> int:
    """Run the ``regedu`` command; return its exit status (0 ok, 2 a usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
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
