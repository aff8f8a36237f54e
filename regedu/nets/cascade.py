"""Recursive cascaded networks (RCN): register, warp, register again.

Reference: Zhao et al., "Recursive Cascaded Networks for Unsupervised Medical
Image Registration", ICCV 2019, doi:10.1109/ICCV.2019.01070.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_positive
from ..spatial import compose, warp
from ._base import RegistrationOutput, check_spatial_dims, create, make_config, register

__all__ = ["Cascade"]


@register("cascade")
class Cascade(nn.Module):
    """``n_stages`` registration networks applied one after the other.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
    n_stages : int
        Number of stages built (and used by default).
    shared : bool
        True: one network applied ``n`` times (shared weights; any number of
        recursions at test time). False: ``n_stages`` separate networks.
    stage : str
        Registry name of each stage (``"unet"``, ``"vnet"``, ``"affine"``, ...).
    stage_kwargs : dict or None
        Further arguments of each stage (e.g. ``{"encoder": [8, 16, 16, 16]}``).

    Notes
    -----
    Stage ``k`` registers the current warped image to the fixed image and
    predicts ``u_k``; the total field becomes ``compose(total, u_k)`` (the
    previous field first, then ``u_k``), and the *original* moving image is
    warped by the total field. Warping the warped image again would
    interpolate ``n`` times and blur it; composing fields interpolates the
    smooth fields instead, and the image once.

    ``stages`` holds the per-stage fields ``[u_1, ..., u_n]`` (each relative to
    the previous stage's output); ``disp`` is their composition. ``deep`` is
    empty and ``velocity`` None (RCN supervises the final warped image).

    >>> model = Cascade(spatial_dims=2, n_stages=2, shared=True)
    >>> out = model(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45), n_stages=3)
    >>> len(out.stages)
    3
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, n_stages: int = 3,
                 shared: bool = False, stage: str = "unet", stage_kwargs: dict | None = None):
        super().__init__()
        check_spatial_dims(spatial_dims)
        self.n_stages = check_positive(n_stages, "n_stages", integer=True)
        if not isinstance(shared, bool):
            raise TypeError(f"shared: expected True or False, got {shared!r}")
        if stage == "cascade":
            raise ValueError("stage: a cascade of cascades is a longer cascade; raise n_stages")
        stage_kwargs = dict(stage_kwargs or {})
        for key in ("spatial_dims", "in_channels"):
            if key in stage_kwargs:
                raise ValueError(f"stage_kwargs: {key!r} is the cascade's own argument (every "
                                 f"stage shares it); pass {key}= to Cascade instead")
        self.shared = shared
        self.stages = nn.ModuleList(
            create(stage, spatial_dims=spatial_dims, in_channels=in_channels, **stage_kwargs)
            for _ in range(1 if shared else n_stages))
        self.config = make_config("cascade", spatial_dims=spatial_dims, in_channels=in_channels,
                                  n_stages=n_stages, shared=shared, stage=stage,
                                  stage_kwargs=stage_kwargs)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor,
                n_stages: int | None = None) -> RegistrationOutput:
        """Register with ``n_stages`` recursions (default: as built; more only if shared)."""
        n = self.n_stages if n_stages is None else check_positive(n_stages, "n_stages",
                                                                   integer=True)
        if not self.shared and n > len(self.stages):
            raise ValueError(f"n_stages: this cascade has {len(self.stages)} separate stages, got "
                             f"n_stages={n}; extra recursions at test time need shared=True")
        warped, disp, fields = moving, None, []
        for k in range(n):
            # each stage registers the current warped image to the fixed image
            out = self.stages[0 if self.shared else k](warped, fixed)
            fields.append(out.disp)
            if disp is None:
                disp, warped = out.disp, out.warped
            else:
                disp = compose(disp, out.disp)
                # one interpolation of the original moving image by the total field
                warped = warp(moving, disp)
        return RegistrationOutput(warped, disp, fields, [], None)
