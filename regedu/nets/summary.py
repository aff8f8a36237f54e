"""What a model costs: parameters, output shapes and memory for an input size."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from .._checks import check_positive
from ._base import RegistrationOutput

__all__ = ["Summary", "summary", "inference_bytes"]


def _shape(obj):
    if isinstance(obj, torch.Tensor):
        return tuple(obj.shape)
    if isinstance(obj, RegistrationOutput):
        return tuple(obj.disp.shape)
    if isinstance(obj, (list, tuple)):
        shapes = [_shape(o) for o in obj]
        return shapes[0] if len(shapes) == 1 else shapes
    return None


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


@dataclasses.dataclass
class Summary:
    """The numbers :func:`summary` measured; ``print`` it for a table.

    Attributes
    ----------
    model : str
        The model's class name.
    input_size : tuple of int
        Spatial size asked for.
    batch : int
    measured_at : tuple of int
        Spatial size of the forward pass actually run (smaller than
        ``input_size`` for large inputs; memory is then scaled by the voxel ratio).
    params, trainable : int
        Parameter counts.
    param_bytes : int
        Memory of the parameters (float32).
    activation_bytes : int
        Tensors kept for the backward pass of one forward at ``input_size``
        (measured at ``measured_at`` and scaled).
    rows : list of dict
        One per outermost submodule call, in call order: ``name``, ``type``, ``params``,
        ``output`` (shape at ``measured_at``), ``activation_bytes``.
    outputs : dict
        Shapes of the ``RegistrationOutput`` fields at ``input_size``.
    amp : bool
        Whether the pass ran under autocast (bfloat16 on CPU, the size of float16).
    scale : float
        Factor from the measured to the asked memory: the ratio of the volumes
        the network actually runs on (inputs padded to its multiple).
    """

    model: str
    input_size: tuple
    batch: int
    measured_at: tuple
    params: int
    trainable: int
    param_bytes: int
    activation_bytes: int
    rows: list
    outputs: dict
    amp: bool

    @property
    def train_bytes(self) -> int:
        """Activations + parameters, gradients and Adam's two moments (4 x parameters)."""
        return self.activation_bytes + 4 * self.param_bytes

    scale: float

    def __str__(self) -> str:
        scale = self.scale
        size = "x".join(map(str, self.input_size))
        lines = [f"{self.model} at batch {self.batch} x {size}"
                 + (" (autocast)" if self.amp else "")]
        if scale != 1:
            lines.append(f"(measured at {'x'.join(map(str, self.measured_at))}, memory scaled "
                         f"x{scale:.3g}; shapes below are at the measured size)")
        head = f"{'module':<20}{'type':<22}{'params':>12}  {'output':<28}{'saved for backward':>20}"
        lines += [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r['name']:<20}{r['type']:<22}{r['params']:>12,}  "
                         f"{str(r['output']):<28}{_mb(r['activation_bytes']):>20}")
        lines.append("-" * len(head))
        for k, v in self.outputs.items():
            lines.append(f"output.{k}: {v}")
        lines += [f"parameters: {self.params:,} ({self.trainable:,} trainable), "
                  f"{_mb(self.param_bytes)}",
                  f"activations kept for backward: {_mb(self.activation_bytes)}",
                  f"training estimate (activations + 4 x parameters for weights, gradients "
                  f"and Adam): {_mb(self.train_bytes)}; expect 10-30% more on a GPU "
                  f"(workspace, fragmentation)"]
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module, input_size, *, batch: int = 1, in_channels: int | None = None,
            max_voxels: int = 2**20, amp: bool = False) -> Summary:
    """Parameters, output shapes and memory of ``model`` for pairs of ``input_size``.

    Runs one training-mode forward pass on random images (on the model's
    device) and records every tensor autograd keeps for the backward pass
    (``torch.autograd.graph.saved_tensors_hooks``), once per storage and
    excluding the parameters: the activation memory of training, attributed
    to the outermost submodule that was running (``"(own ops)"``: the model's
    own operations, such as warps and compositions).

    Parameters
    ----------
    model : nn.Module
        A regedu registration model (``forward(moving, fixed)``).
    input_size : tuple of int
        Spatial size, e.g. ``(160, 192, 224)``.
    batch : int
    in_channels : int or None
        Image channels; default ``model.config["in_channels"]`` or 1.
    max_voxels : int
        Larger inputs are measured at a size halved (per axis) until it fits,
        and the memory is scaled by the voxel ratio (of the padded sizes the
        network runs on): activations of a fully convolutional network grow
        linearly with the number of voxels.
    amp : bool
        Run under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA) to
        estimate mixed-precision training.

    Returns
    -------
    Summary
        Printable; the numbers are its attributes.

    >>> from regedu.nets import VoxelMorph
    >>> s = summary(VoxelMorph(spatial_dims=2), (256, 256), max_voxels=64 * 64)
    >>> s.params, s.measured_at, s.outputs["disp"]
    (109170, (64, 64), (1, 2, 256, 256))
    """
    input_size = tuple(int(n) for n in input_size)
    for n in input_size:
        check_positive(n, "input_size", integer=True)
    check_positive(batch, "batch", integer=True)
    check_positive(max_voxels, "max_voxels", integer=True)
    config = getattr(model, "config", {}) or {}
    channels = in_channels or config.get("in_channels", 1)
    measured = input_size
    while math.prod(measured) > max_voxels and min(measured) > 8:
        measured = tuple(-(-n // 2) for n in measured)
    # The network runs on inputs padded to its multiple (16 for VV-Net): scale
    # by the padded volumes, or 40x48x56 (run as 48x48x64) would overstate.
    multiple = max(getattr(m, "multiple", 1) for m in model.modules())
    padded = lambda size: math.prod(-(-n // multiple) * multiple for n in size)  # noqa: E731
    scale = padded(input_size) / padded(measured)

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: set[int] = set()
    rows: list[dict] = []
    current: list[dict] = []
    top = {"name": "(own ops)", "type": type(model).__name__,
           "params": sum(p.numel() for p in model.parameters(recurse=False)),
           "output": None, "activation_bytes": 0}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen and ptr not in param_ptrs:
            seen.add(ptr)
            (current[-1] if current else top)["activation_bytes"] += storage.nbytes()
        return t

    def pre_hook(name, module):
        def hook(mod, args):
            # a row per outermost call; modules called inside it count towards it
            current.append(current[-1] if current else
                           {"name": name, "type": type(module).__name__,
                            "params": sum(p.numel() for p in module.parameters()),
                            "output": None, "activation_bytes": 0})
        return hook

    def post_hook(mod, args, output):
        row = current.pop()
        if not current:
            row["output"] = _shape(output)
            rows.append(row)

    # Every submodule is hooked: models that call their children's methods
    # (VV-Net calls vnet1.encode) still show their parts.
    handles = []
    for name, child in model.named_modules():
        if child is not model:
            handles.append(child.register_forward_pre_hook(pre_hook(name, child)))
            handles.append(child.register_forward_hook(post_hook))
    moving = torch.rand(batch, channels, *measured, device=device)
    fixed = torch.rand(batch, channels, *measured, device=device)
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu"
                               else torch.float16, enabled=amp):
            out = model(moving, fixed)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    nd = len(input_size)
    outputs = {"warped": (batch, channels, *input_size), "disp": (batch, nd, *input_size),
               "stages": [(batch, nd, *input_size)] * len(out.stages),
               "deep": [(batch, nd, *input_size)] * len(out.deep),
               "velocity": None if out.velocity is None else (batch, nd, *input_size)}
    del out
    rows.append(top)
    for r in rows:
        r["activation_bytes"] = int(r["activation_bytes"] * scale)
    return Summary(model=type(model).__name__, input_size=input_size, batch=batch,
                   measured_at=measured, params=sum(p.numel() for p in params),
                   trainable=sum(p.numel() for p in params if p.requires_grad),
                   param_bytes=sum(p.numel() * 4 for p in params),
                   activation_bytes=sum(r["activation_bytes"] for r in rows),
                   rows=rows, outputs=outputs, amp=amp, scale=scale)


def inference_bytes(model: nn.Module, input_size, *, batch: int = 1, in_channels: int | None = None,
                    max_voxels: int = 2**18) -> int:
    """Peak memory of the tensors one ``torch.no_grad()`` forward pass creates, in bytes.

    What registering one pair of ``input_size`` needs beyond the weights and
    the two images. Measured on random images (halved per axis until at most
    ``max_voxels``, then scaled by the voxel ratio, as :func:`summary` does) by
    following every tensor an operation returns until it is freed.

    >>> from regedu.nets import VoxelMorph
    >>> small, large = (inference_bytes(VoxelMorph(spatial_dims=2), s) for s in ((64, 64), (128, 128)))
    >>> 3.5 < large / small < 4.5
    True
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    input_size = tuple(int(n) for n in input_size)
    for n in input_size:
        check_positive(n, "input_size", integer=True)
    config = getattr(model, "config", {}) or {}
    channels = in_channels or config.get("in_channels", 1)
    measured = input_size
    while math.prod(measured) > max_voxels and min(measured) > 8:
        measured = tuple(-(-n // 2) for n in measured)
    multiple = max(getattr(m, "multiple", 1) for m in model.modules())
    factor = max(getattr(m, "factor", 1) for m in model.modules())
    step = multiple * factor
    padded = lambda size: math.prod(-(-n // step) * step for n in size)  # noqa: E731
    # Rescaled needs sizes that its factor divides: measure on the nearest such size.
    measured = tuple(max(step, -(-n // step) * step) for n in measured)

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    own = {p.untyped_storage().data_ptr() for p in params}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}

    class Live(TorchDispatchMode):
        # Storages by address, with how many live tensors use each: a storage
        # is freed when the last tensor viewing it is.
        def __init__(self):
            super().__init__()
            self.users: dict[int, list] = {}
            self.now = self.peak = 0

        def _free(self, ptr):
            entry = self.users.get(ptr)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    self.now -= entry[0]
                    del self.users[ptr]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and not getattr(t, "_regedu_seen", False):
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr in own or storage.nbytes() == 0:
                        continue
                    try:
                        t._regedu_seen = True
                    except (AttributeError, RuntimeError):
                        continue
                    if ptr in self.users:
                        self.users[ptr][1] += 1
                    else:
                        self.users[ptr] = [storage.nbytes(), 1]
                        self.now += storage.nbytes()
                        self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._free, ptr)
            return out

    moving = torch.rand(batch, channels, *measured, device=device)
    fixed = torch.rand(batch, channels, *measured, device=device)
    was_training = model.training
    model.eval()
    tracker = Live()
    try:
        with torch.no_grad(), tracker:
            out = model(moving, fixed)
        del out
    finally:
        model.train(was_training)
    return int(tracker.peak * padded(input_size) / padded(measured))
