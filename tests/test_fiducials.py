"""Fiducial registration: exact fits, and Fitzpatrick's FLE / FRE / TRE results by simulation."""
import numpy as np
import pytest
import torch

from regedu import fiducials as F
from regedu.spatial import affine_to_displacement, warp_points


def _rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# Six fiducials around a head-sized volume (mm), and targets near and far from their centroid.
FIDUCIALS = np.array([[0., 0., 0.], [80., 10., 5.], [10., 90., 0.], [5., 10., 70.],
                      [70., 80., 20.], [40., 30., 60.]])
TARGETS = np.array([[34., 37., 26.], [100., 100., 100.], [-40., 40., 20.]])


def test_fit_rigid_recovers_a_rotation_and_translation_exactly():
    R, t = _rotation((0.3, -0.5, 1.1)), np.array([4., -7., 12.])
    moved = FIDUCIALS @ R.T + t
    T = F.fit_rigid(FIDUCIALS, moved)
    np.testing.assert_allclose(T[:3, :3], R, atol=1e-10)
    np.testing.assert_allclose(T[:3, 3], t, atol=1e-9)
    assert F.fre(FIDUCIALS, moved, T) < 1e-9
    np.testing.assert_allclose(F.tre(T, TARGETS, TARGETS @ R.T + t), 0, atol=1e-9)


def test_fit_rigid_never_returns_a_reflection():
    mirrored = FIDUCIALS * [1., 1., -1.]
    T = F.fit_rigid(FIDUCIALS, mirrored)
    assert np.linalg.det(T[:3, :3]) == pytest.approx(1.0)
    assert F.fre(FIDUCIALS, mirrored, T) > 1.0        # a rotation cannot mirror: a residual stays
    assert F.fre(FIDUCIALS, mirrored, F.fit_affine(FIDUCIALS, mirrored)) < 1e-9


def test_fit_affine_recovers_an_affine_map_and_matches_the_field_convention():
    A = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.1, 1.2]])
    t = np.array([2., -3., 1.])
    T = F.fit_affine(FIDUCIALS, FIDUCIALS @ A.T + t)
    np.testing.assert_allclose(T[:3], np.c_[A, t], atol=1e-9)
    # Fitted from fixed to moving points, T[:3] is affine_to_displacement's [A | t]:
    # the field sends each fixed point to its moving partner.
    fixed = np.array([[3., 4., 5.], [10., 2., 7.]])
    u = affine_to_displacement(torch.tensor(T[None, :3]), (16, 16, 16))
    mapped = warp_points(torch.tensor(fixed), u).numpy()
    np.testing.assert_allclose(mapped, fixed @ A.T + t, atol=1e-9)


def test_expected_tre_is_fitzpatricks_closed_form():
    # Fitzpatrick, West & Maurer 1998, eq. 46: <TRE^2> = FLE^2 / N (1 + 1/3 sum_k d_k^2 / f_k^2),
    # d_k, f_k the distances from the principal axes of the fiducial configuration.
    centred = FIDUCIALS - FIDUCIALS.mean(0)
    _, axes = np.linalg.eigh(centred.T @ centred)
    def dist_to_axis(p, k):
        return np.linalg.norm(p - np.outer(p @ axes[:, k], axes[:, k]), axis=-1)
    f2 = [np.mean(dist_to_axis(centred, k) ** 2) for k in range(3)]
    r = TARGETS - FIDUCIALS.mean(0)
    fle = 1.5
    closed = fle ** 2 / len(FIDUCIALS) * (1 + sum(dist_to_axis(r, k) ** 2 / f2[k] for k in range(3)) / 3)
    np.testing.assert_allclose(F.expected_tre(FIDUCIALS, TARGETS, fle) ** 2, closed, rtol=1e-9)


@pytest.mark.parametrize("kind, points, ratio", [
    ("rigid", FIDUCIALS, 1 - 2 / 6),                  # Fitzpatrick: (1 - 2/N) in 3D
    ("affine", np.r_[FIDUCIALS, [[60., 5., 40.], [20., 60., 50.]]], 1 - 12 / 24),
    ("rigid", FIDUCIALS[:5, :2], 1 - 3 / 10),          # 2D: K = 3 parameters, 2 N coordinates
])
def test_simulated_fre_follows_the_expected_fre(kind, points, ratio):
    fle = 2.0
    sim = F.simulate(points, points[:2] + 5.0, fle, trials=3000, kind=kind, seed=1)
    assert sim.expected_fre ** 2 == pytest.approx(ratio * fle ** 2)
    # 3000 trials: the mean of FRE^2 is within about 2 % (3 standard errors).
    assert np.mean(sim.fre ** 2) == pytest.approx(ratio * fle ** 2, rel=0.04)
    assert np.mean(sim.fle ** 2) == pytest.approx(fle ** 2, rel=0.03)
    assert np.mean(sim.fre ** 2) < np.mean(sim.fle ** 2)      # the fit absorbs part of the noise


def test_simulated_tre_matches_the_prediction_and_is_uncorrelated_with_fre():
    sim = F.simulate(FIDUCIALS, TARGETS, 1.0, trials=4000, seed=2)
    np.testing.assert_allclose(np.sqrt(np.mean(sim.tre ** 2, 0)), sim.expected_tre, rtol=0.05)
    # TRE far from the fiducials is larger than at their centroid (~FLE / sqrt(N) = 0.41).
    assert sim.expected_tre[0] == pytest.approx(1 / np.sqrt(6), rel=0.02)
    assert sim.expected_tre[1] > 2 * sim.expected_tre[0]
    # Why FRE misleads: across registrations, FRE says nothing about TRE
    # (Fitzpatrick 2009). 4000 trials: the standard error of a zero correlation is 0.016.
    assert np.all(np.abs(sim.correlation()) < 0.08)
    # ... while FRE does follow the noise actually drawn: the correlation works.
    assert np.corrcoef(sim.fre, sim.fle)[0, 1] > 0.5


def test_simulation_is_reproducible_by_seed():
    a = F.simulate(FIDUCIALS, TARGETS, 1.0, trials=50, seed=3)
    b = F.simulate(FIDUCIALS, TARGETS, 1.0, trials=50, seed=3)
    c = F.simulate(FIDUCIALS, TARGETS, 1.0, trials=50, seed=4)
    assert np.array_equal(a.fre, b.fre) and not np.array_equal(a.fre, c.fre)


def test_fiducial_errors_are_clear():
    line = np.array([[0., 0., 0.], [1., 1., 1.], [2., 2., 2.], [5., 5., 5.]])
    with pytest.raises(ValueError, match="source: the points lie on one line"):
        F.fit_rigid(line, line)
    with pytest.raises(ValueError, match="source: the points lie in one plane"):
        F.fit_affine(FIDUCIALS * [1., 1., 0.], FIDUCIALS)
    with pytest.raises(ValueError, match="needs at least 4 points, got 3"):
        F.fit_affine(FIDUCIALS[:3], FIDUCIALS[:3])
    with pytest.raises(ValueError, match="source and target: expected the same number of points"):
        F.fit_rigid(FIDUCIALS, FIDUCIALS[:5])
    with pytest.raises(ValueError, match="n: a rigid fit in 3D has 6 parameters"):
        F.expected_fre(2, 1.0)
    with pytest.raises(ValueError, match=r"source: expected points of shape \(N, 2\) or \(N, 3\)"):
        F.fit_rigid(np.zeros((4, 5)), np.zeros((4, 5)))
