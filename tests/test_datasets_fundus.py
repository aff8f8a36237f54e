"""Offline fundus pairs: categories, exact ground truth, control points, FIRE format, seeds."""
import numpy as np
import pytest
import torch

from regedu.datasets import (FIRE_SIZE, FundusPairs, make_fire_pair, parse_fire_lines, retina_green,
                             synthetic_fundus)
from regedu.spatial import warp, warp_points

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs():
    return {c: make_fire_pair(c, 128, seed=3) for c in "SPA"}


def test_retina_green_channel_and_mask():
    img, mask = retina_green(128)
    assert img.shape == mask.shape == (128, 128) and img.dtype == np.float32
    assert 0 <= img.min() and img.max() <= 1 and img[~mask].max() == 0
    assert mask[64, 64] and not mask[0, 0] and 0.6 < mask.mean() < 0.85  # a disc in a square


@pytest.mark.parametrize("category", ["S", "P", "A"])
def test_categories_follow_fire_definitions(pairs, category):
    pair = pairs[category]
    assert (pair.overlap < 0.75) == (category == "P") and pair.overlap > 0.3
    if category == "A":
        assert pair.params["elastic_amplitude_px"] > 0
    else:
        assert "elastic_amplitude_px" not in pair.params


@pytest.mark.parametrize("category", ["S", "P", "A"])
def test_ground_truth_warps_moving_onto_fixed(category):
    pair = make_fire_pair(category, 128, seed=4, photometric=False)
    warped = warp(pair.moving[None], pair.disp[None])[0, 0]
    seen = warp(pair.moving_mask[None].float(), pair.disp[None])[0, 0] > 0.99
    both = pair.fixed_mask[0] & seen
    residual = (warped - pair.fixed[0]).abs()[both].mean()
    identity = (pair.moving[0] - pair.fixed[0]).abs()[both].mean()  # no registration at all
    # Both views are bilinear samples of one retina: only interpolation is left.
    assert residual < 0.01 and residual < 0.3 * identity, (residual, identity)


def test_photometric_changes_are_stronger_for_a(pairs):
    def change(pair):
        warped = warp(pair.moving[None], pair.disp[None])[0, 0]
        both = pair.fixed_mask[0] & (warped > 0)
        return (warped - pair.fixed[0]).abs()[both].mean()
    clean = make_fire_pair("A", 128, seed=3, photometric=False)
    assert change(pairs["A"]) > 2 * change(clean)


def test_control_points_follow_the_convention(pairs):
    for pair in pairs.values():
        assert pair.fixed_points.shape == (10, 2)
        assert torch.allclose(pair.moving_points, warp_points(pair.fixed_points, pair.disp[None]))
        rows, cols = pair.fixed_points.long().T
        assert pair.fixed_mask[0, rows, cols].all()  # on the retina, inside the overlap


def test_fire_lines_round_trip_in_full_resolution_frame(pairs):
    pair = pairs["P"]
    lines = pair.fire_lines
    assert len(lines) == 10 and all(len(line.split()) == 4 for line in lines)
    x_ref, y_ref = map(float, lines[0].split()[:2])
    scale = (FIRE_SIZE - 1) / 127
    assert abs(x_ref - pair.fixed_points[0, 1] * scale) < 0.01  # x is the column
    assert abs(y_ref - pair.fixed_points[0, 0] * scale) < 0.01  # y is the row
    fixed, moving = parse_fire_lines(lines, shape=(128, 128))
    assert np.allclose(fixed, pair.fixed_points.numpy(), atol=1e-3)
    assert np.allclose(moving, pair.moving_points.numpy(), atol=1e-3)


def test_seeded_pairs_are_deterministic():
    a, b = make_fire_pair("A", 64, seed=11), make_fire_pair("A", 64, seed=11)
    c = make_fire_pair("A", 64, seed=12)
    assert torch.equal(a.moving, b.moving) and torch.equal(a.disp, b.disp)
    assert torch.equal(a.fixed_points, b.fixed_points)
    assert not torch.equal(a.disp, c.disp)


def test_procedural_fundus_is_seeded_and_fundus_like():
    img, mask = synthetic_fundus(128, seed=5)
    assert np.array_equal(img, synthetic_fundus(128, seed=5)[0])
    assert not np.array_equal(img, synthetic_fundus(128, seed=6)[0])
    assert img.dtype == np.float32 and img[~mask].max() == 0
    inside = img[mask]
    # A bright optic disc and dark vessels around a mid-grey background.
    assert np.percentile(inside, 99.9) > np.median(inside) + 0.2
    assert np.percentile(inside, 1) < np.median(inside) - 0.1
    pair = make_fire_pair("S", 96, seed=1, source="procedural")
    assert pair.overlap > 0.75


def test_fundus_sampler_items():
    ds = FundusPairs(4, 64, seed=2, source="mixed")
    item = ds[1]
    assert set(item) >= {"moving", "fixed", "moving_points", "fixed_points", "disp", "meta"}
    assert item["moving"].shape == (1, 64, 64) and item["meta"]["category"] == "P"
    assert torch.equal(ds[1]["disp"], item["disp"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["fixed"].shape == (2, 1, 64, 64) and batch["fixed_points"].shape == (2, 10, 2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="category"):
        make_fire_pair("X", 64)
    with pytest.raises(ValueError, match="size"):
        make_fire_pair("S", 0)
    with pytest.raises(ValueError, match="source"):
        make_fire_pair("S", 64, source="nope")


def test_vessel_contrast_makes_the_true_alignment_the_best_one():
    """On a 64-pixel grid (where the fundus networks work), raw photographs match best near the
    identity, because illumination and aperture belong to the camera; their vessel contrast
    matches best at the true field, and better the closer a field gets to it."""
    import torch.nn.functional as F
    from regedu import losses
    from regedu.datasets import FundusPairs, vessel_contrast

    def ncc_along_the_truth(item):
        moving, fixed = F.avg_pool2d(item["moving"][None], 2), F.avg_pool2d(item["fixed"][None], 2)
        disp = F.avg_pool2d(item["disp"][None], 2) / 2
        return [float(losses.ncc_local(fixed, warp(moving, a * disp))) for a in (0, 0.75, 1)]

    raw = [ncc_along_the_truth(FundusPairs(4, 128, categories=("S",), source="procedural")[i]) for i in range(4)]
    vessels = [ncc_along_the_truth(FundusPairs(4, 128, categories=("S",), source="procedural",
                                               contrast="vessels")[i]) for i in range(4)]
    assert sum(truth > identity for identity, _, truth in raw) >= 2, raw  # the trap
    for identity, most, truth in vessels:
        assert truth < identity - 0.2 and most < identity, vessels
    out = vessel_contrast(FundusPairs(1, 128, source="procedural")[0]["fixed"])
    inside = out != 0
    assert abs(float(out[inside].mean())) < 0.1 and abs(float(out[inside].std()) - 1) < 0.05
    with pytest.raises(ValueError, match=r"expected \(C, H, W\) or \(B, C, H, W\)"):
        vessel_contrast(torch.zeros(8, 8))
