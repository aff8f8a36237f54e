"""Inverting a field, the inverse-consistency error, and the ICON / GradICON losses."""
import numpy as np
import pytest
import torch

from regedu import losses, metrics
from regedu.spatial import affine_to_displacement, compose, invert_field

from conftest import smooth_field

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (shape, amplitude in voxels, largest |grad u| about 0.26 and 0.36: both invertible)
SMOOTH = [((48, 48), 2.0), ((20, 20, 20), 1.5)]


def _inner(x, margin=3):
    # Near the border x + u(x) leaves the grid and the field is extended: judge the interior.
    return x[(slice(None),) + tuple(slice(margin, -margin) for _ in x.shape[1:])]


@pytest.mark.parametrize("shape, amplitude", SMOOTH)
def test_invert_field_inverts_a_smooth_field_both_ways(shape, amplitude):
    u = smooth_field(shape, amplitude, seed=1, dtype=torch.float64)
    v = invert_field(u)
    # compose(u, v) is what the iteration drives to zero: down to the tolerance.
    assert float(compose(u, v).norm(dim=1).max()) < 1e-4
    # compose(v, u) is not iterated on; it is small only because v is a true inverse.
    # Measured: interior mean 0.004 / 0.013 voxels, max 0.012 / 0.038 (2D / 3D).
    other = _inner(compose(v, u).norm(dim=1))
    assert float(other.mean()) < 0.02 and float(other.max()) < 0.06
    # The naive "inverse" -u is several times worse (measured 0.085 / 0.075): the test can fail.
    naive = _inner(compose(u, -u).norm(dim=1))
    assert float(naive.mean()) > 4 * float(other.mean())


def test_invert_field_of_a_scaling_is_the_inverse_scaling():
    # x -> c + 1.1 (x - c) inverts to x -> c + (x - c) / 1.1; linear fields interpolate
    # exactly and the inverse samples u inside the grid, so the answer is exact.
    shape = (21, 17)
    def scale(s):
        matrix = torch.tensor([[[s, 0., 0.], [0., 1., 0.]]], dtype=torch.float64)
        return affine_to_displacement(matrix, shape, center="image")
    v = invert_field(scale(1.1))
    assert torch.allclose(v, scale(1 / 1.1), atol=1e-5)


def test_invert_field_refuses_or_warns_on_folding_and_on_no_convergence():
    u = torch.zeros(1, 2, 8, 9, dtype=torch.float64)
    u[:, 1] = -2.0 * torch.arange(9.0)          # d phi / dx = -1: folded everywhere
    with pytest.raises(ValueError, match="det J <= 0 at 72 of 72 voxels"):
        invert_field(u, folding="raise")
    with pytest.warns(RuntimeWarning, match="no inverse"):
        invert_field(u, iterations=2, tol=1e3)
    strong = smooth_field((16, 16, 16), 2.0, seed=1, dtype=torch.float64)   # |grad u| up to 0.88
    with pytest.warns(RuntimeWarning, match="did not converge in 5 iterations"):
        invert_field(strong, iterations=5)
    with pytest.raises(ValueError, match="folding: expected one of"):
        invert_field(strong, folding="no")


def test_inverse_consistency_error_known_answers():
    shape = (10, 12)
    t = torch.zeros(1, 2, *shape, dtype=torch.float64)
    t[:, 0], t[:, 1] = 1.0, 2.0
    assert metrics.inverse_consistency_error(t, -t) == {"ice_mean": 0.0, "ice_max": 0.0}
    # A field "inverted" by itself: the composition is 2t, |(2, 4)| = sqrt(20) voxels...
    r = metrics.inverse_consistency_error(t, t)
    assert r["ice_mean"] == pytest.approx(np.sqrt(20)) and r["ice_max"] == pytest.approx(np.sqrt(20))
    # ... and |(2 * 2 mm, 4 * 1 mm)| = sqrt(32) mm with 2 x 1 mm voxels.
    in_mm = metrics.inverse_consistency_error(t, t, spacing=(2.0, 1.0))
    assert in_mm["ice_mean"] == pytest.approx(np.sqrt(32))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[2:4, 3:5] = True
    assert metrics.inverse_consistency_error(t, t, mask=mask)["ice_mean"] == pytest.approx(np.sqrt(20))
    with pytest.raises(ValueError, match="mask: selects no voxel"):
        metrics.inverse_consistency_error(t, t, mask=torch.zeros(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="spacing: expected one positive number or 2"):
        metrics.inverse_consistency_error(t, t, spacing=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("shape, amplitude", SMOOTH)
def test_inverse_consistency_error_small_for_an_inverse_large_for_the_field_itself(shape, amplitude):
    u = smooth_field(shape, amplitude, seed=1, dtype=torch.float64)
    good = metrics.inverse_consistency_error(u, invert_field(u))
    bad = metrics.inverse_consistency_error(u, u)
    # Measured: 0.003 / 0.012 voxels for the inverse against 1.95 / 1.34 for the field itself.
    assert good["ice_mean"] < 0.02
    assert bad["ice_mean"] > 50 * good["ice_mean"]
    assert bad["ice_mean"] == pytest.approx(float(compose(u, u).norm(dim=1).mean()), rel=0.05)


def test_icon_and_gradicon_known_answers():
    shape = (9, 7)
    t = torch.zeros(1, 2, *shape, dtype=torch.float64)
    t[:, 0], t[:, 1] = 0.5, -1.0
    for kind in ("icon", "gradicon"):
        assert float(losses.inverse_consistency(t, -t, kind=kind)) == pytest.approx(0, abs=1e-12)
    assert float(losses.inverse_consistency(t, t)) == pytest.approx(4 * 1.25)   # |2 t|^2
    assert float(losses.inverse_consistency(t, t, kind="gradicon")) == pytest.approx(0, abs=1e-12)
    # x -> 0.8 x along axis 0 twice is x -> 0.64 x: grad w = 0.64 - 1 = -0.36 in one entry.
    s = affine_to_displacement(torch.tensor([[[0.8, 0., 0.], [0., 1., 0.]]], dtype=torch.float64), shape)
    assert float(losses.inverse_consistency(s, s, kind="gradicon")) == pytest.approx(0.36 ** 2)
    rows = torch.arange(shape[0], dtype=torch.float64)
    assert float(losses.inverse_consistency(s, s)) == pytest.approx(float((0.36 * rows).square().mean()))
    per_item = losses.inverse_consistency(torch.cat([t, s]), torch.cat([-t, s]), reduction="none")
    assert per_item.shape == (2,) and float(per_item[0]) == pytest.approx(0, abs=1e-12)
    module = losses.InverseConsistency(kind="gradicon")
    assert float(module(s, s)) == pytest.approx(0.36 ** 2)


@pytest.mark.parametrize("kind", ["icon", "gradicon"])
def test_inverse_consistency_loss_small_for_an_inverse_and_gradients_flow(kind):
    u = smooth_field((24, 24), 1.5, seed=2, dtype=torch.float64)
    inv = invert_field(u)
    good = float(losses.inverse_consistency(u, inv, kind=kind))
    bad = float(losses.inverse_consistency(u, u, kind=kind))
    assert bad > 100 * good
    small = smooth_field((6, 7), 0.7, seed=3, dtype=torch.float64).requires_grad_()
    other = smooth_field((6, 7), 0.7, seed=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: losses.inverse_consistency(a, b, kind=kind),
                                    (small, other), eps=1e-6, atol=1e-5)


def test_minimising_icon_alone_recovers_the_inverse():
    u = smooth_field((24, 24), 1.5, seed=2, dtype=torch.float64)
    v = torch.zeros_like(u, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        losses.inverse_consistency(u, v).backward()
        opt.step()
    err = _inner((v.detach() - invert_field(u)).norm(dim=1))
    assert float(err.mean()) < 0.05     # the start (v = 0) is |u|: about 0.7 voxels here
    assert float(_inner(u.norm(dim=1)).mean()) > 0.3


def test_bidirectional_runs_both_orders_in_one_batch():
    calls = []

    def model(moving, fixed):
        calls.append(moving.shape[0])
        # A "registration" that reads the images: displacement = moving - fixed, per channel.
        return (moving - fixed).expand(-1, 2, -1, -1)

    a, b = torch.zeros(1, 1, 5, 6), torch.ones(1, 1, 5, 6)
    u_ab, u_ba = losses.bidirectional(model, a, b)
    assert calls == [2]
    assert torch.all(u_ab == -1) and torch.all(u_ba == 1)     # model(a, b) and model(b, a)
    assert float(losses.inverse_consistency(u_ab, u_ba)) == 0.0
    with pytest.raises(ValueError, match="a and b must have the same shape"):
        losses.bidirectional(model, a, torch.ones(1, 1, 5, 7))
    with pytest.raises(TypeError, match="model: expected a callable"):
        losses.bidirectional("unet", a, b)
