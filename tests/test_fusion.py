"""Label fusion, atlas selection and template selection on cases with known answers."""
import numpy as np
import pytest
import torch

from regedu import fusion, metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _truth(shape=(32, 32)):
    # Four structures: stripes of labels 1..4 along the last axis, so every half has all of them.
    cols = torch.arange(shape[-1]) // (shape[-1] // 4) + 1
    return cols.expand(shape).clone()


def _corrupt(labels, fraction, seed):
    # Replace a fraction of voxels by random labels 0..4: one atlas's registration errors.
    g = torch.Generator().manual_seed(seed)
    wrong = torch.rand(labels.shape, generator=g) < fraction
    return torch.where(wrong, torch.randint(0, 5, labels.shape, generator=g), labels)


def test_majority_vote_two_of_three_win():
    truth = _truth()
    other = _corrupt(truth, 0.9, seed=1)
    fused = fusion.majority_vote([truth, other, truth.clone()])
    assert torch.equal(fused, truth)
    # A stacked (n, *spatial) tensor works the same, numpy maps too.
    assert torch.equal(fusion.majority_vote(torch.stack([other, truth, truth])), truth)
    assert torch.equal(fusion.majority_vote([truth.numpy(), other.numpy(), truth.numpy()]), truth)


def test_majority_vote_of_independent_errors_beats_every_atlas():
    truth = _truth((40, 40))
    atlases = [_corrupt(truth, 0.3, seed=s) for s in range(5)]
    single = [metrics.dice(truth, a, [1, 2, 3, 4]).mean for a in atlases]
    fused = metrics.dice(truth, fusion.majority_vote(atlases), [1, 2, 3, 4]).mean
    # 30 % of voxels relabelled (24 % wrong) in each atlas, independently: the vote is
    # wrong only where several atlases err alike (measured: single 0.78-0.80, fused 0.96).
    assert max(single) < 0.82 and fused > 0.94


def test_majority_vote_label_ids_and_ties():
    a, b = torch.tensor([[1, 7, 2]]), torch.tensor([[2, 7, 1]])
    # A tie goes to the smaller label; unlisted labels (7) vote for background.
    assert fusion.majority_vote([a, b]).tolist() == [[1, 7, 1]]
    assert fusion.majority_vote([a, b], label_ids=[1, 2]).tolist() == [[1, 0, 1]]


def test_weighted_vote_dominant_weight_and_equal_weights():
    truth = _truth()
    maps = [_corrupt(truth, 0.5, seed=s) for s in range(4)]
    assert torch.equal(fusion.weighted_vote(maps, [10.0, 1.0, 1.0, 1.0]), maps[0])
    assert torch.equal(fusion.weighted_vote(maps, np.array([1.0, 1.0, 1.0, 8.0])), maps[3])
    assert torch.equal(fusion.weighted_vote(maps, [1.0] * 4), fusion.majority_vote(maps))
    # Per-voxel weights: atlas 0 decides on the left half, atlas 1 on the right.
    w = torch.full((4, 32, 32), 0.1)
    w[0, :, :16], w[1, :, 16:] = 10.0, 10.0
    fused = fusion.weighted_vote(maps, w)
    assert torch.equal(fused[:, :16], maps[0][:, :16]) and torch.equal(fused[:, 16:], maps[1][:, 16:])


def _two_half_atlases(shape=(32, 32), seed=0):
    """A target, and two atlases each registered well (image and labels right) in one half only."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g)
    truth = _truth(shape)
    half = shape[-1] // 2
    images, labels = [], []
    for good in (slice(0, half), slice(half, None)):
        image = torch.rand(shape, generator=g)                      # a misregistered region
        image[..., good] = target[..., good]
        lab = torch.roll(truth, 3, dims=-1)                         # labels off by 3 columns...
        lab[..., good] = truth[..., good]                           # ... except where it matches
        images.append(image)
        labels.append(lab)
    return target, truth, images, labels


@pytest.mark.parametrize("method, shape", [("ncc", (32, 32)), ("mse", (32, 32)), ("ncc", (10, 12, 32))])
def test_locally_weighted_vote_picks_the_atlas_that_matches_in_each_half(method, shape):
    target, truth, images, labels = _two_half_atlases(shape)
    fused = fusion.locally_weighted_vote(labels, images, target, window=5, method=method)
    # Away from the seam (a window's half-width on each side) every voxel is right.
    away = torch.ones(truth.shape, dtype=torch.bool)
    away[..., 16 - 3:16 + 3] = False
    assert torch.equal(fused[away], truth[away])
    lw = metrics.dice(truth, fused, [1, 2, 3, 4]).mean
    majority = metrics.dice(truth, fusion.majority_vote(labels), [1, 2, 3, 4]).mean
    # Measured: 0.998 (ncc) / 0.997 (mse) against 0.715 for the majority of the two.
    assert lw > 0.95 and lw > majority + 0.1


def test_local_weights_are_high_where_the_images_match():
    target, _, images, _ = _two_half_atlases()
    w = fusion.local_weights(images, target, window=5)
    assert w.shape == (2, 32, 32)
    inner = (slice(2, -2), slice(2, 12))                      # left half, inside the image
    assert float(w[0][inner].min()) > 0.99                    # cc = 1 where identical
    assert float(w[1][inner].mean()) < 0.15                   # independent noise: cc^2 ~ 1/25
    with pytest.raises(ValueError, match="window: expected an odd width"):
        fusion.local_weights(images, target, window=4)
    with pytest.raises(ValueError, match=r"target_image: expected spatial shape \(32, 32\)"):
        fusion.local_weights(images, target[:, :30])


def test_select_atlases_ranks_by_similarity():
    g = torch.Generator().manual_seed(3)
    target = torch.rand(24, 24, generator=g)
    noise = [0.05, 0.4, 0.1, 0.8]
    atlases = [target + s * torch.randn(24, 24, generator=g) for s in noise]
    for similarity in ("ncc", "mse"):
        r = fusion.select_atlases(target, atlases, 2, similarity=similarity)
        assert r.order == [0, 2, 1, 3] and r.selected == [0, 2]
    custom = fusion.select_atlases(target, atlases, 1, similarity=lambda f, m: -float((f - m).abs().mean()))
    assert custom.selected == [0]
    with pytest.raises(ValueError, match=r"k: expected at most 4 \(the number of atlases\), got 5"):
        fusion.select_atlases(target, atlases, 5)


def test_select_template_finds_the_centre_and_the_template_closest_to_the_target():
    g = torch.Generator().manual_seed(4)
    centre = torch.randn(16, 16, 8, generator=g)
    # Every other image is the centre plus its own large deviation: the centre is
    # closest to all (NCC 0.71 with each; they have 0.5 with one another).
    population = [centre + torch.randn(16, 16, 8, generator=g) for _ in range(4)]
    population.insert(2, centre)
    r = fusion.select_template(population)
    assert r.selected == [2] and "mean similarity to the other templates" in r.criterion
    # Per target (the review's template selection): the template closest to this target.
    target = population[4] + 0.2 * torch.randn(16, 16, 8, generator=g)
    assert fusion.select_template(population, target=target).selected == [4]
    # The atlases' term alone picks the common template for these atlases.
    atlases = [population[1] + 0.3 * torch.randn(16, 16, 8, generator=g) for _ in range(3)]
    assert fusion.select_template(population, atlases=atlases).selected == [1]
    both = fusion.select_template(population, target=target, atlases=atlases)
    assert "similarity to the target + mean similarity to the atlases" in both.criterion
    assert both.scores.shape == (5,)


def test_fusion_inputs_are_checked():
    a = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels_list\[1\]: expected spatial shape \(4, 4\), got \(4, 5\)"):
        fusion.majority_vote([a, torch.zeros(4, 5, dtype=torch.long)])
    with pytest.raises(ValueError, match="labels_list: expected at least one label map"):
        fusion.majority_vote([])
    with pytest.raises(ValueError, match=r"weights: expected one per atlas, shape \(2,\)"):
        fusion.weighted_vote([a, a], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="weights: expected non-negative weights"):
        fusion.weighted_vote([a, a], [1.0, -2.0])
    with pytest.raises(ValueError, match=r"labels_list\[0\]: expected a label map of whole numbers"):
        fusion.majority_vote([torch.full((4, 4), 0.5), a])
    with pytest.raises(ValueError, match="similarity: expected one of 'ncc', 'mse', 'mi'"):
        fusion.select_atlases(torch.rand(4, 4), [torch.rand(4, 4)], 1, similarity="dice")


def test_image_similarity_known_values():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(12, 14, generator=g)
    # NCC ignores gain and offset (1 for any positive affine change, -1 for a negative one).
    assert fusion.image_similarity(x, 3 * x + 2) == pytest.approx(1.0, abs=1e-5)
    assert fusion.image_similarity(x, 1 - x) == pytest.approx(-1.0, abs=1e-5)
    # MSE: minus the mean squared difference; a constant offset of 0.5 costs 0.25.
    assert fusion.image_similarity(x, x, "mse") == pytest.approx(0.0, abs=1e-7)
    assert fusion.image_similarity(x, x + 0.5, "mse") == pytest.approx(-0.25, abs=1e-6)
    # MI: an image shares more information with itself than with independent noise.
    noise = torch.rand(12, 14, generator=g)
    assert fusion.image_similarity(x, x, "mi") > fusion.image_similarity(x, noise, "mi") + 0.5
    # A callable gets (1, 1, *spatial) tensors; (1, 1, *spatial) inputs and numpy work alike.
    seen = []
    score = fusion.image_similarity(x[None, None], x.numpy(), lambda f, m: seen.append(f.shape) or 7.0)
    assert score == 7.0 and seen == [(1, 1, 12, 14)]
    with pytest.raises(ValueError, match=r"fixed and moving must have the same shape"):
        fusion.image_similarity(x, x[:, :10])
