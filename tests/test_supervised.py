"""regedu.supervised: classical targets, similarity maps, SVF-Net's pairs and loss, Shan's loss, the loop."""
import pytest
import torch

from regedu import losses, nets
from regedu.nets import RegistrationOutput
from regedu.spatial import integrate_velocity, warp
from regedu.supervised import (classical_targets, fit_objective, shan_loss, similarity_maps,
                               similarity_steered_net, velocity_loss, velocity_pairs)
from regedu.train import fit

SMALL = dict(encoder=(8, 8), decoder=(8, 8, 8))


def blob(shape=(24, 24), centre=(11.0, 12.0), sigma=3.0):
    yy, xx = torch.meshgrid(torch.arange(shape[0]).float(), torch.arange(shape[1]).float(), indexing="ij")
    return torch.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma ** 2))[None, None]


def test_classical_targets_recover_a_known_translation():
    # fixed(x) = moving(x + t): the classical method should find u = t around the blob.
    t = (1.0, -2.0)
    moving = blob(centre=(11.0, 12.0))
    fixed = blob(centre=(11.0 - t[0], 12.0 - t[1]))
    disp, seconds = classical_targets(moving, fixed, weight=0.1, iterations=150, lr=0.05)
    centre = disp[0, :, 8:13, 12:17].mean((1, 2))
    assert torch.allclose(centre, torch.tensor(t), atol=0.1), centre
    assert seconds > 0


def test_classical_targets_with_ants_syn_recover_a_known_translation():
    t = (1.0, -2.0)
    moving, fixed = blob(centre=(11.0, 12.0)), blob(centre=(11.0 - t[0], 12.0 - t[1]))
    disp, _ = classical_targets(moving, fixed, method="syn")
    centre = disp[0, :, 8:13, 12:17].mean((1, 2))
    assert torch.allclose(centre, torch.tensor(t), atol=0.3), centre


def test_similarity_maps_of_a_constant_difference_are_its_square():
    moving = torch.rand(2, 1, 16, 20)
    maps = similarity_maps(moving, moving + 0.5, sigmas=(1.0, 3.0))
    assert maps.shape == (2, 2, 16, 20)
    assert torch.allclose(maps, torch.full_like(maps, 0.25), atol=1e-5)
    assert float(similarity_maps(moving, moving).abs().max()) == 0.0


def test_regression_on_a_known_field_converges_to_it():
    # Cao et al.'s recipe on one pair whose target is a known smooth field: the network learns it.
    torch.manual_seed(0)
    moving = blob()
    yy = torch.linspace(-1, 1, 24)
    target = torch.stack([0.8 * yy[:, None].expand(24, 24), -0.5 * torch.ones(24, 24)])[None]
    model = similarity_steered_net(2, **SMALL)
    data = [{"moving": moving[0], "fixed": warp(moving, target)[0], "disp": target[0]}]
    fit(model, data, losses={"field": 1.0}, steps=150, lr=1e-2, progress=False)
    with torch.no_grad():
        predicted = model(moving, warp(moving, target)).disp
    assert float(losses.field_mse(predicted, target)) < 0.01 * float(target.square().mean())


def test_velocity_pairs_hold_their_known_fields():
    images = torch.rand(3, 1, 20, 24)
    seg = (images > 0.5).long()
    pairs = velocity_pairs(images, 5, amplitude=1.5, points=4, seg=seg, seed=3)
    assert pairs["velocity"].shape == pairs["disp"].shape == (5, 2, 20, 24)
    assert torch.equal(pairs["moving"][3], images[0])
    assert torch.allclose(pairs["disp"], integrate_velocity(pairs["velocity"], 7))
    assert torch.allclose(pairs["fixed"], warp(pairs["moving"], pairs["disp"]))
    assert torch.equal(pairs["fixed_seg"], warp(pairs["moving_seg"], pairs["disp"], mode="nearest"))
    again = velocity_pairs(images, 5, amplitude=1.5, points=4, seed=3)
    assert torch.equal(again["velocity"], pairs["velocity"])


def test_svf_net_integrated_velocity_matches_the_known_displacement():
    torch.manual_seed(0)
    pairs = velocity_pairs(blob(sigma=4.0), 1, amplitude=1.0, points=3, seed=0)
    model = nets.create("unet", spatial_dims=2, integrate_steps=7, **SMALL)
    history = fit_objective(model, pairs, velocity_loss, steps=200, lr=1e-2, batch_size=1, val_data=pairs,
                            val_every=50)
    assert history["val_step"] == [50, 100, 150, 200] and len(history["train"]) == 200
    with torch.no_grad():
        out = model(pairs["moving"], pairs["fixed"])
    assert float(losses.field_mse(out.velocity, pairs["velocity"])) < 0.02 * float(pairs["velocity"].square().mean())
    # the loss is on the velocity; the displacement follows by integration
    assert float((out.disp - pairs["disp"]).norm(dim=1).mean()) < 0.15 * float(pairs["disp"].norm(dim=1).mean())


def test_velocity_loss_is_zero_for_the_true_velocity_and_needs_one():
    v = torch.randn(2, 2, 8, 8)
    out = RegistrationOutput(torch.zeros(2, 1, 8, 8), integrate_velocity(v), velocity=v)
    assert float(velocity_loss(out, {"velocity": v})) == 0.0
    assert float(velocity_loss(out, {"velocity": v + 1})) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="integrate_steps"):
        velocity_loss(RegistrationOutput(torch.zeros(2, 1, 8, 8), v), {"velocity": v})
    with pytest.raises(ValueError, match="velocity"):
        velocity_loss(out, {})


def test_shan_loss_ignores_what_lies_outside_the_mask():
    fixed = torch.rand(1, 1, 12, 12)
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 2:10, 2:10] = 1
    warped = torch.where(mask.bool(), fixed, fixed + 1.0)       # right inside the ROI, wrong outside
    out = RegistrationOutput(warped, torch.full((1, 2, 12, 12), 0.7))  # a translation: no smoothness cost
    assert float(shan_loss(out, {"fixed": fixed, "fixed_mask": mask})) == pytest.approx(0.0, abs=1e-7)
    outside = 1 - float(mask.mean())
    assert float(shan_loss(out, {"fixed": fixed})) == pytest.approx(outside, rel=1e-5)
    bent = RegistrationOutput(warped, torch.randn(1, 2, 12, 12))
    expected = 2.0 * float(losses.edge_aware_smoothness(bent.disp, fixed, alpha=3.0))
    assert float(shan_loss(bent, {"fixed": fixed, "fixed_mask": mask}, weight=2.0, alpha=3.0)) == \
        pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="weight"):
        shan_loss(out, {"fixed": fixed}, weight=-1.0)


def test_bad_input_is_refused_with_the_argument_named():
    moving = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="method"):
        classical_targets(moving, moving, method="demons")
    with pytest.raises(ValueError, match="sigmas"):
        similarity_maps(moving, moving, sigmas=())
    with pytest.raises(ValueError, match="amplitude"):
        velocity_pairs(moving, 2, amplitude=0.0)
    model = nets.create("unet", spatial_dims=2, **SMALL)
    with pytest.raises(ValueError, match=r"data\['disp'\]"):
        fit_objective(model, {"moving": moving, "fixed": moving, "disp": torch.zeros(3, 2, 8, 8)},
                      velocity_loss, steps=1)
    with pytest.raises(ValueError, match="data"):
        fit_objective(model, {"moving": moving}, velocity_loss, steps=1)
