"""VV-Net: three V-Nets, coarse-to-fine registration with a deeper helper network.

Reference: the VV-Net paper (seed 000, "VV-Net based 3D medical image
registration"); docs/conventions.md ("VV-Net, from the paper") is our English reading of it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_positive
from ..spatial import compose as compose_fields
from ..spatial import resize_field, warp
from ._base import (RegistrationOutput, check_features, check_pair, check_spatial_dims, conv,
                    crop, flow_head, make_config, pad_to_multiple, register)
from .vnet import VNet

__all__ = ["VVNet"]


@register("vvnet")
class VVNet(nn.Module):
    """VV-Net, 2D or 3D, for any input size.

    Parameters
    ----------
    spatial_dims : {2, 3}
        3 in the paper (160x192x224 brains); 2 for teaching on slices.
    in_channels : int
        Channels of each image.
    features : (c0, c1, c2)
        Channels of V-Nets 1 and 2 at full, half and quarter resolution.
    deep_features : (c0, c1, c2)
        Channels of V-Net 3 at 1/4, 1/8 and 1/16.
    compose : bool
        True (default): the final field is ``compose(phi1, phi2)`` (warp by
        V-Net 1's field, then by V-Net 2's), since V-Net 2 registers the
        *already warped* image. False: the paper's literal reading, V-Net 2's
        field alone is the final field. The paper does not say which; composing
        is what recursive cascades do.

    Notes
    -----
    The paper (section 1.1), as built here:

    * V-Net 1 sees ``cat(M, F)`` and predicts ``phi1`` (coarse). Each V-Net is
      the two-level :class:`~regedu.nets.vnet.VNet` (stride-2 convolutions to
      1/2 and 1/4, residual units, upsampling back).
    * V-Net 3 grows out of V-Net 1's bottleneck: the same V-Net applied to the
      1/4-resolution bottleneck features, so its two strided convolutions reach
      1/8 and 1/16 and its two upsamplings come back to 1/4.
    * V-Net 2 sees ``cat(M(phi1), F)``; its encoder output (1/4) and V-Net 3's
      output are concatenated and fused (1x1 convolution) into V-Net 2's
      bottleneck. It predicts ``phi2`` (fine).
    * Deep supervision. Each V-Net predicts a field at each of its three
      decoder stages (a small flow head per stage). V-Net 1's three stage
      predictions, upsampled to full resolution, are summed into ``phi1``,
      which is returned in ``deep`` so that the trainer supervises V-Net 1
      directly. The six stage predictions of V-Net 3 (1/16, 1/8, 1/4) and
      V-Net 2 (1/4, 1/2, 1) are the input of the final layer (a 1x1
      convolution that starts as their sum), which gives ``phi2``; the loss on
      the final field reaches every stage through it.
    * ``stages = [phi1]``, ``deep = [phi1]``, ``velocity = None``.

    Inputs are zero-padded to a multiple of 16 (V-Net 3 reaches 1/16) and the
    fields cropped back; 160x192x224 needs no padding.

    Convention: ``forward(moving, fixed)`` returns a
    :class:`~regedu.nets.RegistrationOutput`; fields pull the moving image onto
    the fixed grid, in voxels, channels in tensor-axis order.

    >>> model = VVNet(spatial_dims=2)
    >>> out = model(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45))
    >>> out.disp.shape, len(out.deep), len(out.stages)
    (torch.Size([1, 2, 37, 45]), 1, 1)
    """

    multiple = 16

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, features=(16, 32, 64),
                 deep_features=(64, 64, 64), compose: bool = True):
        super().__init__()
        nd = self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = check_positive(in_channels, "in_channels", integer=True)
        features = check_features(features, "features", length=3)
        deep_features = check_features(deep_features, "deep_features", length=3)
        if not isinstance(compose, bool):
            raise TypeError(f"compose: expected True or False, got {compose!r}")
        self.compose = compose
        self.vnet1 = VNet(nd, 2 * in_channels, features)
        self.vnet2 = VNet(nd, 2 * in_channels, features)
        self.vnet3 = VNet(nd, features[2], deep_features)
        self.fuse = conv(nd, features[2] + deep_features[0], features[2], kernel_size=1)
        self.heads1 = nn.ModuleList(flow_head(nd, c) for c in self.vnet1.stage_features)
        self.heads2 = nn.ModuleList(flow_head(nd, c) for c in self.vnet2.stage_features)
        self.heads3 = nn.ModuleList(flow_head(nd, c) for c in self.vnet3.stage_features)
        self.final = conv(nd, 6 * nd, nd, kernel_size=1)
        with torch.no_grad():  # start as the plain sum of the six stage predictions
            self.final.weight.zero_()
            self.final.bias.zero_()
            for j in range(6):
                for k in range(nd):
                    self.final.weight[k, j * nd + k] = 1.0
        self.config = make_config("vvnet", spatial_dims=spatial_dims, in_channels=in_channels,
                                  features=features, deep_features=deep_features, compose=compose)

    def _predict(self, heads: nn.ModuleList, stages: list[torch.Tensor],
                 size) -> list[torch.Tensor]:
        # one field per decoder stage, each brought to full resolution (values rescaled)
        return [resize_field(head(s), size) for head, s in zip(heads, stages)]

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        fixed = check_pair(moving, fixed, self.spatial_dims, self.in_channels)
        m, region = pad_to_multiple(moving, self.multiple)   # pad once: every level halves exactly
        f, _ = pad_to_multiple(fixed, self.multiple)
        size = m.shape[2:]
        # V-Net 1: coarse field phi1 = sum of its stage predictions (1/4, 1/2, 1)
        skips1, z1 = self.vnet1.encode(torch.cat([m, f], dim=1))
        b1 = self.vnet1.bottleneck(z1)
        phi1 = torch.stack(self._predict(self.heads1, self.vnet1.decode(b1, skips1), size)).sum(0)
        # V-Net 3: grows from V-Net 1's bottleneck, 1/4 -> 1/8 -> 1/16 -> back to 1/4
        skips3, z3 = self.vnet3.encode(b1)
        stages3 = self.vnet3.decode(self.vnet3.bottleneck(z3), skips3)
        # V-Net 2: the moving image warped by phi1, against the fixed image
        skips2, z2 = self.vnet2.encode(torch.cat([warp(m, phi1), f], dim=1))
        # V-Net 3's features fused with V-Net 2's encoder output, into V-Net 2's bottleneck
        b2 = self.vnet2.bottleneck(self.fuse(torch.cat([z2, stages3[-1]], dim=1)))
        stages2 = self.vnet2.decode(b2, skips2)
        # final layer: the stage predictions of V-Net 3 and V-Net 2, fused into phi2
        preds = (self._predict(self.heads3, stages3, size)
                 + self._predict(self.heads2, stages2, size))
        phi2 = self.final(torch.cat(preds, dim=1))
        # final field: phi1 then phi2 (default), or phi2 alone (the paper's literal reading)
        disp = crop(compose_fields(phi1, phi2) if self.compose else phi2, region)
        phi1 = crop(phi1, region)
        return RegistrationOutput(warp(moving, disp), disp, [phi1], [phi1], None)
