"""The rigid registration agent (regedu.agents): transforms, Q-learning target, replay, and learning."""
import math

import pytest
import torch

from regedu.agents import (ACTIONS, QNetwork, ReplayBuffer, compose_rigid, greedy_rollout, q_targets,
                           random_misalignment, random_rollout, rigid_error, rigid_field, train_agent)
from regedu.spatial import compose, gaussian_blur, identity_grid, warp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rigid_field_rotates_about_the_centre():
    # 90 degrees about the centre c = (2, 2) of a 5x5 grid, R = [[0, -1], [1, 0]] on (row, col):
    # x = (0, 2), x - c = (-2, 0) -> R (x - c) = (0, -2) -> (2, 0).
    u = rigid_field(torch.tensor([[0., 0., 90.]]), (5, 5))
    x = identity_grid((5, 5))
    assert torch.allclose((x + u)[0, :, 0, 2], torch.tensor([2., 0.]), atol=1e-5)
    assert torch.allclose((x + u)[0, :, 2, 2], torch.tensor([2., 2.]), atol=1e-5)  # the centre stays


def test_rigid_error_is_the_rms_displacement_over_the_grid():
    shape = (20, 26)
    p = torch.tensor([[1.5, -2.0, 7.0], [0.0, 0.0, -20.0], [3.0, 4.0, 0.0]])
    rms = rigid_field(p, shape).pow(2).sum(1).mean((1, 2)).sqrt()
    assert torch.allclose(rigid_error(p, shape), rms, rtol=1e-5)
    assert float(rigid_error(p, shape)[2]) == pytest.approx(5.0)


def test_compose_rigid_is_the_composition_of_the_maps():
    shape = (30, 30)
    q, p = torch.tensor([[2.0, -1.0, 10.0]]), torch.tensor([[-1.0, 3.0, -25.0]])
    exact = rigid_field(compose_rigid(q, p), shape)
    sampled = compose(rigid_field(q, shape), rigid_field(p, shape))  # u_p + u_q(x + u_p(x))
    inner = (slice(None), slice(None), slice(8, 22), slice(8, 22))  # away from the border padding
    assert torch.allclose(exact[inner], sampled[inner], atol=1e-4)
    # q then its inverse: the residual is the identity, error 0.
    inv = torch.tensor([[0.0, 0.0, -10.0]])
    inv[:, :2] = -torch.linalg.solve(rigid_field_matrix(q), q[:, :2])
    assert float(rigid_error(compose_rigid(q, inv), shape)) == pytest.approx(0.0, abs=1e-5)


def rigid_field_matrix(q):
    a = math.radians(float(q[0, 2]))
    return torch.tensor([[[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]])


def test_q_target_matches_the_hand_computed_one():
    rewards = torch.tensor([0.5, -1.0, 2.0])
    next_q = torch.tensor([[1.0, 3.0, -2.0], [0.0, -1.0, 4.0], [7.0, 7.0, 7.0]])
    dones = torch.tensor([False, False, True])
    # 0.5 + 0.9 * 3, -1 + 0.9 * 4, and 2 alone (the episode ended)
    assert torch.allclose(q_targets(rewards, next_q, dones, 0.9), torch.tensor([3.2, 2.6, 2.0]))
    assert torch.allclose(q_targets(rewards, next_q, dones, 0.0), rewards)
    with pytest.raises(ValueError, match="gamma"):
        q_targets(rewards, next_q, dones, 1.5)


def test_replay_buffer_keeps_the_last_transitions():
    buf = ReplayBuffer(4, seed=0)
    for k in range(3):
        s = torch.full((2, 2, 4, 4), float(k))
        buf.push(s, torch.tensor([k, k]), torch.tensor([k, k], dtype=torch.float32), s + 1,
                 torch.tensor([False, True]))
    assert len(buf) == 4
    # capacity 4, batches of 2: the third batch overwrote the first
    assert buf.rewards.tolist() == [2.0, 2.0, 1.0, 1.0]
    s, a, r, s2, d = buf.sample(50)
    assert set(r.tolist()) <= {1.0, 2.0} and torch.equal(s2, s + 1) and torch.equal(a.float(), r)
    with pytest.raises(ValueError, match="batch size"):
        buf.push(torch.zeros(2, 2, 4, 4), torch.zeros(1), torch.zeros(2), torch.zeros(2, 2, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(3).sample(1)


def _rectangles(n, seed):
    # A bright rectangle with a brighter band along its top-left: where it is tells the shift.
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 24, 24)
    for i in range(n):
        r, c = torch.randint(4, 10, (2,), generator=g).tolist()
        h, w = torch.randint(5, 10, (2,), generator=g).tolist()
        x[i, 0, r:r + h, c:c + w] = 1
        x[i, 0, r:r + 2, c:c + w // 2] = 2
    return gaussian_blur(x, 1.0)


def test_a_short_training_beats_random_actions_on_held_out_images():
    # Translations (rotations of at most 1 degree), a greedy agent (gamma = 0): learnt in seconds.
    val = _rectangles(4, 2)
    q_val = random_misalignment(4, 4.0, 1.0, torch.Generator().manual_seed(6))
    net, history = train_agent(_rectangles(8, 0), updates=150, envs=8, episode_length=10, max_shift=4.0,
                               max_angle=1.0, angle=1.0, gamma=0.0, warmup=32, width=8, seed=0,
                               validation=(warp(val, rigid_field(q_val, (24, 24))), val, q_val),
                               validate_every=50)
    assert len(history.loss) == 150 - 32 // 8 + 1 and history.epsilon[-1] == pytest.approx(0.1)
    assert history.val_update == [0, 50, 100, 150] and history.val_error[-1] < history.val_error[0]
    test = _rectangles(16, 1)
    q = random_misalignment(16, 4.0, 1.0, torch.Generator().manual_seed(5))
    moving = warp(test, rigid_field(q, (24, 24)))
    before = rigid_error(q, (24, 24))
    agent = rigid_error(compose_rigid(q, greedy_rollout(net, moving, test, steps=8, angle=1.0)[-1]), (24, 24))
    rand = rigid_error(compose_rigid(q, random_rollout(moving, test, steps=8, angle=1.0)[-1]), (24, 24))
    assert agent.mean() < 0.6 * before.mean() and agent.mean() < 0.6 * rand.mean(), \
        (before.mean(), agent.mean(), rand.mean())


def test_rollouts_start_at_the_identity_and_take_one_action_per_step():
    net = QNetwork()
    traj = greedy_rollout(net, torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16), steps=4, shift=2.0, angle=5.0)
    assert traj.shape == (5, 3, 3) and torch.equal(traj[0], torch.zeros(3, 3))
    steps = (traj[1:] - traj[:-1]) / torch.tensor([2.0, 2.0, 5.0])
    assert all(any(torch.allclose(s, a) for a in ACTIONS) for s in steps.reshape(-1, 3))


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="images"):
        train_agent(torch.rand(2, 2, 16, 16), updates=1)
    with pytest.raises(ValueError, match="moving and fixed"):
        greedy_rollout(QNetwork(), torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 20))
    with pytest.raises(ValueError, match="params"):
        rigid_error(torch.zeros(2, 4), (8, 8))
    with pytest.raises(ValueError, match="state"):
        QNetwork()(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="shift"):
        random_rollout(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), shift=0)
