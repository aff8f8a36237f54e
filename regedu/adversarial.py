"""Learned similarity and learned regularisers: a discriminator in the objective.

Two adversarial ideas of MICCAI 2018, on any ``regedu.nets`` registration model:

* **Adversarial similarity** (Fan et al., "Adversarial Similarity Network for
  Evaluating Image Alignment in Deep Learning Based Registration"): a
  discriminator learns whether a pair ``(fixed, warped)`` is well aligned, and
  the registration network is trained to make its pairs look aligned to it,
  with no hand-crafted similarity. Positives are well-aligned pairs: the fixed
  image with a *reference* image (:func:`reference_image`, a blend of the fixed
  image and the current warped moving image, as Fan et al. make theirs, or the
  moving image warped by a known true field); negatives are the network's own
  current pairs.
* **Adversarial deformation regularisation** (Hu et al., "Adversarial
  Deformation Regularization for Training Image Registration Neural
  Networks"): a discriminator learns to tell the network's displacement fields
  from plausible ones (Hu et al. simulate them with a biomechanical model; here
  :func:`plausible_fields` draws smooth diffeomorphisms), and its verdict
  regularises the network in place of, or beside, the diffusion term.

Both alternate two updates (:func:`adversarial_step`): the discriminator on
detached real and fake examples (:func:`discriminator_loss`), then the
registration network on the non-saturating generator loss (:func:`adversarial_loss`)
with the discriminator frozen, plus any ``regedu.losses`` terms.

Convention: images ``(B, C, *spatial)``; displacements ``(B, ndim, *spatial)``
in voxels, ``warped(x) = moving(x + u(x))`` (docs/conventions.md, Conventions).
Every loss is lower-is-better; a discriminator's logit is high for "real"
(aligned pair, plausible field).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_choice, check_field, check_image, check_positive
from .losses import loss_terms
from .nets._base import check_features, check_spatial_dims, conv, conv_block
from .spatial import gaussian_blur, integrate_velocity, random_field
from .train import optimizer_step

__all__ = ["Discriminator", "discriminator_loss", "adversarial_loss", "reference_image",
           "plausible_fields", "adversarial_step"]


class Discriminator(nn.Module):
    """A small convolutional critic: ``(B, C, *spatial)`` -> one logit per item.

    Strided convolutions (each halves the size, LeakyReLU(0.2) as
    ``regedu.nets``), a 1x1 convolution to one logit per location, averaged
    over the locations: a PatchGAN-style verdict, the mean of local verdicts,
    so it works at any input size and every region of the image counts.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
        2 * image channels for pairs (fixed and warped concatenated, as
        :func:`adversarial_step` feeds it with ``kind="similarity"``), or
        ``spatial_dims`` for displacement fields (``kind="deformation"``).
    features : sequence of int
        Channels of the strided convolutions, finest first.
    blur : float
        If positive, the input is first smoothed by a Gaussian of this sigma
        (voxels, :func:`regedu.spatial.gaussian_blur`). A discriminator learns
        the easiest cue that separates its classes, and for images warped by
        a true field against images the network barely moved, fine texture is
        one (interpolation smooths noise and edges); the network then learns
        to blur instead of to align. Smoothing both classes alike removes that
        cue and leaves the one that matters, alignment.

    Examples
    --------
    >>> d = Discriminator(2, in_channels=2)
    >>> d(torch.rand(3, 2, 40, 48)).shape
    torch.Size([3])
    >>> Discriminator(3, in_channels=3, features=(4, 8))(torch.rand(1, 3, 8, 8, 8)).shape
    torch.Size([1])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 2, features=(16, 32, 32), *,
                 blur: float = 0.0):
        super().__init__()
        if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not blur >= 0:
            raise ValueError(f"blur: expected a Gaussian sigma >= 0 in voxels (0: none), got {blur!r}")
        self.blur = float(blur)
        nd = check_spatial_dims(spatial_dims)
        self.spatial_dims = nd
        self.in_channels = check_positive(in_channels, "in_channels", integer=True)
        features = check_features(features, "features")
        layers, prev = [], in_channels
        for f in features:
            layers.append(conv_block(nd, prev, f, stride=2))
            prev = f
        self.body = nn.Sequential(*layers)
        self.head = conv(nd, prev, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, "x", spatial_dims=self.spatial_dims, channels=self.in_channels)
        if self.blur:
            x = gaussian_blur(x, self.blur)
        return self.head(self.body(x)).flatten(1).mean(1)


def _check_discriminator(discriminator):
    if not isinstance(discriminator, nn.Module):
        raise TypeError(f"discriminator: expected an nn.Module that maps (B, C, *spatial) to logits "
                        f"(B,), e.g. regedu.adversarial.Discriminator, got {type(discriminator).__name__}")


def _check_reduction(reduction):
    return check_choice(reduction, ("mean", "none"), "reduction")


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, *,
                       reduction: str = "mean") -> torch.Tensor:
    """The discriminator's binary cross-entropy: ``real`` should score high, ``fake`` low.

    ``softplus(-D(real)) + softplus(D(fake))``, averaged over each batch (the
    two batches may differ in size). Both inputs are detached: this loss trains
    the discriminator only. Lower is better; ``2 log 2 = 1.386`` is chance (a
    discriminator that answers 0 to everything).

    Parameters
    ----------
    discriminator : nn.Module
        ``(B, C, *spatial) -> (B,)`` logits.
    real, fake : Tensor, shape (B, C, *spatial)
        Examples of the two classes (aligned pairs or plausible fields; the
        registration network's pairs or fields).
    reduction : {"mean", "none"}
        ``"none"``: the two per-class means, stacked ``(2,)``.

    Examples
    --------
    >>> x = torch.rand(2, 1, 8, 8)
    >>> round(float(discriminator_loss(lambda x: torch.zeros(len(x)), x, x)), 3)  # a blind critic
    1.386
    """
    if not callable(discriminator):
        _check_discriminator(discriminator)
    for name, x in (("real", real), ("fake", fake)):
        check_image(x, name)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real and fake: expected the same channels and spatial size, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    _check_reduction(reduction)
    per_class = _per_class(discriminator(real.detach()), discriminator(fake.detach()))
    return per_class if reduction == "none" else per_class.sum()


def _per_class(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return torch.stack([F.softplus(-real_logits).mean(), F.softplus(fake_logits).mean()])


def adversarial_loss(discriminator: nn.Module, x: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """The generator's non-saturating loss ``softplus(-D(x))``: low when ``x`` looks real.

    With ``x = torch.cat([fixed, warped], 1)`` it is Fan et al.'s adversarial
    similarity (low when the discriminator takes the pair for aligned); with
    ``x = disp`` Hu et al.'s adversarial regulariser (low when it takes the
    field for a plausible one). Gradients flow into ``x`` (and so into the
    registration network) and, unless frozen, into the discriminator's
    weights: :func:`adversarial_step` freezes them for this term.

    Parameters
    ----------
    discriminator : nn.Module
    x : Tensor, shape (B, C, *spatial)
    reduction : {"mean", "none"}
        ``"none"``: one value per item ``(B,)``.

    Examples
    --------
    >>> fixed = torch.rand(2, 1, 16, 16)
    >>> critic = lambda x: -(x[:, :1] - x[:, 1:]).abs().flatten(1).mean(1) * 100  # "aligned" = equal
    >>> aligned = adversarial_loss(critic, torch.cat([fixed, fixed], 1))
    >>> shifted = adversarial_loss(critic, torch.cat([fixed, fixed.roll(3, -1)], 1))
    >>> bool(aligned < shifted), round(float(aligned), 3)
    (True, 0.693)
    """
    if not callable(discriminator):
        _check_discriminator(discriminator)
    check_image(x, "x")
    per_item = F.softplus(-discriminator(x))
    return per_item if _check_reduction(reduction) == "none" else per_item.mean()


def reference_image(fixed: torch.Tensor, warped: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Fan et al.'s reference: ``alpha * fixed + (1 - alpha) * warped``, detached.

    Paired with ``fixed``, it is a positive example for the similarity
    discriminator that needs no true field: closer to ``fixed`` than the
    network's own ``warped`` by the factor ``1 - alpha``, with the same
    anatomy and intensities. The discriminator learns what separates the two,
    which is what is left of the misalignment, and the network learns to
    remove it; at perfect alignment the two classes coincide.

    Parameters
    ----------
    fixed, warped : Tensor, shape (B, C, *spatial)
    alpha : float in (0, 1]
        1 gives ``fixed`` itself (the pair ``(fixed, fixed)``).

    >>> reference_image(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.25).flatten().tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    check_image(fixed, "fixed")
    check_image(warped, "warped")
    if fixed.shape[1:] != warped.shape[1:]:
        raise ValueError(f"fixed and warped: expected the same channels and spatial size, got "
                         f"{tuple(fixed.shape)} and {tuple(warped.shape)}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise ValueError(f"alpha: expected a number in (0, 1] (the weight of the fixed image), got {alpha!r}")
    return (alpha * fixed + (1 - alpha) * warped).detach()


def plausible_fields(n: int, shape, amplitude: float, points=4, *, steps: int = 7, seed=0) -> torch.Tensor:
    """``n`` smooth random diffeomorphic displacements ``(n, ndim, *shape)``: the "real" fields.

    Each is a velocity from :func:`regedu.spatial.random_field` (noise of std
    ``amplitude`` voxels at ``points`` control points per axis, cubic
    interpolation), integrated by scaling and squaring
    (:func:`regedu.spatial.integrate_velocity`): diffeomorphisms, which do
    not fold (on the grid, too, unless the velocity is large for its control
    spacing), with the smoothness and size that the control grid and the
    amplitude set. Hu et al. draw
    theirs from biomechanical simulations; match these to the deformations
    your anatomy shows (the data's own generator, when it is synthetic).

    Parameters
    ----------
    n : int
    shape : sequence of int
        Spatial size, 2 or 3 axes.
    amplitude : float
        Std of the velocity at the control points, in voxels.
    points : int or sequence of int
        Control points per axis (fewer: smoother).
    steps : int
        Scaling-and-squaring steps.
    seed : int or torch.Generator

    >>> u = plausible_fields(3, (32, 40), 2.0, seed=1)
    >>> tuple(u.shape), bool(torch.equal(u, plausible_fields(3, (32, 40), 2.0, seed=1)))
    ((3, 2, 32, 40), True)
    """
    check_positive(n, "n", integer=True)
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    velocity = torch.cat([random_field(shape, amplitude, points, cubic=True, seed=generator) for _ in range(n)])
    return integrate_velocity(velocity, steps)


@contextlib.contextmanager
def _frozen(module: nn.Module):
    # The generator's loss passes through the discriminator: without this its
    # weights would collect gradients from a loss that is not theirs.
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _other_terms(output, batch, losses, kind):
    if not losses:
        return {}
    # With kind="similarity" the discriminator is the data term: the regularisers may stand alone.
    terms = loss_terms(output, batch["moving"], batch["fixed"], losses=losses,
                       moving_seg=batch.get("moving_seg"), fixed_seg=batch.get("fixed_seg"),
                       true_disp=batch.get("disp"), require_data=kind != "similarity")
    terms.pop("loss")
    return terms


def adversarial_step(model: nn.Module, discriminator: nn.Module, batch: Mapping,
                     optimizer: torch.optim.Optimizer, d_optimizer: torch.optim.Optimizer, *,
                     kind: str = "similarity", weight: float = 1.0, losses=None,
                     real: torch.Tensor | None = None, alpha: float = 0.5) -> dict:
    """One alternating update: the discriminator, then the registration network.

    1. Register the batch: ``output = model(moving, fixed)``.
    2. Discriminator step (``d_optimizer``): :func:`discriminator_loss` of the
       real examples against the network's current ones, detached.
       ``kind="similarity"``: fake = ``cat(fixed, output.warped)``; real =
       ``cat(fixed, real)`` if ``real`` (aligned images) is given, else
       ``cat(fixed, reference_image(fixed, output.warped, alpha))``.
       ``kind="deformation"``: fake = ``output.disp``; real = ``real``
       (plausible fields, e.g. :func:`plausible_fields`), required.
    3. Network step (``optimizer``): ``weight * adversarial_loss`` of the fake
       examples through the updated, frozen discriminator, plus the weighted
       ``losses`` terms (:func:`regedu.losses.loss_terms`). With
       ``kind="similarity"`` the discriminator is the similarity, so ``losses``
       may hold regularisers alone (``{"diffusion": 1.0}``).

    Parameters
    ----------
    model : nn.Module
        ``forward(moving, fixed) -> RegistrationOutput`` (``regedu.nets``).
    discriminator : nn.Module
        ``(B, C, *spatial) -> (B,)`` logits; ``C`` is 2 x image channels for
        ``"similarity"``, ``ndim`` for ``"deformation"``.
    batch : dict
        ``moving``, ``fixed`` ``(B, C, *spatial)``; optional keys as for
        :func:`regedu.train.train_step`.
    optimizer, d_optimizer : torch.optim.Optimizer
        Over the model's and the discriminator's parameters.
    kind : {"similarity", "deformation"}
    weight : float
        Weight of the adversarial term in the network's objective.
    losses : dict, optional
        Further terms, as :func:`regedu.losses.loss_terms` takes them.
    real : Tensor, optional
        Real examples: aligned images ``(B, C, *spatial)`` to pair with
        ``fixed`` (similarity) or fields ``(B', ndim, *spatial)`` (deformation).
    alpha : float
        :func:`reference_image`'s blend, when ``real`` is not given.

    Returns
    -------
    dict
        Floats: ``"adversarial"`` (weighted) and every further term, ``"loss"``
        (their sum, what the network minimised), ``"discriminator"`` (its loss
        before its step, :func:`discriminator_loss`), ``"p_real"`` and
        ``"p_fake"`` (the mean probability of "real" it gave each class before
        its step: 0.5 and 0.5 when it cannot tell them apart).

    Examples
    --------
    >>> from regedu import nets
    >>> model = nets.create("unet", spatial_dims=2, encoder=(8, 8), decoder=(8, 8))
    >>> critic = Discriminator(2, in_channels=2, features=(4, 8))
    >>> opt, d_opt = (torch.optim.Adam(m.parameters(), 1e-3) for m in (model, critic))
    >>> batch = {"moving": torch.rand(2, 1, 16, 16), "fixed": torch.rand(2, 1, 16, 16)}
    >>> sorted(adversarial_step(model, critic, batch, opt, d_opt, losses={"diffusion": 1.0}))
    ['adversarial', 'diffusion', 'discriminator', 'loss', 'p_fake', 'p_real']
    """
    _check_discriminator(discriminator)
    check_choice(kind, ("similarity", "deformation"), "kind")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"weight: expected a number >= 0 (the adversarial term's weight), got {weight!r}")
    if not isinstance(batch, Mapping) or "moving" not in batch or "fixed" not in batch:
        raise ValueError(f"batch: expected a dict with 'moving' and 'fixed' images, got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    fixed = batch["fixed"]
    check_image(fixed, "batch['fixed']")
    output = model(batch["moving"], fixed)
    if kind == "similarity":
        fake = torch.cat([fixed, output.warped], 1)
        if real is not None:
            check_image(real, "real")
            if real.shape != fixed.shape:
                raise ValueError(f"real: expected aligned images of the fixed images' shape "
                                 f"{tuple(fixed.shape)}, got {tuple(real.shape)}")
            real = torch.cat([fixed, real], 1)
        else:
            real = torch.cat([fixed, reference_image(fixed, output.warped, alpha)], 1)
    else:
        if real is None:
            raise ValueError("real: kind='deformation' needs plausible displacement fields "
                             "(B', ndim, *spatial) to show the discriminator, e.g. "
                             "regedu.adversarial.plausible_fields(...)")
        check_field(real, "real", spatial=tuple(output.disp.shape[2:]))
        fake = output.disp

    # The discriminator's update, on detached examples: nothing reaches the network.
    d_optimizer.zero_grad(set_to_none=True)
    real_logits, fake_logits = discriminator(real.detach()), discriminator(fake.detach())
    d_loss = _per_class(real_logits, fake_logits).sum()
    d_loss.backward()
    d_optimizer.step()

    # The network's update, through the frozen discriminator.
    with _frozen(discriminator):
        values = {"adversarial": weight * adversarial_loss(discriminator, fake)}
        values.update(_other_terms(output, batch, losses, kind))
        values["loss"] = sum(values.values())
        values = optimizer_step(model.parameters(), optimizer, values)
    out = {k: float(v) for k, v in values.items()}
    out.update(discriminator=float(d_loss.detach()),
               p_real=float(torch.sigmoid(real_logits.detach()).mean()),
               p_fake=float(torch.sigmoid(fake_logits.detach()).mean()))
    return out
