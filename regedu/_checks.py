"""One place for input validation.

Every public function of regedu checks its inputs here, so that all errors
read the same way: the argument's name, what was expected, what came, and
where possible how to fix the call.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["check_shape", "check_tensor", "check_finite", "check_field",
           "check_same_shape", "check_labels", "check_choice", "as_tensor"]


def _describe(x) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"shape {tuple(x.shape)} ({x.dtype})"
    return f"a {type(x).__name__}"


def as_tensor(x, name: str) -> torch.Tensor:
    """Return ``x`` as a tensor (numpy arrays are wrapped without copying)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {_describe(x)}")


def check_tensor(x, name: str, *, floating: bool = False) -> torch.Tensor:
    """Check that ``x`` is a tensor (and floating point if asked)."""
    if not isinstance(x, torch.Tensor):
        hint = " (wrap it with torch.from_numpy)" if isinstance(x, np.ndarray) else ""
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(x)}{hint}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}; "
                        f"convert it with {name}.float()")
    return x


def check_shape(x, spec: str, name: str) -> dict[str, int]:
    """Check ``x.shape`` against a spec such as ``"B C *S"`` or ``"B 2 H W"``.

    Tokens: a name binds a free size (the same name must get the same size),
    a number is a fixed size, and ``*S`` binds any number (>= 1) of trailing
    sizes as a tuple. Returns the bound sizes.

    >>> check_shape(torch.zeros(2, 1, 5, 6), "B C *S", "moving")["S"]
    (5, 6)
    """
    tokens = spec.split()
    shape = tuple(x.shape)
    star = [i for i, t in enumerate(tokens) if t.startswith("*")]
    fixed_len = len(tokens) - len(star)
    bad = (len(shape) != fixed_len) if not star else (len(shape) < fixed_len + 1)
    if bad:
        raise ValueError(f"{name}: expected shape ({', '.join(tokens)}), i.e. "
                         f"{'at least ' + str(fixed_len + 1) if star else fixed_len} dimensions, "
                         f"got {len(shape)} dimensions: shape {shape}")
    bound: dict[str, int | tuple[int, ...]] = {}
    i = 0
    for t in tokens:
        if t.startswith("*"):
            n = len(shape) - fixed_len
            bound[t[1:]] = shape[i:i + n]
            i += n
            continue
        size = shape[i]
        if t.isdigit():
            if size != int(t):
                raise ValueError(f"{name}: expected shape ({', '.join(tokens)}) with {int(t)} at "
                                 f"dimension {i}, got shape {shape}")
        elif t in bound and bound[t] != size:
            raise ValueError(f"{name}: expected shape ({', '.join(tokens)}) where every '{t}' "
                             f"has the same size, got shape {shape}")
        else:
            bound[t] = size
        i += 1
    return bound


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise if ``x`` holds NaN or infinite values."""
    with torch.no_grad():  # a check, not part of any model: keep it out of autograd's graph
        # A finite sum proves every value finite in one read pass with no temporary;
        # only a non-finite sum (NaN, inf or an overflow) needs the full look.
        finite = (not x.is_floating_point() or bool(torch.isfinite(x.sum()))
                  or bool(torch.isfinite(x).all()))
    if not finite:
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name}: expected finite values, got {n_nan} NaN and {n_inf} infinite "
                         f"values in a tensor of shape {tuple(x.shape)}")
    return x


def check_field(u, name: str = "disp", *, spatial: tuple[int, ...] | None = None,
                batch: int | None = None) -> torch.Tensor:
    """Check a displacement field ``(B, ndim, *spatial)``; optionally its size.

    ``batch`` may be broadcast: a field with batch 1 fits any batch.
    """
    check_tensor(u, name, floating=True)
    if u.dim() not in (4, 5):
        raise ValueError(f"{name}: expected a displacement field of shape (B, ndim, *spatial) "
                         f"with ndim 2 (B, 2, H, W) or 3 (B, 3, D, H, W), got shape {tuple(u.shape)}")
    ndim = u.dim() - 2
    if u.shape[1] != ndim:
        raise ValueError(f"{name}: a {ndim}D field needs {ndim} channels (one per spatial axis), "
                         f"got shape {tuple(u.shape)} with {u.shape[1]} channels")
    if spatial is not None and tuple(u.shape[2:]) != tuple(spatial):
        raise ValueError(f"{name}: expected spatial size {tuple(spatial)} "
                         f"({len(spatial)}D) to match the image, got {tuple(u.shape[2:])} "
                         f"({ndim}D): field shape {tuple(u.shape)}")
    if batch is not None and u.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected batch size {batch} (or 1) to match the image, "
                         f"got {u.shape[0]}: field shape {tuple(u.shape)}")
    return check_finite(u, name)


def check_same_shape(a, b, names: tuple[str, str]) -> None:
    """Raise if two arrays differ in shape."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def check_labels(x, name: str):
    """Check a label map: integer or boolean dtype, or floats holding whole numbers."""
    if isinstance(x, np.ndarray):
        is_float = np.issubdtype(x.dtype, np.floating)
        whole = (not is_float) or bool(np.all(np.isfinite(x)) and np.all(np.mod(x, 1) == 0))
    elif isinstance(x, torch.Tensor):
        is_float = x.is_floating_point()
        whole = (not is_float) or bool(torch.isfinite(x).all() and (torch.remainder(x, 1) == 0).all())
    else:
        raise TypeError(f"{name}: expected a label map as a numpy array or torch.Tensor, "
                        f"got {_describe(x)}")
    if not whole:
        raise ValueError(f"{name}: expected a label map of whole numbers, got a float map with "
                         f"non-integer values ({_describe(x)}); warp label maps with mode='nearest' "
                         f"or round them first")
    return x


def check_choice(value, choices, name: str):
    """Raise if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_positive(value, name: str, *, integer: bool = False):
    """Raise unless ``value`` is a positive number (an integer if asked)."""
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive {'integer' if integer else 'number'}, "
                         f"got {value!r}")
    return value
