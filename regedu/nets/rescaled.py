"""Run a registration model on a coarser grid than its inputs.

A network trained on 4 mm volumes (40x48x56) has learned motions of so many
*voxels* at that spacing; fed 2 mm volumes directly, every motion is twice as
many voxels and every feature twice as small, so its weights no longer fit.
``Rescaled`` keeps the network on the grid it knows: it block-averages both
images by ``factor``, predicts there, and brings the field back to the input
grid. VoxelMorph's diffeomorphic model does the same inside (its field lives at
half resolution); brain deformations between subjects are smooth, so little is
lost, and inference is ``factor ** ndim`` times cheaper.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_positive
from ..spatial import warp
from ._base import RegistrationOutput, check_pair, create, from_config, make_config, register

__all__ = ["Rescaled"]


@register("rescaled")
class Rescaled(nn.Module):
    """``model`` applied on the input grid coarsened ``factor`` times.

    Parameters
    ----------
    model : nn.Module, dict or str
        A registration model, its ``config`` (to rebuild it: this is how a
        checkpoint of a ``Rescaled`` model is loaded), or a registry name, built
        with ``spatial_dims`` and ``in_channels`` (``regedu train --model
        rescaled --model-arg model=unet --model-arg factor=4``).
    factor : int
        Coarsening per axis; every spatial size of the inputs must be a multiple.
    spatial_dims, in_channels : int, optional
        Checked against the model's when given (so that a ``Rescaled`` model
        can be a :class:`~regedu.nets.Cascade` stage, ``stage="rescaled"``).

    Notes
    -----
    Coarse voxel ``i`` is the mean of fine voxels ``f i .. f i + f - 1`` (its
    centre at fine position ``f i + (f - 1) / 2``). Linear upsampling with
    ``align_corners=False`` and scale ``f`` inverts exactly that mapping, and a
    displacement of ``d`` coarse voxels is ``f d`` fine voxels. The moving image
    is warped once, at full resolution, by the upsampled field; ``stages`` and
    ``deep`` are the inner model's, upsampled the same way.

    >>> from regedu import nets
    >>> coarse = nets.create("unet", spatial_dims=2)
    >>> out = Rescaled(coarse, 2)(torch.rand(1, 1, 64, 48), torch.rand(1, 1, 64, 48))
    >>> tuple(out.disp.shape)
    (1, 2, 64, 48)
    """

    def __init__(self, model, factor: int = 2, spatial_dims: int | None = None,
                 in_channels: int | None = None):
        super().__init__()
        if isinstance(model, str):
            model = create(model, spatial_dims=3 if spatial_dims is None else spatial_dims,
                           in_channels=1 if in_channels is None else in_channels)
        if isinstance(model, dict):
            model = from_config(model)
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model: expected a regedu registration model (or its config dict), "
                            f"got {type(model).__name__}")
        self.model = model
        self.factor = check_positive(factor, "factor", integer=True)
        self.spatial_dims = model.config.get("spatial_dims", 3)
        self.in_channels = model.config.get("in_channels", 1)
        for name, given, own in (("spatial_dims", spatial_dims, self.spatial_dims),
                                 ("in_channels", in_channels, self.in_channels)):
            if given is not None and given != own:
                raise ValueError(f"{name}: the wrapped model has {name}={own}, got {given}")
        self.config = make_config("rescaled", model=model.config, factor=factor)

    def _up(self, field: torch.Tensor) -> torch.Tensor:
        mode = "bilinear" if field.dim() == 4 else "trilinear"
        return F.interpolate(field, scale_factor=self.factor, mode=mode,
                             align_corners=False) * self.factor

    def coarsen(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (B, C, *spatial) averaged down by ``factor``: what the wrapped model sees."""
        f = self.factor
        if any(n % f for n in image.shape[2:]):
            raise ValueError(f"moving and fixed: every spatial size must be a multiple of "
                             f"factor={f} to coarsen the grid, got {tuple(image.shape[2:])}; "
                             f"pad or crop the images (or use factor=1)")
        if f == 1:
            return image
        pool = F.avg_pool2d if image.dim() == 4 else F.avg_pool3d
        return pool(image, f)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        fixed = check_pair(moving, fixed, self.spatial_dims, self.in_channels)
        if self.factor == 1:
            return self.model(moving, fixed)
        out = self.model(self.coarsen(moving), self.coarsen(fixed))
        disp = self._up(out.disp)
        return RegistrationOutput(warp(moving, disp), disp, [self._up(s) for s in out.stages],
                                  [self._up(d) for d in out.deep],
                                  None if out.velocity is None else self._up(out.velocity))
