"""Registration as a game: a deep Q-learning agent that aligns 2D images rigidly.

Liao et al. (AAAI 2017, "An artificial agent for robust image registration")
and Ma et al. (MICCAI 2017, depth images to CT) let an agent register as a
person does, one small move at a time: the state is the fixed image beside
the moving image under the current transform, the actions are small steps of
each transform parameter, and the reward of a step is how much closer it
brings the transform to the true one (Liao et al.'s reward: the reduction of
the distance to the ground-truth transform). A Q-network scores every action
from the state; at test time the agent takes the best-scored action, step
after step (a greedy rollout).

Here the transform is rigid in 2D, ``p = (t_0, t_1, theta)``: translations in
voxels along the two array axes and a rotation in degrees about the image
centre, the map ``x -> R(theta) (x - c) + c + t`` that
:func:`regedu.spatial.affine_to_displacement` turns into a field
(``center="image"``). The agent learns by deep Q-learning (Mnih et al. 2015):
epsilon-greedy exploration, an experience replay buffer, and a target
network that is a periodic copy of the Q-network, with the target
``r + gamma * max_a' Q_target(s', a')`` (:func:`q_targets`).

Convention (``docs/conventions.md``, "Conventions"): images ``(B, 1, H, W)``;
the moving image under ``p`` is ``warp(moving, rigid_field(p, shape))``, so
``p`` aligns when that equals the fixed image.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import as_tensor, check_image, check_positive, check_shape, check_tensor
from .spatial import affine_to_displacement, warp

__all__ = ["ACTIONS", "rigid_matrix", "rigid_field", "compose_rigid", "rigid_error", "random_misalignment",
           "QNetwork", "ReplayBuffer", "q_targets", "AgentHistory", "train_agent", "greedy_rollout", "random_rollout"]

#: The actions, as steps of ``(t_0, t_1, theta)`` in units of ``(shift, shift, angle)``:
#: +-1 along axis 0, +-1 along axis 1, +-1 in rotation.
ACTIONS = torch.tensor([[1., 0., 0.], [-1., 0., 0.], [0., 1., 0.], [0., -1., 0.], [0., 0., 1.], [0., 0., -1.]])


def _params(p, name: str = "params") -> torch.Tensor:
    p = check_tensor(as_tensor(p, name), name, floating=True)
    check_shape(p, "B 3", name)
    return p


def rigid_matrix(params) -> torch.Tensor:
    """``(B, 3)`` rigid parameters ``(t_0, t_1, theta_degrees)`` -> ``(B, 2, 3)`` matrices ``[R | t]``.

    >>> (rigid_matrix(torch.tensor([[1., 2., 90.]])).round() + 0.0).tolist()
    [[[0.0, -1.0, 1.0], [1.0, 0.0, 2.0]]]
    """
    p = _params(params)
    a = torch.deg2rad(p[:, 2])
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s, p[:, 0]], 1), torch.stack([s, c, p[:, 1]], 1)], 1)


def rigid_field(params, shape) -> torch.Tensor:
    """The displacement ``(B, 2, *shape)`` of the rigid map about the image centre."""
    return affine_to_displacement(rigid_matrix(params), shape, center="image")


def compose_rigid(outer, inner) -> torch.Tensor:
    """Parameters of ``T_outer o T_inner`` (both about the same centre): rotations add,
    ``t = R_outer t_inner + t_outer``.

    ``warp(warp(image, rigid_field(q)), rigid_field(p))`` samples ``image`` at
    ``T_q(T_p(x))``: the transform a moving image made with ``q`` shows under
    ``p`` is ``compose_rigid(q, p)``, aligned when it is the identity.
    """
    q, p = _params(outer, "outer"), _params(inner, "inner")
    R = rigid_matrix(q)[:, :, :2]
    t = torch.einsum("bij,bj->bi", R, p[:, :2]) + q[:, :2]
    return torch.cat([t, (q[:, 2:] + p[:, 2:] + 180) % 360 - 180], 1)


def rigid_error(params, shape) -> torch.Tensor:
    """How far ``params`` is from the identity: the RMS displacement over the image grid (voxels), ``(B,)``.

    For the map ``x -> R (x - c) + c + t`` about the centre ``c`` this is
    ``sqrt(|t|^2 + 2 (1 - cos theta) mean |x - c|^2)`` (the cross term averages
    to zero over a grid symmetric about its centre), computed in closed form.
    The distance of an estimate ``p`` to a truth is the error of their residual,
    ``rigid_error(compose_rigid(q, p), shape)``.
    """
    p = _params(params)
    shape = tuple(int(n) for n in shape)
    r2 = sum((n ** 2 - 1) / 12 for n in shape)  # mean squared distance of a grid's voxels to its centre
    a = torch.deg2rad(p[:, 2])
    return torch.sqrt(p[:, :2].pow(2).sum(1) + 2 * (1 - torch.cos(a)) * r2)


class QNetwork(nn.Module):
    """A small CNN scoring each action from a state ``(B, 2, H, W)`` (fixed, moving under the current
    transform): four stride-2 convolutions, their features averaged over the four quadrants, two
    linear layers.

    Parameters
    ----------
    n_actions : int
    width : int
        Channels of the first convolution (doubling after each of the first three).
    pool : int
        The state is block-averaged by this factor first (a coarse view is
        enough to tell the direction of a misalignment, and it is cheaper).
    """

    def __init__(self, n_actions: int = len(ACTIONS), width: int = 8, pool: int = 1):
        super().__init__()
        check_positive(n_actions, "n_actions", integer=True)
        check_positive(width, "width", integer=True)
        check_positive(pool, "pool", integer=True)
        self.pool = pool
        w = [2, width, 2 * width, 4 * width, 8 * width]
        self.features = nn.Sequential(*[m for i in range(4) for m in
                                        (nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1), nn.ReLU())])
        self.head = nn.Sequential(nn.Linear(w[-1] * 4, 64), nn.ReLU(), nn.Linear(64, n_actions))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        check_image(state, "state", spatial_dims=2, channels=2)
        x = F.avg_pool2d(state, self.pool) if self.pool > 1 else state
        x = self.features(x)
        # Pooling to 2x2 keeps where the evidence is (left/right, up/down), which a rotation needs.
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


class ReplayBuffer:
    """Experience replay: a ring of the last ``capacity`` transitions ``(s, a, r, s', done)``,
    sampled uniformly (it breaks the correlation of consecutive steps).

    >>> buf = ReplayBuffer(3, seed=0)
    >>> for k in range(5): buf.push(torch.full((1, 2, 4, 4), float(k)), torch.tensor([0]),
    ...                             torch.tensor([1.0]), torch.zeros(1, 2, 4, 4), torch.tensor([False]))
    >>> len(buf), sorted(buf.states[:, 0, 0, 0].tolist())
    (3, [2.0, 3.0, 4.0])
    """

    def __init__(self, capacity: int, *, seed: int = 0):
        check_positive(capacity, "capacity", integer=True)
        self.capacity, self.size, self.next = capacity, 0, 0
        self.states = self.actions = self.rewards = self.next_states = self.dones = None
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.size

    def push(self, states, actions, rewards, next_states, dones) -> None:
        """Add a batch of transitions (states ``(B, 2, H, W)``, actions ``(B,)`` ...)."""
        n = len(states)
        if not (len(actions) == len(rewards) == len(next_states) == len(dones) == n):
            raise ValueError(f"push: every part of a transition needs the same batch size, got states {n}, "
                             f"actions {len(actions)}, rewards {len(rewards)}, next_states "
                             f"{len(next_states)}, dones {len(dones)}")
        if self.states is None:
            def new(x, dtype):
                return torch.zeros(self.capacity, *x.shape[1:], dtype=dtype)
            self.states, self.next_states = new(states, torch.float32), new(states, torch.float32)
            self.actions, self.rewards = new(actions, torch.long), new(rewards, torch.float32)
            self.dones = new(dones, torch.bool)
        index = (self.next + torch.arange(n)) % self.capacity
        for store, x in ((self.states, states), (self.actions, actions), (self.rewards, rewards),
                         (self.next_states, next_states), (self.dones, dones)):
            store[index] = x.detach().to(store.dtype)
        self.next = int(index[-1] + 1) % self.capacity
        self.size = min(self.capacity, self.size + n)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``batch_size`` transitions drawn uniformly (with replacement)."""
        if self.size == 0:
            raise ValueError("sample: the buffer is empty; push transitions first")
        i = torch.randint(self.size, (batch_size,), generator=self.generator)
        return self.states[i], self.actions[i], self.rewards[i], self.next_states[i], self.dones[i]


def q_targets(rewards, next_q, dones, gamma: float) -> torch.Tensor:
    """The Q-learning target ``r + gamma * max_a' Q_target(s', a')``, ``r`` alone where the episode ended.

    >>> q_targets(torch.tensor([1., 1.]), torch.tensor([[0., 2.], [5., 3.]]), torch.tensor([False, True]), 0.5)
    tensor([2., 1.])
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma: expected a discount in [0, 1], got {gamma!r}")
    rewards, next_q = as_tensor(rewards, "rewards"), as_tensor(next_q, "next_q")
    check_shape(next_q, "B A", "next_q")
    return rewards + gamma * (~as_tensor(dones, "dones").bool()).to(rewards.dtype) * next_q.max(1).values


def _observe(fixed: torch.Tensor, moving: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return torch.cat([fixed, warp(moving, rigid_field(params, fixed.shape[2:]))], 1)


def _check_steps(shift: float, angle: float) -> torch.Tensor:
    check_positive(shift, "shift")
    check_positive(angle, "angle")
    return ACTIONS * torch.tensor([shift, shift, angle])


@dataclass
class AgentHistory:
    """What :func:`train_agent` logged: per update ``loss`` (Huber, of the TD error) and
    ``epsilon``; per finished episode its final ``episode_error`` (voxels, RMS); and, with
    validation pairs, at updates ``val_update`` the mean residual error ``val_error`` of
    a greedy rollout on them."""
    loss: list = field(default_factory=list)
    epsilon: list = field(default_factory=list)
    episode_error: list = field(default_factory=list)
    val_update: list = field(default_factory=list)
    val_error: list = field(default_factory=list)


def random_misalignment(n: int, max_shift: float, max_angle: float, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` rigid parameters uniform in ``[-max_shift, max_shift]^2 x [-max_angle, max_angle]``."""
    u = torch.rand(n, 3, generator=generator) * 2 - 1
    return u * torch.tensor([max_shift, max_shift, max_angle])



def train_agent(images, *, updates: int = 1500, envs: int = 16, episode_length: int = 20,
                max_shift: float = 6.0, max_angle: float = 15.0, shift: float = 1.0, angle: float = 3.0,
                gamma: float = 0.5, lr: float = 1e-3, batch_size: int = 64, capacity: int = 5000,
                target_every: int = 100, epsilon: tuple = (1.0, 0.1), warmup: int = 100, width: int = 8,
                pool: int = 1, validation=None, validate_every: int = 100,
                seed: int = 0) -> tuple[QNetwork, AgentHistory]:
    """Train a rigid registration agent by deep Q-learning on random misalignments of ``images``.

    Each of ``envs`` parallel episodes takes an image ``f`` and a random
    misalignment ``q`` (:func:`random_misalignment`): the moving image is
    ``warp(f, rigid_field(q))`` and the agent, started at ``p = 0``, moves ``p``
    one action at a time for ``episode_length`` steps. The reward of a step is
    the reduction of the residual error ``rigid_error(compose_rigid(q, p))``.
    After every step of the episodes, one Adam step on a batch from the replay
    buffer (after ``warmup`` transitions) moves ``Q(s, a)`` towards
    :func:`q_targets` (Huber loss); the target network is the Q-network copied
    every ``target_every`` updates; epsilon falls linearly from
    ``epsilon[0]`` to ``epsilon[1]`` over the first half of the updates.

    Parameters
    ----------
    images : Tensor, shape (N, 1, H, W)
        Training images (fixed images; moving ones are made from them).
    updates : int
        Gradient steps (= steps of the parallel episodes).
    max_shift, max_angle : float
        Range of the training misalignments (voxels, degrees).
    shift, angle : float
        One action's step (voxels, degrees).
    gamma : float
        Discount. Liao et al. argue for a greedy agent: with the reward known
        for every action, a short horizon learns fastest.
    width, pool : int
        Of the :class:`QNetwork`.
    validation : tuple (moving, fixed, misalignment), optional
        Pairs to watch, never learnt from: every ``validate_every`` updates and
        at the end, the mean residual error of a greedy rollout of
        ``episode_length`` steps (``moving`` made from ``fixed`` with the
        ``(B, 3)`` misalignment, as in training).

    Returns
    -------
    (QNetwork, AgentHistory)
    """
    images = as_tensor(images, "images").float()
    check_image(images, "images", spatial_dims=2, channels=1)
    for name, value in (("updates", updates), ("envs", envs), ("episode_length", episode_length),
                        ("batch_size", batch_size), ("capacity", capacity), ("target_every", target_every)):
        check_positive(value, name, integer=True)
    steps = _check_steps(shift, angle)
    check_positive(max_shift, "max_shift")
    check_positive(max_angle, "max_angle")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = QNetwork(len(ACTIONS), width, pool)
    target = copy.deepcopy(net).requires_grad_(False)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    buffer = ReplayBuffer(capacity, seed=seed)
    shape = images.shape[2:]
    history = AgentHistory()

    def reset(k):
        idx = torch.randint(len(images), (k,), generator=g)
        q = random_misalignment(k, max_shift, max_angle, g)
        return images[idx], warp(images[idx], rigid_field(q, shape)), q

    def validate(update):
        val_moving, val_fixed, val_q = validation
        end = greedy_rollout(net.eval(), val_moving, val_fixed, steps=episode_length, shift=shift, angle=angle)[-1]
        net.train()
        history.val_update.append(update)
        history.val_error.append(float(rigid_error(compose_rigid(val_q, end), shape).mean()))

    if validation is not None:
        check_positive(validate_every, "validate_every", integer=True)
        if len(validation) != 3:
            raise ValueError("validation: expected a tuple (moving, fixed, misalignment)")
        validate(0)
    fixed, moving, q = reset(envs)
    p, t = torch.zeros(envs, 3), 0
    state = _observe(fixed, moving, p)
    for update in range(updates):
        eps = max(epsilon[1], epsilon[0] + (epsilon[1] - epsilon[0]) * update / max(1, updates // 2))
        with torch.no_grad():
            greedy = net(state).argmax(1)
        explore = torch.rand(envs, generator=g) < eps
        action = torch.where(explore, torch.randint(len(ACTIONS), (envs,), generator=g), greedy)
        p_next = p + steps[action]
        reward = rigid_error(compose_rigid(q, p), shape) - rigid_error(compose_rigid(q, p_next), shape)
        t += 1
        done = torch.full((envs,), t == episode_length)
        next_state = _observe(fixed, moving, p_next)
        buffer.push(state, action, reward, next_state, done)
        if t == episode_length:
            history.episode_error += rigid_error(compose_rigid(q, p_next), shape).tolist()
            fixed, moving, q = reset(envs)
            p, t = torch.zeros(envs, 3), 0
            state = _observe(fixed, moving, p)
        else:
            p, state = p_next, next_state
        if len(buffer) >= warmup:
            s, a, r, s2, d = buffer.sample(batch_size)
            with torch.no_grad():
                y = q_targets(r, target(s2), d, gamma)
            loss = F.smooth_l1_loss(net(s).gather(1, a[:, None])[:, 0], y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            history.loss.append(float(loss.detach()))
            history.epsilon.append(eps)
        if (update + 1) % target_every == 0:
            target.load_state_dict(net.state_dict())
        if validation is not None and ((update + 1) % validate_every == 0 or update + 1 == updates):
            validate(update + 1)
    return net.eval(), history


def greedy_rollout(net: QNetwork, moving, fixed, *, steps: int = 30, shift: float = 1.0,
                   angle: float = 3.0) -> torch.Tensor:
    """Register by the agent's best action, ``steps`` times: the trajectory ``(steps + 1, B, 3)``.

    ``trajectory[k]`` are the parameters after ``k`` actions (``trajectory[0]``
    is the identity); ``warp(moving, rigid_field(trajectory[-1], shape))`` is
    the registered image. ``shift`` and ``angle`` must be those it was trained with.
    """
    return _rollout(lambda state: net(state).argmax(1), moving, fixed, steps, shift, angle)


def random_rollout(moving, fixed, *, steps: int = 30, shift: float = 1.0, angle: float = 3.0,
                   seed: int = 0) -> torch.Tensor:
    """The baseline of an agent: ``steps`` uniformly random actions; a trajectory as :func:`greedy_rollout`'s."""
    g = torch.Generator().manual_seed(seed)
    return _rollout(lambda state: torch.randint(len(ACTIONS), (len(state),), generator=g), moving, fixed,
                    steps, shift, angle)


def _rollout(policy, moving, fixed, steps, shift, angle) -> torch.Tensor:
    moving, fixed = as_tensor(moving, "moving").float(), as_tensor(fixed, "fixed").float()
    check_image(moving, "moving", spatial_dims=2, channels=1)
    check_image(fixed, "fixed", spatial_dims=2, channels=1)
    if moving.shape != fixed.shape:
        raise ValueError(f"moving and fixed: expected the same shape, got {tuple(moving.shape)} and "
                         f"{tuple(fixed.shape)}")
    check_positive(steps, "steps", integer=True)
    step = _check_steps(shift, angle)
    p = torch.zeros(len(fixed), 3)
    trajectory = [p]
    with torch.no_grad():
        for _ in range(steps):
            p = p + step[policy(_observe(fixed, moving, p))]
            trajectory.append(p)
    return torch.stack(trajectory)

