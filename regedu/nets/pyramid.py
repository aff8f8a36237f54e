"""A pyramid registration network in the spirit of Dual-PRNet.

Reference: Hu et al., "Dual-Stream Pyramid Registration Network", MICCAI 2019,
doi:10.1007/978-3-030-32245-8_43. This is the idea (two feature pyramids, one
residual field per level, coarse to fine), not a reproduction.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_positive
from ..spatial import compose, resize_field, warp
from ._base import (RegistrationOutput, check_features, check_pair, check_spatial_dims, conv_block,
                    crop, flow_head, make_config, pad_to_multiple, register)

__all__ = ["PyramidNet"]


@register("pyramid")
class PyramidNet(nn.Module):
    """Dual-stream feature pyramids and a field refined level by level.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
        Channels of each image.
    features : sequence of int
        Channels of the pyramid levels, full resolution first; each further
        level halves the size (stride-2 convolution).

    Notes
    -----
    * Dual stream: one encoder (shared weights) turns the moving and the fixed
      image *separately* into feature pyramids, unlike U-Nets that see the
      concatenated pair from the first layer.
    * Coarsest level: a head predicts a field from both images' features.
    * Each finer level: the field so far is upsampled (values rescaled), the
      moving features are warped by it, a head predicts a residual field from
      the warped moving and the fixed features, and the field becomes
      ``compose(field, residual)``.
    * ``stages``: the field after each level, coarse to fine, at full
      resolution (the last one is ``disp``); ``deep`` empty; ``velocity`` None.

    Inputs are zero-padded to a multiple of ``2**(levels - 1)`` and cropped back.

    >>> out = PyramidNet(2)(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45))
    >>> out.disp.shape, len(out.stages)
    (torch.Size([1, 2, 37, 45]), 5)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1,
                 features=(16, 32, 32, 32, 32)):
        super().__init__()
        nd = self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = check_positive(in_channels, "in_channels", integer=True)
        features = check_features(features, "features")
        self.encoder = nn.ModuleList()
        prev = in_channels
        for level, nf in enumerate(features):
            stride = 1 if level == 0 else 2
            self.encoder.append(nn.Sequential(conv_block(nd, prev, nf, stride=stride),
                                              conv_block(nd, nf, nf)))
            prev = nf
        self.heads = nn.ModuleList(nn.Sequential(conv_block(nd, 2 * nf, nf), flow_head(nd, nf))
                                   for nf in features)
        self.multiple = 2 ** (len(features) - 1)
        self.config = make_config("pyramid", spatial_dims=spatial_dims, in_channels=in_channels,
                                  features=features)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        fixed = check_pair(moving, fixed, self.spatial_dims, self.in_channels)
        B = moving.shape[0]
        x, region = pad_to_multiple(torch.cat([moving, fixed], dim=0), self.multiple)
        # dual stream: one encoder, run on moving and fixed as one batch
        pyramid = []
        for level in self.encoder:
            x = level(x)
            pyramid.append((x[:B], x[B:]))
        # coarse to fine: upsample the field, warp the moving features, add a residual
        disp, fields = None, []
        for (fm, ff), head in zip(reversed(pyramid), reversed(self.heads)):
            if disp is None:
                disp = head(torch.cat([fm, ff], dim=1))
            else:
                disp = resize_field(disp, fm.shape[2:])
                disp = compose(disp, head(torch.cat([warp(fm, disp), ff], dim=1)))
            fields.append(disp)
        size = pyramid[0][0].shape[2:]
        stages = [crop(resize_field(u, size), region) for u in fields[:-1]] + [crop(disp, region)]
        return RegistrationOutput(warp(moving, stages[-1]), stages[-1], stages, [], None)
