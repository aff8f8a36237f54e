"""Networks that learn from fields: regression on classical registrations and on known velocities.

Two supervised recipes of MICCAI 2017, and the objective of an unsupervised one
that needs a per-pair mask:

- **Cao et al. 2017** (similarity-steered CNN regression): register the
  training pairs with a classical method (:func:`classical_targets`), then
  train a network to regress those fields (``regedu.train.fit`` with the
  ``"field"`` term). The network also reads *similarity maps* of the pair at
  several scales (:func:`similarity_maps`, :class:`SimilarityInput`,
  :func:`similarity_steered_net`), the cue that steers its regression.
- **SVF-Net** (Rohé et al. 2017): pairs made with a known stationary velocity
  field (:func:`velocity_pairs`), a network that predicts a velocity and
  integrates it by scaling and squaring (``integrate_steps > 0``), and a loss
  on the *velocity* (:func:`velocity_loss`).
- **Shan et al. 2017**: L2 photometric loss inside a region of interest plus
  edge-aware smoothness (:func:`shan_loss`), the mask being the pair's own.

The last two compare with data that ``regedu.train.fit`` does not carry (a
velocity, a mask per pair), so :func:`fit_objective` trains any model on any
``objective(output, batch)``.

Convention: images ``(B, C, *spatial)``, displacements and velocities
``(B, ndim, *spatial)`` in voxels, ``warped(x) = moving(x + u(x))`` (see
docs/conventions.md, "Conventions").
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from ._checks import as_tensor, check_choice, check_image, check_positive, check_same_shape
from .classic import ants_syn, instance_optimisation
from .losses import edge_aware_smoothness, field_mse, mse
from .nets import Registration, UNet
from .spatial import gaussian_blur, integrate_velocity, random_field, warp
from .train import NonFiniteLoss, optimizer_step, seed_everything

__all__ = ["classical_targets", "similarity_maps", "SimilarityInput", "similarity_steered_net",
           "velocity_pairs", "velocity_loss", "shan_loss", "fit_objective"]


# ---------------------------------------------------------------- Cao et al. 2017

def classical_targets(moving, fixed, *, method: str = "instance", **options) -> tuple[torch.Tensor, float]:
    """Register training pairs with a classical method: the regression targets of Cao et al.

    Parameters
    ----------
    moving, fixed : Tensor, shape (B, 1, *spatial)
    method : {"instance", "syn"}
        ``"instance"``: :func:`regedu.classic.instance_optimisation` on the
        whole batch (pairs do not interact: Adam scales each voxel's step on
        its own); ``"syn"``: ANTs SyN (:func:`regedu.classic.ants_syn`), pair
        by pair (needs antspyx), one of the methods Cao et al. compare with.
    **options
        Passed to the method (``similarity``, ``weight``, ``levels``, ``iterations``...).

    Returns
    -------
    disp : Tensor, shape (B, ndim, *spatial)
        The fields, detached: train a network on ``{"moving", "fixed", "disp"}``
        with ``losses={"field": 1.0}``.
    seconds_per_pair : float
        Wall-clock time of the classical method per pair, the cost a network replaces.
    """
    check_choice(method, ("instance", "syn"), "method")
    moving, fixed = as_tensor(moving, "moving"), as_tensor(fixed, "fixed")
    check_image(moving, "moving")
    check_image(fixed, "fixed")
    check_same_shape(moving, fixed, ("moving", "fixed"))
    start = time.perf_counter()
    if method == "instance":
        options.setdefault("progress", False)
        disp = instance_optimisation(moving, fixed, **options).disp
    else:
        disp = ants_syn(moving, fixed, **options)
    return disp.detach(), (time.perf_counter() - start) / moving.shape[0]


def similarity_maps(moving, fixed, sigmas=(1.0, 2.0, 4.0, 8.0)) -> torch.Tensor:
    """Local dissimilarity of a pair at several scales: Cao et al.'s similarity maps.

    Map ``k`` is the squared intensity difference averaged by a Gaussian window
    of ``sigmas[k]`` voxels (0 where the images agree around a voxel, large
    where they do not). Cao et al. compute such maps with four kernel sizes and
    feed them to the regression network beside the images, so that the size of
    the window is not a choice the network depends on.

    Parameters
    ----------
    moving, fixed : Tensor, shape (B, C, *spatial)
    sigmas : sequence of float
        Window widths in voxels.

    Returns
    -------
    Tensor, shape (B, len(sigmas), *spatial), mean over the image channels.
    """
    moving, fixed = as_tensor(moving, "moving"), as_tensor(fixed, "fixed")
    check_image(moving, "moving")
    check_image(fixed, "fixed")
    check_same_shape(moving, fixed, ("moving", "fixed"))
    if not sigmas:
        raise ValueError("sigmas: expected at least one window width, got an empty sequence")
    difference = (fixed - moving).square().mean(1, keepdim=True)
    return torch.cat([gaussian_blur(difference, check_positive(s, "sigmas")) for s in sigmas], 1)


class SimilarityInput(nn.Module):
    """A backbone that reads a pair *and* its similarity maps (Cao et al. 2017).

    ``forward(x)`` takes the concatenated pair ``(B, 2C, *spatial)`` (moving
    first, as :class:`regedu.nets.Registration` passes it), appends
    :func:`similarity_maps` and runs ``backbone`` on the ``2C + len(sigmas)``
    channels. Put it in a ``Registration`` (see :func:`similarity_steered_net`).
    """

    def __init__(self, backbone: nn.Module, sigmas=(1.0, 2.0, 4.0, 8.0)):
        super().__init__()
        if not hasattr(backbone, "out_features"):
            raise TypeError(f"backbone: expected a module with an 'out_features' attribute, got "
                            f"{type(backbone).__name__}")
        self.backbone, self.sigmas = backbone, tuple(float(s) for s in sigmas)
        self.out_features = backbone.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moving, fixed = x.chunk(2, dim=1)
        return self.backbone(torch.cat([x, similarity_maps(moving, fixed, self.sigmas)], 1))


def similarity_steered_net(spatial_dims: int = 2, *, sigmas=(1.0, 2.0, 4.0, 8.0),
                           integrate_steps: int = 0, **unet) -> Registration:
    """Cao et al.'s regression network: a U-Net on the pair and its similarity maps.

    ``unet`` holds :class:`regedu.nets.UNet`'s ``encoder``/``decoder``. Output
    as every regedu model: ``forward(moving, fixed) -> RegistrationOutput``.
    """
    backbone = UNet(spatial_dims, in_channels=2 + len(sigmas), **unet)
    return Registration(SimilarityInput(backbone, sigmas), spatial_dims, integrate_steps=integrate_steps)


# ---------------------------------------------------------------- SVF-Net

def velocity_pairs(images, n: int, *, amplitude: float, points=5, steps: int = 7, seg=None,
                   seed: int = 0) -> dict:
    """Pairs made with a known stationary velocity field: SVF-Net's training data.

    Pair ``i`` takes ``images[i % len(images)]`` as the moving image, draws a
    smooth velocity ``v`` (:func:`regedu.spatial.random_field`, cubic, with
    ``amplitude`` voxels at ``points`` control points per axis), integrates it,
    ``u = exp(v)`` (:func:`regedu.spatial.integrate_velocity`, ``steps``
    squarings), and makes ``fixed = warp(moving, u)``. So ``u`` is exactly the
    field that registers the pair, and ``v`` its velocity.

    Parameters
    ----------
    images : Tensor, shape (N, C, *spatial)
    n : int
    amplitude : float
    points : int or sequence of int
    steps : int
    seg : Tensor, shape (N, 1, *spatial), integer, optional
        Label maps of ``images``, warped with nearest neighbour into ``fixed_seg``.
    seed : int

    Returns
    -------
    dict of Tensor
        ``moving``, ``fixed``, ``velocity``, ``disp`` (and ``moving_seg``,
        ``fixed_seg``), each with ``n`` items.
    """
    images = as_tensor(images, "images")
    check_image(images, "images")
    check_positive(n, "n", integer=True)
    check_positive(amplitude, "amplitude")
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(n) % images.shape[0]
    moving = images[index]
    velocity = torch.cat([random_field(images.shape[2:], amplitude, points, cubic=True, seed=g)
                          for _ in range(n)])
    disp = integrate_velocity(velocity, steps)
    out = dict(moving=moving, fixed=warp(moving, disp), velocity=velocity, disp=disp)
    if seg is not None:
        seg = as_tensor(seg, "seg")[index]
        out.update(moving_seg=seg, fixed_seg=warp(seg, disp, mode="nearest"))
    return out


def velocity_loss(output, batch: Mapping) -> torch.Tensor:
    """SVF-Net's loss: mean squared error of the predicted velocity against ``batch["velocity"]``."""
    if output.velocity is None:
        raise ValueError("output: the model predicts no velocity; build it with integrate_steps > 0 "
                         "(e.g. nets.create('unet', spatial_dims=2, integrate_steps=7))")
    if "velocity" not in batch:
        raise ValueError("batch: expected a 'velocity' (the known velocity of each pair, as "
                         "velocity_pairs makes)")
    return field_mse(output.velocity, batch["velocity"])


# ---------------------------------------------------------------- Shan et al. 2017

def shan_loss(output, batch: Mapping, *, weight: float = 1.0, alpha: float = 1.0,
              mask_key: str = "fixed_mask") -> torch.Tensor:
    """Shan et al. 2017's objective: L2 photometric loss in the ROI + edge-aware smoothness.

    ``mse(fixed, warped, mask=batch[mask_key]) + weight *
    edge_aware_smoothness(disp, fixed, alpha)``: the photometric loss ignores
    what lies outside the region of interest (the black surround of a fundus
    photograph), and the field may bend where the fixed image has edges.
    Without ``mask_key`` in the batch the whole image counts.
    """
    if not weight >= 0:
        raise ValueError(f"weight: expected a smoothness weight >= 0, got {weight!r}")
    mask = batch.get(mask_key)
    fixed = batch["fixed"]
    if mask is not None:
        mask = as_tensor(mask, mask_key).to(fixed.dtype)
    photometric = mse(fixed, output.warped, mask=mask)
    return photometric + weight * edge_aware_smoothness(output.disp, fixed, alpha=alpha)


# ---------------------------------------------------------------- training on any objective

def _check_data(data, name: str) -> int:
    if not isinstance(data, Mapping) or "moving" not in data or "fixed" not in data:
        got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{name}: expected a dict with 'moving' and 'fixed' tensors, got {got}")
    n = data["moving"].shape[0]
    for key, value in data.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != n:
            raise ValueError(f"{name}[{key!r}]: expected a tensor with {n} items like 'moving', got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    return n


def fit_objective(model: nn.Module, data: Mapping, objective: Callable, *, steps: int, lr: float = 1e-3,
                  batch_size: int = 4, seed: int = 0, grad_clip: float | None = None,
                  val_data: Mapping | None = None, val_every: int | None = None) -> dict:
    """Train ``model`` with Adam on ``objective(output, batch)``; return the history.

    ``regedu.train.fit`` carries the keys that its terms read (images, label
    maps, ``disp``); this loop carries every key of ``data``, so an objective
    may compare with a velocity (:func:`velocity_loss`) or use a mask per pair
    (:func:`shan_loss`).

    Parameters
    ----------
    model : nn.Module
        ``forward(moving, fixed) -> RegistrationOutput``; trained in place.
    data : dict of Tensor
        ``moving``, ``fixed`` and whatever ``objective`` reads, each with the
        same number of items; each pass draws them in a new (seeded) order.
    objective : callable (output, batch) -> scalar Tensor
    steps, lr, batch_size, seed, grad_clip
        As for ``regedu.train.fit``.
    val_data : dict of Tensor, optional
        Scored with ``objective`` (one batch, no gradient) every ``val_every``
        steps (default a tenth of the run) and at the end.

    Returns
    -------
    dict
        ``"train"``: the loss of each step; ``"val_step"`` and ``"val"``: the
        steps validated and their losses (empty without ``val_data``).
    """
    n = _check_data(data, "data")
    if val_data is not None:
        _check_data(val_data, "val_data")
    check_positive(steps, "steps", integer=True)
    check_positive(batch_size, "batch_size", integer=True)
    val_every = check_positive(val_every or max(1, steps // 10), "val_every", integer=True)
    seed_everything(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    history = {"train": [], "val_step": [], "val": []}
    for step in range(1, steps + 1):
        model.train()
        while len(order) < batch_size:          # passes over the data, each in a new order
            order = torch.cat([order, torch.randperm(n, generator=g)])
        pick, order = order[:batch_size], order[batch_size:]
        batch = {k: v[pick] for k, v in data.items()}
        loss = objective(model(batch["moving"], batch["fixed"]), batch)
        try:
            optimizer_step(model.parameters(), optimizer, {"loss": loss}, grad_clip=grad_clip)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(e.values, step=step) from None
        history["train"].append(float(loss.detach()))
        if val_data is not None and (step % val_every == 0 or step == steps):
            model.eval()
            with torch.no_grad():
                history["val"].append(float(objective(model(val_data["moving"], val_data["fixed"]), val_data)))
            history["val_step"].append(step)
    model.eval()
    return history
