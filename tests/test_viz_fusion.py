"""viz.plot_fusion: four panels, Dice in the titles computed from the maps, repairs in green."""
import numpy as np
import pytest
from matplotlib.figure import Figure

from regedu import fusion, metrics, viz


def _case(shape):
    rng = np.random.default_rng(0)
    truth = np.zeros(shape, np.int64)
    truth[(slice(None),) * (len(shape) - 1) + (slice(4, 12),)] = 1
    truth[(slice(None),) * (len(shape) - 1) + (slice(12, 20),)] = 2
    atlases = []
    for s in range(5):
        a = truth.copy()
        a[rng.random(shape) < 0.25] = 0                # each atlas loses a quarter of its voxels
        atlases.append(a)
    return rng.random(shape).astype(np.float32), truth, atlases


@pytest.mark.parametrize("shape", [(16, 24), (6, 16, 24)])
def test_plot_fusion_has_four_panels_with_computed_dice(shape):
    image, truth, atlases = _case(shape)
    fused = fusion.majority_vote(atlases)
    index = 3 if len(shape) == 3 else None
    fig = viz.plot_fusion(image, truth, atlases[0], fused, labels=[1, 2], index=index)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    single_dice = metrics.dice(truth, atlases[0], [1, 2]).mean
    fused_dice = metrics.dice(truth, fused, [1, 2]).mean
    assert fused_dice > single_dice + 0.05              # the case is one where fusion helps
    assert titles[1] == f"best single atlas: Dice {single_dice:.3f}"
    assert titles[2] == f"fused: Dice {fused_dice:.3f}"
    repaired = int(((fused.numpy() == truth) & (atlases[0] != truth)).sum())
    assert f"repaired {repaired}," in titles[3] and repaired > 0
    # A repaired pixel of the slice is drawn green in the last panel.
    plane = (np.take(fused.numpy(), 3, 0), np.take(atlases[0], 3, 0), np.take(truth, 3, 0)) \
        if len(shape) == 3 else (fused.numpy(), atlases[0], truth)
    r, c = np.argwhere((plane[0] == plane[2]) & (plane[1] != plane[2]))[0]
    pixel = fig.axes[3].get_images()[0].get_array()[r, c]
    assert pixel[1] > pixel[0] and pixel[1] > pixel[2]


def test_plot_fusion_checks_its_maps():
    image, truth, atlases = _case((16, 24))
    with pytest.raises(ValueError, match=r"fused: expected a label map of spatial shape \(16, 24\)"):
        viz.plot_fusion(image, truth, atlases[0], atlases[1][:, :20])
    with pytest.raises(ValueError, match="target_labels: no structure"):
        viz.plot_fusion(image, np.zeros_like(truth), atlases[0], atlases[1])
    fig = viz.plot_fusion(image, truth, atlases[0], atlases[1], names=("atlas 0", "atlas 1"))
    assert fig.axes[1].get_title().startswith("atlas 0: Dice ")
