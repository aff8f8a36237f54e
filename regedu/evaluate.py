"""One evaluation for every registration method, and tables like a paper's.

A *method* is anything that registers a pair: a callable ``(moving, fixed) ->
displacement`` (ANTs, instance optimisation, a lambda), or a trained network
whose ``forward(moving, fixed)`` returns an object with ``.disp``
(:class:`regedu.nets.RegistrationOutput`). :func:`evaluate` runs it over a list
of pairs and records, per pair, Dice per structure, TRE on landmarks, folding
(% det J <= 0, SDlogJ), seconds and device. :func:`summary` turns several
evaluations into a "mean (std)" table like Table 2 of the VV-Net paper, and
:func:`fire_report` applies the FIRE protocol to 2D landmark pairs.

A pair is a dict with ``"moving"`` and ``"fixed"`` images and optionally
``"moving_seg"``, ``"fixed_seg"`` (label maps), ``"moving_points"``,
``"fixed_points"`` (``(N, ndim)`` voxel coordinates, tensor-axis order) and
``"meta"`` (a dict: ``"id"``, ``"dataset"``, ``"category"`` for FIRE, ``"spacing"``).

Convention: fields pull the moving image into fixed space (docs/conventions.md, "Conventions");
labels are warped with nearest neighbour; a fixed point ``p`` lands at
``p + u(p)`` in the moving image; TRE is scaled by the spacing.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ._checks import as_tensor, check_choice, check_field, check_finite, check_label_list, check_labels
from .metrics import (FIRE_THRESHOLDS, average_surface_distance, dice, fire_auc, fire_success_curve,
                      folding_stats, hausdorff95, tre)
from .spatial import warp

__all__ = ["evaluate", "score_pair", "dice_per_pair", "PairScores", "compare", "Evaluation", "summary", "SummaryTable",
           "fire_report", "FireReport", "identity"]

FIRE_CATEGORIES = ("S", "P", "A")


def identity(moving, fixed) -> torch.Tensor:
    """The do-nothing method: a zero displacement (the "unregistered" baseline)."""
    fixed = as_tensor(fixed, "fixed")
    return torch.zeros(fixed.shape[0], fixed.dim() - 2, *fixed.shape[2:], device=fixed.device)


# ------------------------------------------------------------------ one pair

def _batched(x, name: str, spatial_dims: int | None) -> torch.Tensor:
    """An image as ``(1, C, *spatial)``: accepts ``(C, *spatial)`` items and ``(1, C, *spatial)``."""
    x = as_tensor(x, name)
    if spatial_dims is None:
        # (C, H, W) -> 2D item; (B, C, D, H, W) -> 3D batch; for four axes, a
        # leading 1 followed by a small channel count reads as a 2D batch.
        if x.dim() == 3:
            spatial_dims = 2
        elif x.dim() == 5:
            spatial_dims = 3
        elif x.dim() == 4:
            spatial_dims = 2 if (x.shape[0] == 1 and x.shape[1] <= 4) else 3
        else:
            raise ValueError(f"{name}: expected (C, *spatial) or (1, C, *spatial) in 2D or 3D, "
                             f"got shape {tuple(x.shape)}")
    if x.dim() == spatial_dims + 1:
        x = x[None]
    if x.dim() != spatial_dims + 2 or x.shape[0] != 1:
        raise ValueError(f"{name}: expected one {spatial_dims}D image, (C, *spatial) or "
                         f"(1, C, *spatial), got shape {tuple(x.shape)}; evaluate takes pairs "
                         f"one at a time (pass spatial_dims= if the guess is wrong)")
    return check_finite(x, name)


def _seg(x, name: str, spatial: tuple[int, ...]) -> torch.Tensor:
    """A label map as ``(1, 1, *spatial)`` (any layout with that many voxels)."""
    x = as_tensor(x, name)
    if x.numel() != math.prod(spatial):
        raise ValueError(f"{name}: expected a label map with spatial size {spatial}, got shape "
                         f"{tuple(x.shape)}")
    # Whole numbers only: rounding 0.5 or NaN into a label would score a structure that is not there.
    check_labels(x, name)
    return x.long().reshape(1, 1, *spatial)


def _points(x, name: str, ndim: int) -> torch.Tensor:
    x = as_tensor(x, name).to(torch.float64)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2 or x.shape[1] != ndim:
        raise ValueError(f"{name}: expected (N, {ndim}) voxel coordinates in tensor-axis order, "
                         f"got shape {tuple(x.shape)}")
    return check_finite(x, name)


def _disp_of(output, name: str) -> torch.Tensor:
    disp = getattr(output, "disp", output)
    if not isinstance(disp, torch.Tensor):
        raise TypeError(f"{name}: expected the method to return a displacement tensor "
                        f"(B, ndim, *spatial) or an object with .disp (e.g. RegistrationOutput), "
                        f"got a {type(output).__name__}")
    return disp


def _device_of(method, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(method, nn.Module):
        param = next(method.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def _run(method, moving, fixed, device: torch.device):
    def call():
        if isinstance(method, nn.Module):
            with torch.no_grad():
                return method(moving, fixed)
        return method(moving, fixed)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


@dataclass
class PairScores:
    """What :func:`score_pair` measured on one pair.

    ``record``: ``dice_mean``, ``dice_std``, ``dice_before``, ``tre_mean``,
    ``tre_median``, ``tre_before`` (NaN without their inputs), ``percent_folding``,
    ``sdlogj``, and with ``surface=True`` ``hd95``, ``asd`` (means over structures)
    and ``surface_missing``; ``dice``, ``hd95``, ``asd``: per structure (None
    without label maps); ``tre``: per point (None without landmarks).
    """
    record: dict
    dice: object = None
    tre: np.ndarray | None = None
    hd95: object = None
    asd: object = None


def score_pair(disp, pair: dict, *, labels=None, spacing=1.0, where: str = "pair",
               surface: bool = False) -> PairScores:
    """The measures of one registered pair: Dice, TRE, folding, and surface distances if asked.

    Parameters
    ----------
    disp : Tensor, shape (1, ndim, *spatial)
        The displacement a method found for the pair.
    pair : dict
        Optionally ``moving_seg`` and ``fixed_seg`` (label maps: Dice of the
        nearest-neighbour-warped moving labels, and before registration),
        ``moving_points`` and ``fixed_points`` (TRE, times ``spacing``).
    labels : sequence of int
        Structures for Dice; required when the pair has label maps.
    spacing : float or tuple of float
        Voxel size for TRE and the surface distances.
    where : str
        How messages name the pair (``"pairs[3]"``).
    surface : bool
        Also HD95 and the average symmetric surface distance between the fixed
        labels and the warped moving ones (:func:`regedu.metrics.hausdorff95`,
        :func:`regedu.metrics.average_surface_distance`); ``surface_missing``
        counts the structures in one map only (left out of the means).
    """
    spatial = tuple(disp.shape[2:])
    record = dict(dice_mean=np.nan, dice_std=np.nan, dice_before=np.nan)
    scores = PairScores(record)
    segs = "moving_seg" in pair and "fixed_seg" in pair
    if segs:
        if labels is None:
            raise ValueError(f"labels: {where} has segmentations; pass the structures "
                             f"to score, e.g. labels=[2, 3, 4, ...] or a dict {{label: name}}")
        ms = _seg(pair["moving_seg"], f"{where}['moving_seg']", spatial)
        fs = _seg(pair["fixed_seg"], f"{where}['fixed_seg']", spatial)
        warped = warp(ms, disp, mode="nearest")
        scores.dice = dice(fs, warped, labels)
        record.update(dice_mean=scores.dice.mean, dice_std=scores.dice.std,
                      dice_before=dice(fs, ms, labels).mean)
    record.update(tre_mean=np.nan, tre_median=np.nan, tre_before=np.nan)
    if "moving_points" in pair and "fixed_points" in pair:
        fp = _points(pair["fixed_points"], f"{where}['fixed_points']", len(spatial))
        mp = _points(pair["moving_points"], f"{where}['moving_points']", len(spatial))
        scores.tre = tre(fp, mp, disp, spacing=spacing).numpy()
        before = tre(fp, mp, torch.zeros_like(disp), spacing=spacing).numpy()
        record.update(tre_mean=float(scores.tre.mean()), tre_median=float(np.median(scores.tre)),
                      tre_before=float(before.mean()))
    record.update(folding_stats(disp))
    if surface:
        record.update(hd95=np.nan, asd=np.nan, surface_missing=0)
        if segs:
            scores.hd95 = hausdorff95(fs[0, 0], warped[0, 0], labels, spacing=spacing)
            scores.asd = average_surface_distance(fs[0, 0], warped[0, 0], labels, spacing=spacing)
            record.update(hd95=scores.hd95.mean, asd=scores.asd.mean,
                          surface_missing=len(scores.hd95.missing))
    return scores


def dice_per_pair(fixed_seg, moving_seg, disp, labels) -> np.ndarray:
    """Mean Dice over ``labels`` of each pair of a batch, the moving labels warped with nearest neighbour.

    ``fixed_seg`` and ``moving_seg`` are ``(B, 1, *spatial)`` label maps, ``disp``
    the ``(B, ndim, *spatial)`` fields (voxels) that pull each moving map onto its
    fixed grid; returns ``(B,)``. The quick score of a batch of registrations
    (notebooks 13-17); :func:`evaluate` gives every metric, per structure.

    >>> seg = torch.tensor([[[[0, 1, 1, 2], [0, 1, 1, 2]]]])
    >>> dice_per_pair(seg, seg, torch.zeros(1, 2, 2, 4), [1, 2]).tolist()
    [1.0]
    """
    warped = warp(moving_seg, disp, mode="nearest")
    return np.array([dice(f[0], w[0], labels).mean for f, w in zip(fixed_seg, warped)])


def _label_spec(labels):
    """``labels`` as a list of ints and a list of column names."""
    if labels is None:
        return None, None
    if isinstance(labels, dict):
        return check_label_list(list(labels)), [str(v) for v in labels.values()]
    ids = check_label_list(labels)
    return ids, [str(k) for k in ids]


# ---------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    """The result of :func:`evaluate`: one record per pair.

    Attributes
    ----------
    name : str
        The method's name (a row of the summary table).
    records : list of dict
        Per pair: ``method``, ``pair``, ``dataset``, ``category``; ``dice_mean``,
        ``dice_std``, ``dice_before`` (the unregistered overlap); ``tre_mean``,
        ``tre_median``, ``tre_before``; ``percent_folding``, ``sdlogj``;
        ``seconds``, ``device``. Missing inputs give NaN.
    dice : DataFrame
        Dice per structure, rows pairs, columns structures (NaN: absent from both).
    tre_errors : list of ndarray or None
        Per-point TRE of each pair (None for pairs without landmarks).
    hd95, asd : DataFrame
        With ``evaluate(..., surface=True)``: HD95 and average symmetric surface
        distance per structure, in the units of the spacing, laid out as ``dice``
        (NaN: absent from both maps, or from one: see ``surface_missing``);
        empty otherwise.
    """

    name: str
    records: list = field(default_factory=list)
    dice: pd.DataFrame = field(default_factory=pd.DataFrame)
    tre_errors: list = field(default_factory=list)
    hd95: pd.DataFrame = field(default_factory=pd.DataFrame)
    asd: pd.DataFrame = field(default_factory=pd.DataFrame)

    def table(self) -> pd.DataFrame:
        """The records as a DataFrame, one row per pair."""
        return pd.DataFrame(self.records)

    def mean_dice(self, dataset: str | None = None) -> float:
        """Mean Dice over every (pair, structure), as :func:`summary` reports it; of one dataset if given."""
        keep = [dataset is None or r["dataset"] == dataset for r in self.records]
        if not any(keep):
            raise ValueError(f"dataset: expected one of {sorted({r['dataset'] for r in self.records})}, "
                             f"got {dataset!r}")
        return float(np.nanmean(self.dice.to_numpy(float)[keep]))

    def _repr_html_(self) -> str:
        return f"<p><b>{self.name}</b>: {len(self.records)} pairs</p>" + self.table()._repr_html_()

    def __repr__(self) -> str:
        return f"Evaluation({self.name!r}, {len(self.records)} pairs)"


def evaluate(method, pairs, *, labels=None, name: str | None = None, spacing=1.0,
             device=None, spatial_dims: int | None = None, warmup: bool = False,
             progress: bool = True, surface: bool = False) -> Evaluation:
    """Register every pair with ``method`` and measure the result.

    Parameters
    ----------
    method : callable or nn.Module
        ``method(moving, fixed)`` with both ``(1, C, *spatial)`` on ``device``;
        returns a displacement ``(1, ndim, *spatial)`` or an object with
        ``.disp`` (a network's ``RegistrationOutput``, an
        ``InstanceOptimisationResult``). A module runs under ``torch.no_grad()``
        (put it in eval mode yourself if it has dropout or batch norm).
    pairs : iterable of dict
        ``moving``, ``fixed`` (``(C, *spatial)`` or ``(1, C, *spatial)``), and
        optionally ``moving_seg``, ``fixed_seg``, ``moving_points``,
        ``fixed_points``, ``meta`` (see the module docstring).
    labels : sequence of int or dict {int: str}, optional
        Structures for Dice (background excluded); a dict names the columns.
        Required when pairs carry segmentations.
    name : str, optional
        Row name in tables; default the method's name.
    spacing : float or tuple of float
        Voxel size for TRE (``meta["spacing"]`` overrides it per pair), e.g.
        full-resolution pixels per pixel for FIRE.
    device : str or torch.device, optional
        Where the images go; default a module's parameter device, else CPU.
    spatial_dims : {2, 3}, optional
        Force the reading of image shapes; default a model's ``config["spatial_dims"]``,
        else guessed from the shapes.
    warmup : bool
        Run the method once on the first pair before timing (one-off costs of
        a network's first call do not count).
    progress : bool
        Show a progress bar.
    surface : bool
        Also measure surface distances of the structures
        (:func:`regedu.metrics.hausdorff95`, :func:`regedu.metrics.average_surface_distance`,
        scaled by the spacing): records gain ``hd95``, ``asd`` (means over
        structures) and ``surface_missing`` (structures in only one of the two
        maps, left out of those means), and the evaluation ``hd95`` and ``asd`` tables.
        Two distance transforms per structure: about 2 s per pair of 30-structure
        brain volumes at 2 mm on one CPU core.

    Returns
    -------
    Evaluation

    Warns when a structure of ``labels`` is in no label map of any pair (its
    column is all NaN and it counts in no mean).

    Convention: ``seconds`` is the wall-clock time of ``method(moving, fixed)``
    alone (CUDA synchronised); metrics run on the CPU afterwards.
    """
    from tqdm.auto import tqdm

    if not callable(method):
        raise TypeError(f"method: expected a callable (moving, fixed) -> displacement or an "
                        f"nn.Module, got a {type(method).__name__}")
    if spatial_dims is None:
        spatial_dims = (getattr(method, "config", None) or {}).get("spatial_dims")
    if spatial_dims is not None:
        check_choice(spatial_dims, (2, 3), "spatial_dims")
    name = name or getattr(method, "__name__", None) or type(method).__name__
    label_ids, label_names = _label_spec(labels)
    dev = _device_of(method, device)
    pairs = list(pairs)
    ev = Evaluation(name)
    dice_rows, hd_rows, asd_rows = [], [], []
    for i, pair in enumerate(tqdm(pairs, disable=not progress, desc=f"evaluate {name}")):
        if not isinstance(pair, dict) or "moving" not in pair or "fixed" not in pair:
            raise ValueError(f"pairs[{i}]: expected a dict with 'moving' and 'fixed' images, got "
                             f"{sorted(pair) if isinstance(pair, dict) else type(pair).__name__}")
        moving = _batched(pair["moving"], f"pairs[{i}]['moving']", spatial_dims).float().to(dev)
        fixed = _batched(pair["fixed"], f"pairs[{i}]['fixed']", spatial_dims).float().to(dev)
        spatial = tuple(fixed.shape[2:])
        meta = dict(pair.get("meta") or {})
        if warmup and i == 0:
            _run(method, moving, fixed, dev)
        out, seconds = _run(method, moving, fixed, dev)
        disp = _disp_of(out, "method").detach().float().cpu()
        check_field(disp, f"the displacement for pairs[{i}]", spatial=spatial, batch=1)

        rec = {"method": name, "pair": meta.get("id", i), "dataset": meta.get("dataset", ""),
               "category": meta.get("category", "")}
        scores = score_pair(disp, pair, labels=label_ids, spacing=meta.get("spacing", spacing),
                            where=f"pairs[{i}]", surface=surface)
        rec.update(scores.record, seconds=seconds, device=str(dev))
        ev.records.append(rec)
        ev.tre_errors.append(scores.tre)
        for rows, result in ((dice_rows, scores.dice), (hd_rows, scores.hd95), (asd_rows, scores.asd)):
            rows.append({} if result is None else dict(zip(label_names, result.per_label)))
    ev.dice = pd.DataFrame(dice_rows, columns=label_names,
                           index=[r["pair"] for r in ev.records])
    if surface:
        ev.hd95 = pd.DataFrame(hd_rows, columns=label_names, index=ev.dice.index)
        ev.asd = pd.DataFrame(asd_rows, columns=label_names, index=ev.dice.index)
    if dice_rows and any(dice_rows):
        absent = [c for c in ev.dice.columns if ev.dice[c].isna().all()]
        if absent:
            warnings.warn(f"labels: {', '.join(map(str, absent))} in no label map of any pair; "
                          f"these structures count in no Dice mean (check the label numbers)",
                          stacklevel=2)
    return ev


def compare(methods: dict, pairs, **kwargs) -> list[Evaluation]:
    """:func:`evaluate` each ``{name: method}`` on the same pairs (kwargs as there)."""
    pairs = list(pairs)
    return [evaluate(m, pairs, name=n, **kwargs) for n, m in methods.items()]


# -------------------------------------------------------------------- tables

_METRIC_TITLES = {"dice": "Dice", "dice_before": "Dice before", "tre": "TRE",
                  "percent_folding": "% det J <= 0", "sdlogj": "SDlogJ", "seconds": "seconds",
                  "hd95": "HD95", "asd": "ASD"}


def _values(ev: Evaluation, metric: str, rows: np.ndarray, dice_over: str) -> np.ndarray:
    if metric == "dice" and dice_over == "structures":
        values = ev.dice.to_numpy(dtype=float)[rows].ravel()
    else:
        column = {"dice": "dice_mean", "tre": "tre_mean"}.get(metric, metric)
        values = ev.table()[column].to_numpy(dtype=float)[rows]
    return values[~np.isnan(values)]


@dataclass
class SummaryTable:
    """Mean and std per method (rows) and column, shown as "mean (std)".

    ``mean`` and ``std`` are numeric DataFrames; ``frame`` the formatted one.
    Renders as HTML in a notebook; exports with :meth:`to_csv` and
    :meth:`to_markdown`.
    """

    mean: pd.DataFrame
    std: pd.DataFrame
    digits: int = 3

    @property
    def frame(self) -> pd.DataFrame:
        def cell(m, s):
            if np.isnan(m):
                return "-"
            return f"{m:.{self.digits}f}" + ("" if np.isnan(s) else f" ({s:.{self.digits}f})")

        out = self.mean.copy().astype(object)
        for r in range(self.mean.shape[0]):
            for c in range(self.mean.shape[1]):
                out.iat[r, c] = cell(self.mean.iat[r, c], self.std.iat[r, c])
        return out

    def to_csv(self, path=None, *, numeric: bool = False):
        """The "mean (std)" table as CSV (``numeric=True``: mean and std columns)."""
        if not numeric:
            return self.frame.to_csv(path)
        both = pd.concat({"mean": self.mean, "std": self.std}, axis=1)
        return both.to_csv(path)

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table."""
        frame = self.frame
        head = [str(frame.index.name or "method")] + [str(c) for c in frame.columns]
        lines = ["| " + " | ".join(head) + " |",
                 "| " + " | ".join(["---"] + ["---:"] * frame.shape[1]) + " |"]
        for idx, row in frame.iterrows():
            lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row]) + " |")
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        return self.frame._repr_html_()

    def __repr__(self) -> str:
        return self.frame.to_string()


def summary(evaluations, metrics=("dice",), *, by: str | None = "dataset",
            dice_over: str = "structures", digits: int = 3) -> SummaryTable:
    """A "mean (std)" table: one row per method, like the VV-Net paper's Table 2.

    Parameters
    ----------
    evaluations : Evaluation or list of Evaluation
        One per method (rows, in this order).
    metrics : sequence of str
        Any of "dice", "dice_before", "tre", "percent_folding", "sdlogj",
        "seconds", "hd95", "asd" (the last two from ``evaluate(..., surface=True)``;
        over the per-pair means), or another numeric record column.
    by : "dataset", "category" or None
        Split columns by this record field (one column per value and metric);
        None pools all pairs (one column per metric).
    dice_over : {"structures", "pairs"}
        Statistics of "dice": over every (pair, structure) value, as the papers
        report Dice over structures and subjects, or over the per-pair means.
    digits : int
        Decimals shown.

    Returns
    -------
    SummaryTable
        Columns are the groups when ``by`` is set and there is one metric,
        the metrics when ``by`` is None, and ``"group / metric"`` otherwise.
        Std is the population std (numpy's default, ddof=0).
    """
    if isinstance(evaluations, Evaluation):
        evaluations = [evaluations]
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    check_choice(dice_over, ("structures", "pairs"), "dice_over")
    if by is not None:
        check_choice(by, ("dataset", "category"), "by")
    groups = [None]
    if by is not None:
        groups = sorted({r[by] for ev in evaluations for r in ev.records}, key=str)
    means, stds = {}, {}
    for ev in evaluations:
        table = ev.table()
        for metric in metrics:
            if metric not in ("dice", "tre") and metric not in table.columns:
                raise ValueError(f"metrics: unknown metric {metric!r}; expected one of "
                                 f"{', '.join(_METRIC_TITLES)} or a record column")
        for g in groups:
            rows = np.ones(len(table), bool) if g is None else (table[by] == g).to_numpy()
            for metric in metrics:
                vals = _values(ev, metric, rows, dice_over)
                title = _METRIC_TITLES.get(metric, metric)
                if g is None:
                    col = title
                elif len(metrics) == 1:
                    col = str(g) or "all"
                else:
                    col = f"{g or 'all'} / {title}"
                means.setdefault(col, {})[ev.name] = vals.mean() if vals.size else np.nan
                stds.setdefault(col, {})[ev.name] = vals.std() if vals.size else np.nan
    order = [ev.name for ev in evaluations]
    mean = pd.DataFrame(means).reindex(order)
    std = pd.DataFrame(stds).reindex(order)
    mean.index.name = std.index.name = "method"
    return SummaryTable(mean, std, digits)


# ---------------------------------------------------------------------- FIRE

@dataclass
class FireReport:
    """The FIRE protocol for one method.

    Attributes
    ----------
    thresholds : ndarray
        Error thresholds in pixels (1..25).
    curves : dict {category: ndarray}
        Success rate at each threshold, per category and for "all" pairs.
    auc : dict {category: float}
        Area under each curve, normalised to [0, 1].
    mauc : float
        Mean of the AUCs of the categories present (S, P, A).
    counts : dict {category: int}
        Pairs per category.
    """

    name: str
    thresholds: np.ndarray
    curves: dict
    auc: dict
    mauc: float
    counts: dict

    def table(self) -> pd.DataFrame:
        """One row: AUC per category, the pooled AUC and mAUC."""
        row = {f"AUC {c}": self.auc[c] for c in self.auc}
        row["mAUC"] = self.mauc
        return pd.DataFrame([row], index=pd.Index([self.name], name="method"))

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def fire_report(evaluation: Evaluation, thresholds=FIRE_THRESHOLDS) -> FireReport:
    """FIRE success curves and AUC per category S/P/A, and mAUC.

    A pair succeeds at threshold t when its mean TRE (in full-resolution
    pixels: evaluate with the right ``spacing``) is below t; the AUC is the
    mean success over thresholds 1..25 (:func:`regedu.metrics.fire_auc`);
    mAUC averages the categories (Hernandez-Matas et al. 2017). Pairs of
    other categories count only in "all".
    """
    cats = [r["category"] for r in evaluation.records]
    with_points = [e is not None for e in evaluation.tre_errors]
    if not any(with_points):
        raise ValueError(f"evaluation: {evaluation.name!r} has no pair with landmarks; FIRE needs "
                         f"pairs with 'fixed_points' and 'moving_points'")
    groups = {"all": [e for e in evaluation.tre_errors if e is not None]}
    for c in FIRE_CATEGORIES:
        errs = [e for e, cat, ok in zip(evaluation.tre_errors, cats, with_points) if ok and cat == c]
        if errs:
            groups[c] = errs
    curves, auc = {}, {}
    for key, errs in groups.items():
        th, curves[key] = fire_success_curve(errs, thresholds)
        auc[key] = fire_auc(errs, thresholds)
    present = [auc[c] for c in FIRE_CATEGORIES if c in auc]
    mauc = float(np.mean(present)) if present else float("nan")
    return FireReport(evaluation.name, np.asarray(th), curves, auc, mauc,
                      {k: len(v) for k, v in groups.items()})
