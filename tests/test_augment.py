"""The statistical deformation model (regedu.augment): PCA of fields, exact in its span, sampled with its variance."""
import math

import pytest
import torch

from regedu.augment import DeformationModel, fit_deformation_model

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
