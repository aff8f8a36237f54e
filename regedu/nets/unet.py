"""VoxelMorph's U-Net and the VoxelMorph registration model.

Reference: Balakrishnan et al., "VoxelMorph: A Learning Framework for
Deformable Medical Image Registration", IEEE TMI 2019, doi:10.1109/TMI.2019.2897538.
Adapted from voxelmorph's ``Unet`` / ``VxmDense`` (torch backend, 0.2).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_positive
from ._base import (Registration, check_features, check_spatial_dims, conv, conv_block,
                    cpu_channels_last, crop, make_config, pad_to_multiple, pointwise, register,
                    upsample)

__all__ = ["UNet", "VoxelMorph"]


class UNet(nn.Module):
    """VoxelMorph's U-Net backbone, 2D or 3D, for any input size.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
        Input channels (2 for a grey pair: moving and fixed concatenated).
    encoder : sequence of int
        Channels of the convolution at each level, full resolution first; each
        level ends with a 2x max-pooling. VoxelMorph: (16, 32, 32, 32).
    decoder : sequence of int
        The first ``len(encoder)`` entries are one convolution per level, from
        the coarsest up, each followed by a 2x upsampling and the skip
        connection of that level; the rest are extra convolutions at full
        resolution. VoxelMorph: (32, 32, 32, 32, 32, 16, 16).
    out_channels : int or None
        If given, a final 1x1 convolution (no activation) to this many channels,
        as in voxelmorph 0.3.4's ``BasicUNet``; else the last decoder features.

    Notes
    -----
    **Any size, not "divisible by 16".** Each max-pooling halves the size and
    rounds down (37 -> 18), and upsampling doubles it (18 -> 36), so at an odd
    size the upsampled map no longer matches its skip connection and
    ``torch.cat`` fails. With 4 poolings every size must be a multiple of
    2**4 = 16: the classic trap that makes students crop or resize their images
    (and, if they resize without rescaling the field, get wrong displacements).
    Here the input is zero-padded up to the next multiple of ``2**len(encoder)``
    inside ``forward`` and the features are cropped back, so any size works and
    the output has the input's size. (160x192x224 needs no padding.)

    Layers: convolution + LeakyReLU(0.2), max-pooling, nearest upsampling, as
    VoxelMorph. Each decoder step (upsample, concatenate the skip, convolve)
    runs as a transposed convolution of the coarse map plus a convolution of
    the skip (:func:`~regedu.nets._base.upsample_conv_block`): the same
    function to float rounding, without the upsampled map, and on the CPU in
    channels-last layout (about twice as fast as voxelmorph 0.3.4's network of
    the same layers: ``benchmarks/bench_step.py``).

    >>> net = UNet(2, in_channels=2)
    >>> net(torch.zeros(1, 2, 37, 45)).shape
    torch.Size([1, 16, 37, 45])
    """

    channels_last = True   # works in channels-last layout on the CPU: see Registration.forward

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2,
                 encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 32, 16, 16),
                 out_channels: int | None = None):
        super().__init__()
        nd = check_spatial_dims(spatial_dims)
        encoder = check_features(encoder, "encoder")
        decoder = check_features(decoder, "decoder")
        if len(decoder) < len(encoder):
            raise ValueError(f"decoder: expected at least one entry per encoder level "
                             f"({len(encoder)}), got {len(decoder)}: {decoder}")
        self.down = nn.ModuleList()
        prev = in_channels
        for nf in encoder:
            self.down.append(conv_block(nd, prev, nf))
            prev = nf
        self.up = nn.ModuleList()
        for level, nf in enumerate(decoder[:len(encoder)]):
            self.up.append(conv_block(nd, prev, nf))
            prev = nf + encoder[-1 - level]  # after concatenating the skip connection
        self.extra = nn.ModuleList()
        for nf in decoder[len(encoder):]:
            self.extra.append(conv_block(nd, prev, nf))
            prev = nf
        self.out = conv(nd, prev, out_channels, kernel_size=1) if out_channels else None
        self.out_features = out_channels or prev
        self.multiple = 2 ** len(encoder)
        self._pool = getattr(F, f"max_pool{nd}d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On the CPU: channels-last layout, in which oneDNN's convolutions and
        # transposed convolutions need no reorders (forward and backward about 20%
        # faster at 256x256, and the decoder's transposed convolutions twice as fast
        # at 80x96x112). The result comes back in the caller's layout.
        given, x = x, cpu_channels_last(x)
        relayout = x is not given
        # pad to a multiple of 2**levels so that every pooling halves exactly
        x, region = pad_to_multiple(x, self.multiple)
        skips = []
        # encoder: convolve, keep the skip, halve
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self._pool(x, 2)
        # decoder: each level convolves the level below, doubled and beside that
        # level's skip (ConvBlock: without building the doubled map)
        for level, block in enumerate(self.up):
            x = block(x) if level == 0 else block(x, skip)
            skip = skips.pop()
        if self.extra:
            x = self.extra[0](x, skip)
            for block in self.extra[1:]:
                x = block(x)
        else:
            x = torch.cat([upsample(x), skip], dim=1)
        if self.out is not None:
            x = pointwise(self.out, x)
        # back to the input's size (and layout)
        x = crop(x, region)
        return x.contiguous() if relayout else x


@register("unet")
class VoxelMorph(Registration):
    """VoxelMorph: the U-Net above, a flow head, optional integration, a warp.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
        Channels of each image (the U-Net sees both: ``2 * in_channels``).
    encoder, decoder, out_channels
        See :class:`UNet`; the defaults are VoxelMorph's (327,331 parameters in 3D).
    integrate_steps : int
        0 (VoxelMorph) or e.g. 7 (VoxelMorph-diff: the head predicts a velocity
        field, integrated by scaling and squaring; ``output.velocity`` holds it).

    Notes
    -----
    voxelmorph 0.3.4's ``VxmPairwise`` builds on neurite's ``BasicUNet``, which
    cannot add full-resolution convolutions after the last skip; it ends with a
    1x1 convolution to ``ndim`` channels and a 3x3 ``ndim -> ndim`` flow layer.
    ``VxmPairwise(nb_features=[[16, 32, 32, 32], [32, 32, 32, 32]])`` has
    exactly the layers of ``VoxelMorph(decoder=(32, 32, 32, 32, 32),
    out_channels=ndim)`` (305,609 parameters in 3D); it uses ReLU and linear
    upsampling where this model uses LeakyReLU(0.2) and nearest upsampling.

    Convention: ``forward(moving, fixed)`` returns a
    :class:`~regedu.nets.RegistrationOutput`; ``disp`` pulls ``moving`` onto
    the fixed grid, in voxels, channels in tensor-axis order.

    >>> model = VoxelMorph(spatial_dims=2)
    >>> out = model(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45))
    >>> out.disp.shape, bool(out.disp.abs().max() < 1e-2)
    (torch.Size([1, 2, 37, 45]), True)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1,
                 encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 32, 16, 16),
                 out_channels: int | None = None, integrate_steps: int = 0):
        check_positive(in_channels, "in_channels", integer=True)
        backbone = UNet(spatial_dims, 2 * in_channels, encoder, decoder, out_channels)
        super().__init__(backbone, spatial_dims, in_channels, integrate_steps=integrate_steps)
        self.config = make_config("unet", spatial_dims=spatial_dims, in_channels=in_channels,
                                  encoder=encoder, decoder=decoder, out_channels=out_channels,
                                  integrate_steps=integrate_steps)
