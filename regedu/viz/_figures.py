"""Static figures: each function returns a matplotlib Figure.

Figures are created through pyplot (so a notebook's inline backend can show
them) and closed at once: a returned figure is shown exactly once, as the
cell's value, and scripts never pile up open figures.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb

from .._checks import as_tensor, check_choice, check_positive, check_shape
from ..spatial import identity_grid, warp_points
from . import _render as R

__all__ = ["plot_pair", "plot_overlay", "plot_checkerboard", "plot_difference", "plot_grid",
           "plot_field", "plot_jacobian", "plot_landmarks", "plot_dice", "plot_history",
           "plot_fire_curves", "plot_slices", "plot_fusion"]


def _subplots(nrows: int, ncols: int, *, size: tuple[float, float] = (3.4, 3.4), **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False, layout="constrained", **kw)
    plt.close(fig)
    return fig, axes


def _image_axes(ax, title: str | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)


def _slice_of(x, name: str, axis: int, index: int | None) -> tuple[np.ndarray, str]:
    a = R.spatial_array(x, name)
    if a.ndim == 2:
        return a.astype(np.float32, copy=False), ""
    index = R.check_axis_index(a.shape, axis, index)
    return R.plane(a, axis, index).astype(np.float32), f" (axis {axis} = {index})"


def _field_slice(disp, axis: int, index: int | None):
    u = R.field_tensor(disp)
    if u.shape[1] == 2:
        return u, ""
    index = R.check_axis_index(tuple(u.shape[2:]), axis, index)
    return R.field_plane(u, axis, index), f" (axis {axis} = {index})"


def _pairs(fixed, moving, warped, axis, index):
    """Slices of fixed/moving/warped and the panel titles of before/after figures."""
    f, where = _slice_of(fixed, "fixed", axis, index)
    images = [("fixed vs moving", _slice_of(moving, "moving", axis, index)[0])]
    if warped is not None:
        images.append(("fixed vs warped", _slice_of(warped, "warped", axis, index)[0]))
    for title, img in images:
        if img.shape != f.shape:
            raise ValueError(f"fixed and {title.split()[-1]} must have the same shape, got "
                             f"{f.shape} and {img.shape}")
    return f, images, where


def plot_pair(fixed, moving, warped=None, *, axis: int = 0, index: int | None = None,
              titles: Sequence[str] | None = None):
    """Fixed, moving (and warped) side by side, on one intensity scale.

    Parameters
    ----------
    fixed, moving, warped : array or Tensor, shape (H, W), (D, H, W) or with
        leading (1, 1) axes
    axis, index : int
        For volumes, the slice shown (default: the centre, see
        :func:`default_index`).
    titles : list of str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    f, images, where = _pairs(fixed, moving, warped, axis, index)
    panels = [f] + [img for _, img in images]
    titles = list(titles) if titles is not None else ["fixed", "moving", "warped"][:len(panels)]
    if len(titles) != len(panels):
        raise ValueError(f"titles: expected {len(panels)} titles, got {len(titles)}")
    lo, hi = R.intensity_window(f)
    fig, axes = _subplots(1, len(panels))
    for ax, img, title in zip(axes[0], panels, titles):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        _image_axes(ax, title + where)
    return fig


def _overlay_rgb(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Red = first image, cyan = second: where they agree the result is grey.
    out = np.empty((*a.shape, 3), np.float32)
    for img, channels in ((a, [0]), (b, [1, 2])):
        lo, hi = R.intensity_window(img)
        out[..., channels] = np.clip((img - lo) / (hi - lo), 0, 1)[..., None]
    return out


def plot_overlay(fixed, moving, warped=None, *, axis: int = 0, index: int | None = None):
    """Red/cyan overlay: fixed in red, moving (then warped) in cyan; grey where they agree."""
    f, images, where = _pairs(fixed, moving, warped, axis, index)
    fig, axes = _subplots(1, len(images))
    for ax, (title, img) in zip(axes[0], images):
        ax.imshow(_overlay_rgb(f, img))
        _image_axes(ax, f"{title}{where}\nred: fixed, cyan: {title.split()[-1]}")
    return fig


def plot_checkerboard(fixed, moving, warped=None, *, tile: int | None = None, axis: int = 0,
                      index: int | None = None):
    """Checkerboard of fixed and moving (then warped): edges should continue across tiles."""
    f, images, where = _pairs(fixed, moving, warped, axis, index)
    tile = tile if tile is not None else max(2, max(f.shape) // 8)
    check_positive(tile, "tile", integer=True)
    mask = R.checkerboard_mask(f.shape, tile)
    lo, hi = R.intensity_window(f)
    fig, axes = _subplots(1, len(images))
    for ax, (title, img) in zip(axes[0], images):
        ax.imshow(np.where(mask, f, img), cmap="gray", vmin=lo, vmax=hi)
        _image_axes(ax, f"checkerboard{where}\n{title}")
    return fig


def plot_difference(fixed, moving, warped=None, *, axis: int = 0, index: int | None = None):
    """Signed differences ``moving - fixed`` (and ``warped - fixed``) on one colour scale."""
    f, images, where = _pairs(fixed, moving, warped, axis, index)
    diffs = [(title.replace("fixed vs ", "") + " - fixed", img - f) for title, img in images]
    lim = max(float(np.percentile(np.abs(d), 99.5)) for _, d in diffs) or 1.0
    fig, axes = _subplots(1, len(diffs))
    for ax, (title, d) in zip(axes[0], diffs):
        im = ax.imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim)
        rms = float(np.sqrt(np.mean(d ** 2)))
        _image_axes(ax, f"{title}{where}\nRMS {rms:.3g}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                 label=f"{R.DIFFERENCE_LABEL} (image - fixed)")
    return fig


def plot_grid(disp, image=None, *, step: int | None = None, axis: int = 0, index: int | None = None):
    """The deformation as a warped grid, optionally over an image (e.g. the warped one).

    The lines are a regular grid drawn on the moving image and carried into
    the fixed image's space by the warp, so they move with the content of
    the warped image: the curves ``x_k + u_k(x) = const`` for each in-plane
    axis ``k``. For a volume, the in-plane components on one slice are shown.

    Parameters
    ----------
    disp : array or Tensor, shape (1, ndim, *spatial) or (ndim, *spatial)
        Displacement in voxels, docs/conventions.md (pulls the moving image).
    image : array or Tensor, optional
        Background image of the same spatial size (fixed space).
    step : int, optional
        Grid spacing in voxels (default: 1/16 of the larger side, at least 4).
    """
    u, where = _field_slice(disp, axis, index)
    h, w = u.shape[2:]
    step = step if step is not None else max(4, max(h, w) // 16)
    check_positive(step, "step", integer=True)
    phi = (identity_grid((h, w)) + u)[0].numpy()
    fig, axes = _subplots(1, 1, size=(5, 5 * h / w))
    ax = axes[0, 0]
    if image is not None:
        img, _ = _slice_of(image, "image", axis, index)
        if img.shape != (h, w):
            raise ValueError(f"image: expected spatial size {(h, w)} to match disp, got {img.shape}")
        lo, hi = R.intensity_window(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    else:
        ax.imshow(np.ones((h, w)), cmap="gray", vmin=0, vmax=1)
    for k, n in enumerate((h, w)):
        ax.contour(phi[k], levels=np.arange(step // 2, n, step), colors="#ffc828" if image is not None
                   else "k", linewidths=0.9)
    _image_axes(ax, f"deformation grid{where}")
    return fig


def _field_colour(u2: np.ndarray) -> tuple[np.ndarray, float]:
    mag = np.hypot(u2[0], u2[1])
    top = float(mag.max()) or 1.0
    # Hue = direction (0 = +row, i.e. down), brightness = length relative to the longest.
    hue = (np.arctan2(u2[1], u2[0]) / (2 * np.pi)) % 1.0
    rgb = hsv_to_rgb(np.stack([hue, np.ones_like(hue), mag / top], -1))
    return rgb, top


def plot_field(disp, image=None, *, kind: str = "both", step: int | None = None, axis: int = 0,
               index: int | None = None):
    """The displacement as colour (hue = direction, brightness = length) and/or as arrows.

    Arrows start at a fixed-image point ``x`` and end at ``x + u(x)``, where
    that point samples the moving image; they are drawn to scale (voxels).
    For a volume, the in-plane components on one slice are shown.

    Parameters
    ----------
    kind : {"both", "color", "arrows"}
    step : int, optional
        Arrow spacing in voxels (default: 1/20 of the larger side, at least 2).
    """
    check_choice(kind, ("both", "color", "arrows"), "kind")
    u, where = _field_slice(disp, axis, index)
    u2 = u[0].numpy()
    h, w = u2.shape[1:]
    kinds = ["color", "arrows"] if kind == "both" else [kind]
    fig, axes = _subplots(1, len(kinds))
    for ax, k in zip(axes[0], kinds):
        if k == "color":
            rgb, top = _field_colour(u2)
            ax.imshow(rgb)
            # Hue (direction) has no scale; the bar gives the length that brightness stands for.
            R.colorbar(fig, ax, "gray", 0.0, top, "|u| (voxels), as brightness", shrink=0.8)
            _image_axes(ax, f"field as colour{where}\nmax |u| = {top:.3g} voxels")
            continue
        if image is not None:
            img, _ = _slice_of(image, "image", axis, index)
            lo, hi = R.intensity_window(img)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        else:
            ax.imshow(np.ones((h, w)), cmap="gray", vmin=0, vmax=1)
        s = step if step is not None else max(2, max(h, w) // 20)
        check_positive(s, "step", integer=True)
        r, c = np.mgrid[s // 2:h:s, s // 2:w:s]
        q = ax.quiver(c, r, u2[1][r, c], u2[0][r, c], np.hypot(u2[0][r, c], u2[1][r, c]),
                      angles="xy", scale_units="xy", scale=1, cmap="viridis", width=0.004)
        fig.colorbar(q, ax=ax, shrink=0.8, label="arrow length |u| (voxels)")
        _image_axes(ax, f"field as arrows{where}\nto scale, from x to x + u(x)")
    return fig


def plot_jacobian(disp, *, axis: int = 0, index: int | None = None):
    """Jacobian determinant of ``x + u(x)``: blue shrinks, red grows, yellow folds (det <= 0)."""
    from .. import metrics
    u = R.field_tensor(disp)
    det = metrics.jacobian_determinant(u)[0].numpy()
    stats = metrics.folding_stats(u)
    d2, where = _slice_of(det, "jacobian", axis, index)
    fig, axes = _subplots(1, 1, size=(5, 4.2))
    ax = axes[0, 0]
    im = ax.imshow(d2, cmap="coolwarm", vmin=0, vmax=2)
    folds = d2 <= 0
    ax.imshow(np.where(folds[..., None], np.append(R.FOLD_RGB / 255, 1.0), 0.0))
    fig.colorbar(im, ax=ax, shrink=0.8, label=R.JACOBIAN_LABEL)
    _image_axes(ax, f"Jacobian determinant{where}\n{int(folds.sum())} folded voxels here (yellow); "
                    f"{float(stats['percent_folding']):.3g}% of all")
    return fig


def _points(p, name: str) -> torch.Tensor:
    t = as_tensor(p, name).detach().cpu().float()
    check_shape(t, "N 2", name)
    return t


def plot_landmarks(fixed, moving, fixed_points, moving_points, disp=None, *, spacing: float = 1.0):
    """Landmarks and their registration errors (2D).

    Left: the fixed image with its points. Right: the moving image with the
    true corresponding points (circles), where the registration sends the
    fixed points, ``p + u(p)`` (crosses; ``p`` itself without ``disp``), and an
    error line between them coloured by its length (TRE).

    Parameters
    ----------
    fixed_points, moving_points : array or Tensor, shape (N, 2)
        Voxel coordinates in (row, column) order.
    disp : optional, shape (1, 2, H, W)
    spacing : float
        Pixel size, to report TRE in physical units.
    """
    from .. import metrics
    f = R.spatial_array(fixed, "fixed", ndim=2)
    m = R.spatial_array(moving, "moving", ndim=2)
    pf, pm = _points(fixed_points, "fixed_points"), _points(moving_points, "moving_points")
    if pf.shape != pm.shape:
        raise ValueError(f"fixed_points and moving_points must pair up, got {tuple(pf.shape)} "
                         f"and {tuple(pm.shape)}")
    u = R.field_tensor(disp, spatial=f.shape) if disp is not None else torch.zeros(1, 2, *f.shape)
    pred = warp_points(pf, u).numpy()
    err = np.asarray(metrics.tre(pf, pm, u, spacing=spacing), dtype=float).reshape(-1)
    fig, axes = _subplots(1, 2, size=(4.5, 4.5))
    for ax, img in zip(axes[0], (f, m)):
        lo, hi = R.intensity_window(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    axes[0, 0].scatter(pf[:, 1], pf[:, 0], s=18, c="#00c8ff", edgecolors="k", linewidths=0.5)
    _image_axes(axes[0, 0], "fixed with its landmarks")
    ax = axes[0, 1]
    pmn = pm.numpy()
    cmap = plt.get_cmap("autumn_r")
    top = max(float(err.max()), 1e-9)
    for (r0, c0), (r1, c1), e in zip(pred, pmn, err):
        ax.plot([c0, c1], [r0, r1], color=cmap(e / top), linewidth=1.5)
    ax.scatter(pmn[:, 1], pmn[:, 0], s=18, facecolors="none", edgecolors="#00ff80", label="true")
    ax.scatter(pred[:, 1], pred[:, 0], s=18, marker="x", c="#ff4040", label="p + u(p)")
    ax.legend(loc="lower right", fontsize=8)
    unit = "pixels" if spacing == 1.0 else f"pixels x {spacing:g}"
    R.colorbar(fig, ax, "autumn_r", 0.0, top, f"TRE, error-line colour ({unit})", shrink=0.8)
    _image_axes(ax, f"moving: TRE mean {err.mean():.3g}, median {np.median(err):.3g}, "
                    f"max {err.max():.3g}")
    return fig


def _dice_table(result, labels):
    """(n_pairs, n_labels) array and its labels from a DiceResult, a vector or a matrix."""
    if hasattr(result, "per_label") and hasattr(result, "labels"):
        return np.atleast_2d(np.asarray(result.per_label, float)), [int(v) for v in result.labels]
    a = np.atleast_2d(np.asarray(R.to_numpy(result, "results") if isinstance(result, torch.Tensor)
                                 else result, dtype=float))
    if labels is None:
        raise ValueError("labels: needed when results are plain arrays (one value per label)")
    if a.shape[1] != len(labels):
        raise ValueError(f"results: expected {len(labels)} values per row (one per label), "
                         f"got shape {a.shape}")
    return a, [int(v) for v in labels]


def plot_dice(results: Mapping, labels=None, *, names: Mapping[int, str] | None = None):
    """Per-structure Dice bars for several methods (the VV-Net paper's figure 3).

    Parameters
    ----------
    results : dict of method name -> DiceResult, or array (n_labels,) or (n_pairs, n_labels)
        Several pairs give mean bars with a standard-deviation whisker; NaN
        (structure absent) is left out.
    labels : list of int, optional
        Needed for plain arrays; DiceResults carry their own.
    names : dict, optional
        Label -> structure name (default: the 30 FreeSurfer structures,
        :data:`regedu.datasets.STRUCTURE_NAMES`).
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results: expected a non-empty dict of method name -> Dice results")
    if names is None:
        from ..datasets.freesurfer import STRUCTURE_NAMES
        names = STRUCTURE_NAMES
    names = dict(names)
    tables = {k: _dice_table(v, labels) for k, v in results.items()}
    order = list(next(iter(tables.values()))[1])
    fig, axes = _subplots(1, 1, size=(min(16.0, max(6.0, 0.11 * len(order) * len(tables) + 2)), 4.2))
    ax = axes[0, 0]
    width = 0.8 / len(tables)
    x = np.arange(len(order))
    for i, (method, (table, labs)) in enumerate(tables.items()):
        col = {v: j for j, v in enumerate(labs)}
        missing = [v for v in order if v not in col]
        if missing:
            raise ValueError(f"results[{method!r}]: no Dice for labels {missing}")
        vals = table[:, [col[v] for v in order]]
        with np.errstate(all="ignore"):
            mean = np.nanmean(vals, 0) if np.isfinite(vals).any() else np.full(len(order), np.nan)
            std = np.nanstd(vals, 0) if len(vals) > 1 else None
        overall = np.nanmean(vals) if np.isfinite(vals).any() else np.nan
        ax.bar(x + (i - (len(tables) - 1) / 2) * width, np.nan_to_num(mean), width,
               yerr=None if std is None else np.nan_to_num(std), capsize=1.5,
               label=f"{method} (mean {overall:.3f})")
    ax.set_xticks(x, [names.get(v, str(v)) for v in order], rotation=70, ha="right", fontsize=8)
    ax.set_xlabel("structure")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(4, len(tables)), loc="upper center", bbox_to_anchor=(0.5, 1.12))
    return fig


_X_KEYS = ("step", "epoch", "iteration")
_SPLIT_NAMES = {"train": "training", "val": "validation"}
_AXIS_NAMES = {"percent_folding": "% folding (det J <= 0)", "sdlogj": "SDlogJ",
               "dice": "Dice", "tre": "TRE"}


def _series(table: Mapping, split: str | None = None):
    """(label, group, x, y, xlabel, validation) for each numeric series of one flat history table.

    ``split`` names the table of a nested history ("train", "val"); in a flat
    one, ``val_<name>`` is the validation of ``<name>``.
    """
    cols = {k: np.asarray(v, float) for k, v in table.items()}
    xkey = next((k for k in _X_KEYS if k in cols), None)
    out = []
    for k, y in cols.items():
        if k == xkey:
            continue
        x = cols[xkey][:len(y)] if xkey else np.arange(1, len(y) + 1)
        if split is None:
            is_val = k.startswith("val_") and k[4:] in cols
            group, part = (k[4:], "val") if is_val else (k, "train")
        else:
            group, part, is_val = k, split, split == "val"
        out.append((_SPLIT_NAMES.get(part, part), group, x, y, xkey or "epoch", is_val))
    return out


def plot_history(history, *, keys: Sequence[str] | None = None, logy: bool = False,
                 smooth: int = 1):
    """Training curves: one panel per quantity, validation drawn beside training.

    Validation values (measured every few steps) are drawn with a marker at
    each step where they were measured and labelled "validation"; training
    values are labelled "training". Every panel labels both axes.

    Parameters
    ----------
    history : dict
        :func:`regedu.train.fit`'s history ``{"train": {"step": [...], "loss": [...], ...},
        "val": {"step": [...], "dice": [...], ...}}``, or a flat dict of name -> values
        (``val_<name>`` shares ``<name>``'s panel), or a list of per-epoch dicts. A
        "step", "epoch" or "iteration" series gives the x axis.
    keys : list of str, optional
        Quantities to plot (default: all).
    logy : bool
        Logarithmic y axes (losses spanning decades).
    smooth : int
        Moving-average window for noisy per-step training curves (the raw curve
        stays, faint); validation values are never smoothed.
    """
    if isinstance(history, Sequence) and history and isinstance(history[0], Mapping):
        history = {k: [row.get(k, np.nan) for row in history] for k in history[0]}
    if not isinstance(history, Mapping) or not history:
        raise ValueError("history: expected a non-empty dict of name -> list of values, "
                         "regedu.train.fit's {'train': {...}, 'val': {...}}, or a list of dicts")
    check_positive(smooth, "smooth", integer=True)
    if all(isinstance(v, Mapping) for v in history.values()):
        series = [s for split, table in history.items() for s in _series(table, split)]
    else:
        series = _series(history)
    # fit() records an empty validation table when it has no validation data.
    series = [s for s in series if len(s[3])]
    if keys is not None:
        known = {g for _, g, *_ in series}
        for k in keys:
            if k not in known:
                raise ValueError(f"keys: {k!r} is not in history (has {', '.join(sorted(known))})")
        series = [s for s in series if s[1] in keys]
    groups: dict[str, list] = {}
    for s in series:
        groups.setdefault(s[1], []).append(s)
    if not groups:
        raise ValueError("history: no series to plot")
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = _subplots(nrows, ncols, size=(4.0, 3.0))
    for ax, (group, members) in zip(axes.flat, groups.items()):
        for label, _, x, y, xlabel, is_val in members:
            if is_val:
                ax.plot(x, y, marker="o", markersize=4, linewidth=1.2, color="C1", label=label)
            elif smooth > 1 and len(y) > smooth:
                line, = ax.plot(x, y, alpha=0.3, linewidth=0.8, color="C0")
                kernel = np.ones(smooth) / smooth
                ax.plot(x[smooth - 1:], np.convolve(y, kernel, mode="valid"), color=line.get_color(),
                        label=f"{label} ({smooth}-step mean)")
            else:
                ax.plot(x, y, marker="." if len(y) < 30 else None,
                        color="C0" if label == "training" else None, label=label)
        ax.set_title(group)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_AXIS_NAMES.get(group, group) + (" (log scale)" if logy else ""))
        ax.grid(alpha=0.3)
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    return fig


def plot_fire_curves(errors: Mapping, *, thresholds=None):
    """FIRE success-rate curves per category: the fraction of pairs registered within each threshold.

    Parameters
    ----------
    errors : dict of category ("S", "P", "A", ...) -> per-pair errors
        One entry per pair, as :func:`regedu.metrics.fire_success_curve` takes
        them: the pair's per-point errors in pixels (or their mean), or None
        for a failed pair. With several categories an "all" curve is added.
    thresholds : iterable of float, optional
        Error thresholds in pixels (default FIRE's 1 to 25).
    """
    from .. import metrics
    if not isinstance(errors, Mapping) or not errors:
        raise ValueError("errors: expected a non-empty dict of category -> per-pair errors")
    curves = {k: list(v) for k, v in errors.items()}
    if len(curves) > 1:
        curves["all"] = [e for v in curves.values() for e in v]
    thresholds = metrics.FIRE_THRESHOLDS if thresholds is None else np.asarray(list(thresholds), float)
    fig, axes = _subplots(1, 1, size=(5.5, 4.0))
    ax = axes[0, 0]
    for k, e in curves.items():
        t, rate = metrics.fire_success_curve(e, thresholds)
        ax.plot(t, rate, label=f"{k} (n={len(e)}, AUC {metrics.fire_auc(e, thresholds):.3f})",
                linewidth=2.5 if k == "all" else 1.5, linestyle="--" if k == "all" else "-")
    ax.set_xlabel("threshold (pixels)")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_slices(volumes, index: Sequence[int] | None = None, *, titles: Sequence[str] | None = None):
    """Three orthogonal slices of each volume (the VV-Net paper's figure 4).

    Parameters
    ----------
    volumes : dict of title -> volume, or a list of volumes (D, H, W)
        Typically fixed, moving and warped; all of one shape, shown on the
        first volume's intensity scale.
    index : three ints, optional
        Slice along axes 0, 1, 2 (default: the centre, [80, 96, 112] at 160x192x224).
    """
    if isinstance(volumes, Mapping):
        titles, volumes = list(volumes), list(volumes.values())
    vols = [R.spatial_array(v, f"volumes[{i}]", ndim=3) for i, v in enumerate(volumes)]
    if not vols:
        raise ValueError("volumes: expected at least one volume")
    titles = list(titles) if titles is not None else ["fixed", "moving", "warped", "4th", "5th"][:len(vols)]
    if len(titles) != len(vols):
        raise ValueError(f"titles: expected {len(vols)} titles, got {len(titles)}")
    shape = vols[0].shape
    for i, v in enumerate(vols):
        if v.shape != shape:
            raise ValueError(f"volumes[{i}]: expected shape {shape} like the first, got {v.shape}")
    idx = [R.check_axis_index(shape, k, None if index is None else index[k]) for k in range(3)]
    lo, hi = R.intensity_window(vols[0])
    widths = [shape[2], shape[2], shape[1]]
    fig, axes = plt.subplots(len(vols), 3, figsize=(2.8 * 3, 2.8 * len(vols) * shape[1] / shape[2] + 0.4),
                             squeeze=False, layout="constrained", gridspec_kw={"width_ratios": widths})
    plt.close(fig)
    for row, (v, t) in enumerate(zip(vols, titles)):
        for k in range(3):
            ax = axes[row, k]
            ax.imshow(R.plane(v, k, idx[k]), cmap="gray", vmin=lo, vmax=hi)
            _image_axes(ax, f"axis {k} = {idx[k]}" if row == 0 else None)
            if k == 0:
                ax.set_ylabel(t)
    return fig


_FIXED_RGB = np.array([40, 200, 80], dtype=np.uint8)     # fusion right where the single atlas was wrong
_BROKEN_RGB = np.array([230, 40, 40], dtype=np.uint8)    # fusion wrong where the single atlas was right


def plot_fusion(target_image, target_labels, best_single, fused, labels=None, *, axis: int = 0,
                index: int | None = None, names: Sequence[str] = ("best single atlas", "fused"),
                alpha: float = 0.45):
    """The best single atlas and the fused segmentation side by side, against the target's labels.

    Four panels on the target image: its own labels (the reference), the best
    single atlas's propagated labels, the fused labels (both with the
    reference's outlines in white), and where they differ: green where the
    fusion is right and the single atlas wrong, red the other way round.
    Titles carry the Dice of each against the reference (mean over
    ``labels``, computed on the whole image or volume, not the slice shown) and
    the voxel counts of the last panel.

    Parameters
    ----------
    target_image : array or Tensor, shape (H, W), (D, H, W) or with leading (1, 1) axes
    target_labels, best_single, fused : label maps of that shape
    labels : sequence of int, optional
        Structures to score (default: every non-zero label of ``target_labels``).
    axis, index : int
        For volumes, the slice shown (default: the centre).
    names : (str, str)
        Titles of the two candidates.
    alpha : float
        Opacity of the label colours.

    Returns
    -------
    matplotlib.figure.Figure

    Convention: arrays shown as stored (rows down); all maps in the target's
    space (labels warped with nearest neighbour, docs/conventions.md, "Conventions").
    """
    from ..metrics import dice

    img = R.spatial_array(target_image, "target_image")
    shape = img.shape
    ref = R.label_array(target_labels, "target_labels", shape=shape)
    single = R.label_array(best_single, "best_single", shape=shape)
    fuse = R.label_array(fused, "fused", shape=shape)
    if len(names) != 2:
        raise ValueError(f"names: expected two titles (single, fused), got {names!r}")
    if labels is None:
        labels = [int(v) for v in np.unique(ref) if v != 0]
        if not labels:
            raise ValueError("target_labels: no structure (only background); pass labels=[...]")
    scores = [dice(ref, m, labels) for m in (single, fuse)]
    # "Right" means the voxel's label agrees with the reference, counting unscored labels as background.
    keep = np.asarray(labels)
    as_scored = [np.where(np.isin(m, keep), m, 0) for m in (ref, single, fuse)]
    right_single, right_fused = as_scored[1] == as_scored[0], as_scored[2] == as_scored[0]
    repaired, broken = right_fused & ~right_single, right_single & ~right_fused

    k = R.check_axis_index(shape, axis, index) if img.ndim == 3 else None
    cut = (lambda a: R.plane(a, axis, k)) if k is not None else (lambda a: a)
    where = f" (axis {axis} = {k})" if k is not None else ""
    lo, hi = R.intensity_window(img)
    grey = R.colorize(cut(img).astype(np.float32), lo, hi)
    colours = R.LabelColours(ref, single, fuse)
    outline = R.label_edges(cut(ref))

    def labelled(m, edges: bool):
        m2 = cut(m)
        rgb = R.blend(grey, (m2 != 0).astype(np.float32), colours.rgb(m2), alpha)
        if edges:
            rgb[outline] = 255
        return rgb

    diff = R.blend(R.blend(grey, cut(repaired).astype(np.float32), _FIXED_RGB, 0.8),
                   cut(broken).astype(np.float32), _BROKEN_RGB, 0.8)
    panels = [(labelled(ref, False), f"target labels (reference){where}"),
              (labelled(single, True), f"{names[0]}: Dice {scores[0].mean:.3f}"),
              (labelled(fuse, True), f"{names[1]}: Dice {scores[1].mean:.3f}"),
              (diff, f"{names[1]} vs {names[0]}\ngreen: repaired {int(repaired.sum())}, "
                     f"red: broken {int(broken.sum())} voxels")]
    fig, axes = _subplots(1, 4)
    for ax, (rgb, title) in zip(axes[0], panels):
        ax.imshow(rgb)
        _image_axes(ax, title)
    return fig
