"""Checkpoints: what a training run saves, how it is read back, and whether it can continue.

A checkpoint written by :func:`regedu.train.fit` is a dict saved with
``torch.save`` holding only plain types and tensors (so it loads with
``weights_only=True``, which runs no code hidden in a file):

- ``model``, ``optimizer``, ``scaler``: the state dicts;
- ``config``: the model's constructor arguments (:func:`regedu.nets.from_config`
  rebuilds it); ``train_config``: the settings of the run (losses, lr, batch
  size, seed, voxel spacing and shape trained on, changes made on resume);
- ``step``, ``epoch``, ``batch_in_epoch``, ``history``, ``seconds`` (the time
  spent training, over every resumed part; None if a part predates this record);
- ``rng`` and ``rng_epoch_start``: the random generators now and at the start
  of the epoch, so that a resumed run draws exactly what the uninterrupted run
  would have (:func:`rng_state`);
- ``metadata`` (e.g. the ``regedu train`` command) and ``versions``.

Files are written atomically (:func:`save_checkpoint`); :func:`load_model`
rebuilds the model, at the right scale for images of another voxel size.
"""
from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ._checks import format_spacing
from ._files import write_atomic
from .nets._base import jsonable

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "checkpoint_note", "trained_spacing",
           "choose_factor", "check_complete", "check_resumable", "describe_checkpoint", "rng_state",
           "set_rng_state", "training_recipe"]


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` with ``torch.save``, atomically.

    A crash (or Ctrl-C, or a full disk) while saving leaves the previous
    checkpoint intact (:func:`regedu._files.write_atomic`).
    """
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    return write_atomic(path, write)


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`regedu.train.fit` (with ``weights_only=True``).

    ``weights_only=True`` refuses to run code hidden in a file, so a checkpoint
    downloaded from somewhere is safe to open.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # torch's unpickling errors bury the cause under advice; keep the line that names it.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        cause = next((ln for ln in lines if "error:" in ln.lower()), lines[0])
        raise ValueError(f"checkpoint: {str(path)!r} is not a regedu checkpoint that torch can "
                         f"read with weights_only=True ({cause})") from None


def describe_checkpoint(path) -> str:
    """``"a unet checkpoint at step 2000"``: what a file holds, for messages."""
    try:
        state = load_checkpoint(path)
    except (ValueError, OSError):
        return "a file that is not a regedu checkpoint"
    name = (state.get("config") or {}).get("name", "model")
    return f"a {name} checkpoint at step {state.get('step', '?')}"


def training_recipe(state: Mapping) -> dict:
    """What a run was trained with, read from its checkpoint (never retyped).

    Returns ``model`` (registry name), ``seed``, ``steps`` (the step it was
    saved at), ``batch``, ``lr``, ``grad_clip`` (None: no clipping),
    ``losses`` (term -> weight), ``data``, ``pairs`` and ``misalign`` (the
    ``regedu train`` command's; None, None and False for a run started from
    Python), ``shape`` and ``spacing`` (the grid trained on), ``parameters``
    and ``validation_dice`` (every validation's mean Dice, oldest first).
    Two runs had equal budgets when every key but ``model``, ``seed``,
    ``parameters`` and ``validation_dice`` agrees.
    """
    if "train_config" not in state or "config" not in state:
        raise ValueError("state: expected a checkpoint written by regedu.train.fit (with 'config' and "
                         f"'train_config'), got keys {sorted(state)}")
    tc, cli = state["train_config"], (state.get("metadata") or {}).get("cli") or {}
    return dict(model=state["config"]["name"], seed=tc.get("seed"), steps=int(state["step"]),
                batch=tc.get("batch_size"), lr=tc.get("lr"), grad_clip=tc.get("grad_clip"),
                losses=dict(tc.get("losses") or {}),
                data=cli.get("data"), pairs=cli.get("pairs"), misalign=bool(cli.get("misalign")),
                shape=list(tc["shape"]) if tc.get("shape") is not None else None,
                spacing=list(tc["spacing"]) if tc.get("spacing") is not None else None,
                parameters=sum(v.numel() for v in state["model"].values()),
                validation_dice=[float(d) for d in ((state.get("history") or {}).get("val") or {}).get("dice", [])])


def check_weights(state_dict: Mapping, where: str) -> None:
    """Refuse weights holding NaN or infinite values (a diverged run)."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{where}: {len(bad)} weight tensors hold NaN or infinite values (first: "
                         f"{bad[0]!r}); the run diverged before this was saved: use an earlier "
                         f"checkpoint or train again with a lower lr or grad_clip")


# ---------------------------------------------------------------- the model, at its scale

def trained_spacing(state: Mapping) -> tuple[float, ...] | None:
    """The voxel size (mm per axis) a checkpoint was trained at, if it records one."""
    spacing = (state.get("train_config") or {}).get("spacing")
    return None if spacing is None else tuple(float(v) for v in spacing)


def choose_factor(trained, spacing, *, hint: str = "factor=N") -> int:
    """The :class:`regedu.nets.Rescaled` factor that runs a model trained at voxel
    size ``trained`` on images of voxel size ``spacing`` (mm, one per axis or one).

    Whole ratios give the factor (a 4 mm model on 1 mm images: 4); anything
    else raises, saying what to do (``hint`` names the override).

    >>> choose_factor(4.0, (1.0, 1.0, 1.0))
    4
    """
    trained = np.atleast_1d(np.asarray(trained, dtype=float))
    spacing = np.atleast_1d(np.asarray(spacing, dtype=float))
    if trained.size == 1 and spacing.size > 1:
        trained = np.repeat(trained, spacing.size)
    if spacing.size == 1 and trained.size > 1:
        spacing = np.repeat(spacing, trained.size)
    if trained.size != spacing.size or not (np.all(trained > 0) and np.all(spacing > 0)):
        raise ValueError(f"spacing: expected positive voxel sizes for the same axes as the model's "
                         f"{format_spacing(trained)}, got {spacing.tolist()}")
    ratio = trained / spacing
    k = int(round(float(ratio[0])))
    if k >= 1 and np.all(np.abs(ratio - k) <= 1e-3 * k):
        return k
    what = (f"the model was trained at {format_spacing(trained)} voxels and the images have "
            f"{format_spacing(spacing)}")
    if np.all(ratio < 1):
        raise ValueError(f"spacing: {what}: the images are coarser than the model's grid, where "
                         f"it would see every structure smaller than it learnt; resample them to "
                         f"{format_spacing(trained)}, or run it anyway with {hint.replace('N', '1')}")
    raise ValueError(f"spacing: {what}: the ratio {'x'.join(f'{r:.3g}' for r in ratio)} is not one "
                     f"whole number, so no grid coarsening fits; resample the images to "
                     f"{format_spacing(trained)} divided by 1, 2, 3 ..., or choose the factor with {hint}")


def load_model(path, *, map_location="cpu", factor: int | None = None, spacing=None) -> nn.Module:
    """Rebuild the model stored in a checkpoint (``regedu.nets.from_config``) with its weights.

    ``factor > 1`` wraps it in :class:`regedu.nets.Rescaled`: a model trained at
    4 mm runs on 2 mm volumes with ``factor=2`` (inputs coarsened, field upsampled).
    Give ``spacing`` (the images' voxel size in mm) instead to have the factor
    chosen from the spacing the checkpoint records (:func:`choose_factor`).
    The model is returned in eval mode. Weights holding NaN are refused.
    ``path`` may also be a checkpoint already read by :func:`load_checkpoint`,
    so that a caller that reads its metadata reads the file once.
    """
    from . import nets
    if isinstance(path, Mapping):
        state, path = path, "(a loaded checkpoint)"
    else:
        state = load_checkpoint(path, map_location=map_location)
    config = state.get("config") if isinstance(state, dict) else None
    if not config or "model" not in state:
        raise ValueError(f"checkpoint: {str(path)!r} holds no model config; save models that have "
                         f"a .config dict (every regedu.nets model does) to rebuild them")
    check_weights(state["model"], f"checkpoint {str(path)!r}")
    model = nets.from_config(config)
    model.load_state_dict(state["model"])
    if factor is None:
        trained = trained_spacing(state)
        factor = 1 if spacing is None or trained is None else choose_factor(trained, spacing)
    if factor != 1:
        model = nets.Rescaled(model, factor)
    return model.eval()


def checkpoint_note(path, state: Mapping | None = None) -> str:
    """What a notebook prints when it loads a shipped checkpoint: the file, its
    training step, and the command that made it (``NAME.txt`` beside ``NAME.pt``).
    ``state``: the file already read by :func:`load_checkpoint` (it is then not read again)."""
    path = Path(path)
    state = load_checkpoint(path) if state is None else state
    command = path.with_suffix(".txt")
    made_by = command.read_text().strip() if command.is_file() else "(no command file beside it)"
    return (f"LOADED a pre-trained checkpoint: {path} ({state['config']['name']}, step "
            f"{state.get('step', '?')})\nmade by: {made_by}")


# ---------------------------------------------------------------- exact resume

def rng_state() -> dict:
    """The states of Python's, NumPy's and PyTorch's generators (CPU, and CUDA when present).

    Plain types and tensors only, so that checkpoints load with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back the generator states of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> dict:
    """The versions a checkpoint records (torch, Python)."""
    return {"torch": str(torch.__version__), "python": sys.version.split()[0]}


# What a run optimises: changed half-way, the history would belong to no single run.
_FIXED_ON_RESUME = ("losses", "batch_size", "deep_weight", "labels", "spacing")
# How each step is taken: a resumed run may change these from its first step on.
CHANGEABLE_ON_RESUME = ("lr", "grad_clip")
_RESUME_KEYS = ("model", "optimizer", "rng", "rng_epoch_start", "step", "epoch", "batch_in_epoch",
                "history")


def check_complete(state: Mapping, path) -> None:
    """Raise unless checkpoint ``state`` (from ``path``) holds all a run needs to continue exactly."""
    missing = [k for k in _RESUME_KEYS if k not in state]
    if missing:
        what = ("weights only" if "model" in state else "no weights") + \
               f" (no {', '.join(repr(k) for k in missing)})"
        raise ValueError(f"resume: {str(path)!r} holds {what}, so no run can continue from it "
                         f"exactly; start a new run initialised from its weights (regedu train "
                         f"--init-from {path}, or fit(load_model({str(path)!r}), ...)), or re-run "
                         f"the command that made it")


def _differences(saved: Mapping, now: Mapping) -> str:
    keys = sorted(set(saved) | set(now), key=str)
    return "; ".join(f"{k}: {jsonable(saved.get(k))!r} in the checkpoint, {jsonable(now.get(k))!r} here"
                     for k in keys if jsonable(saved.get(k)) != jsonable(now.get(k)))


def _same_spacing(a, b) -> bool:
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    try:
        return bool(np.allclose(*np.broadcast_arrays(a, b), rtol=1e-4))
    except ValueError:
        return False


def check_resumable(state: Mapping, path: Path, config: dict, train_config: dict) -> list[str]:
    """Raise if ``state`` cannot continue a run of this model ``config`` and these
    settings (``train_config``); return the changes it makes (lines to print)."""
    check_complete(state, path)
    saved_config = state.get("config") or {}
    if config and jsonable(saved_config) != jsonable(config):
        # Between two kinds of model only the kind matters; their arguments differ anyway.
        names = ({"name": saved_config.get("name")}, {"name": config.get("name")})
        shown = names if names[0] != names[1] else (saved_config, config)
        raise ValueError(f"resume: {str(path)!r} holds another model than this run builds "
                         f"({_differences(*shown)}); build the model it holds to "
                         f"continue it (regedu train takes it from the checkpoint when --model is "
                         f"not given), or train into another checkpoint file")
    saved = state.get("train_config") or {}
    fixed = {k: saved[k] for k in _FIXED_ON_RESUME if k in saved}
    now = {k: train_config.get(k) for k in fixed}
    if "spacing" in fixed and (fixed["spacing"] is None or now["spacing"] is None
                               or _same_spacing(fixed["spacing"], now["spacing"])):
        del fixed["spacing"], now["spacing"]
    if jsonable(fixed) != jsonable(now):
        raise ValueError(f"resume: {str(path)!r} was trained with other settings "
                         f"({_differences(fixed, now)}); a run that changed them half-way would "
                         f"mix two objectives in one history: resume with the checkpoint's "
                         f"settings, or start a new run (from its weights: --init-from)")
    notes = [f"{k} {saved[k]!r} -> {train_config[k]!r} from here on"
             for k in CHANGEABLE_ON_RESUME if k in saved and saved[k] != train_config[k]]
    for k in ("amp", "channels_last", "world_size"):
        if k in saved and saved[k] != train_config[k]:
            notes.append(f"{k} {saved[k]!r} -> {train_config[k]!r} (the run continues, but not "
                         f"bit for bit)")
    return notes
