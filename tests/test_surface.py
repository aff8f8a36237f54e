"""HD95 and average surface distance against an independent implementation and known answers."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from regedu import evaluate as E
from regedu import metrics


def _boundary_points(mask, spacing):
    # Independent of the library: a voxel is on the surface when one of its 2 * ndim
    # face neighbours (zero outside the image) is outside the structure.
    padded = np.pad(mask, 1)
    inner = padded[(slice(1, -1),) * mask.ndim]
    outside = np.zeros(mask.shape, bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            outside |= ~np.roll(padded, step, axis=axis)[(slice(1, -1),) * mask.ndim]
    return np.argwhere(inner & outside) * np.asarray(spacing, float)


def _brute_force(a, b, label, spacing):
    """(HD95, ASSD, HD) by nearest neighbours between boundary points (cKDTree)."""
    pa, pb = _boundary_points(a == label, spacing), _boundary_points(b == label, spacing)
    d_ab, d_ba = cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]
    hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assd = (d_ab.sum() + d_ba.sum()) / (len(d_ab) + len(d_ba))
    return hd95, assd, max(d_ab.max(), d_ba.max())


def _random_labels(shape, seed):
    # Three blobby structures (labels 1..3) from smoothed noise.
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.standard_normal(shape), 1.5)
    return np.digitize(field, np.quantile(field, [0.4, 0.6, 0.8])).astype(np.int64)


@pytest.mark.parametrize("shape, spacing", [((24, 28), (1.0, 1.0)), ((24, 28), (1.5, 0.7)),
                                            ((12, 14, 10), (1.0, 1.0, 1.0)),
                                            ((12, 14, 10), (2.0, 0.8, 1.2))])
def test_agrees_with_brute_force_nearest_neighbours(shape, spacing):
    a, b = _random_labels(shape, 1), _random_labels(shape, 2)
    labels = [1, 2, 3]
    hd = metrics.hausdorff95(a, b, labels, spacing=spacing)
    asd = metrics.average_surface_distance(a, b, labels, spacing=spacing)
    full = metrics.hausdorff95(a, b, labels, spacing=spacing, percentile=100)
    expected = np.array([_brute_force(a, b, k, spacing) for k in labels])
    np.testing.assert_allclose(hd.per_label, expected[:, 0], rtol=1e-9)
    np.testing.assert_allclose(asd.per_label, expected[:, 1], rtol=1e-9)
    np.testing.assert_allclose(full.per_label, expected[:, 2], rtol=1e-9)
    assert hd.mean == pytest.approx(expected[:, 0].mean()) and hd.missing == ()
    assert np.all(expected[:, 1] > 0.3)      # the maps differ: a test the identity cannot pass


def test_identical_maps_give_zero():
    a = _random_labels((12, 14, 10), 1)
    assert metrics.hausdorff95(a, a, [1, 2, 3]).per_label.tolist() == [0.0, 0.0, 0.0]
    assert metrics.average_surface_distance(torch.from_numpy(a), a, [1, 2, 3]).mean == 0.0


def _ball(shape, radius):
    grid = np.indices(shape) - ((np.asarray(shape) - 1) / 2).reshape(-1, *([1] * len(shape)))
    return (np.sqrt((grid ** 2).sum(0)) <= radius).astype(np.int64)


def test_concentric_spheres_are_r2_minus_r1_apart():
    shape, r1, r2 = (25, 25, 25), 4, 8
    small, large = _ball(shape, r1), _ball(shape, r2)
    hd = metrics.hausdorff95(small, large, [1], percentile=100).mean
    hd95 = metrics.hausdorff95(small, large, [1]).mean
    asd = metrics.average_surface_distance(small, large, [1]).mean
    # Every surface point is r2 - r1 = 4 from the other sphere, up to the voxel
    # staircase (measured: HD = HD95 = 4.24, ASD 3.88).
    for value in (hd, hd95, asd):
        assert abs(value - (r2 - r1)) < 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_shifted_cube_hd95_is_the_shift(ndim):
    shape, side, shift = (20,) * ndim, 8, 3
    a = np.zeros(shape, np.int64)
    a[(slice(4, 4 + side),) * ndim] = 2
    b = np.roll(a, shift, axis=0)
    assert metrics.hausdorff95(a, b, [2]).mean == pytest.approx(shift)
    assert metrics.hausdorff95(a, b, [2], percentile=100).mean == pytest.approx(shift)
    # Rows 2 mm apart: the same shift is 6 mm; the other axes do not matter.
    spacing = (2.0,) + (0.5,) * (ndim - 1)
    r = metrics.hausdorff95(a, b, [2], spacing=spacing)
    assert r.mean == pytest.approx(2 * shift) and r.units == "spacing units"
    # A shift along another axis at that spacing is 0.5 mm per voxel.
    c = np.roll(a, shift, axis=1)
    assert metrics.hausdorff95(a, c, [2], spacing=spacing).mean == pytest.approx(0.5 * shift)


def test_missing_labels_follow_the_rule():
    a = np.zeros((10, 10), np.int64)
    a[2:5, 2:5] = 1
    a[6:9, 6:9] = 2
    b = a.copy()
    b[b == 2] = 0                                   # label 2 lost in b; label 5 in neither
    r = metrics.hausdorff95(a, b, [1, 2, 5])
    assert r.per_label[0] == 0.0 and np.isnan(r.per_label[1:]).all()
    assert r.missing == (2,) and r.mean == 0.0      # NaN left out of the mean
    penalised = metrics.average_surface_distance(a, b, [1, 2, 5], missing=100.0)
    assert penalised.per_label[1] == 100.0 and penalised.mean == pytest.approx(50.0)
    assert np.isnan(penalised.per_label[2])        # absent from both: still NaN
    assert np.isnan(metrics.hausdorff95(a, b, [5]).mean)


def test_surface_metrics_refuse_bad_input():
    a = np.zeros((6, 6), np.int64)
    with pytest.raises(ValueError, match="a and b must have the same shape"):
        metrics.hausdorff95(a, np.zeros((6, 7), np.int64), [1])
    with pytest.raises(ValueError, match="percentile: expected a number in"):
        metrics.hausdorff95(a, a, [1], percentile=0)
    with pytest.raises(ValueError, match="spacing: expected one positive number or 2"):
        metrics.average_surface_distance(a, a, [1], spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="b: expected a label map of whole numbers"):
        metrics.hausdorff95(a, a + 0.5, [1])


# --- in the evaluation table ----------------------------------------------------------------

def _pair(shift):
    fixed = np.zeros((16, 16), np.int64)
    fixed[3:9, 3:9] = 1
    fixed[10:14, 10:14] = 2
    moving = np.roll(fixed, shift, axis=1)
    return {"moving": moving[None].astype(np.float32), "fixed": fixed[None].astype(np.float32),
            "moving_seg": moving, "fixed_seg": fixed, "meta": {"dataset": "A"}}


def test_evaluate_adds_surface_columns_only_when_asked():
    pairs = [_pair(1), _pair(2)]
    plain = E.evaluate(E.identity, pairs, labels=[1, 2], progress=False)
    assert "hd95" not in plain.table().columns and plain.hd95.empty
    ev = E.evaluate(E.identity, pairs, labels=[1, 2], progress=False, surface=True)
    table = ev.table()
    # Unregistered, a structure shifted by s columns is s away: HD95 = s for both labels.
    np.testing.assert_allclose(table["hd95"], [1.0, 2.0])
    np.testing.assert_allclose(ev.hd95.to_numpy(), [[1.0, 1.0], [2.0, 2.0]])
    expected = [metrics.average_surface_distance(p["fixed_seg"], p["moving_seg"], [1, 2]).mean for p in pairs]
    np.testing.assert_allclose(table["asd"], expected)
    assert (table["surface_missing"] == 0).all()
    before = plain.table().drop(columns="seconds")
    assert before.equals(table[before.columns]), "surface=True must leave the other columns as they were"

    def undo(shift):
        # moving(x) = fixed(x - shift): pulling from x + shift registers it exactly.
        def method(moving, fixed):
            u = torch.zeros(1, 2, *fixed.shape[2:])
            u[:, 1] = shift
            return u
        return method

    fixed_up = E.evaluate(undo(1), [_pair(1)], labels=[1, 2], progress=False, surface=True)
    assert fixed_up.table()["hd95"].tolist() == [0.0] and fixed_up.table()["asd"].tolist() == [0.0]
    mm = E.evaluate(E.identity, [_pair(2)], labels=[1, 2], progress=False, surface=True, spacing=(1.0, 0.5))
    assert mm.table()["hd95"].tolist() == [1.0]      # 2 columns of 0.5 mm
    table = E.summary([ev], ["dice", "hd95", "asd"], by=None)
    assert list(table.mean.columns) == ["Dice", "HD95", "ASD"]
    assert table.mean.loc["identity", "HD95"] == pytest.approx(1.5)
