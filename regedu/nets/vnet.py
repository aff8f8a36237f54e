"""A two-level V-Net (residual units, strided convolutions, upsampling), as in VV-Net.

Reference: Milletari et al., "V-Net: Fully Convolutional Neural Networks for
Volumetric Medical Image Segmentation", 3DV 2016, doi:10.1109/3DV.2016.79; the
two-level layout is VV-Net's (see :mod:`regedu.nets.vvnet`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_positive
from ._base import (Registration, check_features, check_spatial_dims, conv, conv_block, crop,
                    make_config, pad_to_multiple, register, upsample)

__all__ = ["ResidualUnit", "VNet", "VNetRegistration"]


class ResidualUnit(nn.Module):
    """Two convolutions and a shortcut: ``act(conv(act(conv(x))) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 convolution when the channel count
    changes.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_block(spatial_dims, in_channels, out_channels),
                                  conv(spatial_dims, out_channels, out_channels))
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else conv(spatial_dims, in_channels, out_channels, kernel_size=1))
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class VNet(nn.Module):
    """Two-level V-Net backbone, 2D or 3D, for any input size.

    Layout (VV-Net, section 1.1), with ``features = (c0, c1, c2)``:

    ========== ======================================================= ==========
    stage      layers                                                  resolution
    ========== ======================================================= ==========
    enc1       3x3 conv -> c0                                          1
    down1      stride-2 3x3 conv -> c1                                 1/2
    enc2       residual unit (two convs)                               1/2
    down2      stride-2 3x3 conv -> c2                                 1/4
    bottleneck residual unit (two convs)                               1/4
    dec2       upsample, concatenate enc2, residual unit -> c1         1/2
    dec1       upsample, concatenate enc1, 3x3 conv -> c0              1
    ========== ======================================================= ==========

    The skip connections (concatenation) are V-Net's; the paper does not list
    them but draws a V-Net. ``encode``, ``bottleneck`` and ``decode`` are
    separate so that VV-Net can tap the bottleneck and the stage features.
    Inputs are zero-padded to a multiple of 4 and the output cropped back (the
    two strided convolutions halve the size twice; see :class:`UNet` for why
    "sizes must be divisible by 2**levels" is a trap).

    >>> VNet(2, in_channels=2)(torch.zeros(1, 2, 37, 45)).shape
    torch.Size([1, 16, 37, 45])
    """

    multiple = 4

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, features=(16, 32, 64)):
        super().__init__()
        nd = check_spatial_dims(spatial_dims)
        c0, c1, c2 = check_features(features, "features", length=3)
        self.enc1 = conv_block(nd, in_channels, c0)
        self.down1 = conv_block(nd, c0, c1, stride=2)
        self.enc2 = ResidualUnit(nd, c1, c1)
        self.down2 = conv_block(nd, c1, c2, stride=2)
        self.bottleneck = ResidualUnit(nd, c2, c2)
        self.dec2 = ResidualUnit(nd, c2 + c1, c1)
        self.dec1 = conv_block(nd, c1 + c0, c0)
        self.out_features = c0
        #: channels of the features ``decode`` returns, coarsest (bottleneck) first
        self.stage_features = (c2, c1, c0)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Skip features ``[enc1, enc2]`` and the bottleneck's input (1/4).

        ``x``'s spatial sizes must be multiples of 4 (``forward`` pads them).
        """
        e1 = self.enc1(x)
        e2 = self.enc2(self.down1(e1))
        return [e1, e2], self.down2(e2)

    def decode(self, b: torch.Tensor, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Features at 1/4 (the bottleneck's output ``b``), 1/2 and 1, coarsest first."""
        e1, e2 = skips
        d2 = self.dec2(torch.cat([upsample(b), e2], dim=1))
        d1 = self.dec1(d2, e1)
        return [b, d2, d1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, region = pad_to_multiple(x, self.multiple)
        skips, z = self.encode(x)
        return crop(self.decode(self.bottleneck(z), skips)[-1], region)


@register("vnet")
class VNetRegistration(Registration):
    """A single V-Net as a registration model (backbone, flow head, integration, warp).

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
        Channels of each image.
    features : (c0, c1, c2)
        Channels at full, half and quarter resolution (see :class:`VNet`).
    integrate_steps : int
        As :class:`~regedu.nets.Registration`.

    >>> out = VNetRegistration(2)(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45))
    >>> out.warped.shape
    torch.Size([1, 1, 37, 45])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, features=(16, 32, 64),
                 integrate_steps: int = 0):
        check_positive(in_channels, "in_channels", integer=True)
        super().__init__(VNet(spatial_dims, 2 * in_channels, features), spatial_dims, in_channels,
                         integrate_steps=integrate_steps)
        self.config = make_config("vnet", spatial_dims=spatial_dims, in_channels=in_channels,
                                  features=features, integrate_steps=integrate_steps)
