"""RegNet's synthetic fields (regedu.datasets.synthetic): bounds, smoothness, exact labels."""
import math

import pytest
import torch

from regedu.datasets import SyntheticPairs, point_field, regnet_field
from regedu.spatial import warp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", [(40, 48), (12, 14, 16)])
@pytest.mark.parametrize("sigma,max_disp", [(6.0, 3.0), (2.0, 0.5)])
def test_each_scale_reaches_its_maximum_displacement_exactly(shape, sigma, max_disp):
    for seed in range(3):
        u = point_field(shape, sigma, max_disp, points=5, seed=seed)
        assert u.shape == (1, len(shape), *shape)
        assert float(u.norm(dim=1).max()) == pytest.approx(max_disp, rel=1e-5)


def test_one_point_makes_a_gaussian_bump_of_width_sigma():
    # A single displaced point blurred by G_sigma: |u| falls as exp(-d^2 / (2 sigma^2)) from its peak.
    sigma, shape = 3.0, (61, 61)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[30, 30] = True
    u = point_field(shape, sigma, 2.0, points=1, mask=mask, seed=0)
    norm = u.norm(dim=1)[0]
    assert float(norm[30, 30]) == pytest.approx(2.0, rel=1e-5)
    for d in (2, 4, 6):
        expected = 2.0 * math.exp(-d ** 2 / (2 * sigma ** 2))
        assert float(norm[30, 30 + d]) == pytest.approx(expected, rel=0.02)
        assert float(norm[30 - d, 30]) == pytest.approx(expected, rel=0.02)


def test_coarser_scales_are_smoother():
    # Same maximum displacement d: the steepest slope falls as sigma grows. One bump's is
    # d / (sigma sqrt(e)); overlapping bumps change it by a factor near 1.
    for sigma in (2.0, 4.0, 8.0):
        for seed in range(3):
            u = point_field((96, 96), sigma, 2.0, points=4, seed=seed)
            slope = float(torch.cat([(u[..., 1:, :] - u[..., :-1, :]).abs().flatten(),
                                     (u[..., 1:] - u[..., :-1]).abs().flatten()]).max())
            one_bump = 2.0 / (sigma * math.exp(0.5))
            assert 0.6 * one_bump < slope < 1.6 * one_bump, (sigma, seed, slope, one_bump)


def test_multiscale_field_is_bounded_by_the_sum_of_the_scales():
    scales = ((8.0, 2.0), (4.0, 1.0), (2.0, 0.5))
    for seed in range(5):
        u = regnet_field((40, 48), scales, seed=seed)
        assert float(u.norm(dim=1).max()) <= 3.5 + 1e-5
    # One generator feeds every scale: same seed, same field; another seed, another field.
    assert torch.equal(regnet_field((40, 48), scales, seed=1), regnet_field((40, 48), scales, seed=1))
    assert not torch.equal(regnet_field((40, 48), scales, seed=1), regnet_field((40, 48), scales, seed=2))


def test_points_stay_in_the_mask():
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[:, :10] = True
    u = point_field((40, 40), 1.0, 1.0, points=6, mask=mask, seed=0)
    # sigma 1: the kernel reaches 3 voxels, so nothing moves beyond column 12.
    assert float(u[..., 13:].abs().max()) == 0.0 and float(u[..., :10].abs().max()) > 0


def test_pairs_carry_their_exact_label():
    images = torch.rand(2, 1, 24, 28)
    segs = torch.randint(0, 4, (2, 24, 28))
    pairs = SyntheticPairs(images, 5, segs=segs, scales=((4.0, 2.0),), seed=3)
    item = pairs[3]
    assert torch.equal(item["moving"], images[1])
    assert torch.allclose(warp(item["moving"][None], item["disp"][None])[0], item["fixed"])
    assert torch.equal(warp(item["moving_seg"][None], item["disp"][None])[0], item["fixed_seg"])
    assert float(item["disp"].norm(dim=0).max()) == pytest.approx(2.0, rel=1e-5)
    assert torch.equal(pairs[3]["disp"], item["disp"])  # item i is the same every time


def test_pairs_from_a_sampler():
    field = torch.zeros(1, 2, 8, 8)
    field[:, 1] = 1.0
    pairs = SyntheticPairs(torch.rand(1, 8, 8), 2, sampler=lambda g: field)
    item = pairs[0]
    assert torch.equal(item["disp"], field[0])
    assert torch.equal(item["fixed"][0, :, :-1], item["moving"][0, :, 1:])  # +1 along axis 1 pulls the right neighbour


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="max_disp"):
        point_field((8, 8), 2.0, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        point_field((8, 8), 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        point_field((8,), 2.0, 1.0)
    with pytest.raises(ValueError, match="mask"):
        point_field((8, 8), 2.0, 1.0, mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="scales"):
        regnet_field((8, 8), (2.0, 1.0))
    with pytest.raises(ValueError, match="sampler"):
        SyntheticPairs(torch.rand(1, 8, 8), 2, sampler=lambda g: None, scales=((2.0, 1.0),))
    with pytest.raises(ValueError, match="segs"):
        SyntheticPairs(torch.rand(2, 1, 8, 8), 2, segs=torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sampler"):
        SyntheticPairs(torch.rand(1, 8, 8), 2, sampler=lambda g: torch.zeros(1, 2, 4, 4))[0]
