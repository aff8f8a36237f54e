"""Model-based data augmentation: a statistical deformation model of displacement fields.

Uzunova et al. (MICCAI 2017) train a registration CNN from few pairs by
learning a statistical model of the training data and drawing as many new
pairs from it as needed. Their model is a statistical appearance model made
"local" so that its space is not limited by the number of training samples;
this module is the classical core of it, a PCA of displacement fields (a
statistical deformation model, SDM):

* fit: the fields ``u_1..u_n`` (e.g. the fields that register the training
  pairs, or their known warps), flattened, give the mean ``m`` and the
  principal modes ``e_i`` with variances ``lambda_i``;
* sample: ``u = m + sum_i b_i sqrt(lambda_i) e_i`` with ``b_i ~ N(0, 1)``,
  truncated to ``|b_i| <= truncate`` so that no sample is an implausible
  extreme. With ``n`` training fields there are at most ``n - 1`` modes:
  every sample lies in the span of the training fields (the limit Uzunova
  et al.'s local model lifts).

The local model (:func:`fit_local_deformation_model`) is the locality
assumption of Uzunova et al.'s model (after Wilms et al. 2017): points far
apart move independently. The grid is covered by overlapping regions whose
weights sum to 1 everywhere; each region has its own PCA of the fields cut to
it, its coefficients are drawn independently, and the regions' fields are
blended by the weights. ``r`` regions give up to ``r (n - 1)`` modes from the
same ``n`` fields, and a field that is no training field's combination can
still be represented region by region.

A sampled field makes a new pair with :class:`regedu.datasets.SyntheticPairs`
(``sampler=lambda g: model.sample(1, seed=g)``).

Convention (``docs/conventions.md``, "Conventions"): fields are
``(B, ndim, *spatial)`` in voxels.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ._checks import as_tensor, check_field, check_positive

__all__ = ["DeformationModel", "fit_deformation_model", "LocalDeformationModel", "fit_local_deformation_model"]


@dataclass(frozen=True)
class DeformationModel:
    """A PCA model of displacement fields (see :func:`fit_deformation_model`).

    Attributes
    ----------
    mean : Tensor, shape (1, ndim, *spatial)
    modes : Tensor, shape (k, ndim, *spatial)
        Orthonormal principal directions (as flattened vectors), largest variance first.
    variances : Tensor, shape (k,)
        ``lambda_i``, the variance of the training fields along mode ``i`` (voxels^2).
    """
    mean: torch.Tensor
    modes: torch.Tensor
    variances: torch.Tensor

    def _flat_modes(self) -> torch.Tensor:
        return self.modes.reshape(len(self.modes), self.mean[0].numel())

    def project(self, fields) -> torch.Tensor:
        """Coefficients ``b`` (B, k) of fields in units of each mode's std: ``b_i = e_i . (u - m) / sqrt(lambda_i)``."""
        u = check_field(as_tensor(fields, "fields"), "fields", spatial=tuple(self.mean.shape[2:]))
        centred = (u.to(self.mean.dtype) - self.mean).reshape(len(u), -1)
        return centred @ self._flat_modes().T / self.variances.sqrt()

    def reconstruct(self, b) -> torch.Tensor:
        """The field ``m + sum_i b_i sqrt(lambda_i) e_i`` for coefficients ``b`` (B, k): (B, ndim, *spatial)."""
        b = as_tensor(b, "b").to(self.mean.dtype)
        if b.dim() != 2 or b.shape[1] != len(self.variances):
            raise ValueError(f"b: expected shape (B, {len(self.variances)}), one coefficient per mode, "
                             f"got {tuple(b.shape)}")
        flat = (b * self.variances.sqrt()) @ self._flat_modes()
        return self.mean + flat.reshape(len(b), *self.mean.shape[1:])

    def sample(self, n: int = 1, *, truncate: float | None = 3.0, seed=0) -> torch.Tensor:
        """``n`` new fields ``(n, ndim, *spatial)``: ``b ~ N(0, 1)`` per mode, redrawn while ``|b| > truncate``.

        ``truncate=None`` keeps the plain Gaussian: the samples then have the
        fitted variances exactly in expectation; truncation at 3 std lowers
        them by 2.7 % (:meth:`sample_variances`).
        ``seed`` is an int or a ``torch.Generator``.
        """
        return self.reconstruct(_draws(n, [len(self.variances)], truncate, seed)[0])

    def sample_variances(self, truncate: float | None = 3.0) -> torch.Tensor:
        """The variance of :meth:`sample`'s fields along each mode: ``lambda_i`` times that of ``b``.

        ``b`` is a standard normal truncated to ``[-t, t]``, whose variance is
        ``1 - 2 t phi(t) / (2 Phi(t) - 1)`` (1 without truncation).
        """
        if truncate is None:
            return self.variances.clone()
        check_positive(truncate, "truncate")
        phi = math.exp(-truncate ** 2 / 2) / math.sqrt(2 * math.pi)
        return self.variances * (1 - 2 * truncate * phi / math.erf(truncate / math.sqrt(2)))

    def explained(self) -> torch.Tensor:
        """Cumulative fraction of the training fields' variance that the first 1, 2, ... modes hold."""
        return self.variances.cumsum(0) / self.variances.sum()


def fit_deformation_model(fields, *, modes: int | None = None, variance: float | None = None) -> DeformationModel:
    """PCA of a set of displacement fields: their mean, principal modes and variances.

    Parameters
    ----------
    fields : Tensor or ndarray, shape (n, ndim, *spatial), n >= 2
        The training fields, in voxels.
    modes : int, optional
        Keep this many modes (at most ``n - 1``, the rank of ``n`` centred fields).
    variance : float in (0, 1], optional
        Or keep the fewest modes that hold this fraction of the variance.
        Default (neither): every mode with a non-zero variance.

    Returns
    -------
    DeformationModel
        A training field ``u_j`` is reproduced exactly (to float precision) by
        ``model.reconstruct(model.project(u_j))`` when every mode is kept.

    Notes
    -----
    The modes come from the SVD of the centred data matrix ``X`` (n x D):
    ``X = U S V^T``, ``e_i = V_i``, ``lambda_i = S_i^2 / (n - 1)`` (the sample
    covariance's eigenvalues, without forming the D x D matrix).
    """
    u = check_field(as_tensor(fields, "fields"), "fields")
    if len(u) < 2:
        raise ValueError(f"fields: a PCA needs at least 2 fields, got {len(u)} (shape {tuple(u.shape)})")
    if modes is not None and variance is not None:
        raise ValueError("modes and variance: give one way to choose the number of modes, not both")
    x = u.double().reshape(len(u), -1)
    mean = x.mean(0, keepdim=True)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    lam = s ** 2 / (len(u) - 1)
    # Below this a "variance" is round-off of a rank-deficient set (n fields span n - 1 directions).
    keep = int((lam > lam[0] * 1e-10).sum()) if lam[0] > 0 else 0
    if keep == 0:
        raise ValueError("fields: all the fields are the same; there is no variation to model")
    if modes is not None:
        check_positive(modes, "modes", integer=True)
        if modes > keep:
            raise ValueError(f"modes: {len(u)} fields have {keep} mode(s) of non-zero variance, got modes={modes}")
        keep = modes
    elif variance is not None:
        if not 0 < variance <= 1:
            raise ValueError(f"variance: expected a fraction in (0, 1], got {variance!r}")
        cumulative = (lam[:keep].cumsum(0) / lam[:keep].sum()).tolist()
        keep = next(i + 1 for i, c in enumerate(cumulative) if c >= variance - 1e-12)
    dtype = u.dtype
    return DeformationModel(mean=mean.reshape(1, *u.shape[1:]).to(dtype),
                            modes=vt[:keep].reshape(keep, *u.shape[1:]).to(dtype),
                            variances=lam[:keep].to(dtype))


def _draws(n: int, sizes, truncate: float | None, seed) -> list[torch.Tensor]:
    """Standard normal coefficients, ``(n, k)`` for each ``k`` of ``sizes`` in turn from one generator,
    each value redrawn while ``|b| > truncate``."""
    check_positive(n, "n", integer=True)
    if truncate is not None:
        check_positive(truncate, "truncate")
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    out = []
    for k in sizes:
        b = torch.randn(n, k, generator=g, dtype=torch.float64)
        while truncate is not None and bool((b.abs() > truncate).any()):
            bad = b.abs() > truncate
            b[bad] = torch.randn(int(bad.sum()), generator=g, dtype=torch.float64)
        out.append(b)
    return out


def _hats(size: int, count: int) -> list[tuple[slice, torch.Tensor]]:
    """``count`` tent functions over ``range(size)`` that sum to 1 everywhere: (support, weights) each."""
    if count == 1:
        return [(slice(0, size), torch.ones(size, dtype=torch.float64))]
    x = torch.arange(size, dtype=torch.float64)
    step = (size - 1) / (count - 1)
    hats = []
    for k in range(count):
        w = (1 - (x - k * step).abs() / step).clamp(min=0)
        inside = torch.nonzero(w > 0).flatten()
        lo, hi = int(inside[0]), int(inside[-1]) + 1
        hats.append((slice(lo, hi), w[lo:hi]))
    return hats


@dataclass(frozen=True)
class LocalDeformationModel:
    """Region-wise PCA models blended by weights that sum to 1 (see :func:`fit_local_deformation_model`).

    Attributes
    ----------
    shape : tuple of int
        The spatial size of the fields.
    regions : tuple of tuple of slice
        Each region's bounding box on the grid.
    weights : tuple of Tensor
        Each region's blending weights on its box (they sum to 1 over the regions at every point).
    models : tuple of DeformationModel
        Each region's PCA of the training fields cut to its box.
    """
    shape: tuple
    regions: tuple
    weights: tuple
    models: tuple

    def _blend(self, parts) -> torch.Tensor:
        out = torch.zeros(len(parts[0]), len(self.shape), *self.shape, dtype=self.models[0].mean.dtype)
        for box, w, part in zip(self.regions, self.weights, parts):
            out[(slice(None), slice(None), *box)] += w.to(out.dtype) * part
        return out

    def project(self, fields) -> list[torch.Tensor]:
        """Each region's coefficients ``(B, k_r)`` of ``fields`` (B, ndim, *shape)."""
        u = check_field(as_tensor(fields, "fields"), "fields", spatial=tuple(self.shape))
        return [m.project(u[(slice(None), slice(None), *box)]) for box, m in zip(self.regions, self.models)]

    def reconstruct(self, coefficients) -> torch.Tensor:
        """The blended field for one ``(B, k_r)`` coefficient tensor per region: (B, ndim, *shape)."""
        if len(coefficients) != len(self.models):
            raise ValueError(f"coefficients: expected one tensor per region ({len(self.models)}), "
                             f"got {len(coefficients)}")
        return self._blend([m.reconstruct(b) for m, b in zip(self.models, coefficients)])

    def sample(self, n: int = 1, *, truncate: float | None = 3.0, seed=0) -> torch.Tensor:
        """``n`` new fields: every region's coefficients drawn independently, as :meth:`DeformationModel.sample`."""
        return self.reconstruct(_draws(n, [len(m.variances) for m in self.models], truncate, seed))

    @property
    def n_modes(self) -> int:
        """The modes of all regions together."""
        return sum(len(m.variances) for m in self.models)


def fit_local_deformation_model(fields, *, regions, modes: int | None = None) -> LocalDeformationModel:
    """A local statistical deformation model: one PCA per overlapping region of the grid.

    Parameters
    ----------
    fields : Tensor or ndarray, shape (n, ndim, *spatial), n >= 2
        The training fields, in voxels.
    regions : int or sequence of int
        Regions along each axis (one int: the same on every axis). Along an
        axis with ``r`` regions the weights are ``r`` tents centred at equal
        steps, each reaching 0 at its neighbours' centres: their sum is 1, and
        a region is about ``2 / (r - 1)`` of the axis long.
    modes : int, optional
        Modes kept per region (default: every mode with a non-zero variance).

    Returns
    -------
    LocalDeformationModel
        With one region it is :func:`fit_deformation_model`'s model. A
        training field is reproduced exactly by ``reconstruct(project(u))``
        when every mode is kept, and so is any field that agrees on each
        region with some combination of the training fields there.
    """
    u = check_field(as_tensor(fields, "fields"), "fields")
    shape = tuple(u.shape[2:])
    counts = [regions] * len(shape) if isinstance(regions, int) else list(regions)
    if len(counts) != len(shape):
        raise ValueError(f"regions: expected one count per axis ({len(shape)}) or one int, got {regions!r}")
    for axis, (c, size) in enumerate(zip(counts, shape)):
        check_positive(c, f"regions[{axis}]", integer=True)
        if c > max(1, size // 2):
            raise ValueError(f"regions[{axis}]: at most {max(1, size // 2)} regions on an axis of {size} "
                             f"voxels, got {c}")
    boxes, weights, models = [], [], []
    for combo in itertools.product(*[_hats(size, c) for size, c in zip(shape, counts)]):
        box = tuple(b for b, _ in combo)
        w = combo[0][1].reshape(-1, *[1] * (len(shape) - 1))
        for axis, (_, wa) in enumerate(combo[1:], start=1):
            w = w * wa.reshape(*[1] * axis, -1, *[1] * (len(shape) - axis - 1))
        boxes.append(box)
        weights.append(w.to(u.dtype))
        cut = u[(slice(None), slice(None), *box)]
        if bool((cut == cut[:1]).all()):  # no variation here (e.g. outside a mask): the mean, no modes
            models.append(DeformationModel(mean=cut[:1].clone(), modes=cut[:0].clone(), variances=cut.new_zeros(0)))
        else:
            models.append(fit_deformation_model(cut, modes=modes))
    return LocalDeformationModel(shape=shape, regions=tuple(boxes), weights=tuple(weights), models=tuple(models))
