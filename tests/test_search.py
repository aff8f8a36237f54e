"""regedu.classic.similarity_search: a global search recovers large known similarity maps."""
import numpy as np
import pytest
import torch

from regedu import metrics
from regedu.classic import similarity_search
from regedu.datasets import make_fire_pair, vessel_contrast
from regedu.spatial import affine_to_displacement, identity_grid, warp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# On the search grid (every 2 degrees, 4 % in scale) the map comes back to sub-pixel accuracy; between
# grid points the error is what the nearest candidate leaves (1 degree and 2 % at 60 px: about 2 px).
@pytest.mark.parametrize("angle,scale,shift,tolerance", [(0.0, 1.0, (0.0, 0.0), 0.3), (10.0, 1.04, (40.0, -55.5), 0.5),
                                                         (-13.0, 0.95, (-60.0, 30.0), 2.0)])
def test_recovers_a_known_similarity_map_on_the_retina(angle, scale, shift, tolerance):
    pair = make_fire_pair("S", 256, seed=0, photometric=False)
    fixed = vessel_contrast(pair.fixed[None], pair.fixed_mask[None])
    c, s = np.cos(np.deg2rad(angle)) * scale, np.sin(np.deg2rad(angle)) * scale
    matrix = torch.tensor([[c, -s, shift[0]], [s, c, shift[1]], [0.0, 0.0, 1.0]])
    truth = affine_to_displacement(matrix[None, :2], (256, 256), center="image")
    # The fixed image seen through the inverse map: warping it by `truth` gives the fixed image back.
    moving = warp(fixed, affine_to_displacement(torch.linalg.inv(matrix)[None, :2], (256, 256), center="image"))
    found = similarity_search(moving, fixed)
    centre = (identity_grid((256, 256))[0] - 127.5).norm(dim=0) < 60
    error = (found - truth).norm(dim=1)[0][centre]
    assert error.mean() < tolerance, f"mean error {error.mean():.2f} px for angle {angle}, scale {scale}, shift {shift}"


def test_finds_category_p_motion_that_local_methods_miss():
    pair = make_fire_pair("P", 256, seed=3, source="procedural")
    moving = vessel_contrast(pair.moving[None], pair.moving_mask[None])
    fixed = vessel_contrast(pair.fixed[None], pair.fixed_mask[None])
    before = metrics.tre(pair.fixed_points, pair.moving_points, torch.zeros(1, 2, 256, 256)).mean()
    after = metrics.tre(pair.fixed_points, pair.moving_points, similarity_search(moving, fixed)).mean()
    assert before > 40 and after < 3, f"TRE {before:.1f} -> {after:.1f} px"


def test_checks_its_arguments():
    image = torch.rand(64, 64)
    with pytest.raises(ValueError, match="moving: expected one 2D image"):
        similarity_search(torch.rand(2, 1, 64, 64), image)
    with pytest.raises(ValueError, match="moving and fixed must have the same shape"):
        similarity_search(torch.rand(64, 63), image)
    with pytest.raises(ValueError, match="min_overlap"):
        similarity_search(image, image, min_overlap=0)
    with pytest.raises(ValueError, match="fixed: .*NaN"):
        similarity_search(image, torch.full((64, 64), float("nan")))
    with pytest.raises(ValueError, match="moving_mask: the field of view is empty"):
        similarity_search(image, image, moving_mask=torch.zeros(64, 64))
