"""What every registration network shares: its output, input checks, padding,
the flow head, the generic ``Registration`` wrapper and the model registry.

Convention: images ``(B, C, *spatial)``; displacements ``(B, ndim, *spatial)``
in voxels, channel ``k`` along spatial axis ``k``; warping pulls,
``warped(x) = moving(x + u(x))`` (see :mod:`regedu.spatial`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree

from .._checks import check_choice, check_image, check_positive
from ..spatial import integrate_velocity, warp

__all__ = ["RegistrationOutput", "Registration", "create", "from_config", "available_models"]

_REGISTRY: dict[str, type] = {}


@dataclasses.dataclass
class RegistrationOutput:
    """What every regedu registration model returns.

    Attributes
    ----------
    warped : Tensor, shape (B, C, *spatial)
        The moving image warped by ``disp`` (one interpolation of the original).
    disp : Tensor, shape (B, ndim, *spatial)
        The final displacement, in voxels, on the fixed grid.
    stages : list of Tensor, each (B, ndim, *spatial)
        Intermediate fields (cascade stages, VV-Net's phi1, the affine stage...),
        for inspection; each model's docstring says what they are. May be empty.
    deep : list of Tensor, each (B, ndim, *spatial)
        Deep-supervision fields at full resolution. Each is a complete
        moving-to-fixed field: train it exactly like ``disp`` (similarity of the
        fixed image and the moving image warped by it, plus the regulariser).
    velocity : Tensor, shape (B, ndim, *spatial), or None
        The stationary velocity field when the model integrates one.

    The same fields exist whatever the model and its flags.
    """

    warped: torch.Tensor
    disp: torch.Tensor
    stages: list = dataclasses.field(default_factory=list)
    deep: list = dataclasses.field(default_factory=list)
    velocity: torch.Tensor | None = None


# DistributedDataParallel (find_unused_parameters=True) walks outputs as pytrees:
# declare the fields so that it reaches the tensors inside.
torch.utils._pytree.register_pytree_node(
    RegistrationOutput,
    lambda out: ([out.warped, out.disp, out.stages, out.deep, out.velocity], None),
    lambda values, _: RegistrationOutput(*values),
    serialized_type_name="regedu.nets.RegistrationOutput")


# ----------------------------------------------------------------------------- registry

def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a model buildable by ``create(name, ...)``."""
    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls
    return deco


def available_models() -> list[str]:
    """Names that :func:`create` and :func:`from_config` accept."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    """Build a registration model by its registry name.

    >>> create("unet", spatial_dims=2).config["name"]
    'unet'
    """
    check_choice(name, tuple(available_models()), "name")
    return _REGISTRY[name](**kwargs)


def from_config(config: dict) -> nn.Module:
    """Rebuild a model from its ``model.config`` (as saved with its weights).

    The weights are not part of the config: load them with ``load_state_dict``.
    """
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"config: expected a dict with a 'name' key (a model's .config), got "
                         f"{config!r:.200}")
    kwargs = {k: v for k, v in config.items() if k != "name"}
    if config["name"] not in _REGISTRY:
        raise ValueError(f"config: unknown model name {config['name']!r}; known: "
                         f"{', '.join(available_models())}. A Registration built around a custom "
                         f"backbone cannot be rebuilt from its config: build it again in code and "
                         f"load the weights with load_state_dict")
    return create(config["name"], **kwargs)


def jsonable(value):
    """``value`` as JSON holds it: tuples become lists, mappings dicts with string keys.

    Configs travel so inside checkpoints, and compare equal whether a size came
    as a tuple or a list (code, JSON, TOML, ``torch.load``).
    """
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def make_config(name: str, **kwargs) -> dict:
    """The ``config`` dict of a model: its registry name and constructor arguments."""
    return {"name": name, **jsonable(kwargs)}


# ----------------------------------------------------------------------------- checks

def check_spatial_dims(spatial_dims) -> int:
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims: expected 2 (images (B, C, H, W)) or 3 (volumes "
                         f"(B, C, D, H, W)), got {spatial_dims!r}")
    return spatial_dims


def check_features(features, name: str, length: int | None = None) -> tuple[int, ...]:
    """Check a sequence of positive channel counts."""
    if isinstance(features, (str, bytes)) or not hasattr(features, "__len__"):
        raise ValueError(f"{name}: expected a sequence of channel counts, got {features!r}")
    if length is not None and len(features) != length:
        raise ValueError(f"{name}: expected {length} channel counts, got {len(features)}: "
                         f"{tuple(features)}")
    for f in features:
        check_positive(f, name, integer=True)
    return tuple(int(f) for f in features)


def check_pair(moving, fixed, spatial_dims: int, in_channels: int) -> torch.Tensor:
    """Check a (moving, fixed) pair for a model; return ``fixed`` broadcast to the batch.

    A fixed batch of 1 (an atlas) is expanded to the moving batch.
    """
    for name, x in (("moving", moving), ("fixed", fixed)):
        check_image(x, name, spatial_dims=spatial_dims, channels=in_channels)
    if moving.shape[2:] != fixed.shape[2:]:
        raise ValueError(f"moving and fixed: expected the same spatial size, got "
                         f"{tuple(moving.shape[2:])} and {tuple(fixed.shape[2:])}; resample the "
                         f"moving image onto the fixed image's grid first (the network predicts "
                         f"one displacement per fixed voxel)")
    if fixed.shape[0] != moving.shape[0]:
        if fixed.shape[0] != 1:
            raise ValueError(f"moving and fixed: batch sizes {moving.shape[0]} and "
                             f"{fixed.shape[0]} differ (a fixed batch of 1, an atlas, is "
                             f"broadcast)")
        fixed = fixed.expand(moving.shape[0], *fixed.shape[1:])
    return fixed


# ----------------------------------------------------------------------------- building blocks

def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of ``x`` up to a multiple of ``multiple``.

    Returns the padded tensor and the region (one slice per spatial axis) that
    :func:`crop` uses to cut the original extent back out. Padding is split
    between both ends so that the image stays centred.

    >>> y, region = pad_to_multiple(torch.zeros(1, 1, 37, 45), 16)
    >>> tuple(y.shape), tuple(crop(y, region).shape)
    ((1, 1, 48, 48), (1, 1, 37, 45))
    """
    extra = [(-n) % multiple for n in x.shape[2:]]
    region = tuple(slice(e // 2, e // 2 + n) for e, n in zip(extra, x.shape[2:]))
    if not any(extra):
        return x, region
    pad = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [e // 2, e - e // 2]
    return F.pad(x, pad), region


def crop(x: torch.Tensor, region: tuple[slice, ...]) -> torch.Tensor:
    """Cut ``region`` (from :func:`pad_to_multiple`) out of the spatial axes of ``x``."""
    return x[(Ellipsis, *region)]


def _takes_native_path(x: torch.Tensor, conv: nn.Conv3d) -> bool:
    # PyTorch's own choice of kernel (ConvParams::use_mkldnn, torch 2.x): a CPU
    # float32 batch of ONE whose N*C*D*H is at most 20480 runs on the native
    # kernels, not oneDNN's; their backward is about three times slower here
    # (32 channels at 20x24x28: 0.20 s against 0.064 s, forward and backward).
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5 and x.shape[0] == 1
            and conv.groups == 1 and conv.kernel_size[-1] > 1 and conv.padding_mode == "zeros"
            and x.shape[1] * x.shape[2] * x.shape[3] <= 20480 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv3d
           ) -> torch.Tensor:
    """``F.conv3d`` with ``conv``'s stride, padding and dilation, kept on oneDNN's kernels.

    A batch of one volume that PyTorch would send to its slow native kernels
    is cut into two overlapping halves along the last axis and convolved as a
    batch of two (which PyTorch sends to oneDNN); the two outputs are joined
    back. The halves overlap by the kernel's reach, so every output voxel sees
    exactly its own neighbourhood.
    """
    if not _takes_native_path(x, conv):
        return F.conv3d(x, weight, bias, conv.stride, conv.padding, conv.dilation)
    k, s, p = conv.kernel_size[-1], conv.stride[-1], conv.padding[-1]
    d = conv.dilation[-1]
    x = F.pad(x, (p, p))
    n_out = (x.shape[-1] - d * (k - 1) - 1) // s + 1
    left_out = (n_out + 1) // 2
    width = (left_out - 1) * s + d * (k - 1) + 1     # input columns of left_out outputs
    start = left_out * s
    right = x[..., start:start + width]
    right = F.pad(right, (0, width - right.shape[-1]))  # odd splits: the last column is dropped below
    y = F.conv3d(torch.cat([x[..., :width], right]), weight, bias, conv.stride,
                 (*conv.padding[:2], 0), conv.dilation)
    return torch.cat([y[:1], y[1:, ..., :n_out - left_out]], dim=-1)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same weights, same result to float rounding) that keeps oneDNN's kernels
    for a batch of one volume (see :func:`conv3d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight, self.bias, self)


def conv(spatial_dims: int, in_channels: int, out_channels: int, *, kernel_size: int = 3,
         stride: int = 1) -> nn.Module:
    """A ``Conv{n}d`` with 'same' padding (halving the size when ``stride=2``).

    In 3D it is :class:`Conv3d`, which keeps a batch of one on oneDNN's fast
    kernels on the CPU (the state dict is ``nn.Conv3d``'s).
    """
    Conv = Conv3d if spatial_dims == 3 else getattr(nn, f"Conv{spatial_dims}d")
    return Conv(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


class ConvBlock(nn.Sequential):
    """Convolution then LeakyReLU(0.2), VoxelMorph's block (the state dict of an ``nn.Sequential``).

    ``block(x)`` applies it; ``block(low, skip)`` applies it to
    ``torch.cat([upsample(low), skip], dim=1)``, a decoder step, computed
    without the upsampled map (:func:`upsample_conv_block`). Either way the
    block is called as a module, so hooks on it see the step.
    """

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is None:
            return super().forward(x)
        return upsample_conv_block(self, x, skip)


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, *,
               stride: int = 1) -> ConvBlock:
    """Convolution then LeakyReLU(0.2), VoxelMorph's block (:class:`ConvBlock`)."""
    # In place: the activation's backward needs only its output, so this saves
    # one feature map per block at no cost.
    return ConvBlock(conv(spatial_dims, in_channels, out_channels, stride=stride),
                     nn.LeakyReLU(0.2, inplace=True))


def flow_head(spatial_dims: int, in_channels: int, *, std: float = 1e-5) -> nn.Module:
    """3x3(x3) convolution to ``spatial_dims`` channels with N(0, std) weights and zero bias.

    Tiny weights make the first prediction almost the identity (u ~ 0), so
    training starts from "no motion" instead of a random warp.
    """
    head = conv(spatial_dims, in_channels, spatial_dims)
    nn.init.normal_(head.weight, mean=0.0, std=std)
    nn.init.zeros_(head.bias)
    return head


def cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout if it is a CPU float32 image or volume batch, else ``x``.

    In that layout oneDNN's convolutions need no reorders of their input and
    output. Same values, another memory order.
    """
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if layout is None or x.device.type != "cpu" or x.dtype != torch.float32:
        return x
    return x.contiguous(memory_format=layout)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling by 2 (exact sizes: inputs are padded to a multiple).

    >>> x = torch.rand(2, 3, 4, 5)
    >>> y = upsample(x.contiguous(memory_format=torch.channels_last))
    >>> torch.equal(y, upsample(x)), y.is_contiguous(memory_format=torch.channels_last)
    (True, True)
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # Channels-last (UNet does 2D so on the CPU): each pixel's channel vector
        # repeated 2x2, written as a broadcast copy. Its backward is a sum over
        # the repeats that reads the gradient where it lies (a channel slice of
        # the concatenation's gradient); upsample_nearest2d's backward first
        # copies that slice into a new tensor. Same values.
        B, C, H, W = x.shape
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(B, H, 2, W, 2, C)
        return y.reshape(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)
    return F.interpolate(x, scale_factor=2, mode="nearest")


#: Nearest upsampling by 2 then a 3-tap convolution, along one axis, as 4 taps of a
#: stride-2 transposed convolution: row j of ``_UP_TAPS`` sums the taps (w0, w1, w2)
#: that reach the coarse voxel with transposed-kernel index j.
_UP_TAPS = torch.tensor([[0., 0., 1.], [0., 1., 1.], [1., 1., 0.], [1., 0., 0.]])


def upsample_conv_block(block: nn.Sequential, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``block(torch.cat([upsample(low), skip], dim=1))`` without the upsampled map.

    ``block`` is a :func:`conv_block` whose convolution is 3x3(x3), stride 1,
    'same' padding; ``skip`` is twice ``low``'s size. Same result to float
    rounding (the taps are summed in another order), with 8 instead of 27
    products per fine voxel for ``low``'s channels in 3D (4 instead of 9 in 2D).

    Why: after nearest upsampling by 2, the fine voxels ``2i`` and ``2i + 1``
    see only two coarse voxels each along an axis: ``2i`` takes ``w0`` from
    ``i - 1`` and ``w1 + w2`` from ``i``; ``2i + 1`` takes ``w0 + w1`` from
    ``i`` and ``w2`` from ``i + 1``. That is a transposed convolution of
    stride 2 with the 4 taps ``(w2, w1 + w2, w0 + w1, w0)`` per axis on the
    coarse map, and the skip connection's channels get their own 3x3(x3)
    convolution; the concatenation is never built.

    >>> block = conv_block(2, 6, 5)
    >>> low, skip = torch.rand(1, 4, 3, 5), torch.rand(1, 2, 6, 10)
    >>> ref = block(torch.cat([upsample(low), skip], dim=1))
    >>> torch.allclose(upsample_conv_block(block, low, skip), ref, atol=1e-6)
    True
    """
    conv = block[0]
    nd = low.dim() - 2
    if (conv.kernel_size != (3,) * nd or conv.stride != (1,) * nd or conv.padding != (1,) * nd
            or conv.dilation != (1,) * nd or conv.groups != 1 or conv.padding_mode != "zeros"
            or tuple(skip.shape[2:]) != tuple(2 * n for n in low.shape[2:])):
        return nn.Sequential.forward(block, torch.cat([upsample(low), skip], dim=1))
    c, w = low.shape[1], conv.weight
    taps = _UP_TAPS.to(w)
    # (out, in, 3, 3[, 3]) -> transposed kernel (in, out, 4, 4[, 4])
    if nd == 3:
        k = torch.einsum("at,bu,cv,oituv->ioabc", taps, taps, taps, w[:, :c])
        skip_part = conv3d(skip, w[:, c:], conv.bias, conv)
        y = F.conv_transpose3d(low, k, stride=2, padding=1)
    else:
        k = torch.einsum("at,bu,oitu->ioab", taps, taps, w[:, :c])
        skip_part = F.conv2d(skip, w[:, c:], conv.bias, padding=1)
        y = F.conv_transpose2d(low, k, stride=2, padding=1)
    return block[1:](y.add_(skip_part))   # in place: neither convolution's backward needs its output


def pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1(x1) convolution ``conv`` applied to ``x`` as one matrix product.

    Same result as ``conv(x)`` to float rounding. PyTorch sends a 1x1
    convolution of a small batch to its slow native kernels (3D batch of one,
    or 2D under 16 images on one thread); as a matrix product over the voxels
    it is one BLAS call forward and two backward, on ``x`` where it lies.

    >>> head = nn.Conv2d(4, 2, kernel_size=1)
    >>> x = torch.rand(3, 4, 5, 6)
    >>> last = x.contiguous(memory_format=torch.channels_last)
    >>> all(torch.allclose(pointwise(head, t), head(x), atol=1e-6) for t in (x, last))
    True
    """
    w, b = conv.weight.flatten(1), conv.bias      # (out, in), (out,)
    if x.is_contiguous():                         # (B, C, *S): W @ (C, N) per item
        # bmm, not matmul: for a weight that requires grad, matmul folds the batch into
        # one (N, C) @ (C, out) product, a shape BLAS runs 10x slower (200 ms against
        # 16 ms at 32 channels of 80x96x112, forward; 280 against 96 ms with backward).
        y = torch.bmm(w.expand(x.shape[0], -1, -1), x.flatten(2))
        if b is not None:
            y = y + b[:, None]
        return y.view(x.shape[0], w.shape[0], *x.shape[2:])
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            or x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return F.linear(x.movedim(1, -1), w, b).movedim(-1, 1)
    return conv(x)


# ----------------------------------------------------------------------------- wrapper

class Registration(nn.Module):
    """A registration model around any backbone: features, flow head, integration, warp.

    Parameters
    ----------
    backbone : nn.Module
        Maps the concatenated pair ``(B, 2 * in_channels, *spatial)`` to
        features ``(B, F, *spatial)`` of the same spatial size, and has an
        ``out_features`` attribute (``F``).
    spatial_dims : {2, 3}
    in_channels : int
        Channels of each image.
    integrate_steps : int
        0: the head predicts the displacement. ``n > 0``: it predicts a
        stationary velocity field, integrated by scaling and squaring in ``n``
        steps (a diffeomorphic model, as VoxelMorph-diff and SVF-Net).

    Convention: ``forward(moving, fixed)``; the field lives on the fixed grid and
    pulls the moving image into it (see :mod:`regedu.spatial`).
    """

    def __init__(self, backbone: nn.Module, spatial_dims: int = 3, in_channels: int = 1, *,
                 integrate_steps: int = 0):
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = check_positive(in_channels, "in_channels", integer=True)
        if not isinstance(integrate_steps, int) or isinstance(integrate_steps, bool) \
                or integrate_steps < 0:
            raise ValueError(f"integrate_steps: expected a non-negative integer (0 = no "
                             f"integration, 7 is usual), got {integrate_steps!r}")
        if not hasattr(backbone, "out_features"):
            raise TypeError(f"backbone: expected a module with an 'out_features' attribute (its "
                            f"number of output channels), got {type(backbone).__name__}")
        self.integrate_steps = integrate_steps
        self.backbone = backbone
        self.flow = flow_head(spatial_dims, backbone.out_features)
        self.config = make_config("custom", backbone=type(backbone).__name__,
                                  spatial_dims=spatial_dims, in_channels=in_channels,
                                  integrate_steps=integrate_steps)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        fixed = check_pair(moving, fixed, self.spatial_dims, self.in_channels)
        # features of the pair, moving first (VoxelMorph's order). A backbone that works
        # in channels-last layout on the CPU (UNet: channels_last = True) takes the pair
        # so, and the flow head then runs in that layout too (2.5x faster at 3 channels);
        # the field comes back contiguous.
        pair = torch.cat([moving, fixed], dim=1)
        if getattr(self.backbone, "channels_last", False):
            pair = cpu_channels_last(pair)
        flow = self.flow(self.backbone(pair)).contiguous()
        # a velocity field is integrated into a diffeomorphic displacement
        velocity = flow if self.integrate_steps else None
        disp = integrate_velocity(flow, self.integrate_steps) if self.integrate_steps else flow
        # warp the moving image into the fixed image's space
        return RegistrationOutput(warp(moving, disp), disp, [], [], velocity)
