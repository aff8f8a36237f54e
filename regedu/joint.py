"""Joint segmentation and registration: two FCN branches trained together.

The survey's FCN model (Wu et al. 2019, seed 001) has a segmentation branch
and a registration branch. Trained together, each can help the other
(notebook 16 measures whether it does):

- the registration branch is trained on image similarity and, through the
  consistency term, to carry the moving image's segmentation onto the fixed
  image's;
- the segmentation branch learns from the few labelled images, and from every
  unlabelled pair through the same term: its prediction on the moving image,
  warped, must agree with its prediction on the fixed image.

:class:`JointModel` holds both branches, :func:`consistency` is the term,
:func:`joint_terms` the weighted objective of one batch and
:func:`joint_step` one optimiser step on it.

Convention: images ``(B, C, *spatial)``, displacement ``(B, ndim, *spatial)``
in voxels, ``warped(x) = moving(x + u(x))``; segmentation logits ``(B, K + 1,
*spatial)``, channel 0 the background, channel ``k`` the ``k``-th label of
``labels`` (docs/conventions.md, "Conventions").
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import as_tensor, check_image, check_label_list, check_same_shape
from .losses import DEFAULT_LOSSES, loss_terms, one_hot, soft_dice
from .nets import RegistrationOutput, UNet, create
from .spatial import warp
from .train import optimizer_step

__all__ = ["JointOutput", "JointModel", "consistency", "segmentation_loss", "joint_terms", "joint_step",
           "JOINT_WEIGHTS"]

#: Default weights of the joint objective's three parts.
JOINT_WEIGHTS = MappingProxyType({"registration": 1.0, "segmentation": 1.0, "consistency": 1.0})


@dataclasses.dataclass
class JointOutput:
    """What :class:`JointModel` returns: the registration and both segmentations (logits)."""
    registration: RegistrationOutput
    moving_logits: torch.Tensor
    fixed_logits: torch.Tensor


class JointModel(nn.Module):
    """A registration U-Net and a segmentation U-Net, trained together.

    Parameters
    ----------
    labels : sequence of int
        The structures to segment; the segmentation branch predicts
        ``len(labels) + 1`` classes (background first).
    spatial_dims : {2, 3}
    in_channels : int
    integrate_steps : int
        Of the registration branch (see ``regedu.nets.Registration``).
    **unet
        ``encoder`` / ``decoder`` of both U-Nets (:class:`regedu.nets.UNet`).
    """

    def __init__(self, labels, spatial_dims: int = 2, in_channels: int = 1, *, integrate_steps: int = 0,
                 **unet):
        super().__init__()
        self.labels = check_label_list(labels, "labels")
        if not self.labels:
            raise ValueError("labels: expected at least one structure to segment, got an empty list")
        self.registration = create("unet", spatial_dims=spatial_dims, in_channels=in_channels,
                                   integrate_steps=integrate_steps, **unet)
        self.segmentation = UNet(spatial_dims, in_channels=in_channels, out_channels=len(self.labels) + 1,
                                 **unet)

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, len(labels) + 1, *spatial)`` of an image batch."""
        return self.segmentation(image)

    def predict_labels(self, image: torch.Tensor) -> torch.Tensor:
        """The label map ``(B, 1, *spatial)`` (values from ``labels``, 0 background) of an image batch."""
        ids = torch.tensor([0, *self.labels], device=image.device)
        return ids[self.segment(image).argmax(1, keepdim=True)]

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> JointOutput:
        # Both images go through the segmentation branch in one batch: one pass, shared statistics.
        logits = self.segment(torch.cat([moving, fixed]))
        return JointOutput(self.registration(moving, fixed), *logits.split(moving.shape[0]))


def consistency(moving_prob, fixed_prob, disp) -> torch.Tensor:
    """1 - soft Dice of the fixed segmentation and the moving one warped by ``disp``.

    Parameters
    ----------
    moving_prob, fixed_prob : Tensor, shape (B, K + 1, *spatial)
        Class probabilities (softmax) or one-hot maps, background in channel 0
        (left out of the Dice).
    disp : Tensor, shape (B, ndim, *spatial)
        Registers the moving image to the fixed one; the probabilities are
        warped linearly, so the term is differentiable in both.

    Returns
    -------
    Tensor, scalar: about 0 when the warped moving segmentation equals the
    fixed one, up to 1 when they do not overlap.
    """
    moving_prob, fixed_prob = as_tensor(moving_prob, "moving_prob"), as_tensor(fixed_prob, "fixed_prob")
    check_image(moving_prob, "moving_prob")
    check_same_shape(moving_prob, fixed_prob, ("moving_prob", "fixed_prob"))
    if moving_prob.shape[1] < 2:
        raise ValueError(f"moving_prob: expected a background channel and at least one structure, got "
                         f"{moving_prob.shape[1]} channel")
    return soft_dice(fixed_prob[:, 1:], warp(moving_prob, disp)[:, 1:])


def _with_background(seg: torch.Tensor, labels) -> torch.Tensor:
    """One-hot ``(B, len(labels) + 1, *spatial)`` of a label map, background (every other label) first."""
    target = one_hot(seg, labels)
    return torch.cat([1 - target.sum(1, keepdim=True), target], 1)


def segmentation_loss(logits: torch.Tensor, seg: torch.Tensor, labels) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice) of segmentation logits against a label map ``(B, 1, *spatial)``."""
    target = _with_background(seg, check_label_list(labels, "labels"))
    if logits.shape != target.shape:
        raise ValueError(f"logits: expected shape {tuple(target.shape)} (background + {len(labels)} "
                         f"labels), got {tuple(logits.shape)}")
    prob = logits.softmax(1)
    return F.cross_entropy(logits, target.argmax(1)) + soft_dice(target[:, 1:], prob[:, 1:])


def _labelled(batch: Mapping, side: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The label map of one side of the batch and which of its items may be used (or None, None)."""
    seg = batch.get(f"{side}_seg")
    if seg is None:
        return None, None
    use = batch.get(f"{side}_labelled")
    use = torch.ones(seg.shape[0], dtype=torch.bool) if use is None else as_tensor(use, f"{side}_labelled").bool()
    if use.shape != (seg.shape[0],):
        raise ValueError(f"{side}_labelled: expected one boolean per item, shape ({seg.shape[0]},), got "
                         f"{tuple(use.shape)}")
    return seg, use.to(seg.device)


def joint_terms(model: JointModel, batch: Mapping, *, weights: Mapping = JOINT_WEIGHTS,
                registration_losses=DEFAULT_LOSSES) -> dict[str, torch.Tensor]:
    """The weighted terms of the joint objective on one batch, and their sum.

    Parameters
    ----------
    model : JointModel
    batch : dict
        ``moving``, ``fixed`` ``(B, C, *spatial)``; optionally ``moving_seg``,
        ``fixed_seg`` ``(B, 1, *spatial)`` with ``moving_labelled``,
        ``fixed_labelled`` ``(B,)`` booleans saying which label maps may be
        used (default: every given one).
    weights : dict
        ``registration``, ``segmentation``, ``consistency`` (see
        :data:`JOINT_WEIGHTS`); a term of weight 0 is not computed, so
        ``{"segmentation": 0, "consistency": 0}`` trains the registration
        branch alone and ``{"registration": 0, "consistency": 0}`` the
        segmentation branch alone, at the cost of one branch.
    registration_losses : dict
        The registration branch's own objective (``regedu.losses.loss_terms``),
        default local NCC + diffusion.

    Returns
    -------
    dict
        ``registration``, ``segmentation`` (when an image of the batch is
        labelled), ``consistency``, each weighted, and ``loss``, their sum.

    Notes
    -----
    The consistency term compares segmentations: on a labelled image its
    label map (one-hot), on an unlabelled one the branch's prediction
    (softmax). So a labelled moving image warped onto an unlabelled fixed
    one teaches the segmentation branch on the fixed image (the labels travel
    by registration), and a pair of labelled images teaches the registration
    branch as a Dice loss would.
    """
    unknown = set(weights) - set(JOINT_WEIGHTS)
    if unknown:
        raise ValueError(f"weights: unknown terms {sorted(unknown)}; expected {sorted(JOINT_WEIGHTS)}")
    w = {**JOINT_WEIGHTS, **weights}
    moving, fixed = batch["moving"], batch["fixed"]
    terms = {}
    registration = None
    if w["registration"] or w["consistency"]:
        registration = model.registration(moving, fixed)
        if w["registration"]:
            terms["registration"] = w["registration"] * loss_terms(registration, moving, fixed,
                                                                  losses=registration_losses)["loss"]
    labelled = {side: _labelled(batch, side) for side in ("moving", "fixed")}
    # Segment a side when the consistency term compares it, or when its labelled images are trained on.
    sides = [side for side in ("moving", "fixed") if w["consistency"]
             or (w["segmentation"] and labelled[side][1] is not None and labelled[side][1].any())]
    if sides:
        images = torch.cat([batch[side] for side in sides])
        logits = dict(zip(sides, model.segment(images).split(moving.shape[0])))
        seg_terms, probs = [], {}
        for side in sides:
            probs[side] = logits[side].softmax(1)
            seg, use = labelled[side]
            if seg is None or not use.any():
                continue
            seg_terms.append(segmentation_loss(logits[side][use], seg[use], model.labels))
            truth = _with_background(seg, model.labels)
            probs[side] = torch.where(use.view(-1, *[1] * (truth.dim() - 1)), truth, probs[side])
        if seg_terms and w["segmentation"]:
            terms["segmentation"] = w["segmentation"] * sum(seg_terms) / len(seg_terms)
        if w["consistency"]:
            terms["consistency"] = w["consistency"] * consistency(probs["moving"], probs["fixed"],
                                                                  registration.disp)
    terms["loss"] = sum(terms.values())
    return terms


def joint_step(model: JointModel, batch: Mapping, optimizer: torch.optim.Optimizer, **options) -> dict:
    """One optimiser step on :func:`joint_terms` (``options`` as there); returns the detached terms."""
    return optimizer_step(model.parameters(), optimizer, joint_terms(model, batch, **options))
