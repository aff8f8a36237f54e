"""An affine registration network, and the survey's affine-then-deformable pipeline."""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_positive
from ..spatial import affine_to_displacement, compose, warp
from ._base import (RegistrationOutput, check_features, check_pair, check_spatial_dims, conv_block,
                    make_config, register)
from .unet import VoxelMorph

__all__ = ["AffineNet", "AffineThenDeformable"]


@register("affine")
class AffineNet(nn.Module):
    """Predict an affine transform from a pair; exactly the identity at initialisation.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
        Channels of each image.
    features : sequence of int
        Channels of the stride-2 convolutions of the encoder; global average
        pooling then makes the network work for any input size.

    Notes
    -----
    The last layer (zero weights and bias) outputs ``theta``, and the matrix is
    ``A = I + theta_A`` with translation ``t = theta_t * (n - 1) / 2``: the
    network predicts translations as fractions of the half-size, so one
    learning rate suits any image size. The matrix acts about the image centre
    (``affine_to_displacement(..., center="image")``), so rotations and scalings
    do not drag the image towards a corner.

    Convention: the fixed voxel ``x`` maps to ``A (x - c) + c + t`` in the moving
    image, tensor-axis order; ``forward`` returns the field of that map
    (``stages``, ``deep`` empty, ``velocity`` None).

    >>> net = AffineNet(spatial_dims=2)
    >>> net.matrix(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45))
    tensor([[[1., 0., 0.],
             [0., 1., 0.]]], grad_fn=<CatBackward0>)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, features=(16, 32, 64, 128)):
        super().__init__()
        nd = self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = check_positive(in_channels, "in_channels", integer=True)
        features = check_features(features, "features")
        layers, prev = [], 2 * in_channels
        for nf in features:
            layers.append(conv_block(nd, prev, nf, stride=2))
            prev = nf
        self.encoder = nn.Sequential(*layers)
        self.theta = nn.Linear(prev, nd * (nd + 1))
        nn.init.zeros_(self.theta.weight)
        nn.init.zeros_(self.theta.bias)
        self.config = make_config("affine", spatial_dims=spatial_dims, in_channels=in_channels,
                                  features=features)

    def matrix(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The predicted ``[A | t]``, shape (B, ndim, ndim + 1), in voxel units."""
        fixed = check_pair(moving, fixed, self.spatial_dims, self.in_channels)
        nd = self.spatial_dims
        feats = self.encoder(torch.cat([moving, fixed], dim=1)).flatten(2).mean(2)
        theta = self.theta(feats).view(-1, nd, nd + 1)
        eye = torch.eye(nd, device=theta.device, dtype=theta.dtype)
        half = torch.tensor([(n - 1) / 2 for n in moving.shape[2:]], device=theta.device,
                            dtype=theta.dtype)
        return torch.cat([eye + theta[:, :, :nd], (theta[:, :, nd] * half)[..., None]], dim=2)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        disp = affine_to_displacement(self.matrix(moving, fixed), moving.shape[2:], center="image")
        return RegistrationOutput(warp(moving, disp), disp, [], [], None)


@register("affine_unet")
class AffineThenDeformable(nn.Module):
    """The survey's pipeline: an affine network, then a deformable U-Net, then one warp.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
    affine_features : sequence of int
        :class:`AffineNet`'s encoder.
    encoder, decoder, integrate_steps
        The deformable stage, :class:`~regedu.nets.unet.VoxelMorph`.
    supervise_affine : bool
        True: the affine field is also returned in ``deep``, so the trainer
        makes the affine stage align the pair on its own (a true pre-alignment);
        False: only the final field is supervised.

    Notes
    -----
    The deformable stage registers the affinely warped image to the fixed
    image; the final field is ``compose(u_affine, u_deformable)`` and the
    *original* moving image is warped once by it (no double interpolation).
    ``stages = [u_affine, u_deformable]``; ``velocity`` is the deformable
    stage's velocity when it integrates one.

    >>> model = AffineThenDeformable(spatial_dims=2)
    >>> out = model(torch.rand(1, 1, 37, 45), torch.rand(1, 1, 37, 45))
    >>> len(out.stages), len(out.deep)
    (2, 1)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1,
                 affine_features=(16, 32, 64, 128), encoder=(16, 32, 32, 32),
                 decoder=(32, 32, 32, 32, 32, 16, 16), integrate_steps: int = 0,
                 supervise_affine: bool = True):
        super().__init__()
        self.affine = AffineNet(spatial_dims, in_channels, affine_features)
        self.deformable = VoxelMorph(spatial_dims, in_channels, encoder, decoder,
                                     integrate_steps=integrate_steps)
        self.supervise_affine = bool(supervise_affine)
        self.config = make_config("affine_unet", spatial_dims=spatial_dims,
                                  in_channels=in_channels, affine_features=affine_features,
                                  encoder=encoder, decoder=decoder,
                                  integrate_steps=integrate_steps,
                                  supervise_affine=supervise_affine)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        # affine stage on the raw pair
        a = self.affine(moving, fixed)
        # deformable stage on the affinely aligned image
        d = self.deformable(a.warped, fixed)
        # total field: the affine map first, then the deformable one; one warp of the original
        disp = compose(a.disp, d.disp)
        deep = [a.disp] if self.supervise_affine else []
        return RegistrationOutput(warp(moving, disp), disp, [a.disp, d.disp], deep, d.velocity)
