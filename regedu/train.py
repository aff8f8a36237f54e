"""One training loop for every registration model in regedu.

:func:`fit` trains any model that follows the ``regedu.nets`` contract
(``forward(moving, fixed) -> RegistrationOutput``) on batches of dicts with the
keys ``moving`` and ``fixed`` (and optionally ``moving_seg`` and ``fixed_seg``,
integer label maps). The loss is a sum of weighted terms chosen by name::

    history = fit(model, data, losses={"ncc": 1.0, "diffusion": 1.0}, steps=500)

Every weighted term is logged on its own (``history["train"]["ncc"]``), so a
plot shows which term the optimiser is trading against which.

The loop also keeps atomic checkpoints (model, optimiser, step, configs, RNG
states, history) that resume exactly, uses mixed precision and channels-last on
CUDA, and runs unchanged under ``torchrun`` with DistributedDataParallel.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from . import losses as _losses
from . import metrics as _metrics
from ._checks import (check_finite, check_label_list, check_labels, check_output_path, check_positive,
                      check_same_shape, check_tensor, format_spacing)
from .spatial import warp

__all__ = ["fit", "loss_terms", "LOSSES", "save_checkpoint", "load_checkpoint", "load_model",
           "seed_everything", "default_device", "checkpoint_note", "choose_factor",
           "trained_spacing", "check_complete", "TrainingInterrupted"]

# name -> (kind, factory). The kind says what a term is computed on:
#   "similarity"   fn(fixed, warped)
#   "regulariser"  fn(field)
#   "edge"         fn(field, fixed)      (edge-aware smoothness follows the fixed image)
#   "dice"         fn(fixed_onehot, warped_onehot), needs moving_seg and fixed_seg
LOSSES: dict[str, tuple[str, Callable[[], Callable]]] = {
    "mse": ("similarity", lambda: _losses.MSE()),
    "ncc": ("similarity", lambda: _losses.NCC(window=9)),
    "ncc_global": ("similarity", lambda: _losses.NCC(kind="global")),
    "mi": ("similarity", lambda: _losses.MI()),
    "diffusion": ("regulariser", lambda: _losses.Diffusion("l2")),
    "bending": ("regulariser", lambda: _losses.BendingEnergy()),
    "edge_aware": ("edge", lambda: _losses.EdgeAwareSmoothness()),
    "dice": ("dice", lambda: _losses.SoftDice()),
}

DEFAULT_LOSSES = {"ncc": 1.0, "diffusion": 1.0}


@dataclass(frozen=True)
class _Term:
    name: str
    kind: str
    fn: Callable
    weight: float


def _build_terms(losses) -> list[_Term]:
    if isinstance(losses, list) and all(isinstance(t, _Term) for t in losses):
        return losses
    if not isinstance(losses, Mapping) or not losses:
        raise TypeError(f"losses: expected a non-empty dict such as {{'ncc': 1.0, 'diffusion': 1.0}}, "
                        f"got {losses!r}")
    terms = []
    for name, spec in losses.items():
        if name not in LOSSES:
            raise ValueError(f"losses: unknown term {name!r}; expected names from "
                             f"{', '.join(map(repr, LOSSES))}")
        kind, factory = LOSSES[name]
        # A (callable, weight) pair replaces the default callable, e.g. NCC(window=5).
        fn, weight = spec if isinstance(spec, tuple) else (factory(), spec)
        if not callable(fn) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"losses[{name!r}]: expected a weight or a (callable, weight) pair, "
                            f"got {spec!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"losses[{name!r}]: expected a finite weight >= 0 (every term is "
                             f"lower-is-better), got {weight!r}")
        terms.append(_Term(name, kind, fn, float(weight)))
    if not any(t.kind == "similarity" for t in terms) and not any(t.kind == "dice" for t in terms):
        raise ValueError(f"losses: no similarity term in {list(losses)}; add one of "
                         f"'mse', 'ncc', 'ncc_global', 'mi' (or 'dice' with label maps)")
    return terms


def _terms_config(terms: list[_Term]) -> dict:
    return {t.name: t.weight for t in terms}


def _field_terms(terms, field, reg_field, moving, fixed, moving_onehot, fixed_onehot):
    """Weighted terms for one field: similarity, regulariser(s) and Dice."""
    out = {}
    warped = None
    for t in terms:
        if t.weight == 0:
            continue
        if t.kind == "similarity":
            warped = warp(moving, field) if warped is None else warped
            value = t.fn(fixed, warped)
        elif t.kind == "regulariser":
            value = t.fn(reg_field)
        elif t.kind == "edge":
            value = t.fn(field, fixed)
        else:
            if moving_onehot is None:
                continue
            value = t.fn(fixed_onehot, warp(moving_onehot, field))
        out[t.name] = t.weight * value
    return out


def _resolve_labels(labels, moving_seg, fixed_seg) -> list[int]:
    if labels is not None:
        return check_label_list(labels)
    # No explicit list: every non-background label in either map of the batch.
    found = torch.unique(torch.cat([moving_seg.flatten(), fixed_seg.flatten()]))
    return [int(v) for v in found.tolist() if v != 0]


def loss_terms(output, moving: torch.Tensor, fixed: torch.Tensor, *, losses=None,
               moving_seg: torch.Tensor | None = None, fixed_seg: torch.Tensor | None = None,
               labels=None, deep_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one batch and their sum.

    Parameters
    ----------
    output : RegistrationOutput
        What the model returned for ``(moving, fixed)``.
    moving, fixed : Tensor, shape (B, C, *spatial)
    losses : dict, optional
        Term name -> weight, e.g. ``{"ncc": 1.0, "diffusion": 1.0, "dice": 0.1}``;
        a value may also be a ``(callable, weight)`` pair to replace the default
        callable (``{"ncc": (regedu.losses.NCC(window=5), 1.0)}``). Names are the
        keys of :data:`LOSSES`. Default ``{"ncc": 1.0, "diffusion": 1.0}``.
    moving_seg, fixed_seg : Tensor, shape (B, 1, *spatial), integer, optional
        Label maps. The ``"dice"`` term compares ``fixed_seg`` with the one-hot
        ``moving_seg`` warped linearly (differentiable); it is skipped without them.
    labels : sequence of int, optional
        Structures for the Dice term; default every non-zero label in the batch.
    deep_weight : float
        Weight of the deep-supervision term: each field in ``output.deep`` is
        supervised exactly like the final one (same terms, same weights), and the
        ``"deep"`` term is ``deep_weight`` times their mean.

    Returns
    -------
    dict
        ``{name: weighted term}`` for every active term, ``"deep"`` when the model
        has deep-supervision fields, and ``"loss"``, their sum (what is minimised).

    Notes
    -----
    The regulariser acts on ``output.velocity`` when the model integrates one
    (as VoxelMorph regularises its pre-integration field) and on the
    displacement otherwise. Edge-aware smoothness always acts on the displacement.

    Examples
    --------
    >>> from regedu import nets
    >>> model = nets.create("unet", spatial_dims=2)
    >>> moving, fixed = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    >>> terms = loss_terms(model(moving, fixed), moving, fixed, losses={"mse": 1.0, "diffusion": 0.1})
    >>> sorted(terms)
    ['diffusion', 'loss', 'mse']
    >>> bool(terms["loss"] == terms["mse"] + terms["diffusion"])
    True
    """
    terms = _build_terms(DEFAULT_LOSSES if losses is None else losses)
    moving_onehot = fixed_onehot = None
    if moving_seg is not None and fixed_seg is not None and any(t.kind == "dice" for t in terms):
        label_list = _resolve_labels(labels, moving_seg, fixed_seg)
        moving_onehot = _losses.one_hot(moving_seg, label_list).to(moving.dtype)
        fixed_onehot = _losses.one_hot(fixed_seg, label_list).to(moving.dtype)
    reg_field = output.velocity if output.velocity is not None else output.disp
    out = _field_terms(terms, output.disp, reg_field, moving, fixed, moving_onehot, fixed_onehot)
    if output.deep and deep_weight:
        deep = [sum(_field_terms(terms, d, d, moving, fixed, moving_onehot, fixed_onehot).values())
                for d in output.deep]
        out["deep"] = deep_weight * sum(deep) / len(deep)
    out["loss"] = sum(out.values())
    return out


# ---------------------------------------------------------------- seeds and devices

def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """The device of the active profile (``regedu.profiles``): CUDA when available."""
    from .profiles import get_profile
    return torch.device(get_profile().device)


def _rng_state() -> dict:
    # Plain types and tensors only, so checkpoints load with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- checkpoints

def _temp_prefix(path: Path, pid: int | None = None) -> str:
    return f".{path.name}.{os.getpid() if pid is None else pid}."


def _remove_stale_temporaries(path: Path) -> None:
    # A save killed outright (SIGKILL, power loss) cannot clean up after itself;
    # its temporary file carries the writer's pid, so a later save knows it is
    # orphaned (and leaves alone one that a live process is still writing).
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive but another user's: not ours to remove
            pass


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically.

    The file is written to a temporary file in the same folder and moved over
    ``path`` with ``os.replace`` only once complete, so a crash (or Ctrl-C, or a
    full disk) while saving leaves the previous checkpoint intact. Temporary
    files of saves that were killed outright are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`fit` (with ``weights_only=True``).

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


def _check_weights(state_dict: Mapping, where: str) -> None:
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{where}: {len(bad)} weight tensors hold NaN or infinite values (first: "
                         f"{bad[0]!r}); the run diverged before this was saved: use an earlier "
                         f"checkpoint or train again with a lower lr or grad_clip")


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
    """
    from . import nets
    state = load_checkpoint(path, map_location=map_location)
    config = state.get("config") if isinstance(state, dict) else None
    if not config or "model" not in state:
        raise ValueError(f"checkpoint: {str(path)!r} holds no model config; save models that have "
                         f"a .config dict (every regedu.nets model does) to rebuild them")
    _check_weights(state["model"], f"checkpoint {str(path)!r}")
    model = nets.from_config(config)
    model.load_state_dict(state["model"])
    if factor is None:
        trained = trained_spacing(state)
        factor = 1 if spacing is None or trained is None else choose_factor(trained, spacing)
    if factor != 1:
        model = nets.Rescaled(model, factor)
    return model.eval()


def checkpoint_note(path) -> str:
    """What a notebook prints when it loads a shipped checkpoint: the file, its
    training step, and the command that made it (``NAME.txt`` beside ``NAME.pt``)."""
    path = Path(path)
    state = load_checkpoint(path)
    command = path.with_suffix(".txt")
    made_by = command.read_text().strip() if command.is_file() else "(no command file beside it)"
    return (f"LOADED a pre-trained checkpoint: {path} ({state['config']['name']}, step "
            f"{state.get('step', '?')})\nmade by: {made_by}")


# ---------------------------------------------------------------- data

def _as_loader(data, batch_size, num_workers, sampler=None, pin_memory=False) -> DataLoader:
    if isinstance(data, DataLoader):
        if sampler is None:
            return data
        # Under DDP each process needs its own shard: same loader, distributed sampler.
        return DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler,
                          num_workers=data.num_workers, collate_fn=data.collate_fn,
                          drop_last=data.drop_last, pin_memory=data.pin_memory)
    if not isinstance(data, (Dataset, IterableDataset)) and not hasattr(data, "__getitem__"):
        raise TypeError(f"train_data: expected a torch Dataset or DataLoader of dict batches, "
                        f"got a {type(data).__name__}")
    iterable = isinstance(data, IterableDataset)
    return DataLoader(data, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      shuffle=not iterable and sampler is None, sampler=sampler)


def _prepare_batch(batch, device, memory_format) -> dict:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        batch = {"moving": batch[0], "fixed": batch[1]}
    if not isinstance(batch, Mapping) or "moving" not in batch or "fixed" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"batch: expected a dict with keys 'moving' and 'fixed' "
                         f"(and optionally 'moving_seg', 'fixed_seg'), got {got}")
    out = {}
    for key in ("moving", "fixed"):
        x = check_tensor(batch[key], key)
        out[key] = x.to(device, torch.float32, non_blocking=True).contiguous(memory_format=memory_format)
        # A NaN voxel makes every loss NaN, and Adam turns that into NaN weights.
        check_finite(out[key], key)
    check_same_shape(out["moving"], out["fixed"], ("moving", "fixed"))
    for key in ("moving_seg", "fixed_seg"):
        if batch.get(key) is not None:
            seg = check_tensor(batch[key], key)
            if seg.is_floating_point():
                check_labels(seg, key)  # .long() would truncate 2.7 to 2 without a word
            out[key] = seg.to(device, non_blocking=True).long()
    return out


def _memory_format(ndim: int, enabled: bool):
    if not enabled:
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


# ---------------------------------------------------------------- validation

@torch.no_grad()
def _validate(model, loader, terms, *, device, memory_format, labels, deep_weight, amp,
              progress: bool = False) -> dict:
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {"loss": [], "dice": [], "percent_folding": [], "sdlogj": []}
    try:
        total = len(loader)
    except TypeError:
        total = None
    for raw in tqdm(loader, total=total, desc="validating", leave=False, disable=not progress,
                    dynamic_ncols=True):
        batch = _prepare_batch(raw, device, memory_format)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            output = model(batch["moving"], batch["fixed"])
        output = _float_output(output)
        sums["loss"].append(float(loss_terms(output, batch["moving"], batch["fixed"], losses=terms,
                                             moving_seg=batch.get("moving_seg"),
                                             fixed_seg=batch.get("fixed_seg"), labels=labels,
                                             deep_weight=deep_weight)["loss"]))
        for i in range(output.disp.shape[0]):
            disp = output.disp[i:i + 1]
            stats = _metrics.folding_stats(disp)
            sums["percent_folding"].append(float(stats["percent_folding"]))
            sums["sdlogj"].append(float(stats["sdlogj"]))
            if "moving_seg" in batch and "fixed_seg" in batch:
                ms, fs = batch["moving_seg"][i:i + 1], batch["fixed_seg"][i:i + 1]
                label_list = _resolve_labels(labels, ms, fs)
                result = _metrics.dice(warp(ms, disp, mode="nearest")[0, 0].cpu(), fs[0, 0].cpu(),
                                       label_list)
                sums["dice"].append(float(result.mean))
    model.train(was_training)
    return {k: float(np.mean(v)) for k, v in sums.items() if v}


def _float_output(output):
    # Losses run in float32 even under autocast: NCC's local variances and the
    # Jacobian underflow or cancel in float16.
    if output.disp.dtype == torch.float32:
        return output
    cast = lambda t: None if t is None else t.float()
    return type(output)(warped=cast(output.warped), disp=cast(output.disp),
                        stages=[cast(s) for s in output.stages], deep=[cast(d) for d in output.deep],
                        velocity=cast(output.velocity))


# ---------------------------------------------------------------- distributed

def _distributed() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether fit initialised the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1, 0, False
    # Launched by torchrun: it sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True


# ---------------------------------------------------------------- the loop

def _new_history() -> dict:
    return {"train": {"step": []}, "val": {"step": []}}


def _append(log: dict, step: int, values: Mapping[str, float]) -> None:
    log["step"].append(step)
    for k, v in values.items():
        log.setdefault(k, []).append(float(v))


class TrainingInterrupted(KeyboardInterrupt):
    """:func:`fit` stopped by SIGINT (Ctrl-C) or SIGTERM, after saving its checkpoint.

    ``step`` is the last step done, ``checkpoint`` the file holding it (continue
    with ``resume=True``), ``signum`` the signal.
    """

    def __init__(self, step: int, checkpoint: Path, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"saved {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class _StopRequests:
    """Turns a first SIGINT or SIGTERM into a request to stop after the current step.

    A step cut half-way (the optimiser moved, the step count not yet) cannot be
    saved so that it resumes exactly; the loop saves at the next step boundary
    instead. A second signal stops at once, as without this.
    """

    def __init__(self, enabled: bool):
        self.signum = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: dict = {}

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(sig)
                if previous in (signal.default_int_handler, signal.SIG_DFL):  # not someone else's
                    self._previous[sig] = previous
                    signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving the checkpoint "
              f"(send it again to stop at once without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def _plain(x):
    # Configs compare equal whether a size came as a tuple or a list (JSON, TOML, torch.load).
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _differences(saved: Mapping, now: Mapping) -> str:
    keys = sorted(set(saved) | set(now), key=str)
    return "; ".join(f"{k}: {_plain(saved.get(k))!r} in the checkpoint, {_plain(now.get(k))!r} here"
                     for k in keys if _plain(saved.get(k)) != _plain(now.get(k)))


def _same_spacing(a, b) -> bool:
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    try:
        return bool(np.allclose(*np.broadcast_arrays(a, b), rtol=1e-4))
    except ValueError:
        return False


# What a run optimises: changed half-way, the history would belong to no single run.
_FIXED_ON_RESUME = ("losses", "batch_size", "deep_weight", "labels", "spacing")
# How each step is taken: a resumed run may change these from its first step on.
_CHANGEABLE_ON_RESUME = ("lr", "grad_clip")
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


def _check_resumable(state: Mapping, path: Path, config: dict, train_config: dict) -> list[str]:
    """Raise if ``state`` cannot continue this run; return the changes it makes (lines)."""
    check_complete(state, path)
    saved_config = state.get("config") or {}
    if config and _plain(saved_config) != _plain(config):
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
    if _plain(fixed) != _plain(now):
        raise ValueError(f"resume: {str(path)!r} was trained with other settings "
                         f"({_differences(fixed, now)}); a run that changed them half-way would "
                         f"mix two objectives in one history: resume with the checkpoint's "
                         f"settings, or start a new run (from its weights: --init-from)")
    notes = [f"{k} {saved[k]!r} -> {train_config[k]!r} from here on"
             for k in _CHANGEABLE_ON_RESUME if k in saved and saved[k] != train_config[k]]
    for k in ("amp", "channels_last", "world_size"):
        if k in saved and saved[k] != train_config[k]:
            notes.append(f"{k} {saved[k]!r} -> {train_config[k]!r} (the run continues, but not "
                         f"bit for bit)")
    return notes


def _skip_batches(batches, n: int, dataset) -> None:
    # Drawing the used batches again would load (or synthesise) every one of
    # their items. With one process and a map-style dataset the sampler alone
    # says which they were; the generators are restored right after, so what
    # the items would have drawn does not matter.
    single = type(batches).__name__ == "_SingleProcessDataLoaderIter"
    if single and not isinstance(dataset, IterableDataset) and hasattr(batches, "_next_index"):
        for _ in range(n):
            batches._next_index()
        batches._num_yielded += n
        return
    for _ in range(n):
        next(batches)


def _checkpoint_summary(path: Path) -> str:
    try:
        state = load_checkpoint(path)
    except (ValueError, OSError):
        return "a file that is not a regedu checkpoint"
    name = (state.get("config") or {}).get("name", "model")
    return f"a {name} checkpoint at step {state.get('step', '?')}"


def fit(model: nn.Module, train_data, *, val_data=None, losses=None, steps: int | None = None,
        epochs: int | None = None, lr: float = 1e-4, batch_size: int = 1, labels=None,
        deep_weight: float = 1.0, val_every: int | None = None, checkpoint=None,
        checkpoint_every: int | None = None, checkpoint_minutes: float | None = 10.0,
        resume=False, overwrite: bool = False, seed: int = 0, device=None,
        amp: bool | None = None, channels_last: bool | None = None, progress: bool = True,
        num_workers: int = 0, grad_clip: float | None = None, spacing=None,
        metadata: Mapping | None = None) -> dict:
    """Train a registration model with Adam; return the history.

    Parameters
    ----------
    model : nn.Module
        ``forward(moving, fixed) -> RegistrationOutput`` (see ``regedu.nets``),
        with a ``config`` dict so that checkpoints can rebuild it. Trained in place.
    train_data : Dataset or DataLoader
        Yields dicts with ``moving`` and ``fixed`` ``(B, C, *spatial)`` images and
        optionally ``moving_seg`` / ``fixed_seg`` integer label maps ``(B, 1, *spatial)``.
        A Dataset is wrapped in a shuffling DataLoader of ``batch_size``.
        Images holding NaN or infinite values, and label maps holding
        fractions, are refused.
    val_data : Dataset or DataLoader, optional
        Finite; evaluated every ``val_every`` steps and at the end: mean loss,
        mean Dice of the nearest-neighbour-warped labels (when present), % of
        folding voxels and SDlogJ, into ``history["val"]``.
    losses : dict, optional
        Weighted terms, see :func:`loss_terms`. Default ``{"ncc": 1.0, "diffusion": 1.0}``.
    steps, epochs : int
        How long to train (give one). With ``epochs`` the data needs a length.
        On resume, the total: ``fit(..., steps=1000, resume=True)`` after a run
        stopped at 400 trains 600 more steps.
    lr : float
        Adam's learning rate (VoxelMorph and VV-Net: 1e-4).
    labels : sequence of int, optional
        Structures for the Dice loss and the validation Dice; default every
        non-zero label present.
    deep_weight : float
        Weight of the deep-supervision term (see :func:`loss_terms`).
    val_every : int, optional
        Steps between validations; default a tenth of the run.
    checkpoint : str or Path, optional
        Checkpoint file, written atomically every ``checkpoint_every`` steps,
        at least every ``checkpoint_minutes``, at the end, and when SIGINT
        (Ctrl-C) or SIGTERM stops the run (see Notes). Checked to be writable
        before training starts. An existing file is refused unless ``resume``
        or ``overwrite`` says what to do with it.
    checkpoint_every : int, optional
        Steps between saves; default a tenth of the run.
    checkpoint_minutes : float or None
        Also save when this much time has passed since the last save
        (default 10; None: by steps only).
    resume : bool or str or Path
        ``True`` continues from ``checkpoint`` if that file exists (and says
        so); a path continues from that file. The run continues exactly: on CPU
        its losses equal those of an uninterrupted run. The checkpoint must
        hold the same model and the same objective (losses, labels, batch
        size, deep weight, voxel spacing); ``lr`` and ``grad_clip`` may change,
        and the change is recorded in ``train_config["changes"]``.
    overwrite : bool
        Start a new run over an existing ``checkpoint`` file.
    seed : int
        Seeds Python, NumPy and PyTorch at the start (not on resume: the saved
        generator states are restored instead).
    device : str or torch.device, optional
        Default: the profile's device (CUDA when available).
    amp, channels_last : bool, optional
        Mixed precision (float16 autocast with a gradient scaler) and channels-last
        memory; default on with CUDA. Both are CUDA-only.
    progress : bool
        Show progress bars for training and validation (``tqdm.auto``: a widget
        in Jupyter, text in a terminal).
    num_workers : int
        DataLoader workers when ``train_data`` is a Dataset.
    grad_clip : float, optional
        Clip the gradient's global norm to this value before each step. A
        registration loss can spike when a structure slides off the brain into
        the zero background; one such step at a high learning rate can undo
        hundreds of good ones.
    spacing : float or sequence of float, optional
        Voxel size of the training images in mm (default the dataset's
        ``spacing`` attribute, if any). Recorded with ``shape`` (the spatial size
        trained on) in ``train_config``, so that :func:`load_model` and
        ``regedu register`` can run the model at the right scale on other grids.
    metadata : dict, optional
        Anything else to keep in the checkpoint (``state["metadata"]``).

    Returns
    -------
    dict
        ``history["train"]``: ``step``, ``loss`` and every weighted term, one value
        per step; ``history["val"]``: ``step`` and the validation metrics.

    Raises
    ------
    TrainingInterrupted
        After SIGINT or SIGTERM, once the checkpoint is saved.
    ValueError
        Bad arguments; a checkpoint that cannot be resumed (weights only,
        another model, other settings); a loss that is no longer finite (the
        model is not updated by that step and the last checkpoint is kept).
    FileExistsError
        ``checkpoint`` exists, and neither ``resume`` nor ``overwrite`` is set.

    Notes
    -----
    Under ``torchrun --nproc_per_node N`` the same call trains with
    DistributedDataParallel: each process takes a shard of the data
    (``DistributedSampler``), gradients are averaged, the logged losses are
    averaged over processes, and only rank 0 shows progress, validates and
    writes checkpoints. ``batch_size`` is per process.

    Exact resume works by saving, beside the generator states, those at the
    start of the current epoch and the number of batches already drawn: on
    resume the epoch's data order is drawn again and the used batches skipped.

    A first SIGINT or SIGTERM (in the main thread of a single process) lets the
    current step finish, saves the checkpoint and raises
    :class:`TrainingInterrupted`; a second one stops at once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got a {type(model).__name__}")
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps and epochs, got steps={steps!r}, epochs={epochs!r}")
    check_positive(steps if steps is not None else epochs, "steps" if steps is not None else "epochs",
                   integer=True)
    check_positive(lr, "lr")
    check_positive(batch_size, "batch_size", integer=True)
    for name, value in (("val_every", val_every), ("checkpoint_every", checkpoint_every)):
        if value is not None:
            check_positive(value, name, integer=True)
    if checkpoint_minutes is not None:
        check_positive(checkpoint_minutes, "checkpoint_minutes")
    if grad_clip is not None:
        check_positive(grad_clip, "grad_clip")
    terms = _build_terms(DEFAULT_LOSSES if losses is None else losses)
    labels = None if labels is None else check_label_list(labels)

    # Everything about the checkpoint file is settled before any training, so
    # that a bad path or an unwanted overwrite costs nothing.
    if resume is True and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH (the file to continue from)")
    resume_path = (Path(checkpoint) if resume is True
                   else Path(resume) if resume not in (False, None) else None)
    if resume_path is not None and resume is not True and not resume_path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint file {str(resume_path)!r}")
    if checkpoint is not None:
        checkpoint = check_output_path(checkpoint, "checkpoint")
        continues_it = (checkpoint.exists() and resume_path is not None and resume_path.is_file()
                        and os.path.samefile(resume_path, checkpoint))
        if checkpoint.exists() and not continues_it and not overwrite:
            raise FileExistsError(f"checkpoint: {str(checkpoint)!r} already exists "
                                  f"({_checkpoint_summary(checkpoint)}); continue it with "
                                  f"resume=True, start over with overwrite=True, or choose "
                                  f"another file")

    rank, world, local_rank, own_group = _distributed()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    amp = device.type == "cuda" if amp is None else bool(amp)
    channels_last = device.type == "cuda" if channels_last is None else bool(channels_last)
    if (amp or channels_last) and device.type != "cuda":
        raise ValueError(f"amp and channels_last are for CUDA devices; got device {device} "
                         f"with amp={amp}, channels_last={channels_last}")

    dataset = getattr(train_data, "dataset", train_data)
    if spacing is None:
        spacing = getattr(dataset, "spacing", None)
    if spacing is not None:
        spacing = [float(v) for v in np.atleast_1d(np.asarray(spacing, dtype=float))]
        for v in spacing:
            check_positive(v, "spacing")

    sampler = None
    if world > 1 and not isinstance(dataset, IterableDataset):
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, seed=seed)
    loader = _as_loader(train_data, batch_size, num_workers, sampler, pin_memory=device.type == "cuda")
    val_loader = None
    if val_data is not None:
        val_loader = val_data if isinstance(val_data, DataLoader) else DataLoader(val_data, batch_size=1)
    if epochs is not None:
        try:
            total = epochs * len(loader)
        except TypeError:
            raise ValueError("epochs: this data has no length (an endless sampler?); give steps "
                             "instead") from None
    else:
        total = steps
    val_every = val_every or max(1, math.ceil(total / 10))
    checkpoint_every = checkpoint_every or max(1, math.ceil(total / 10))

    net = model.to(device)
    config = dict(getattr(net, "config", {}) or {})
    if not any(True for _ in net.parameters()):
        raise ValueError("model: has no parameters to train")
    # The fused CUDA kernel updates all parameters in one launch (same maths).
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    train_config = {"losses": _terms_config(terms), "lr": lr, "batch_size": batch_size,
                    "grad_clip": grad_clip,
                    "steps": steps, "epochs": epochs, "seed": seed, "deep_weight": deep_weight,
                    "labels": labels, "amp": amp, "channels_last": channels_last,
                    "world_size": world, "spacing": spacing, "shape": None, "changes": []}
    meta = dict(metadata or {})

    step, epoch, batch_in_epoch = 0, 0, 0
    history = _new_history()
    resume_state = None
    if resume_path is not None and resume_path.is_file():
        resume_state = load_checkpoint(resume_path, map_location=device)
        notes = _check_resumable(resume_state, resume_path, config, train_config)
        try:
            net.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"resume: the weights in {str(resume_path)!r} do not fit this model "
                             f"({first}); build the model the checkpoint holds, or train into "
                             f"another checkpoint file") from None
        for group in optimizer.param_groups:
            group["lr"] = lr  # the saved optimiser carries the old rate: the new one applies
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        step, epoch = resume_state["step"], resume_state["epoch"]
        batch_in_epoch = resume_state["batch_in_epoch"]
        history = resume_state["history"]
        saved = resume_state.get("train_config") or {}
        train_config["seed"] = saved.get("seed", seed)  # its generators continue, not seed's
        train_config["shape"] = saved.get("shape")
        if train_config["spacing"] is None:
            train_config["spacing"] = saved.get("spacing")
        train_config["changes"] = list(saved.get("changes") or [])
        changed = {k: [saved[k], train_config[k]] for k in _CHANGEABLE_ON_RESUME
                   if k in saved and saved[k] != train_config[k]}
        if changed:
            train_config["changes"].append({"step": step, **changed})
        meta = {**(resume_state.get("metadata") or {}), **meta}
        if rank == 0:
            where = (f"nothing to train: it is already at step {step}, and the run asks for "
                     f"{total}; give more steps to continue it" if step >= total else
                     f"{total - step} steps to go")
            print(f"resuming from step {step} of {total} ({resume_path}): {where}"
                  + "".join(f"; {n}" for n in notes), flush=True)
    else:
        if resume_path is not None and rank == 0:
            print(f"no checkpoint at {resume_path} yet: starting a new run", flush=True)
        seed_everything(seed + rank)

    train_net = net
    if world > 1:
        train_net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state() -> dict:
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if amp else {}, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "config": config, "train_config": train_config,
                "rng": _rng_state(), "rng_epoch_start": rng_epoch_start, "history": history,
                "metadata": meta,
                "versions": {"torch": str(torch.__version__), "python": sys.version.split()[0]}}

    saved_at = step if resume_state is not None else None
    last_save = time.monotonic()

    def save() -> None:
        nonlocal saved_at, last_save
        # A diverged model must not replace the last good checkpoint.
        _check_weights(net.state_dict(), f"model at step {step}")
        save_checkpoint(checkpoint, checkpoint_state())
        saved_at, last_save = step, time.monotonic()

    def kept() -> str:
        if checkpoint is None:
            return "no checkpoint file was given"
        if saved_at is None:
            return "no checkpoint was saved yet"
        return f"the checkpoint {str(checkpoint)!r} (step {saved_at}) is kept"

    bar = tqdm(total=total, initial=min(step, total), disable=not progress or rank != 0,
               desc="training", dynamic_ncols=True)
    net.train()
    memory_format = None
    shown: dict[str, str] = {}  # the last validation, kept on the progress bar
    stop = _StopRequests(enabled=checkpoint is not None and world == 1 and rank == 0)
    try:
        with stop:
            while step < total:
                if resume_state is not None:
                    # Draw this epoch's order again from the saved start state, skip what was used.
                    rng_epoch_start = resume_state["rng_epoch_start"]
                    _set_rng_state(rng_epoch_start)
                else:
                    rng_epoch_start = _rng_state()
                    batch_in_epoch = 0
                if hasattr(loader.sampler, "set_epoch"):
                    loader.sampler.set_epoch(epoch)
                batches = iter(loader)
                if resume_state is not None:
                    _skip_batches(batches, batch_in_epoch, loader.dataset)
                    _set_rng_state(resume_state["rng"])
                    resume_state = None
                for raw in batches:
                    if memory_format is None:
                        ndim = raw["moving"].dim() if isinstance(raw, Mapping) else raw[0].dim()
                        memory_format = _memory_format(ndim, channels_last)
                        if channels_last:
                            net.to(memory_format=memory_format)
                    batch = _prepare_batch(raw, device, memory_format)
                    if train_config["shape"] is None:
                        train_config["shape"] = list(batch["fixed"].shape[2:])
                    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                        output = train_net(batch["moving"], batch["fixed"])
                    values = loss_terms(_float_output(output), batch["moving"], batch["fixed"],
                                        losses=terms, moving_seg=batch.get("moving_seg"),
                                        fixed_seg=batch.get("fixed_seg"), labels=labels,
                                        deep_weight=deep_weight)
                    if not bool(torch.isfinite(values["loss"].detach())):
                        parts = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in values.items())
                        raise ValueError(f"loss: not finite at step {step + 1} ({parts}); the model "
                                         f"was not updated by it and {kept()}. The run diverged "
                                         f"or a batch holds extreme values: lower lr, set "
                                         f"grad_clip, or check the data")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(values["loss"]).backward()
                    if grad_clip is not None:
                        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
                        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                    batch_in_epoch += 1
                    logged = torch.stack([v.detach().float() for v in values.values()])
                    if world > 1:
                        dist.all_reduce(logged)
                        logged /= world
                    _append(history["train"], step, dict(zip(values, logged.tolist())))
                    bar.update(1)
                    bar.set_postfix({"loss": f"{history['train']['loss'][-1]:.4g}", **shown},
                                    refresh=False)
                    if rank == 0 and val_loader is not None and (step % val_every == 0 or step == total):
                        # Validation must not move the generators, or where a run stops
                        # (with its final validation) would change the run that resumes.
                        rng = _rng_state()
                        metrics = _validate(net, val_loader, terms, device=device,
                                            memory_format=memory_format, labels=labels,
                                            deep_weight=deep_weight, amp=amp,
                                            progress=progress and not bar.disable)
                        _set_rng_state(rng)
                        _append(history["val"], step, metrics)
                        shown = {f"val_{k}": f"{metrics[k]:.4g}" for k in ("loss", "dice") if k in metrics}
                    if rank == 0 and checkpoint is not None and (
                            step == total or step % checkpoint_every == 0 or stop.signum is not None
                            or (checkpoint_minutes is not None
                                and time.monotonic() - last_save >= 60 * checkpoint_minutes)):
                        save()
                    if stop.signum is not None:
                        raise TrainingInterrupted(step, checkpoint, stop.signum)
                    if step >= total:
                        break
                else:
                    if batch_in_epoch == 0:
                        raise ValueError("train_data: yielded no batches")
                    epoch += 1
    finally:
        bar.close()
        if own_group:
            dist.destroy_process_group()
    return history
