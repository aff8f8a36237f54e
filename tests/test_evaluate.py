"""regedu.evaluate: records, summary tables and FIRE against hand computations."""
import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from regedu import evaluate as E


def _square(shape, top, left, size, label):
    seg = np.zeros(shape, np.int64)
    seg[top:top + size, left:left + size] = label
    return seg


def _seg_pair(dataset="A", shift=1):
    """Label 1: a 4x4 square; label 2: a 2x2 square; the moving copy is shifted."""
    shape = (12, 12)
    fixed = _square(shape, 2, 2, 4, 1) + _square(shape, 8, 8, 2, 2)
    moving = _square(shape, 2, 2 + shift, 4, 1) + _square(shape, 8, 8 + shift, 2, 2)
    return {"moving": moving[None].astype(np.float32), "fixed": fixed[None].astype(np.float32),
            "moving_seg": moving, "fixed_seg": fixed, "meta": {"dataset": dataset}}


def _shift_method(shift):
    """Registers _seg_pair exactly: u = +shift along the column axis."""
    def method(moving, fixed):
        u = torch.zeros(1, 2, *fixed.shape[2:])
        u[:, 1] = shift
        return u
    return method


def test_identity_gives_the_unregistered_overlap_and_no_folding():
    pairs = [_seg_pair(shift=1), _seg_pair(shift=2)]
    ev = E.evaluate(E.identity, pairs, labels=[1, 2], progress=False)
    table = ev.table()
    # By hand: a 4x4 square shifted by s columns overlaps 4 (4 - s) voxels,
    # Dice 2 * 4 (4 - s) / 32; the 2x2 square: 2 (2 - s) / 4.
    np.testing.assert_allclose(ev.dice.to_numpy(), [[0.75, 0.5], [0.5, 0.0]])
    np.testing.assert_allclose(table["dice_mean"], [0.625, 0.25])
    np.testing.assert_allclose(table["dice_before"], table["dice_mean"])
    np.testing.assert_allclose(table["percent_folding"], 0.0)
    np.testing.assert_allclose(table["sdlogj"], 0.0)
    assert (table["device"] == "cpu").all() and (table["seconds"] >= 0).all()
    assert np.isnan(table["tre_mean"]).all()


def test_mean_dice_is_over_pairs_and_structures_and_by_dataset():
    pairs = [_seg_pair("A", shift=1), _seg_pair("B", shift=2), _seg_pair("B", shift=1)]
    ev = E.evaluate(E.identity, pairs, labels=[1, 2], progress=False)
    # By hand (as above): shift 1 gives Dice 0.75 and 0.5, shift 2 gives 0.5 and 0.
    assert ev.mean_dice() == pytest.approx((0.75 + 0.5 + 0.5 + 0.0 + 0.75 + 0.5) / 6)
    assert ev.mean_dice("A") == pytest.approx(0.625)
    assert ev.mean_dice("B") == pytest.approx((0.5 + 0.0 + 0.75 + 0.5) / 4)
    with pytest.raises(ValueError, match="dataset: expected one of \\['A', 'B'\\], got 'C'"):
        ev.mean_dice("C")


def test_a_perfect_method_scores_dice_one():
    ev = E.evaluate(_shift_method(1.0), [_seg_pair(shift=1)], labels={1: "square", 2: "small"},
                    progress=False)
    assert list(ev.dice.columns) == ["square", "small"]
    np.testing.assert_allclose(ev.dice.to_numpy(), [[1.0, 1.0]])
    assert ev.records[0]["dice_before"] == pytest.approx(0.625)


class _Net(nn.Module):
    """A network following the nets contract: forward(moving, fixed) -> object with .disp."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(1.0))

    def forward(self, moving, fixed):
        disp = torch.zeros(moving.shape[0], 2, *moving.shape[2:])
        disp[:, 1] = self.shift
        return type("Out", (), {"disp": disp, "warped": None})()


def test_networks_and_batched_pairs_are_accepted():
    pair = _seg_pair(shift=1)
    pair = dict(pair, moving=torch.from_numpy(pair["moving"])[None],
                fixed=torch.from_numpy(pair["fixed"])[None])  # (1, C, H, W)
    ev = E.evaluate(_Net(), [pair], labels=[1, 2], name="net", progress=False, warmup=True)
    assert ev.records[0]["method"] == "net" and ev.records[0]["dice_mean"] == 1.0


def test_summary_matches_a_hand_computation():
    pairs = [_seg_pair("A", 1), _seg_pair("A", 2), _seg_pair("B", 1)]
    ident = E.evaluate(E.identity, pairs, labels=[1, 2], name="Identity", progress=False)
    shift1 = E.evaluate(_shift_method(1.0), pairs, labels=[1, 2], name="Shift", progress=False)
    table = E.summary([ident, shift1], "dice", by="dataset")
    # Identity, dataset A: Dice values {0.75, 0.5, 0.5, 0.0} -> mean 0.4375,
    # population std sqrt(mean of squares - mean^2).
    a = np.array([0.75, 0.5, 0.5, 0.0])
    assert table.mean.loc["Identity", "A"] == pytest.approx(0.4375)
    assert table.std.loc["Identity", "A"] == pytest.approx(math.sqrt((a ** 2).mean() - 0.4375 ** 2))
    # Shift by 1, dataset A: exact on the first pair; on the second (true shift
    # 2) the squares still overlap like a shift of 1: {1, 1, 0.75, 0.5}.
    assert table.mean.loc["Shift", "A"] == pytest.approx(0.8125)
    assert table.mean.loc["Shift", "B"] == pytest.approx(1.0)
    assert table.std.loc["Shift", "B"] == pytest.approx(0.0)
    assert table.frame.loc["Identity", "A"] == "0.438 (0.272)"
    assert table.frame.loc["Identity", "B"] == "0.625 (0.125)"
    # Over per-pair means instead: Identity A has pair means 0.625 and 0.25.
    pairs_mean = E.summary(ident, "dice", by="dataset", dice_over="pairs")
    assert pairs_mean.mean.loc["Identity", "A"] == pytest.approx(0.4375)
    assert pairs_mean.std.loc["Identity", "A"] == pytest.approx(0.1875)


def test_summary_exports_markdown_csv_and_html():
    pairs = [_seg_pair("A", 1), _seg_pair("B", 1)]
    evs = E.compare({"Identity": E.identity, "Shift": _shift_method(1.0)}, pairs,
                    labels=[1, 2], progress=False)
    table = E.summary(evs, ["dice", "percent_folding"], by=None)
    md = table.to_markdown()
    assert md.splitlines()[0] == "| method | Dice | % det J <= 0 |"
    assert md.splitlines()[2] == "| Identity | 0.625 (0.125) | 0.000 (0.000) |"
    assert md.splitlines()[3] == "| Shift | 1.000 (0.000) | 0.000 (0.000) |"
    csv = pd.read_csv(io.StringIO(table.to_csv()), index_col=0)
    assert csv.loc["Shift", "Dice"] == "1.000 (0.000)"
    numeric = pd.read_csv(io.StringIO(table.to_csv(numeric=True)), header=[0, 1], index_col=0)
    assert numeric.loc["Identity", ("mean", "Dice")] == pytest.approx(0.625)
    assert "<table" in table._repr_html_()
    by_both = E.summary(evs, ["dice", "seconds"], by="dataset")
    assert list(by_both.mean.columns) == ["A / Dice", "A / seconds", "B / Dice", "B / seconds"]


def _landmark_pair(error, category):
    """A 2D pair whose landmarks are off by ``error`` pixels under the identity."""
    fixed_points = np.array([[10.0, 10.0], [20.0, 15.0]])
    moving_points = fixed_points + np.array([0.6, 0.8]) * error  # |(0.6, 0.8)| = 1
    return {"moving": np.zeros((1, 32, 32), np.float32), "fixed": np.zeros((1, 32, 32), np.float32),
            "fixed_points": fixed_points, "moving_points": moving_points,
            "meta": {"category": category}}


def test_fire_auc_matches_a_hand_computation():
    pairs = [_landmark_pair(0.5, "S"), _landmark_pair(3.2, "S"), _landmark_pair(10.5, "P"),
             _landmark_pair(30.0, "A")]
    ev = E.evaluate(E.identity, pairs, progress=False)
    np.testing.assert_allclose([r["tre_mean"] for r in ev.records], [0.5, 3.2, 10.5, 30.0])
    report = E.fire_report(ev)
    # A pair succeeds at threshold t (1..25 px) when its mean error is below t.
    # S: 0.5 succeeds at all 25 thresholds, 3.2 at t = 4..25 (22): AUC (25 + 22) / 50.
    # P: 10.5 succeeds at t = 11..25 (15): 15 / 25. A: 30 never succeeds.
    assert report.auc["S"] == pytest.approx(47 / 50)
    assert report.auc["P"] == pytest.approx(15 / 25)
    assert report.auc["A"] == pytest.approx(0.0)
    assert report.mauc == pytest.approx((0.94 + 0.6 + 0.0) / 3)
    assert report.auc["all"] == pytest.approx((25 + 22 + 15 + 0) / 100)
    np.testing.assert_allclose(report.curves["S"][:5], [0.5, 0.5, 0.5, 1.0, 1.0])
    assert report.counts == {"all": 4, "S": 2, "P": 1, "A": 1}
    assert list(report.table().columns) == ["AUC all", "AUC S", "AUC P", "AUC A", "mAUC"]


def test_tre_uses_the_spacing():
    ev = E.evaluate(E.identity, [_landmark_pair(2.0, "S")], spacing=4.0, progress=False)
    assert ev.records[0]["tre_mean"] == pytest.approx(8.0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="labels: pairs\\[0\\] has segmentations"):
        E.evaluate(E.identity, [_seg_pair()], progress=False)
    with pytest.raises(ValueError, match="pairs\\[0\\]: expected a dict with 'moving' and 'fixed'"):
        E.evaluate(E.identity, [{"moving": np.zeros((1, 4, 4))}], progress=False)
    with pytest.raises(ValueError, match="expected spatial size"):
        E.evaluate(lambda m, f: torch.zeros(1, 2, 3, 3), [_seg_pair()], labels=[1],
                   progress=False)
    with pytest.raises(TypeError, match="an object with .disp"):
        E.evaluate(lambda m, f: "nope", [_seg_pair()], labels=[1], progress=False)
    with pytest.raises(ValueError, match="has no pair with landmarks"):
        E.fire_report(E.evaluate(E.identity, [_seg_pair()], labels=[1], progress=False))


def test_dice_per_pair_recovers_a_known_shift():
    fixed = torch.zeros(2, 1, 6, 8, dtype=torch.long)
    fixed[:, :, 1:5, 2:6] = 1                          # a 4x4 square
    moving = torch.roll(fixed, 1, dims=3)              # moved one column right
    back = torch.zeros(2, 2, 6, 8)
    back[:, 1] = 1.0                                   # read one column to the right: undoes the move
    assert E.dice_per_pair(fixed, moving, back, [1]).tolist() == [1.0, 1.0]
    # unregistered, the squares overlap in 12 of 16 pixels: Dice 2 * 12 / 32
    assert np.allclose(E.dice_per_pair(fixed, moving, torch.zeros(2, 2, 6, 8), [1]), 0.75)
