"""The fast local NCC (banded-matrix box sums, hand-written backward) against
references: the definition (``losses.ncc_reference``: dense convolutions with
a ones kernel, differentiated by autograd) and neurite 0.3.4's ``ncc`` (what
voxelmorph 0.3.4 uses)."""
import numpy as np
import pytest
import torch

from regedu import losses
from regedu.losses import _box_sum, _box_sum_by_definition as _dense_box, _LocalNCCMap
from regedu.losses import _local_cc_by_definition as _plain_ncc_map
from regedu.spatial import warp

from conftest import smooth_field

ne = pytest.importorskip("neurite")


@pytest.mark.parametrize("shape, window", [
    ((2, 3, 23, 31), 9), ((1, 1, 70, 131), 9), ((3, 1, 17, 12), 5),
    ((1, 2, 11, 14, 17), 9), ((2, 1, 9, 70, 13), 7), ((1, 1, 3, 5, 4), 9),
])
def test_box_sum_equals_dense_convolution(shape, window):
    # Sizes above the 64-row block and below the window exercise the band edges.
    x = torch.rand(shape, dtype=torch.float64)
    assert torch.allclose(_box_sum(x, window), _dense_box(x, window), rtol=0, atol=1e-10)


def test_box_sum_overwrite_gives_the_same_sums():
    x = torch.rand(2, 3, 10, 11, 12)
    expected = _box_sum(x, 5)
    assert torch.equal(_box_sum(x.clone(), 5, overwrite=True), expected)


@pytest.mark.parametrize("shape, window", [((2, 1, 23, 31), 9), ((1, 2, 11, 14, 17), 5),
                                           ((1, 1, 3, 70, 9), 9)])
def test_the_fast_path_equals_the_definition(shape, window):
    a = torch.rand(shape, dtype=torch.float64)
    b = 0.5 * a + 0.5 * torch.rand(shape, dtype=torch.float64)
    fast = losses.ncc_local(a, b, window=window, reduction="none")
    assert torch.allclose(fast, losses.ncc_reference(a, b, window=window, reduction="none"),
                          rtol=0, atol=1e-12)
    assert float(losses.ncc_reference(a, a, window=window)) < -0.99  # a perfect match is about -1


@pytest.mark.parametrize("shape", [(2, 1, 23, 31), (1, 3, 80, 67), (2, 2, 11, 14, 17), (1, 1, 19, 70, 23)])
@pytest.mark.parametrize("window", [3, 9])
def test_values_equal_neurite_on_random_inputs(shape, window):
    a = torch.rand(shape)
    b = 0.5 * a + 0.5 * torch.rand(shape)
    ours = losses.ncc_local(a, b, window=window, reduction="none")
    theirs = -ne.nn.functional.ncc(a, b, window_size=window, reduction=None).mean(1)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)


def test_values_equal_neurite_on_a_real_brain_with_background(shared_data):
    # Real intensities with large zero background (flat windows: eps matters).
    vol = np.load(shared_data / "test_scan.npz")["vol"][::2, ::2, ::2]
    fixed = torch.tensor(vol, dtype=torch.float32)[None, None]
    moving = warp(fixed, smooth_field(fixed.shape[2:], 3.0, seed=1))
    ours = losses.ncc_local(fixed, moving)
    theirs = -ne.nn.functional.ncc(fixed, moving, window_size=9).squeeze()
    assert abs(float(ours - theirs)) < 1e-4
    assert float(ours) < -0.3  # the pair is similar, not flat: the test checks something


@pytest.mark.parametrize("shape, window", [((1, 1, 7, 9), 3), ((2, 1, 5, 4), 5), ((1, 2, 3, 4, 5), 3),
                                           ((1, 1, 3, 6, 5), 5)])
def test_gradcheck_float64(shape, window):
    a = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    b = (0.3 * a.detach() + torch.rand(shape, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: _LocalNCCMap.apply(x, y, window, 1e-5), (a, b))


@pytest.mark.parametrize("shape, window", [((2, 1, 30, 70), 9), ((1, 2, 12, 9, 70), 5)])
def test_gradient_equals_autograd_through_the_plain_formula(shape, window):
    I = torch.rand(shape, dtype=torch.float64)
    J = 0.4 * I + 0.6 * torch.rand(shape, dtype=torch.float64)
    weights = torch.rand(shape, dtype=torch.float64)  # a non-uniform upstream gradient
    grads = []
    for fn in (lambda x, y: _LocalNCCMap.apply(x, y, window, 1e-5),
               lambda x, y: _plain_ncc_map(x, y, window, 1e-5)):
        x, y = I.clone().requires_grad_(True), J.clone().requires_grad_(True)
        (fn(x, y) * weights).sum().backward()
        grads.append((x.grad, y.grad))
    (fast_I, fast_J), (plain_I, plain_J) = grads
    assert torch.allclose(fast_J, plain_J, rtol=1e-9, atol=1e-12)
    assert torch.allclose(fast_I, plain_I, rtol=1e-9, atol=1e-12)


def test_gradient_of_the_loss_equals_neurite_autograd():
    I = torch.rand(1, 1, 20, 24, 28)
    J0 = 0.5 * I + 0.5 * torch.rand(I.shape)
    grads = []
    for loss in (lambda y: losses.ncc_local(I, y), lambda y: -ne.nn.functional.ncc(I, y).mean()):
        y = J0.clone().requires_grad_(True)
        loss(y).backward()
        grads.append(y.grad)
    scale = grads[1].abs().max()
    assert scale > 0
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-4 * float(scale))


def test_only_the_needed_gradient_is_computed():
    I = torch.rand(1, 1, 8, 9)
    J = torch.rand(1, 1, 8, 9, requires_grad=True)
    losses.ncc_local(I, J).backward()
    assert I.grad is None and J.grad is not None and torch.isfinite(J.grad).all()


def test_box_sum_of_a_non_contiguous_input():
    x = torch.rand(2, 9, 10, 3).permute(0, 3, 1, 2)  # (B, C, H, W) with channels last in memory
    assert torch.allclose(_box_sum(x, 5), _dense_box(x.contiguous(), 5), atol=1e-5)
    assert torch.allclose(_box_sum(x.clone(), 5, overwrite=True), _dense_box(x.contiguous(), 5), atol=1e-5)
