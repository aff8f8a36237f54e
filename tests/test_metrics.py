import numpy as np
import pytest
import torch

from regedu import metrics
from regedu.spatial import warp

from conftest import smooth_field


@pytest.mark.parametrize("shape", [(19, 23), (9, 11, 13)])
def test_jacobian_agrees_with_voxelmorph(shape):
    vxm = pytest.importorskip("voxelmorph")
    u = torch.randn(1, len(shape), *shape, dtype=torch.float64)
    ours = metrics.jacobian_determinant(u)[0].numpy()
    theirs = vxm.py.utils.jacobian_determinant(np.moveaxis(u[0].numpy(), 0, -1))
    assert np.allclose(ours, theirs, atol=1e-10)


def test_dice_agrees_with_voxelmorph():
    vxm = pytest.importorskip("voxelmorph")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 7, (13, 17, 11)), rng.integers(0, 7, (13, 17, 11))
    labels = [1, 2, 3, 5, 6]
    assert np.allclose(metrics.dice(a, b, labels).per_label, vxm.py.utils.dice(a, b, labels))


def test_dice_on_real_labels_after_warp(shared_data):
    scan = np.load(shared_data / "test_scan.npz")
    labels = np.load(shared_data / "labels.npz")["labels"]
    seg = torch.from_numpy(scan["seg"].astype(np.int32))[None, None]
    assert metrics.dice(seg, seg, labels).mean == 1.0
    u = torch.zeros(1, 3, *seg.shape[2:])
    u[:, 0] = 2
    moved = warp(seg, u)
    r = metrics.dice(seg, moved, labels)
    assert 0.5 < r.mean < 1.0 and len(r.per_label) == len(labels)


def test_dice_absent_label_is_nan_and_excluded():
    r = metrics.dice(np.array([1, 1, 0]), np.array([1, 0, 0]), [1, 9])
    assert np.isnan(r.per_label[1]) and r.mean == pytest.approx(2 / 3)
    assert r.as_dict()[1] == pytest.approx(2 / 3)


def test_folding_stats_identity_and_folded():
    assert metrics.folding_stats(torch.zeros(1, 2, 8, 9)) == {"percent_folding": 0.0, "sdlogj": 0.0}
    u = torch.zeros(1, 2, 8, 9)
    u[:, 1] = -2.0 * torch.arange(9.0)  # d phi / dx = 1 - 2 < 0 everywhere
    assert metrics.folding_stats(u)["percent_folding"] == 100.0
    scaled = torch.zeros(1, 2, 8, 9)
    scaled[:, 0] = 0.1 * torch.arange(8.0).view(8, 1)
    s = metrics.folding_stats(scaled)
    assert s["percent_folding"] == 0 and s["sdlogj"] < 1e-6


def test_tre_hand_computed():
    u = torch.zeros(1, 2, 10, 10)
    u[:, 0], u[:, 1] = 1.0, 2.0
    fixed = torch.tensor([[2.0, 3.0], [5.0, 5.0]])
    moving = torch.tensor([[3.0, 5.0], [6.0, 9.0]])
    e = metrics.tre(fixed, moving, u)
    assert torch.allclose(e, torch.tensor([0.0, 2.0], dtype=e.dtype))
    e_mm = metrics.tre(fixed, moving, u, spacing=[1.0, 0.5])
    assert torch.allclose(e_mm, torch.tensor([0.0, 1.0], dtype=e.dtype))


def test_fire_curve_and_auc_hand_computed():
    errors = [np.array([0.2, 0.4]), np.array([3.0, 5.0]), None, [30.0]]
    thr, success = metrics.fire_success_curve(errors)
    assert thr[0] == 1 and thr[-1] == 25 and len(thr) == 25
    # mean errors 0.3, 4.0, failed, 30: below t for t>=1 (1 pair), t>=5 (2 pairs)
    expected = np.array([(1 + (t > 4.0)) / 4 for t in range(1, 26)])
    assert np.allclose(success, expected)
    assert metrics.fire_auc(errors) == pytest.approx(expected.mean())


def test_smooth_field_jacobian_near_one():
    u = smooth_field((30, 30), 0.5)
    det = metrics.jacobian_determinant(u)
    assert (det - 1).abs().max() < 0.3
