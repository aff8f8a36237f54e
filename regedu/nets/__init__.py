"""Registration networks: VoxelMorph U-Net, V-Net, VV-Net, TransMorph, affine, cascades, pyramids.

Every model is an ``nn.Module`` with ``forward(moving, fixed)`` (both
``(B, C, *spatial)``) returning a :class:`RegistrationOutput`, keeps its
constructor arguments in ``model.config`` and is rebuilt by
:func:`from_config`. Registry names: ``"unet"``, ``"vnet"``, ``"vvnet"``,
``"affine"``, ``"affine_unet"``, ``"cascade"``, ``"pyramid"``, ``"rescaled"``
(any of them run on a coarser grid than its inputs), ``"transmorph"``.

>>> from regedu import nets
>>> model = nets.create("unet", spatial_dims=2)
>>> nets.from_config(model.config).config == model.config
True
"""
from ._base import Registration, RegistrationOutput, available_models, create, from_config
from .affine import AffineNet, AffineThenDeformable
from .cascade import Cascade
from .pyramid import PyramidNet
from .rescaled import Rescaled
from .transmorph import TransMorph
from .summary import Summary, inference_bytes, summary
from .unet import UNet, VoxelMorph
from .vnet import VNet, VNetRegistration
from .vvnet import VVNet

__all__ = ["RegistrationOutput", "Registration", "create", "from_config", "available_models",
           "UNet", "VoxelMorph", "VNet", "VNetRegistration", "VVNet", "AffineNet",
           "AffineThenDeformable", "Cascade", "PyramidNet", "Rescaled", "TransMorph", "summary", "Summary",
           "inference_bytes"]
