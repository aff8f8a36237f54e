"""Multi-atlas segmentation: label fusion, atlas selection and template selection.

An *atlas* is an image with its labels. Registered to a target image, each
atlas proposes a segmentation of the target (its labels warped with nearest
neighbour: *label propagation*). **Label fusion** combines the proposals, which
make different registration errors: :func:`majority_vote`, :func:`weighted_vote`
(one weight per atlas, e.g. its image similarity to the target) and
:func:`locally_weighted_vote` (per voxel, by how well the warped atlas image
matches the target around it; Artaechevarria et al., IEEE TMI 28(8), 2009).

**Atlas selection** (:func:`select_atlases`) keeps the k atlases most similar to
the target (Aljabar et al., NeuroImage 46(3), 2009). **Template selection**
(:func:`select_template`) is the alternative the MICCAI review (seed 002)
describes after Wang and Zhang (MICCAI 2018, "Atlas Propagation Through
Template Selection"): atlases and target are registered to a common
*template* instead of to each other, which costs one registration per image
instead of one per atlas-target pair; the error of propagating an atlas to
the target through a template is bounded by the atlas-template error plus the
template-target error, and the second term is the easier to make small, so
instead of one fixed common template, the template is chosen *per target* from
a library, as the one closest to that target.

Convention: label maps are integer arrays of one spatial shape, 2D or 3D
(``(*spatial)``, or ``(1, 1, *spatial)``), already in the target's space (warped
with nearest neighbour, docs/conventions.md, "Conventions"); images likewise,
float; numpy or torch. Results are tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import losses
from ._checks import as_labels, as_tensor, check_choice, check_finite, check_label_list, check_positive

__all__ = ["majority_vote", "weighted_vote", "locally_weighted_vote", "local_weights",
           "image_similarity", "select_atlases", "select_template", "Selection"]


# ------------------------------------------------------------------ inputs

def _spatial(x, name: str, *, labels: bool) -> torch.Tensor:
    x = as_tensor(x, name)
    if x.dim() in (4, 5) and tuple(x.shape[:2]) == (1, 1):
        x = x[0, 0]
    if x.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a 2D or 3D {'label map' if labels else 'image'} "
                         f"(*spatial) or (1, 1, *spatial), got shape {tuple(x.shape)}")
    if labels:
        return as_labels(x, name)
    if not x.is_floating_point():
        x = x.float()
    return check_finite(x, name)


def _stack(items, name: str, *, labels: bool, shape=None) -> torch.Tensor:
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of {'label maps' if labels else 'images'}, "
                        f"got a {type(items).__name__}")
    maps = [_spatial(m, f"{name}[{i}]", labels=labels) for i, m in enumerate(items)]
    if not maps:
        raise ValueError(f"{name}: expected at least one {'label map' if labels else 'image'}, got none")
    shape = tuple(maps[0].shape) if shape is None else tuple(shape)
    for i, m in enumerate(maps):
        if tuple(m.shape) != shape:
            raise ValueError(f"{name}[{i}]: expected spatial shape {shape}, got {tuple(m.shape)}; "
                             f"every map must be in the target's space")
    return torch.stack(maps)


def _listed(stack: torch.Tensor, label_ids) -> torch.Tensor:
    """The maps with labels outside ``label_ids`` set to background (None: all kept)."""
    if label_ids is None:
        return stack
    ids = torch.tensor([v for v in check_label_list(label_ids, "label_ids") if v != 0] or [0],
                       dtype=stack.dtype, device=stack.device)
    # A lookup table is one gather over the maps; torch.isin sorts them.
    lo, hi = int(min(int(stack.min()), int(ids.min()))), int(max(int(stack.max()), int(ids.max())))
    table = torch.zeros(hi - lo + 1, dtype=stack.dtype, device=stack.device)
    table[ids - lo] = ids
    return table[stack - lo]


def _vote(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted vote of ``n`` label maps ``(n, *spatial)``; ``weights`` broadcast to them.

    Only labels some atlas proposes can win, so each atlas's proposal is scored
    by the total weight of the atlases agreeing with it: ``n^2`` comparisons of
    whole maps, instead of ``n`` per label of the label list (31 for the
    FreeSurfer structures), and two volumes of memory. Ties go to the smaller label.
    """
    best = fused = None
    for i in range(stack.shape[0]):
        score = (weights * (stack == stack[i])).sum(0)
        if best is None:
            best, fused = score, stack[i].clone()
            continue
        better = (score > best) | ((score == best) & (stack[i] < fused))
        best = torch.where(better, score, best)
        fused = torch.where(better, stack[i], fused)
    return fused


# ------------------------------------------------------------------ fusion

def majority_vote(labels_list, label_ids=None) -> torch.Tensor:
    """At every voxel, the label most atlases propose.

    Parameters
    ----------
    labels_list : sequence of label maps, each (*spatial)
        The atlases' labels warped to the target (nearest neighbour), or a
        stacked ``(n, *spatial)`` tensor.
    label_ids : sequence of int, optional
        The structures to fuse; other labels vote for background. Default:
        every label found.

    Returns
    -------
    Tensor (long), shape (*spatial). Ties go to the smaller label (background first).

    >>> maps = [torch.tensor([[1, 2, 0]]), torch.tensor([[1, 2, 2]]), torch.tensor([[3, 1, 2]])]
    >>> majority_vote(maps)
    tensor([[1, 2, 2]])
    """
    stack = _listed(_stack(labels_list, "labels_list", labels=True), label_ids)
    return _vote(stack, torch.ones((), dtype=torch.float32))


def _check_weights(weights, n: int, spatial: tuple[int, ...]) -> torch.Tensor:
    if isinstance(weights, (list, tuple)):      # e.g. a list of similarities, one per atlas
        weights = np.asarray(weights, dtype=np.float64)
    w = as_tensor(weights, "weights")
    w = w.to(torch.float64) if not w.is_floating_point() else w
    check_finite(w, "weights")
    if tuple(w.shape) == (n,):
        w = w.view(n, *([1] * len(spatial)))
    elif tuple(w.shape) != (n, *spatial):
        raise ValueError(f"weights: expected one per atlas, shape ({n},), or one per atlas and "
                         f"voxel, shape {(n, *spatial)}; got shape {tuple(w.shape)}")
    if bool((w < 0).any()):
        raise ValueError("weights: expected non-negative weights (a vote cannot count against a "
                         "label); exponentiate similarities such as NCC first")
    return w


def weighted_vote(labels_list, weights, label_ids=None) -> torch.Tensor:
    """At every voxel, the label with the largest total weight of the atlases proposing it.

    Parameters
    ----------
    labels_list : sequence of label maps, each (*spatial)
    weights : array, shape (n,) or (n, *spatial)
        Non-negative: one per atlas (global weighting, e.g. ``exp(NCC / T)`` of
        each warped atlas image with the target), or one per atlas and voxel
        (as :func:`locally_weighted_vote` computes).
    label_ids : sequence of int, optional
        As :func:`majority_vote`.

    Returns
    -------
    Tensor (long), shape (*spatial). Equal weights give :func:`majority_vote`.

    >>> maps = [torch.tensor([[1, 1]]), torch.tensor([[2, 2]]), torch.tensor([[2, 3]])]
    >>> weighted_vote(maps, [5.0, 1.0, 1.0])      # one dominant atlas outvotes two
    tensor([[1, 1]])
    """
    stack = _listed(_stack(labels_list, "labels_list", labels=True), label_ids)
    w = _check_weights(weights, stack.shape[0], tuple(stack.shape[1:])).to(stack.device)
    return _vote(stack, w)


def local_weights(warped_images, target_image, *, window: int = 5, method: str = "ncc",
                  h: float | None = None, floor: float = 1e-3) -> torch.Tensor:
    """Per-voxel atlas weights from the local match of each warped atlas image with the target.

    Parameters
    ----------
    warped_images : sequence of images, each (*spatial)
        The atlas images warped to the target with the same fields as their labels.
    target_image : image, (*spatial)
    window : int
        Odd width of the cube (square) around each voxel, in voxels.
    method : {"ncc", "mse"}
        ``"ncc"``: the squared local correlation coefficient of atlas and target
        in the window (the quantity inside local NCC, :func:`regedu.losses.ncc_local`),
        in [0, 1]; insensitive to each subject's own bias field and contrast.
        ``"mse"``: ``exp(-local mean squared difference / h)``, 1 for a perfect match.
    h : float, optional
        Scale of ``"mse"``; default the mean local squared difference over all
        atlases and voxels (so the weights do not depend on the intensity scale).
    floor : float
        Added to every weight: where no atlas matches (flat regions, where the
        correlation is 0 for all), the vote falls back to a majority.

    Returns
    -------
    Tensor, shape (n, *spatial), non-negative.
    """
    images = _stack(warped_images, "warped_images", labels=False)
    target = _spatial(target_image, "target_image", labels=False).to(images.dtype)
    if tuple(target.shape) != tuple(images.shape[1:]):
        raise ValueError(f"target_image: expected spatial shape {tuple(images.shape[1:])} like the "
                         f"warped images, got {tuple(target.shape)}")
    check_positive(window, "window", integer=True)
    if window % 2 == 0:
        raise ValueError(f"window: expected an odd width so the window is centred on the voxel, got {window}")
    check_choice(method, ("ncc", "mse"), "method")
    if not (isinstance(floor, (int, float)) and floor >= 0):
        raise ValueError(f"floor: expected a non-negative number, got {floor!r}")
    a = images[:, None]                                   # (n, 1, *spatial): one batch item per atlas
    t = target.expand_as(images)[:, None]
    if method == "ncc":
        # The per-voxel squared correlation of local NCC, with its fast box sums
        # (zero padding at the border, as the loss).
        w = losses._LocalNCCMap.apply(t, a, window, 1e-5)[:, 0]
    else:
        sq = (a - t).square()
        count = losses._box_sum(torch.ones_like(sq[:1]), window)
        local = (losses._box_sum(sq, window) / count)[:, 0]
        scale = float(local.mean()) if h is None else check_positive(h, "h")
        w = torch.exp(-local / max(scale, 1e-12))
    return w.clamp_min(0) + floor


def locally_weighted_vote(labels_list, warped_images, target_image, *, window: int = 5,
                          method: str = "ncc", h: float | None = None, label_ids=None) -> torch.Tensor:
    """Label fusion with per-voxel weights: atlases vote where their image matches the target.

    An atlas whose warped image looks like the target around a voxel is probably
    registered well there, so its label counts more there (Artaechevarria et al.
    2009). Weights from :func:`local_weights` (arguments as there), votes as
    :func:`weighted_vote`.

    Parameters
    ----------
    labels_list : sequence of label maps, each (*spatial)
    warped_images : sequence of images, each (*spatial), in the same order
    target_image : image, (*spatial)
    window, method, h
        As :func:`local_weights`.
    label_ids : sequence of int, optional
        As :func:`majority_vote`.

    Returns
    -------
    Tensor (long), shape (*spatial).
    """
    stack = _listed(_stack(labels_list, "labels_list", labels=True), label_ids)
    w = local_weights(warped_images, target_image, window=window, method=method, h=h)
    if w.shape[0] != stack.shape[0] or tuple(w.shape[1:]) != tuple(stack.shape[1:]):
        raise ValueError(f"warped_images: expected one image per label map, {stack.shape[0]} of "
                         f"shape {tuple(stack.shape[1:])}, got {w.shape[0]} of shape {tuple(w.shape[1:])}")
    return _vote(stack, w.to(stack.device))


# --------------------------------------------------------------- selection

_SIMILARITIES = {
    "ncc": lambda fixed, moving: -float(losses.ncc_global(fixed, moving)),
    "mse": lambda fixed, moving: -float(losses.mse(fixed, moving)),
    "mi": lambda fixed, moving: -float(losses.mutual_information(fixed, moving)),
}


def _similarity_fn(similarity):
    if callable(similarity):
        return lambda fixed, moving: float(similarity(fixed, moving))
    return _SIMILARITIES[check_choice(similarity, tuple(_SIMILARITIES), "similarity")]


def image_similarity(fixed, moving, similarity="ncc") -> float:
    """Similarity of two images of one shape, higher is more similar.

    ``similarity``: ``"ncc"`` (global correlation coefficient, in [-1, 1]),
    ``"mse"`` (minus the mean squared difference), ``"mi"`` (mutual
    information, for images in [0, 1]), or a callable ``(fixed, moving) ->
    float`` on ``(1, 1, *spatial)`` tensors, higher is more similar.

    >>> x = torch.rand(8, 9)
    >>> round(image_similarity(x, 2 * x + 1), 4)
    1.0
    """
    f = _spatial(fixed, "fixed", labels=False)
    m = _spatial(moving, "moving", labels=False)
    if f.shape != m.shape:
        raise ValueError(f"fixed and moving must have the same shape, got {tuple(f.shape)} and "
                         f"{tuple(m.shape)}")
    return _similarity_fn(similarity)(f[None, None], m[None, None].to(f.dtype))


@dataclass(frozen=True)
class Selection:
    """The result of :func:`select_atlases` or :func:`select_template`.

    Attributes
    ----------
    selected : list of int
        Indices of the chosen candidates, best first.
    order : list of int
        Every candidate, best first.
    scores : ndarray, shape (n,)
        Each candidate's score in input order; higher is better (closer).
    criterion : str
        What the score is, in words.
    """
    selected: list
    order: list
    scores: np.ndarray
    criterion: str


def _rank(scores, k: int, criterion: str) -> Selection:
    scores = np.asarray(scores, dtype=float)
    order = [int(i) for i in np.argsort(-scores, kind="stable")]   # ties: the earlier candidate
    return Selection(order[:k], order, scores, criterion)


def select_atlases(target, atlases, k: int, *, similarity="ncc") -> Selection:
    """Atlas selection: the ``k`` atlases most similar to the target image.

    Parameters
    ----------
    target : image, (*spatial)
    atlases : sequence of images, each (*spatial)
        The candidate atlas images *in the target's space*: after an affine
        pre-alignment (cheap: select, then register only the chosen ones
        deformably) or after the deformable registration (better ranking, full cost).
    k : int
        How many to keep, 1 <= k <= len(atlases).
    similarity : str or callable
        As :func:`image_similarity`, called as ``similarity(target, atlas)``.

    Returns
    -------
    Selection

    >>> t = torch.rand(10, 10)
    >>> select_atlases(t, [t + 0.3 * torch.rand(10, 10), t, t + 0.1 * torch.rand(10, 10)], 2).selected
    [1, 2]
    """
    target = _spatial(target, "target", labels=False)
    images = _stack(atlases, "atlases", labels=False, shape=target.shape)
    check_positive(k, "k", integer=True)
    if k > images.shape[0]:
        raise ValueError(f"k: expected at most {images.shape[0]} (the number of atlases), got {k}")
    sim = _similarity_fn(similarity)
    scores = [sim(target[None, None], a[None, None].to(target.dtype)) for a in images]
    name = similarity if isinstance(similarity, str) else getattr(similarity, "__name__", "similarity")
    return _rank(scores, k, f"{name} of each atlas with the target (higher is closer)")


def select_template(templates, *, target=None, atlases=None, similarity="ncc") -> Selection:
    """Template selection: the library image through which atlases best reach the target.

    Following Wang and Zhang (MICCAI 2018) as the MICCAI review (seed 002)
    summarises it: propagating an atlas's labels to the target *through* a
    template (atlas -> template -> target) errs at most by the atlas-template
    error plus the template-target error. Each candidate template ``T`` is
    scored by ``sim(T, target) + mean_i sim(T, atlas_i)`` (higher is better),
    with whichever terms are given:

    * ``target`` only: the template closest to this target, chosen per target
      from a library (the review's point: this term is the one that is easy to
      make small when the library is large);
    * ``atlases`` only: the template closest to the atlases on average, a common
      template for every target;
    * neither: the population's centre, the image of ``templates`` most similar
      on average to all the *others* (the classic choice of one common template);
    * both: the bound itself.

    Parameters
    ----------
    templates : sequence of images, each (*spatial)
        The library (affinely aligned to one another, or the scores measure the pose).
    target : image, (*spatial), optional
    atlases : sequence of images, each (*spatial), optional
    similarity : str or callable
        As :func:`image_similarity`, called as ``similarity(template, other)``
        (the template is the fixed image: everything is registered to it).

    Returns
    -------
    Selection
        ``selected`` holds the one chosen template.

    >>> base = torch.linspace(0, 1, 64).view(8, 8)
    >>> library = [base, base.T, base.flip(0)]
    >>> select_template(library, target=base.T + 0.01 * torch.rand(8, 8)).selected
    [1]
    """
    lib = _stack(templates, "templates", labels=False)
    sim = _similarity_fn(similarity)
    shape = tuple(lib.shape[1:])
    n = lib.shape[0]
    scores = np.zeros(n)
    parts = []
    if target is not None:
        t = _spatial(target, "target", labels=False)
        if tuple(t.shape) != shape:
            raise ValueError(f"target: expected spatial shape {shape} like the templates, "
                             f"got {tuple(t.shape)}")
        scores += [sim(T[None, None], t[None, None].to(T.dtype)) for T in lib]
        parts.append("similarity to the target")
    if atlases is not None:
        atl = _stack(atlases, "atlases", labels=False, shape=shape)
        scores += [np.mean([sim(T[None, None], a[None, None].to(T.dtype)) for a in atl]) for T in lib]
        parts.append("mean similarity to the atlases")
    if target is None and atlases is None:
        if n < 2:
            raise ValueError("templates: the centre of a population needs at least 2 images, got 1")
        scores += [np.mean([sim(lib[j][None, None], lib[i][None, None]) for i in range(n) if i != j])
                   for j in range(n)]
        parts.append("mean similarity to the other templates")
    name = similarity if isinstance(similarity, str) else getattr(similarity, "__name__", "similarity")
    return _rank(scores, 1, f"{name}: " + " + ".join(parts) + " (higher is closer)")
