"""regedu.adversarial: discriminators that learn what they are meant to, and updates that touch
only the player whose turn it is."""
import math

import numpy as np
import pytest
import torch

from regedu import losses, metrics, nets
from regedu.adversarial import (Discriminator, adversarial_loss, adversarial_step, discriminator_loss,
                                plausible_fields, reference_image)
from regedu.spatial import gaussian_blur, warp


def _images(n, seed, size=(24, 24)):
    # Smooth random "anatomy": blurred noise, contrast stretched to [0, 1].
    g = torch.Generator().manual_seed(seed)
    x = gaussian_blur(torch.rand(n, 1, *size, generator=g), 1.5)
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return (x - lo) / (hi - lo)


def _auc(positive, negative):
    return float((positive[:, None] > negative[None, :]).float().mean())


def _misaligned(x, seed):
    # Each image moved by a smooth random field of a few pixels: the content no longer matches.
    u = plausible_fields(len(x), x.shape[2:], 2.5, points=4, seed=seed)
    return warp(x, u)


def _aligned(x, seed):
    # The same content under a different smooth gain and a little noise (another "scanner").
    g = torch.Generator().manual_seed(seed)
    gain = 1 + 0.2 * torch.rand(len(x), 1, 1, 1, generator=g)
    return gain * x + 0.01 * torch.randn(x.shape, generator=g)


def test_discriminator_learns_to_separate_aligned_from_misaligned_pairs():
    torch.manual_seed(0)
    critic = Discriminator(2, in_channels=2, features=(8, 16))
    untrained = Discriminator(2, in_channels=2, features=(8, 16))
    untrained.load_state_dict(critic.state_dict())
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for step in range(40):
        x = _images(8, seed=step)
        loss = discriminator_loss(critic, torch.cat([x, _aligned(x, step)], 1),
                                  torch.cat([x, _misaligned(x, 1000 + step)], 1))
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    x = _images(24, seed=999)                          # held out
    pos, neg = torch.cat([x, _aligned(x, 5)], 1), torch.cat([x, _misaligned(x, 6)], 1)
    with torch.no_grad():
        trained_auc = _auc(critic(pos), critic(neg))
        untrained_auc = _auc(untrained(pos), untrained(neg))
    # 24 x 24 held-out pairs: chance gives 0.5 +- 0.08, so 0.9 is out of its reach.
    assert trained_auc > 0.9, trained_auc
    assert trained_auc > untrained_auc + 0.25, (trained_auc, untrained_auc)


def test_adversarial_regulariser_trained_on_smooth_fields_penalises_rough_ones_more():
    torch.manual_seed(0)
    shape = (24, 24)
    critic = Discriminator(2, in_channels=2, features=(8, 8))
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)

    def rough(n, seed):
        # Smooth fields plus pixel noise: folds in places, as an unregularised network's.
        g = torch.Generator().manual_seed(seed)
        return plausible_fields(n, shape, 1.0, seed=seed) + 0.8 * torch.randn(n, 2, *shape, generator=g)

    for step in range(40):
        loss = discriminator_loss(critic, plausible_fields(8, shape, 1.0, seed=step), rough(8, 100 + step))
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    smooth_test, rough_test = plausible_fields(16, shape, 1.0, seed=500), rough(16, 501)
    assert metrics.folding_stats(rough_test)["percent_folding"] > 1.0
    assert metrics.folding_stats(smooth_test)["percent_folding"] == 0.0
    with torch.no_grad():
        penalty_smooth = adversarial_loss(critic, smooth_test, reduction="none")
        penalty_rough = adversarial_loss(critic, rough_test, reduction="none")
    assert float(penalty_rough.min()) > float(penalty_smooth.max()), (penalty_smooth, penalty_rough)


class _Recorder(torch.optim.SGD):
    """SGD that records, at each step, the gradients of the parameters of two modules."""

    def __init__(self, params, watched, lr=1e-2):
        super().__init__(params, lr=lr)
        self.watched, self.seen = watched, []

    def step(self, closure=None):
        self.seen.append({name: [None if p.grad is None else p.grad.clone() for p in module.parameters()]
                          for name, module in self.watched.items()})
        return super().step(closure)


@pytest.mark.parametrize("kind", ["similarity", "deformation"])
def test_each_update_reaches_only_its_own_player(kind):
    torch.manual_seed(0)
    model = nets.create("unet", spatial_dims=2, encoder=(4, 8), decoder=(8, 8))
    critic = Discriminator(2, in_channels=2, features=(4, 8))
    watched = {"model": model, "critic": critic}
    optimizer = _Recorder(model.parameters(), watched)
    d_optimizer = _Recorder(critic.parameters(), watched)
    moving, fixed = _images(2, 1, (16, 16)), _images(2, 2, (16, 16))
    real = plausible_fields(2, (16, 16), 1.0) if kind == "deformation" else None
    before = [p.detach().clone() for p in critic.parameters()]
    adversarial_step(model, critic, {"moving": moving, "fixed": fixed}, optimizer, d_optimizer, kind=kind,
                     losses={"diffusion": 1.0} if kind == "similarity" else {"ncc": 1.0}, real=real)
    (d_seen,), (g_seen,) = d_optimizer.seen, optimizer.seen
    # The discriminator's update: its inputs were detached, nothing reached the network.
    assert all(g is None for g in d_seen["model"])
    assert all(g is not None and g.abs().sum() > 0 for g in d_seen["critic"])
    # The network's update: gradients in the network, and the discriminator's left as its own step made them.
    assert all(g is not None for g in g_seen["model"]) and sum(float(g.abs().sum()) for g in g_seen["model"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(d_seen["critic"], g_seen["critic"]))
    # Only the discriminator's own step moved its weights (SGD: exactly lr times its gradient).
    for p, p0, grad in zip(critic.parameters(), before, d_seen["critic"]):
        torch.testing.assert_close(p.detach(), p0 - 1e-2 * grad)
    assert all(p.requires_grad for p in critic.parameters()), "the discriminator must be unfrozen afterwards"


def test_step_returns_the_terms_it_minimised():
    torch.manual_seed(0)
    model = nets.create("unet", spatial_dims=2, encoder=(4, 8), decoder=(8, 8))
    critic = Discriminator(2, in_channels=2, features=(4,))
    moving, fixed = _images(2, 1, (16, 16)), _images(2, 2, (16, 16))
    with torch.no_grad():
        disp = model(moving, fixed).disp
        expected = {"ncc": float(losses.ncc_local(fixed, warp(moving, disp))), "diffusion": 0.5 * float(losses.diffusion(disp))}
    values = adversarial_step(model, critic, {"moving": moving, "fixed": fixed},
                              torch.optim.SGD(model.parameters(), lr=0.0), torch.optim.SGD(critic.parameters(), lr=0.0),
                              kind="deformation", weight=2.0, losses={"ncc": 1.0, "diffusion": 0.5},
                              real=plausible_fields(3, (16, 16), 1.0))
    assert values["ncc"] == pytest.approx(expected["ncc"], rel=1e-5)
    assert values["diffusion"] == pytest.approx(expected["diffusion"], rel=1e-5)
    with torch.no_grad():
        adv = 2.0 * float(adversarial_loss(critic, disp))
    assert values["adversarial"] == pytest.approx(adv, rel=1e-5)
    assert values["loss"] == pytest.approx(adv + expected["ncc"] + expected["diffusion"], rel=1e-5)
    assert 0 < values["p_real"] < 1 and 0 < values["p_fake"] < 1


def test_losses_at_a_blind_discriminator_are_chance():
    blind = lambda x: torch.zeros(len(x))  # noqa: E731
    x = torch.rand(3, 2, 8, 8)
    assert float(discriminator_loss(blind, x, x)) == pytest.approx(2 * math.log(2))
    assert float(adversarial_loss(blind, x)) == pytest.approx(math.log(2))
    assert adversarial_loss(blind, x, reduction="none").shape == (3,)


def test_reference_image_is_the_blend_and_detached():
    fixed, warped = torch.full((1, 1, 4, 4), 2.0), torch.zeros(1, 1, 4, 4, requires_grad=True)
    ref = reference_image(fixed, warped, 0.25)
    assert torch.allclose(ref, torch.full_like(ref, 0.5)) and not ref.requires_grad


def test_plausible_fields_fold_nowhere_and_scale_with_amplitude():
    small, large = plausible_fields(8, (32, 32), 1.0, seed=3), plausible_fields(8, (32, 32), 2.0, seed=3)
    assert metrics.folding_stats(large)["percent_folding"] == 0.0
    ratio = float(large.norm(dim=1).mean() / small.norm(dim=1).mean())
    assert 1.8 < ratio < 2.4, ratio           # twice the velocity: about twice the displacement
    assert float(plausible_fields(2, (8, 8), 0.0).abs().max()) == 0.0
    assert plausible_fields(2, (6, 7, 8), 1.0, points=3).shape == (2, 3, 6, 7, 8)


def test_discriminator_works_in_3d_and_blur_changes_the_input_not_the_shape():
    torch.manual_seed(0)
    d3 = Discriminator(3, in_channels=3, features=(4, 8))
    assert d3(torch.rand(2, 3, 8, 10, 12)).shape == (2,)
    plain = Discriminator(2, in_channels=1, features=(4,))
    blurred = Discriminator(2, in_channels=1, features=(4,), blur=1.0)
    blurred.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(blurred(x), plain(gaussian_blur(x, 1.0)))
        assert not torch.allclose(blurred(x), plain(x))


@pytest.mark.parametrize("call, name", [
    (lambda: Discriminator(4), "spatial_dims"),
    (lambda: Discriminator(2, in_channels=0), "in_channels"),
    (lambda: Discriminator(2, features=(8, -1)), "features"),
    (lambda: Discriminator(2, blur=-1.0), "blur"),
    (lambda: Discriminator(2, in_channels=2)(torch.rand(1, 3, 8, 8)), "x"),
    (lambda: discriminator_loss(Discriminator(2, 1), torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9)), "real and fake"),
    (lambda: discriminator_loss("critic", torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)), "discriminator"),
    (lambda: adversarial_loss(Discriminator(2, 1), torch.rand(1, 1, 8, 8), reduction="sum"), "reduction"),
    (lambda: reference_image(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), alpha=0.0), "alpha"),
    (lambda: reference_image(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5)), "fixed and warped"),
    (lambda: plausible_fields(0, (8, 8), 1.0), "n"),
    (lambda: plausible_fields(1, (8,), 1.0), "shape"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises((ValueError, TypeError), match=f"^{name}:"):
        call()


def _step_args(**overrides):
    model = nets.create("unet", spatial_dims=2, encoder=(4,), decoder=(4,))
    critic = Discriminator(2, in_channels=2, features=(4,))
    args = dict(model=model, discriminator=critic, batch={"moving": torch.rand(1, 1, 8, 8), "fixed": torch.rand(1, 1, 8, 8)},
                optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                d_optimizer=torch.optim.SGD(critic.parameters(), lr=0.0))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, name", [
    (dict(kind="both"), "kind"),
    (dict(kind="deformation"), "real"),
    (dict(kind="deformation", real=torch.rand(2, 2, 8, 9)), "real"),
    (dict(real=torch.rand(1, 1, 8, 9)), "real"),
    (dict(weight=-1.0), "weight"),
    (dict(batch={"moving": torch.rand(1, 1, 8, 8)}), "batch"),
    (dict(discriminator=np.zeros(3)), "discriminator"),
])
def test_adversarial_step_bad_input_names_the_argument(overrides, name):
    with pytest.raises((ValueError, TypeError), match=f"^{name}:"):
        adversarial_step(**_step_args(**overrides))
