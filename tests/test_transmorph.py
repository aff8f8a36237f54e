"""regedu.nets.transmorph: windows tile and untile, Swin's relative positions and shift mask,
attention stays inside its window, and the model learns a known translation."""
import pytest
import torch

from regedu import losses, nets
from regedu.nets.transmorph import (_PatchMerging, _relative_index, _shift_mask, _SwinBlock,
                                    window_merge, window_partition)
from regedu.spatial import warp


@pytest.mark.parametrize("shape", [(8, 12), (4, 8, 12)])
def test_windows_hold_the_blocks_of_the_map_and_untile_exactly(shape):
    x = torch.rand(2, *shape, 3)
    w = window_partition(x, 4)
    assert w.shape == (2 * torch.Size(shape).numel() // 4 ** len(shape), 4 ** len(shape), 3)
    # the second window of the first item is the block next to the first along the last axis
    block = x[(0, *[slice(0, 4)] * (len(shape) - 1), slice(4, 8))]
    assert torch.equal(w[1], block.reshape(-1, 3))
    assert torch.equal(window_merge(w, shape, 4), x)


def test_relative_index_depends_only_on_the_offset():
    index = _relative_index(3, 2)                   # 9 positions of a 3x3 window
    coords = [(i, j) for i in range(3) for j in range(3)]
    seen = {}
    for a, p in enumerate(coords):
        for b, q in enumerate(coords):
            offset = (p[0] - q[0], p[1] - q[1])
            assert seen.setdefault(offset, int(index[a, b])) == int(index[a, b])
    assert len(set(seen.values())) == len(seen) == 5 * 5
    assert int(index[4, 4]) == 2 * 5 + 2             # offset (0, 0): the centre of the 5x5 table


def test_shift_mask_separates_the_regions_a_cyclic_shift_brings_together():
    mask = _shift_mask((8, 8), window=4, shift=2)    # 4 windows of 16 tokens
    allowed = torch.isfinite(mask).sum(-1)           # tokens each token may attend to
    assert allowed[0].tolist() == [16] * 16          # top-left window: one region
    assert allowed[1].tolist() == [8] * 16           # top-right: two regions of 4x2
    assert allowed[3].tolist() == [4] * 16           # bottom-right: four regions of 2x2


def _influence(block, shape, source, target):
    x = torch.zeros(1, *shape, 4, requires_grad=True)
    y = block(x + torch.rand(1, *shape, 4))
    y[(0, *target)].sum().backward()
    return float(x.grad[(0, *source)].abs().sum())


def test_plain_windows_see_only_their_window_and_shifted_ones_reach_across():
    torch.manual_seed(0)
    plain = _SwinBlock(2, dim=4, heads=2, window=4, shift=0, mlp_ratio=2.0)
    shifted = _SwinBlock(2, dim=4, heads=2, window=4, shift=2, mlp_ratio=2.0)
    shifted.load_state_dict(plain.state_dict())
    # (3, 3) and (3, 4) are neighbours in different windows of the plain partition
    assert _influence(plain, (8, 8), (3, 4), (3, 3)) == 0.0
    assert _influence(plain, (8, 8), (3, 2), (3, 3)) > 0.0
    assert _influence(shifted, (8, 8), (3, 4), (3, 3)) > 0.0
    # the cyclic shift brings (0, 0) and (7, 7) into one window: the mask keeps them apart
    assert _influence(shifted, (8, 8), (0, 0), (7, 7)) == 0.0


def test_patch_merging_halves_the_size_and_doubles_the_channels():
    merge = _PatchMerging(3, dim=5)
    assert merge(torch.rand(2, 4, 6, 8, 5)).shape == (2, 2, 3, 4, 10)


def test_heads_must_divide_the_channels():
    with pytest.raises(ValueError, match="heads: stage 1 has 16 channels, not divisible by 3"):
        nets.create("transmorph", spatial_dims=2, embed_dim=8, heads=(2, 3))


def test_transmorph_learns_a_known_translation():
    torch.manual_seed(0)
    g = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    fixed = torch.exp(-((g - 15.5) ** 2).sum(0) / 40)[None, None]
    shift = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    moving = warp(fixed, -shift.expand(1, 2, 32, 32))       # fixed(x) = moving(x + shift)
    model = nets.create("transmorph", spatial_dims=2, embed_dim=8, heads=(2, 2), skip=4,
                        out_features=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(moving, fixed)
        loss = losses.mse(fixed, out.warped) + 0.1 * losses.diffusion(out.disp)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    centre = out.disp[0, :, 10:22, 10:22].mean(dim=(1, 2))
    assert torch.allclose(centre, shift.flatten(), atol=0.35), centre
