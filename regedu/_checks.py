"""One place for input validation.

Every public function of regedu checks its inputs here, so that all errors
read the same way: the argument's name, what was expected, what came, and
where possible how to fix the call.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["check_shape", "check_tensor", "check_image", "check_finite", "check_field",
           "check_same_shape", "check_labels", "as_labels", "check_label_list", "check_choice",
           "check_positive", "check_output_path", "check_memory", "available_memory",
           "format_bytes", "format_shape", "format_spacing", "as_tensor"]


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


_LAYOUTS = {2: "(B, C, H, W)", 3: "(B, C, D, H, W)"}


def check_image(x, name: str, *, spatial_dims: int | None = None, channels: int | None = None,
                max_channels: int | None = None, floating: bool = True) -> tuple[int, ...]:
    """Check an image (or a batch of them) ``(B, C, *spatial)`` in 2D or 3D; return the spatial size.

    The one image check of regedu (warping, losses, networks): a tensor, floating
    point unless ``floating=False`` (label maps), finite, with 2 or 3 spatial
    axes, exactly ``spatial_dims`` when the caller knows them (a model does).
    ``channels``: the channel count a model was built for. ``max_channels``:
    a 4-axis tensor with more channels reads as a 3D volume that lost an axis,
    not as a 2D image. Every message names the argument and says how to fix
    the call (add the missing axes, or build the model for the other dimension).

    >>> check_image(torch.zeros(2, 1, 5, 6), "moving")
    (5, 6)
    """
    check_tensor(x, name, floating=floating)
    allowed = (2, 3) if spatial_dims is None else (spatial_dims,)
    if x.dim() - 2 not in allowed:
        if spatial_dims is None:
            expected = f"shape (B, C, *S) with 2 or 3 spatial axes, {_LAYOUTS[2]} or {_LAYOUTS[3]}"
        else:
            expected = (f"{_LAYOUTS[spatial_dims]}: this model is {spatial_dims}D "
                        f"(spatial_dims={spatial_dims})")
        fixes = []
        if x.dim() in allowed:
            fixes.append(f"add the batch and channel axes ({name}[None, None] for one grey image)")
        elif x.dim() - 1 in allowed:
            fixes.append(f"add the batch axis ({name}[None] for one image)")
        if spatial_dims is not None and x.dim() - 2 in (2, 3):
            fixes.append(f"build the model with spatial_dims={x.dim() - 2} for {x.dim() - 2}D inputs")
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(x.shape)} ({x.dim()} axes)"
                         + ("; " + " or ".join(fixes) if fixes else ""))
    if max_channels is not None and x.dim() == 4 and x.shape[1] > max_channels:
        raise ValueError(f"{name}: shape {tuple(x.shape)} reads as a 2D image with {x.shape[1]} "
                         f"channels; expected 1 to {max_channels} channels. For one 3D volume "
                         f"(C, D, H, W) or (D, H, W) add the missing axes: {name}[None] or "
                         f"{name}[None, None] (shape (B, C, D, H, W))")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: this model expects {channels} image channel(s) "
                         f"(in_channels={channels}), got {x.shape[1]} in shape {tuple(x.shape)}; "
                         f"convert the image (e.g. RGB to grey: x.mean(1, keepdim=True)) or build "
                         f"the model with in_channels={x.shape[1]}")
    # One NaN voxel spreads through every interpolation, loss and convolution it meets.
    check_finite(x, name)
    return tuple(x.shape[2:])


def check_finite(x, name: str):
    """Raise if ``x`` (a tensor or numpy array) holds NaN or infinite values."""
    if isinstance(x, np.ndarray):
        if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x.sum(dtype=np.float64)) \
                and not np.isfinite(x).all():
            n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
            raise ValueError(f"{name}: expected finite values, got {n_nan} NaN and {n_inf} infinite "
                             f"values in an array of shape {x.shape}")
        return x
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
                         f"with ndim 2 (B, 2, H, W) or 3 (B, 3, D, H, W), got shape {tuple(u.shape)}"
                         f"{_batch_hint(u, name)}")
    ndim = u.dim() - 2
    if u.shape[1] != ndim:
        raise ValueError(f"{name}: a {ndim}D field needs {ndim} channels (one per spatial axis), "
                         f"got shape {tuple(u.shape)} with {u.shape[1]} channels"
                         f"{_batch_hint(u, name)}")
    if spatial is not None and tuple(u.shape[2:]) != tuple(spatial):
        raise ValueError(f"{name}: expected spatial size {tuple(spatial)} "
                         f"({len(spatial)}D) to match the image, got {tuple(u.shape[2:])} "
                         f"({ndim}D): field shape {tuple(u.shape)}")
    if batch is not None and u.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected batch size {batch} (or 1) to match the image, "
                         f"got {u.shape[0]}: field shape {tuple(u.shape)}")
    return check_finite(u, name)


def _batch_hint(u, name: str) -> str:
    # (ndim, *spatial) with ndim matching the spatial axes is one field without
    # its batch axis; reading it as a batch of a lower-dimensional field is wrong.
    nd = u.dim() - 1
    if nd in (2, 3) and u.shape[0] == nd:
        return (f"; this looks like one {nd}D field without its batch axis: add it with "
                f"{name}[None] (shape (1, {', '.join(map(str, u.shape))}))")
    return ""


def check_same_shape(a, b, names: tuple[str, str]) -> None:
    """Raise if two arrays differ in shape."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def check_labels(x, name: str, *, max_labels: int | None = None):
    """Check a label map: integer or boolean dtype, or finite floats holding whole numbers.

    ``max_labels`` also refuses maps with more distinct values than that: an
    intensity image stored as integers looks like a label map with thousands of labels.
    """
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise TypeError(f"{name}: expected a label map of integers, got dtype {x.dtype}")
        is_float = np.issubdtype(x.dtype, np.inexact)
        finite = (not is_float) or bool(np.isfinite(x).all())
        fractional = int(np.count_nonzero(np.mod(x, 1))) if is_float and finite else 0
    elif isinstance(x, torch.Tensor):
        is_float = x.is_floating_point() or x.is_complex()
        finite = (not is_float) or bool(torch.isfinite(x).all())
        fractional = int(torch.count_nonzero(torch.remainder(x, 1))) if is_float and finite else 0
    else:
        raise TypeError(f"{name}: expected a label map as a numpy array or torch.Tensor, "
                        f"got {_describe(x)}")
    if not finite:
        raise ValueError(f"{name}: expected a label map of whole numbers, got NaN or infinite "
                         f"values ({_describe(x)}); a label map has no missing values: "
                         f"label them 0 (background)")
    if fractional:
        raise ValueError(f"{name}: expected a label map of whole numbers, got a float map with "
                         f"{fractional} non-integer values ({_describe(x)}); is it an intensity "
                         f"image? Warp label maps with mode='nearest' so they stay whole")
    if max_labels is not None:
        values = np.unique(x) if isinstance(x, np.ndarray) else torch.unique(x)
        if len(values) > max_labels + 1:
            raise ValueError(f"{name}: expected a label map (at most {max_labels} structures), got "
                             f"{len(values)} distinct values ({_describe(x)}); is it an intensity "
                             f"image rather than labels?")
    return x


def as_labels(x, name: str):
    """A label map as int64 (numpy or torch, as given), after :func:`check_labels`:
    a cast alone would truncate 2.7 to 2 and turn NaN into an arbitrary label."""
    if isinstance(x, torch.Tensor):
        return check_labels(x, name).long()
    return np.asarray(check_labels(np.asarray(x), name), dtype=np.int64)


def check_label_list(labels, name: str = "labels") -> list[int]:
    """Check a list of structure labels: whole numbers, no repeats; returns them as ints.

    >>> check_label_list((2, 3.0, np.int64(41)))
    [2, 3, 41]
    """
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of integer labels such as [2, 3, 4], "
                        f"got {labels!r}")
    if isinstance(labels, (np.ndarray, torch.Tensor)):
        labels = labels.tolist()
    out = []
    for v in labels:
        whole = isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and math.isfinite(v)
                                                    and float(v).is_integer())
        if isinstance(v, bool) or not whole:
            raise ValueError(f"{name}: expected integer labels such as [2, 3, 4], got {v!r} "
                             f"in {list(labels)!r}")
        out.append(int(v))
    repeated = sorted({v for v in out if out.count(v) > 1})
    if repeated:
        raise ValueError(f"{name}: each label once, got {', '.join(map(str, repeated))} more than "
                         f"once in {out}")
    return out


def check_choice(value, choices, name: str):
    """Raise if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_positive(value, name: str, *, integer: bool = False):
    """Raise unless ``value`` is a positive number (an integer if asked)."""
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive {'integer' if integer else 'number'}, "
                         f"got {value!r}")
    return value


def check_output_path(path, name: str, *, inputs=()) -> Path:
    """Check, before any work is done, that a file can be written at ``path``.

    Refuses a folder, a parent that is a file, a folder that cannot be written
    and a path that is one of ``inputs`` (writing there would destroy an input).
    Creates missing parent folders.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder; expected a file name "
                         f"(e.g. {str(path / 'out')!r}...)")
    for given in inputs:
        if given is not None and Path(given).exists() and path.exists() and \
                os.path.samefile(given, path):
            raise ValueError(f"{name}: {str(path)!r} is also an input; writing it would destroy "
                             f"that input: choose another file name")
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{name}: cannot write {str(path)!r}: {str(p)!r} is a file, "
                                 f"not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{name}: cannot create the folder {str(parent)!r} for {str(path)!r} "
                         f"({e.strerror or e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {str(path)!r}: the folder {str(parent)!r} is "
                         f"not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{name}: cannot write {str(path)!r}: the file is read-only")
    return path


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``320 MiB``: sizes in binary units."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def format_shape(shape) -> str:
    """``160x192x224``: a grid size as people write it."""
    return "x".join(map(str, shape))


def format_spacing(values) -> str:
    """``4 mm`` for an isotropic voxel size, ``1x1x2.5 mm`` otherwise; ``unknown`` for None."""
    if values is None:
        return "unknown"
    values = [float(v) for v in np.atleast_1d(np.asarray(values, dtype=float))]
    if all(abs(v - values[0]) < 1e-6 for v in values):
        return f"{values[0]:g} mm"
    return "x".join(f"{v:g}" for v in values) + " mm"


def available_memory() -> int:
    """Bytes of memory the system can give this process now (psutil's ``available``)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:  # without psutil, read what Linux reports; elsewhere assume plenty
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return 2**62


def check_memory(needed: float, what: str, fix: str, *, available: int | None = None) -> None:
    """Refuse to start work that needs more memory than is available, before allocating it.

    ``what`` names the work (``"--fixed: reading 'x.nii' (4000x4000x4000 int16)"``),
    ``fix`` says what to do instead.
    """
    available = available_memory() if available is None else available
    if needed > available:
        raise MemoryError(f"{what} needs about {format_bytes(needed)} of memory, more than the "
                          f"{format_bytes(available)} available; {fix}")
