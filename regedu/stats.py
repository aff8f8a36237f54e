"""Paired comparison of two methods on the same items (pairs, subjects, structures).

When two methods are scored on the same test pairs, the question is not
whether their mean scores differ but whether the *per-pair differences* are
consistently on one side of zero: the pairs vary far more among themselves
than the methods do. :func:`paired_bootstrap` resamples the pairs to give a
confidence interval of the mean difference; :func:`paired_test` adds the
Wilcoxon signed-rank test and the paired t-test, and says the result in one
generated sentence (:meth:`PairedTest.summary`).

Convention: differences are ``b - a`` (method B minus method A, per item);
``higher_is_better`` says which sign favours B (True for Dice, False for TRE
or HD95).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_positive

__all__ = ["paired_bootstrap", "paired_test", "PairedBootstrap", "PairedTest"]


def _scores(a, b) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for name, x in (("a", a), ("b", b)):
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"{name}: expected one score per item, shape (n,), got shape {x.shape}")
        bad = int((~np.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name}: {bad} NaN or infinite scores; drop those items from both a "
                             f"and b (a pair needs both scores)")
        out.append(x)
    if out[0].shape != out[1].shape:
        raise ValueError(f"a and b: expected paired scores (the same items in the same order), got "
                         f"{out[0].size} and {out[1].size} scores")
    if out[0].size < 2:
        raise ValueError(f"a: expected at least 2 paired scores, got {out[0].size}")
    return out[0], out[1]


def _fmt(x: float, digits: int) -> str:
    s = f"{x:.{digits}f}"
    return s if s.strip("-0.") else f"{0:.{digits}f}"      # no "-0.000"


def _p(p: float) -> str:
    return "nan" if np.isnan(p) else ("< 0.001" if p < 0.001 else f"= {p:.3f}")


@dataclass(frozen=True)
class PairedBootstrap:
    """A bootstrap confidence interval of the mean paired difference ``b - a``.

    Attributes
    ----------
    n : int
        Pairs.
    mean_difference : float
        Mean of ``b - a``.
    ci_low, ci_high : float
        Percentile bootstrap interval at level ``ci``.
    ci : float
        The level, e.g. 0.95.
    p_value : float
        Two-sided bootstrap p-value of the sign: ``2 min(P*(d <= 0), P*(d >= 0))``
        over the resampled means, capped at 1. Resolution ``1 / n_boot``.
    n_boot : int
    names : (str, str)
        The methods' names for :meth:`summary`.
    metric : str
    higher_is_better : bool
    """
    n: int
    mean_difference: float
    ci_low: float
    ci_high: float
    ci: float
    p_value: float
    n_boot: int
    names: tuple = ("A", "B")
    metric: str = ""
    higher_is_better: bool = True

    def _winner(self, agrees: bool = True) -> str | None:
        # A winner only when the interval excludes 0 (and the other test, if any, agrees).
        if not ((self.ci_low > 0 or self.ci_high < 0) and agrees):
            return None
        a, b = self.names
        return b if (self.mean_difference > 0) == self.higher_is_better else a

    @property
    def winner(self) -> str | None:
        """The better method's name when the interval excludes 0, else None ("do not differ clearly")."""
        return self._winner()

    def _sentence(self, digits: int, test: str, agrees: bool = True) -> str:
        a, b = self.names
        d, lo, hi = self.mean_difference, self.ci_low, self.ci_high
        unit = f" {self.metric}" if self.metric else ""
        winner = self._winner(agrees)
        if winner is not None:
            # The interval of the winner's advantage, so that it reads beside "beats ... by".
            lo, hi = sorted((abs(lo), abs(hi)))
        interval = f"{self.ci * 100:g} % CI {_fmt(lo, digits)} to {_fmt(hi, digits)}, {self.n} pairs; {test}"
        if winner is not None:
            loser = a if winner == b else b
            return f"{winner} beats {loser} by {_fmt(abs(d), digits)}{unit} ({interval})"
        return (f"{b} and {a} do not differ clearly: {b} - {a} = {_fmt(d, digits)}{unit} "
                f"({interval})")

    def summary(self, digits: int = 3) -> str:
        """One sentence from the numbers, e.g. ``"B beats A by 0.012 Dice (95 % CI 0.004 to
        0.020, 30 pairs; bootstrap p = 0.002)"``; "do not differ clearly" when the CI holds 0."""
        return self._sentence(digits, f"bootstrap p {_p(self.p_value)}")


def paired_bootstrap(a, b, *, n_boot: int = 10000, seed: int = 0, ci: float = 0.95,
                     names=("A", "B"), metric: str = "", higher_is_better: bool = True) -> PairedBootstrap:
    """Bootstrap the mean of the paired differences ``b - a``.

    Resamples the items (pairs of scores stay together) ``n_boot`` times and
    takes the percentiles of the resampled mean differences as the interval.

    Parameters
    ----------
    a, b : array, shape (n,)
        Scores of methods A and B on the same ``n`` items, in the same order.
    n_boot : int
        Resamples.
    seed : int
        Seed of numpy's ``default_rng``: the same seed gives the same interval.
    ci : float
        Level of the interval, in (0, 1).
    names : (str, str)
        Names of A and B for the summary.
    metric : str
        Name of the score for the summary ("Dice", "mm").
    higher_is_better : bool
        Whether a positive difference favours B (Dice: True; TRE, HD95: False).

    Returns
    -------
    PairedBootstrap

    >>> a = np.array([0.70, 0.72, 0.68, 0.75, 0.71, 0.69])
    >>> r = paired_bootstrap(a, a + [0.02, 0.01, 0.03, 0.02, 0.01, 0.02], metric="Dice", n_boot=2000)
    >>> round(r.mean_difference, 4), r.ci_low > 0
    (0.0183, True)
    >>> r.summary()
    'B beats A by 0.018 Dice (95 % CI 0.013 to 0.023, 6 pairs; bootstrap p < 0.001)'
    """
    a, b = _scores(a, b)
    check_positive(n_boot, "n_boot", integer=True)
    if not (isinstance(ci, float) and 0 < ci < 1):
        raise ValueError(f"ci: expected a level in (0, 1) such as 0.95, got {ci!r}")
    if len(names) != 2:
        raise ValueError(f"names: expected two names (A, B), got {names!r}")
    d = b - a
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    # Resample in blocks: n_boot x n indices at once would need n_boot * n * 8 bytes.
    block = max(1, 2_000_000 // n)
    for start in range(0, n_boot, block):
        stop = min(start + block, n_boot)
        means[start:stop] = d[rng.integers(0, n, (stop - start, n))].mean(1)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return PairedBootstrap(n, float(d.mean()), float(lo), float(hi), ci, p, n_boot,
                           tuple(names), metric, bool(higher_is_better))


@dataclass(frozen=True)
class PairedTest:
    """Paired tests of ``b - a``: Wilcoxon signed-rank, paired t, and the bootstrap interval.

    Attributes
    ----------
    n : int
    mean_difference, median_difference : float
    wilcoxon_statistic, wilcoxon_p : float
        ``scipy.stats.wilcoxon`` (two-sided; zero differences dropped, as its
        default). All differences zero: p = 1 (nothing to rank).
    t_statistic, t_p : float
        ``scipy.stats.ttest_rel`` (two-sided). Differences all equal: t = 0, p = 1
        if they are 0, t = +-inf, p = 0 otherwise (no spread: any shift is certain).
    bootstrap : PairedBootstrap
    """
    n: int
    mean_difference: float
    median_difference: float
    wilcoxon_statistic: float
    wilcoxon_p: float
    t_statistic: float
    t_p: float
    bootstrap: PairedBootstrap

    def summary(self, digits: int = 3) -> str:
        """One sentence, e.g. ``"B beats A by 0.012 Dice (95 % CI 0.004 to 0.020, 30 pairs;
        Wilcoxon p = 0.003)"``: the bootstrap interval and the Wilcoxon p-value.

        A method "beats" the other only when both say so: the interval excludes
        0 *and* the Wilcoxon p-value is below ``1 - ci``. With few pairs the
        bootstrap interval is too narrow (3 pairs of one sign give an interval
        that excludes 0, while no test on 3 pairs can reach p < 0.25); the
        sentence then says "do not differ clearly".
        """
        return self.bootstrap._sentence(digits, f"Wilcoxon p {_p(self.wilcoxon_p)}", self._agrees)

    @property
    def _agrees(self) -> bool:
        return self.wilcoxon_p < 1 - self.bootstrap.ci

    @property
    def winner(self) -> str | None:
        """The better method's name when the interval and the Wilcoxon test both say so
        (:meth:`summary`'s "beats"), else None."""
        return self.bootstrap._winner(self._agrees)


def paired_test(a, b, *, n_boot: int = 10000, seed: int = 0, ci: float = 0.95,
                names=("A", "B"), metric: str = "", higher_is_better: bool = True) -> PairedTest:
    """Wilcoxon signed-rank test, paired t-test and bootstrap interval of ``b - a``.

    The Wilcoxon test asks whether the differences are symmetric about 0
    without assuming they are normal (per-pair Dice differences rarely are);
    the t-test assumes normal differences. Arguments as :func:`paired_bootstrap`.

    Returns
    -------
    PairedTest

    >>> a = np.linspace(0.6, 0.8, 12)
    >>> b = a + 0.01 + 0.002 * np.cos(np.arange(12))
    >>> r = paired_test(a, b, metric="Dice", names=("VoxelMorph", "VV-Net"))
    >>> r.wilcoxon_p < 0.001, r.t_p < 0.001
    (True, True)
    >>> r.summary()[:30]
    'VV-Net beats VoxelMorph by 0.0'
    """
    from scipy import stats as st

    a, b = _scores(a, b)
    boot = paired_bootstrap(a, b, n_boot=n_boot, seed=seed, ci=ci, names=names, metric=metric,
                            higher_is_better=higher_is_better)
    d = b - a
    if np.all(d == 0):
        w_stat, w_p = 0.0, 1.0
    else:
        w = st.wilcoxon(d)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    if np.all(d == d[0]):
        # No spread: scipy would divide by zero (and warn); the limit is certain.
        t_stat, t_p = (0.0, 1.0) if d[0] == 0 else (float(np.sign(d[0]) * np.inf), 0.0)
    else:
        t = st.ttest_rel(b, a)
        t_stat, t_p = float(t.statistic), float(t.pvalue)
    return PairedTest(d.size, float(d.mean()), float(np.median(d)), w_stat, w_p, t_stat, t_p, boot)
