"""benchmarks/bench_step.py's checks as tests: regedu's U-Net computes voxelmorph 0.3.4's network.

The benchmark times regedu against voxelmorph at the same layers and weights;
these tests run its value check and its learning-curve check at small sizes,
so that a change to regedu's network (such as the decoder's transposed
convolutions) that alters the function fails here, not only in a benchmark.
"""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("voxelmorph")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_step  # noqa: E402


@pytest.mark.parametrize("shape, batch", [((32, 48), 2), ((16, 32, 48), 1)])
def test_regedu_computes_voxelmorphs_network_and_learns_the_same(shape, batch):
    models = bench_step.build(len(shape), ["vxm-0.3.4", "torch"], paper=False)
    g = torch.Generator().manual_seed(1)
    moving, fixed = (torch.rand(batch, 1, *shape, generator=g) for _ in range(2))
    lines, ok = bench_step.value_check(models, moving, fixed)
    assert ok, "\n".join(lines)
    lines, ok = bench_step.learning_curves(models, *bench_step.smooth_pair(batch, shape), 5)
    assert ok, "\n".join(lines)


def test_a_network_that_differs_fails_the_checks():
    """The checks can fail: a voxelmorph network whose flow layer is 20 % larger is caught by both."""
    shape, batch = (32, 48), 2
    models = bench_step.build(2, ["vxm-0.3.4"], paper=False)
    with torch.no_grad():
        models["vxm-0.3.4"].flow_layer.conv0.weight.mul_(1.2)
    g = torch.Generator().manual_seed(1)
    moving, fixed = (torch.rand(batch, 1, *shape, generator=g) for _ in range(2))
    lines, ok = bench_step.value_check(models, moving, fixed)
    assert not ok and "FAIL" in "\n".join(lines)
    lines, ok = bench_step.learning_curves(models, *bench_step.smooth_pair(batch, shape), 5)
    assert not ok and "FAIL" in "\n".join(lines)
