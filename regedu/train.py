"""Training: one step (:func:`train_step`), and the loop around it (:func:`fit`).

:func:`train_step` is the whole algorithm, on one screen: register the pair,
add the weighted loss terms (:func:`regedu.losses.loss_terms`), backpropagate,
step the optimiser. A notebook can write its own loop around it::

    for batch in loader:
        values = train_step(model, batch, optimizer, losses={"ncc": 1.0, "diffusion": 1.0})

:func:`fit` is that loop for every registration model in regedu: any model
that follows the ``regedu.nets`` contract (``forward(moving, fixed) ->
RegistrationOutput``), on batches of dicts with the keys ``moving`` and
``fixed`` (and optionally ``moving_seg`` and ``fixed_seg``, integer label maps,
and ``disp``, the true field of a pair made from one)::

    history = fit(model, data, losses={"ncc": 1.0, "diffusion": 1.0}, steps=500)

Every weighted term is logged on its own (``history["train"]["ncc"]``), so a
plot shows which term the optimiser is trading against which. Around the
steps, ``fit`` keeps checkpoints that resume exactly (:mod:`regedu.checkpoints`),
validates, stops cleanly on Ctrl-C, uses mixed precision and channels-last on
CUDA, and runs unchanged under ``torchrun`` with DistributedDataParallel.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ._checks import (check_field, check_finite, check_label_list, check_labels, check_output_path,
                      check_positive, check_same_shape, check_tensor)
from .checkpoints import (CHANGEABLE_ON_RESUME, check_resumable, check_weights, describe_checkpoint,
                          load_checkpoint, rng_state, save_checkpoint, set_rng_state, versions)
from .evaluate import score_pair
from .losses import DEFAULT_LOSSES, build_terms, loss_terms
from .metrics import labels_present

__all__ = ["train_step", "optimizer_step", "fit", "NonFiniteLoss", "TrainingInterrupted", "seed_everything",
           "default_device"]


# ---------------------------------------------------------------- one step

class NonFiniteLoss(ValueError):
    """The loss of a step is NaN or infinite; :func:`optimizer_step` did not update the model.

    ``values`` holds every term of that step (floats).
    """

    def __init__(self, values: Mapping, *, step: int | None = None, kept: str | None = None):
        self.values = {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        parts = ", ".join(f"{k} {v:.4g}" for k, v in self.values.items())
        super().__init__(f"loss: not finite{'' if step is None else f' at step {step}'} ({parts}); "
                         f"the model was not updated by it{'' if kept is None else f' and {kept}'}. "
                         f"The run diverged or a batch holds extreme values: lower lr, set "
                         f"grad_clip, or check the data")


# Scales nothing: with it, train_step takes the plain float32 step.
_NO_SCALING = torch.amp.GradScaler("cuda", enabled=False)


def train_step(model: nn.Module, batch: Mapping, optimizer: torch.optim.Optimizer, *,
               losses=DEFAULT_LOSSES, labels=None, deep_weight: float = 1.0,
               grad_clip: float | None = None, scaler: torch.amp.GradScaler | None = None) -> dict:
    """One optimiser step on one batch: forward, weighted loss terms, backward, step.

    Parameters
    ----------
    model : nn.Module
        ``forward(moving, fixed) -> RegistrationOutput`` (see ``regedu.nets``).
    batch : dict
        ``moving`` and ``fixed`` ``(B, C, *spatial)`` on the model's device;
        optionally ``moving_seg``, ``fixed_seg`` (for the ``"dice"`` term) and
        ``disp``, the true displacement (for the ``"field"`` term).
    optimizer : torch.optim.Optimizer
    losses, labels, deep_weight
        The objective, as for :func:`regedu.losses.loss_terms`.
    grad_clip : float, optional
        Clip the gradient's global norm to this value before the step.
    scaler : torch.amp.GradScaler, optional
        Mixed precision (CUDA): the forward pass runs under float16 autocast
        and the loss is scaled so that small float16 gradients do not vanish.

    Returns
    -------
    dict
        Every weighted term of the step and ``"loss"``, their sum (detached).

    Raises
    ------
    NonFiniteLoss
        The loss is NaN or infinite: nothing was updated.

    Examples
    --------
    >>> from regedu import nets
    >>> model = nets.create("unet", spatial_dims=2)
    >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    >>> batch = {"moving": torch.rand(1, 1, 32, 32), "fixed": torch.rand(1, 1, 32, 32)}
    >>> sorted(train_step(model, batch, optimizer, losses={"mse": 1.0, "diffusion": 0.01}))
    ['diffusion', 'loss', 'mse']
    """
    scaler = scaler or _NO_SCALING
    # Forward: the field that registers moving to fixed (float16 under mixed precision).
    with torch.autocast(batch["fixed"].device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
        output = model(batch["moving"], batch["fixed"])
    # The weighted terms and their sum, in float32.
    values = loss_terms(_float32(output), batch["moving"], batch["fixed"], losses=losses,
                        moving_seg=batch.get("moving_seg"), fixed_seg=batch.get("fixed_seg"),
                        true_disp=batch.get("disp"), labels=labels, deep_weight=deep_weight)
    return optimizer_step(model.parameters(), optimizer, values, grad_clip=grad_clip, scaler=scaler)


def optimizer_step(parameters, optimizer: torch.optim.Optimizer, values: Mapping, *,
                   grad_clip: float | None = None, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Minimise ``values["loss"]`` by one step of ``optimizer``; the one update every trainer takes.

    Refuses a non-finite loss before touching the weights, then zero-grad,
    backward, optional clipping of the gradient's global norm over
    ``parameters``, step. :func:`train_step` and the trainers of
    ``regedu.joint``, ``regedu.adversarial`` and ``regedu.supervised`` call it.

    Parameters
    ----------
    parameters : iterable of Parameter
        What ``grad_clip`` clips (the optimiser's parameters).
    optimizer : torch.optim.Optimizer
    values : dict of Tensor
        ``"loss"``, the scalar to minimise, and any other terms (reported).
    grad_clip : float, optional
    scaler : torch.amp.GradScaler, optional
        Mixed precision: scales the loss, unscales before clipping.

    Returns
    -------
    dict
        ``values``, detached.

    Raises
    ------
    NonFiniteLoss
        ``values["loss"]`` is NaN or infinite: nothing was updated.

    Examples
    --------
    >>> w = nn.Parameter(torch.tensor([3.0]))
    >>> opt = torch.optim.SGD([w], lr=0.25)
    >>> float(optimizer_step([w], opt, {"loss": (w ** 2).sum()})["loss"]), float(w.detach()[0])
    (9.0, 1.5)
    """
    scaler = scaler or _NO_SCALING
    if not bool(torch.isfinite(values["loss"].detach())):
        raise NonFiniteLoss(values)  # before the update: the weights stay finite
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(values["loss"]).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach() for k, v in values.items()}


def _float32(output):
    # Losses run in float32 even under autocast: NCC's local variances and the
    # Jacobian underflow or cancel in float16.
    if output.disp.dtype == torch.float32:
        return output
    cast = lambda t: None if t is None else t.float()
    return type(output)(warped=cast(output.warped), disp=cast(output.disp),
                        stages=[cast(s) for s in output.stages], deep=[cast(d) for d in output.deep],
                        velocity=cast(output.velocity))


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


def _devices(device, amp, channels_last, world: int, local_rank: int) -> tuple[torch.device, bool, bool]:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    amp = device.type == "cuda" if amp is None else bool(amp)
    channels_last = device.type == "cuda" if channels_last is None else bool(channels_last)
    if (amp or channels_last) and device.type != "cuda":
        raise ValueError(f"amp and channels_last are for CUDA devices; got device {device} "
                         f"with amp={amp}, channels_last={channels_last}")
    return device, amp, channels_last


def _memory_format(ndim: int, enabled: bool):
    if not enabled:
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


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
                         f"(and optionally 'moving_seg', 'fixed_seg', 'disp'), got {got}")
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
    if batch.get("disp") is not None:
        out["disp"] = check_field(check_tensor(batch["disp"], "disp").to(device, torch.float32), "disp")
    return out


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


def _loaders(train_data, val_data, *, steps, epochs, batch_size, num_workers, world, seed, device):
    """The training and validation loaders, and how many steps the run takes."""
    dataset = getattr(train_data, "dataset", train_data)
    sampler = None
    if world > 1 and not isinstance(dataset, IterableDataset):
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, seed=seed)
    loader = _as_loader(train_data, batch_size, num_workers, sampler, pin_memory=device.type == "cuda")
    val_loader = (val_data if val_data is None or isinstance(val_data, DataLoader)
                  else DataLoader(val_data, batch_size=1))
    try:
        total = steps if steps is not None else epochs * len(loader)
    except TypeError:
        raise ValueError("epochs: this data has no length (an endless sampler?); give steps "
                         "instead") from None
    return loader, val_loader, total


def _spacing(spacing, dataset) -> list[float] | None:
    # The voxel size trained at (mm per axis), recorded so that the model runs at its scale later.
    if spacing is None:
        spacing = getattr(dataset, "spacing", None)
    if spacing is None:
        return None
    spacing = [float(v) for v in np.atleast_1d(np.asarray(spacing, dtype=float))]
    for v in spacing:
        check_positive(v, "spacing")
    return spacing


def _new_history() -> dict:
    return {"train": {"step": []}, "val": {"step": []}}


@dataclass
class _Progress:
    """Where a run is: what its checkpoint keeps beside the weights to resume exactly."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches drawn in this epoch
    history: dict = field(default_factory=_new_history)
    rng_epoch_start: dict | None = None
    seconds: float | None = 0.0  # wall-clock time in steps and validations, over every resumed part


def _epochs(loader: DataLoader, at: _Progress, resume_state: dict | None):
    """The batches of epoch after epoch, without end, drawn as an uninterrupted run draws them.

    Each epoch starts by recording the generators' state. On resume the epoch
    in progress is drawn again from its recorded state, the batches already
    used are skipped unread, and the generators go back to where the run stopped.
    """
    while True:
        if resume_state is not None:
            at.rng_epoch_start = resume_state["rng_epoch_start"]
            set_rng_state(at.rng_epoch_start)
        else:
            at.rng_epoch_start = rng_state()
            at.batch_in_epoch = 0
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(at.epoch)
        batches = iter(loader)
        if resume_state is not None:
            _skip_batches(batches, at.batch_in_epoch, loader.dataset)
            set_rng_state(resume_state["rng"])
            resume_state = None
        for raw in batches:
            at.batch_in_epoch += 1
            yield raw
        if at.batch_in_epoch == 0:
            raise ValueError("train_data: yielded no batches")
        at.epoch += 1


def _append(log: dict, step: int, values: Mapping[str, float]) -> None:
    log["step"].append(step)
    for k, v in values.items():
        log.setdefault(k, []).append(float(v))


# ---------------------------------------------------------------- validation

@torch.no_grad()
def _validate(model, loader, terms, *, device, memory_format, labels, deep_weight, amp,
              progress: bool = False) -> dict:
    """Mean loss, Dice of the nearest-neighbour-warped labels, % folding and SDlogJ over ``loader``."""
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
            output = _float32(model(batch["moving"], batch["fixed"]))
        sums["loss"].append(float(loss_terms(output, batch["moving"], batch["fixed"], losses=terms,
                                             moving_seg=batch.get("moving_seg"),
                                             fixed_seg=batch.get("fixed_seg"),
                                             true_disp=batch.get("disp"), labels=labels,
                                             deep_weight=deep_weight)["loss"]))
        segs = "moving_seg" in batch and "fixed_seg" in batch
        for i in range(output.disp.shape[0]):
            pair = {k: batch[k][i:i + 1] for k in ("moving_seg", "fixed_seg")} if segs else {}
            structures = labels if labels is not None or not segs else labels_present(*pair.values())
            scores = score_pair(output.disp[i:i + 1], pair, labels=structures).record
            sums["percent_folding"].append(float(scores["percent_folding"]))
            sums["sdlogj"].append(float(scores["sdlogj"]))
            if segs:
                sums["dice"].append(float(scores["dice_mean"]))
    model.train(was_training)
    return {k: float(np.mean(v)) for k, v in sums.items() if v}


# ---------------------------------------------------------------- interrupts and checkpoints

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


def _check_options(model, steps, epochs, lr, batch_size, **optional) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got a {type(model).__name__}")
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps and epochs, got steps={steps!r}, epochs={epochs!r}")
    check_positive(steps if steps is not None else epochs, "steps" if steps is not None else "epochs",
                   integer=True)
    check_positive(lr, "lr")
    check_positive(batch_size, "batch_size", integer=True)
    for name, value in optional.items():
        if value is not None:
            check_positive(value, name, integer=name in ("val_every", "checkpoint_every"))


def _checkpoint_files(checkpoint, resume, overwrite: bool) -> tuple[Path | None, Path | None]:
    """The checkpoint to write and the one to resume from, settled before any training,
    so that a bad path or an unwanted overwrite costs nothing."""
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
                                  f"({describe_checkpoint(checkpoint)}); continue it with "
                                  f"resume=True, start over with overwrite=True, or choose "
                                  f"another file")
    return checkpoint, resume_path


class _Saver:
    """Saves the run's checkpoint when due: every ``every`` steps, at least every
    ``minutes``, at the end, and when a stop was requested."""

    def __init__(self, path: Path | None, every: int, minutes: float | None, state, saved_at):
        self.path, self.every, self.minutes, self.state = path, every, minutes, state
        self.saved_at, self.last = saved_at, time.monotonic()

    def due(self, step: int, total: int, stopping: bool) -> bool:
        return self.path is not None and (
            step == total or step % self.every == 0 or stopping
            or (self.minutes is not None and time.monotonic() - self.last >= 60 * self.minutes))

    def save(self, net: nn.Module, step: int) -> None:
        # A diverged model must not replace the last good checkpoint.
        check_weights(net.state_dict(), f"model at step {step}")
        save_checkpoint(self.path, self.state())
        self.saved_at, self.last = step, time.monotonic()

    def kept(self) -> str:
        if self.path is None:
            return "no checkpoint file was given"
        if self.saved_at is None:
            return "no checkpoint was saved yet"
        return f"the checkpoint {str(self.path)!r} (step {self.saved_at}) is kept"


def _resume(state: dict, path: Path, net, optimizer, scaler, lr, config, train_config, meta,
            total: int, rank: int) -> tuple[_Progress, dict]:
    """Load ``state`` into the run (weights, optimiser, progress); return the progress and metadata."""
    notes = check_resumable(state, path, config, train_config)
    try:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"resume: the weights in {str(path)!r} do not fit this model "
                         f"({first}); build the model the checkpoint holds, or train into "
                         f"another checkpoint file") from None
    for group in optimizer.param_groups:
        group["lr"] = lr  # the saved optimiser carries the old rate: the new one applies
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    # A checkpoint written before runs kept their time: the total is unknown (None).
    at = _Progress(state["step"], state["epoch"], state["batch_in_epoch"], state["history"],
                   seconds=state.get("seconds"))
    saved = state.get("train_config") or {}
    train_config["seed"] = saved.get("seed", train_config["seed"])  # its generators continue
    train_config["shape"] = saved.get("shape")
    if train_config["spacing"] is None:
        train_config["spacing"] = saved.get("spacing")
    train_config["changes"] = list(saved.get("changes") or [])
    changed = {k: [saved[k], train_config[k]] for k in CHANGEABLE_ON_RESUME
               if k in saved and saved[k] != train_config[k]}
    if changed:
        train_config["changes"].append({"step": at.step, **changed})
    if rank == 0:
        where = (f"nothing to train: it is already at step {at.step}, and the run asks for "
                 f"{total}; give more steps to continue it" if at.step >= total else
                 f"{total - at.step} steps to go")
        print(f"resuming from step {at.step} of {total} ({path}): {where}"
              + "".join(f"; {n}" for n in notes), flush=True)
    return at, {**(state.get("metadata") or {}), **meta}


# ---------------------------------------------------------------- the loop

def fit(model: nn.Module, train_data, *, val_data=None, losses=DEFAULT_LOSSES, steps: int | None = None,
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
        optionally ``moving_seg`` / ``fixed_seg`` integer label maps ``(B, 1, *spatial)``
        and ``disp``, the true displacement of a pair made from a known field.
        A Dataset is wrapped in a shuffling DataLoader of ``batch_size``.
        Images holding NaN or infinite values, and label maps holding
        fractions, are refused.
    val_data : Dataset or DataLoader, optional
        Finite; evaluated every ``val_every`` steps and at the end: mean loss,
        mean Dice of the nearest-neighbour-warped labels (when present), % of
        folding voxels and SDlogJ, into ``history["val"]``.
    losses : dict, optional
        Weighted terms, see :func:`regedu.losses.loss_terms`. Default
        :data:`regedu.losses.DEFAULT_LOSSES`, ``{"ncc": 1.0, "diffusion": 1.0}``.
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
        Weight of the deep-supervision term (see :func:`regedu.losses.loss_terms`).
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
        trained on) in ``train_config``, so that :func:`regedu.checkpoints.load_model` and
        ``regedu register`` can run the model at the right scale on other grids.
    metadata : dict, optional
        Anything else to keep in the checkpoint (``state["metadata"]``).

    Returns
    -------
    dict
        ``history["train"]``: ``step``, ``loss`` and every weighted term, one value
        per step; ``history["val"]``: ``step`` and the validation metrics. The
        checkpoint also keeps ``seconds``: the wall-clock time spent in steps and
        validations, summed over every resumed part (None when a part was
        resumed from a checkpoint written before this record existed).

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
    _check_options(model, steps, epochs, lr, batch_size, val_every=val_every,
                   checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
                   grad_clip=grad_clip)
    terms = build_terms(losses)
    labels = None if labels is None else check_label_list(labels)
    checkpoint, resume_path = _checkpoint_files(checkpoint, resume, overwrite)

    rank, world, local_rank, own_group = _distributed()
    device, amp, channels_last = _devices(device, amp, channels_last, world, local_rank)
    spacing = _spacing(spacing, getattr(train_data, "dataset", train_data))
    loader, val_loader, total = _loaders(train_data, val_data, steps=steps, epochs=epochs,
                                         batch_size=batch_size, num_workers=num_workers, world=world,
                                         seed=seed, device=device)
    val_every = val_every or max(1, math.ceil(total / 10))
    checkpoint_every = checkpoint_every or max(1, math.ceil(total / 10))

    net = model.to(device)
    config = dict(getattr(net, "config", {}) or {})
    if not any(True for _ in net.parameters()):
        raise ValueError("model: has no parameters to train")
    # The fused CUDA kernel updates all parameters in one launch (same maths).
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    train_config = {"losses": {t.name: t.weight for t in terms}, "lr": lr, "batch_size": batch_size,
                    "grad_clip": grad_clip, "steps": steps, "epochs": epochs, "seed": seed,
                    "deep_weight": deep_weight, "labels": labels, "amp": amp,
                    "channels_last": channels_last, "world_size": world, "spacing": spacing,
                    "shape": None, "changes": []}
    meta = dict(metadata or {})
    resume_state = (load_checkpoint(resume_path, map_location=device)
                    if resume_path is not None and resume_path.is_file() else None)
    if resume_state is not None:
        at, meta = _resume(resume_state, resume_path, net, optimizer, scaler, lr, config,
                           train_config, meta, total, rank)
    else:
        if resume_path is not None and rank == 0:
            print(f"no checkpoint at {resume_path} yet: starting a new run", flush=True)
        at = _Progress()
        seed_everything(seed + rank)
    train_net = net if world == 1 else nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)

    def state() -> dict:
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if amp else {}, "step": at.step, "epoch": at.epoch,
                "batch_in_epoch": at.batch_in_epoch, "config": config, "train_config": train_config,
                "rng": rng_state(), "rng_epoch_start": at.rng_epoch_start, "history": at.history,
                "seconds": at.seconds,
                "metadata": meta, "versions": versions()}

    saver = _Saver(checkpoint, checkpoint_every, checkpoint_minutes, state,
                   saved_at=at.step if resume_state is not None else None)
    bar = tqdm(total=total, initial=min(at.step, total), disable=not progress or rank != 0,
               desc="training", dynamic_ncols=True)
    net.train()
    clock = time.perf_counter()
    memory_format, shown = None, {}  # shown: the last validation, kept on the progress bar
    stop = _StopRequests(enabled=checkpoint is not None and world == 1 and rank == 0)
    try:
        with stop:
            for raw in _epochs(loader, at, resume_state) if at.step < total else ():
                if memory_format is None:
                    ndim = raw["moving"].dim() if isinstance(raw, Mapping) else raw[0].dim()
                    memory_format = _memory_format(ndim, channels_last)
                    if channels_last:
                        net.to(memory_format=memory_format)
                batch = _prepare_batch(raw, device, memory_format)
                if train_config["shape"] is None:
                    train_config["shape"] = list(batch["fixed"].shape[2:])
                try:
                    values = train_step(train_net, batch, optimizer, losses=terms, labels=labels,
                                        deep_weight=deep_weight, grad_clip=grad_clip, scaler=scaler)
                except NonFiniteLoss as e:
                    raise NonFiniteLoss(e.values, step=at.step + 1, kept=saver.kept()) from None
                at.step += 1
                logged = torch.stack([v.float() for v in values.values()])
                if world > 1:
                    dist.all_reduce(logged)
                    logged /= world
                _append(at.history["train"], at.step, dict(zip(values, logged.tolist())))
                bar.update(1)
                bar.set_postfix({"loss": f"{at.history['train']['loss'][-1]:.4g}", **shown}, refresh=False)
                if rank == 0 and val_loader is not None and (at.step % val_every == 0 or at.step == total):
                    # Validation must not move the generators, or where a run stops
                    # (with its final validation) would change the run that resumes.
                    rng = rng_state()
                    metrics = _validate(net, val_loader, terms, device=device, memory_format=memory_format,
                                        labels=labels, deep_weight=deep_weight, amp=amp,
                                        progress=progress and not bar.disable)
                    set_rng_state(rng)
                    _append(at.history["val"], at.step, metrics)
                    shown = {f"val_{k}": f"{metrics[k]:.4g}" for k in ("loss", "dice") if k in metrics}
                now = time.perf_counter()
                if at.seconds is not None:
                    at.seconds += now - clock
                clock = now
                if rank == 0 and saver.due(at.step, total, stopping=stop.signum is not None):
                    saver.save(net, at.step)
                if stop.signum is not None:
                    raise TrainingInterrupted(at.step, checkpoint, stop.signum)
                if at.step >= total:
                    break
    finally:
        bar.close()
        if own_group:
            dist.destroy_process_group()
    return at.history
