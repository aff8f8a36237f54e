import os
from pathlib import Path

import numpy as np
import pytest
import torch

from regedu.spatial import random_field

SHARED_DATA = Path(os.environ.get("REGEDU_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one torch thread (``pytestmark = pytest.mark.usefixtures(...)``).

    Its tensors are small: on a 2-core machine shared with other jobs, the
    OpenMP barriers of a second thread stall and small ops run 10-30x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "test_scan.npz").exists():
        pytest.skip(f"voxelmorph's test scan not found in {SHARED_DATA} (set REGEDU_SHARED_DATA)")
    return SHARED_DATA


def smooth_field(shape, amplitude, *, seed=0, sigma_frac=0.15, dtype=torch.float32):
    """A random smooth displacement (B=1) for tests, from ``regedu.spatial.random_field``.

    Control points about 2.5 sigma apart, sigma = ``sigma_frac`` of each side,
    interpolated by cubic convolution (smooth derivatives); each component is
    scaled to a largest absolute value of ``amplitude``.
    """
    points = max(2, round(1 / (2.5 * sigma_frac)) + 1)
    u = random_field(shape, 1.0, points, cubic=True, seed=seed).to(dtype)
    return u * (amplitude / u.abs().amax(dim=tuple(range(2, u.dim())), keepdim=True))
