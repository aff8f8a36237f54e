"""The statistical deformation model (regedu.augment): PCA of fields, exact in its span, sampled with its variance."""
import math

import pytest
import torch

from regedu.augment import DeformationModel, fit_deformation_model, fit_local_deformation_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fields(n=6, shape=(10, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, *shape, generator=g)


def test_fields_in_the_span_are_reproduced_exactly():
    fields = _fields()
    model = fit_deformation_model(fields)
    assert len(model.variances) == 5  # n centred fields span n - 1 directions
    assert torch.allclose(model.reconstruct(model.project(fields)), fields, atol=1e-5)
    # Any combination of the training fields whose weights sum to 1 lies in the (affine) span too.
    w = torch.tensor([0.5, -0.2, 0.3, 0.1, 0.1, 0.2])
    combo = (w.view(-1, 1, 1, 1) * fields).sum(0, keepdim=True)
    assert torch.allclose(model.reconstruct(model.project(combo)), combo, atol=1e-5)
    # A field outside the span is not reproduced.
    other = _fields(1, seed=9)
    assert not torch.allclose(model.reconstruct(model.project(other)), other, atol=1e-2)


def test_mean_modes_and_variances_are_those_of_the_pca():
    # Fields made from two known orthonormal directions with known std: the model recovers them.
    D = 2 * 8 * 8
    e1 = torch.zeros(D); e1[:D // 2] = 1 / math.sqrt(D // 2)
    e2 = torch.zeros(D); e2[D // 2:] = 1 / math.sqrt(D // 2)
    a = torch.tensor([3., -3., 3., -3.])
    b = torch.tensor([1., 1., -1., -1.])
    mean = torch.full((D,), 0.5)
    fields = (mean + a[:, None] * e1 + b[:, None] * e2).reshape(4, 2, 8, 8)
    model = fit_deformation_model(fields)
    assert torch.allclose(model.mean.flatten(), mean, atol=1e-6)
    # variance = sum of squares / (n - 1): 36 / 3 = 12 and 4 / 3
    assert torch.allclose(model.variances, torch.tensor([12.0, 4 / 3]), rtol=1e-5)
    assert float((model.modes[0].flatten() @ e1).abs()) == pytest.approx(1.0, abs=1e-5)
    assert float((model.modes[1].flatten() @ e2).abs()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(model.explained(), torch.tensor([0.9, 1.0]), atol=1e-6)


def test_samples_have_the_fitted_variance():
    model = fit_deformation_model(_fields())
    plain = model.project(model.sample(20000, truncate=None, seed=1)) * model.variances.sqrt()
    assert torch.allclose(plain.var(0), model.variances, rtol=0.05)
    assert torch.allclose(plain.mean(0), torch.zeros(5), atol=0.05 * float(model.variances.max().sqrt()))
    b = model.project(model.sample(20000, truncate=2.0, seed=2))
    assert float(b.abs().max()) <= 2.0 + 1e-4
    # A normal truncated to [-2, 2] has variance 1 - 4 phi(2) / (2 Phi(2) - 1) = 0.7737.
    assert model.sample_variances(2.0) / model.variances == pytest.approx(torch.full((5,), 0.7737), abs=1e-4)
    assert torch.allclose(b.var(0), torch.full((5,), 0.7737), atol=0.03)


def test_choosing_the_number_of_modes():
    model = fit_deformation_model(_fields(), modes=2)
    assert model.modes.shape == (2, 2, 10, 12)
    full = fit_deformation_model(_fields())
    k = int((full.explained() < 0.6).sum()) + 1
    assert len(fit_deformation_model(_fields(), variance=0.6).variances) == k


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="at least 2"):
        fit_deformation_model(_fields(1))
    with pytest.raises(ValueError, match="fields"):
        fit_deformation_model(torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match="same"):
        fit_deformation_model(torch.ones(3, 2, 8, 8))
    with pytest.raises(ValueError, match="modes"):
        fit_deformation_model(_fields(), modes=9)
    with pytest.raises(ValueError, match="variance"):
        fit_deformation_model(_fields(), variance=1.5)
    model = fit_deformation_model(_fields())
    with pytest.raises(ValueError, match="b:"):
        model.reconstruct(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="fields"):
        model.project(torch.zeros(1, 2, 9, 9))
    with pytest.raises(ValueError, match="truncate"):
        model.sample(2, truncate=-1.0)
    assert isinstance(model, DeformationModel)


# ---------------------------------------------------------------- the local model

def _residual_off_span(model, fields):
    # What of each field the global model's affine span cannot hold (0 for a field inside it).
    back = model.reconstruct(model.project(fields))
    return (fields - back).flatten(1).norm(dim=1) / fields.flatten(1).norm(dim=1)


def test_one_region_is_the_global_model():
    fields = _fields()
    local, whole = fit_local_deformation_model(fields, regions=1), fit_deformation_model(fields)
    torch.testing.assert_close(local.sample(4, seed=7), whole.sample(4, seed=7))
    assert local.n_modes == len(whole.variances) == 5


@pytest.mark.parametrize("regions", [(2, 3), 3])
def test_training_fields_are_reproduced_and_the_weights_sum_to_one(regions):
    fields = _fields(4, shape=(11, 9))
    model = fit_local_deformation_model(fields, regions=regions)
    torch.testing.assert_close(model.reconstruct(model.project(fields)), fields, rtol=0, atol=1e-5)
    total = torch.zeros(11, 9, dtype=torch.float64)
    for box, w in zip(model.regions, model.weights):
        total[box] += w
    torch.testing.assert_close(total, torch.ones(11, 9, dtype=torch.float64))
    assert len(model.models) == (6 if regions == (2, 3) else 9) and model.n_modes == 3 * len(model.models)


def test_far_apart_points_move_independently_in_the_local_model_only():
    # Four training fields, each one constant vector everywhere: the global model
    # moves every point together; with two regions along axis 0 the two ends do not.
    g = torch.Generator().manual_seed(0)
    fields = torch.randn(4, 2, 1, 1, generator=g).expand(4, 2, 20, 6).clone()
    whole = fit_deformation_model(fields).sample(2000, seed=1)
    local = fit_local_deformation_model(fields, regions=(2, 1)).sample(2000, seed=1)
    r = lambda s: float(torch.corrcoef(torch.stack([s[:, 0, 0, 0], s[:, 0, -1, 0]]))[0, 1])  # noqa: E731
    assert r(whole) == pytest.approx(1.0, abs=1e-9)
    assert abs(r(local)) < 0.1
    # The local samples leave the span of the training fields; the global ones never do.
    global_model = fit_deformation_model(fields)
    assert float(_residual_off_span(global_model, whole[:50]).max()) < 1e-5
    assert float(_residual_off_span(global_model, local[:50]).median()) > 0.1


def test_a_new_field_is_held_better_region_by_region():
    # Smooth random fields: a field not in the training set is closer to the local model's span.
    def smooth(n, seed):
        x = torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
        return torch.nn.functional.interpolate(x, size=(24, 24), mode="bicubic", align_corners=True)
    train, new = smooth(6, 0), smooth(5, 1)
    whole, local = fit_deformation_model(train), fit_local_deformation_model(train, regions=3)
    error = lambda m: float((m.reconstruct(m.project(new)) - new).norm() / new.norm())  # noqa: E731
    assert error(local) < 0.8 * error(whole)


def test_a_region_without_variation_keeps_its_mean_and_no_modes():
    fields = torch.zeros(3, 2, 12, 8)
    fields[:, :, 8:] = torch.randn(3, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    model = fit_local_deformation_model(fields, regions=(3, 1))
    assert [len(m.variances) for m in model.models] == [0, 2, 2]
    torch.testing.assert_close(model.reconstruct(model.project(fields)), fields, rtol=0, atol=1e-5)
    # Rows 0-7 never vary in training, and none of the models moves them.
    assert float(model.sample(3, seed=0)[:, :, :8].abs().max()) < 1e-9


def test_local_model_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"regions: expected one count per axis \(2\) or one int, got \(2, 2, 2\)"):
        fit_local_deformation_model(_fields(), regions=(2, 2, 2))
    with pytest.raises(ValueError, match=r"regions\[1\]: at most 6 regions on an axis of 12 voxels, got 7"):
        fit_local_deformation_model(_fields(), regions=(2, 7))
    with pytest.raises(ValueError, match=r"regions\[0\]"):
        fit_local_deformation_model(_fields(), regions=0)
    model = fit_local_deformation_model(_fields(), regions=2)
    with pytest.raises(ValueError, match="coefficients: expected one tensor per region \\(4\\), got 1"):
        model.reconstruct([torch.zeros(1, 5)])
    with pytest.raises(ValueError, match="fields"):
        model.project(torch.zeros(1, 2, 9, 9))
