"""Paired comparisons: known shifts recovered, no difference found where there is none."""
import numpy as np
import pytest

from regedu import stats


def _scores(n=30, shift=0.012, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.6, 0.8, n)                  # pairs differ far more than the methods
    return a, a + shift + rng.normal(0, noise, n)


def test_bootstrap_recovers_a_known_shift_inside_its_interval():
    a, b = _scores()
    r = stats.paired_bootstrap(a, b, metric="Dice")
    assert r.ci_low < 0.012 < r.ci_high and r.ci_low > 0
    # The percentile interval is close to the normal one, mean +- 1.96 s / sqrt(n).
    d = b - a
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert r.ci_low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r.ci_high == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert r.p_value < 0.001
    assert r.summary().startswith(f"B beats A by {abs(d.mean()):.3f} Dice (95 % CI {r.ci_low:.3f} to ")


def test_bootstrap_interval_covers_the_true_shift_about_95_percent_of_the_time():
    hits = 0
    for seed in range(300):
        a, b = _scores(shift=0.01, seed=seed)
        r = stats.paired_bootstrap(a, b, n_boot=1000, seed=seed)
        hits += r.ci_low <= 0.01 <= r.ci_high
    # The percentile bootstrap covers a little less than 95 % at n = 30; 300 trials: +- 2.5 %.
    assert 0.88 <= hits / 300 <= 0.98


def test_identical_scores_show_no_difference():
    a, _ = _scores()
    r = stats.paired_test(a, a.copy())
    assert r.mean_difference == 0 and r.bootstrap.ci_low == 0 == r.bootstrap.ci_high
    assert r.bootstrap.p_value == 1.0 and r.wilcoxon_p == 1.0 and r.t_p == 1.0
    assert r.summary() == ("B and A do not differ clearly: B - A = 0.000 (95 % CI 0.000 to 0.000, "
                           "30 pairs; Wilcoxon p = 1.000)")


def test_tests_known_answers():
    # Five positive differences: exact two-sided Wilcoxon p = 2 / 2^5; t on (1, 2, 3): t = 2 sqrt(3).
    assert stats.paired_test(np.zeros(5), np.arange(1.0, 6.0)).wilcoxon_p == pytest.approx(2 / 32)
    r = stats.paired_test(np.zeros(3), np.array([1.0, 2.0, 3.0]))
    assert r.t_statistic == pytest.approx(2 * np.sqrt(3)) and r.t_p == pytest.approx(0.07418, abs=1e-4)
    constant = stats.paired_test(np.zeros(10), np.full(10, 0.5))
    assert constant.t_statistic == np.inf and constant.t_p == 0.0
    assert constant.wilcoxon_p == pytest.approx(2 / 2 ** 10)


def test_direction_and_names_in_the_summary():
    a, b = _scores()
    # TRE: lower is better, so B (higher) loses.
    r = stats.paired_test(a, b, names=("ANTs", "VoxelMorph"), metric="mm", higher_is_better=False)
    assert r.summary().startswith("ANTs beats VoxelMorph by 0.01") and r.winner == "ANTs"
    assert "30 pairs; Wilcoxon p < 0.001)" in r.summary()
    noisy_a, noisy_b = _scores(shift=0.0, noise=0.02, seed=5)
    noisy = stats.paired_test(noisy_a, noisy_b)
    assert "do not differ clearly" in noisy.summary() and noisy.winner is None
    assert stats.paired_test(a, b, names=("ANTs", "VoxelMorph")).winner == "VoxelMorph"   # Dice: higher is better


def test_seed_reproducibility():
    a, b = _scores(n=12)
    r1, r2 = stats.paired_bootstrap(a, b, seed=7), stats.paired_bootstrap(a, b, seed=7)
    r3 = stats.paired_bootstrap(a, b, seed=8)
    assert (r1.ci_low, r1.ci_high) == (r2.ci_low, r2.ci_high)
    assert (r1.ci_low, r1.ci_high) != (r3.ci_low, r3.ci_high)
    assert r1.ci_low == pytest.approx(r3.ci_low, abs=0.002)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="a and b: expected paired scores"):
        stats.paired_test(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="b: 1 NaN or infinite scores; drop those items"):
        stats.paired_bootstrap(np.zeros(3), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match=r"a: expected one score per item, shape \(n,\)"):
        stats.paired_bootstrap(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"ci: expected a level in \(0, 1\)"):
        stats.paired_bootstrap(np.zeros(3), np.ones(3), ci=95)


def test_a_verdict_needs_the_test_to_agree_with_the_interval():
    # Three differences of one sign: the bootstrap interval excludes 0, but the exact
    # Wilcoxon p on 3 pairs is 0.25: no winner.
    a = np.array([0.60, 0.70, 0.65])
    r = stats.paired_test(a, a + [0.010, 0.012, 0.011], metric="Dice")
    assert r.bootstrap.ci_low > 0 and r.wilcoxon_p == pytest.approx(0.25)
    assert r.bootstrap.summary().startswith("B beats A") and r.bootstrap.winner == "B"
    assert r.summary().startswith("B and A do not differ clearly: B - A = 0.011 Dice") and r.winner is None


def test_the_winners_interval_is_its_advantage():
    a, b = _scores()
    r = stats.paired_test(b, a, names=("VoxelMorph", "SyN"), metric="Dice")   # SyN = a is worse
    lo, hi = -r.bootstrap.ci_high, -r.bootstrap.ci_low
    assert lo > 0
    assert r.summary().startswith(f"VoxelMorph beats SyN by {abs(r.mean_difference):.3f} Dice "
                                  f"(95 % CI {lo:.3f} to {hi:.3f}, 30 pairs")
