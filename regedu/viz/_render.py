"""Turning arrays into pictures: input normalisation, slicing, colour, PNG.

Shared by the static figures and the viewers, so that a viewer's live panel
and its static fallback show the same pixels.
"""
from __future__ import annotations

import contextlib
import functools
import io

import matplotlib
import numpy as np
import torch

from .._checks import as_tensor, check_choice, check_field, check_labels

FOLD_RGB = np.array([255, 221, 0], dtype=np.uint8)  # folded voxels: yellow, off the coolwarm map
GRID_RGB = np.array([255, 200, 40], dtype=np.uint8)
LINE_RGB = np.array([0, 200, 255], dtype=np.uint8)


@contextlib.contextmanager
def one_thread():
    """Run torch single-threaded inside the block (restoring the setting after).

    A redraw handles tensors of ~1e5 elements: thread start-up and, on a busy
    machine, threads waiting for each other cost more than they save (measured
    on 2 loaded cores: ~1 s per playground redraw with 2 threads, ~0.1 s with 1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def to_numpy(x, name: str) -> np.ndarray:
    """A numpy copy-free view of a tensor or array (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name}: expected a numpy array or torch.Tensor, got a {type(x).__name__}")


def spatial_array(x, name: str, *, ndim: int | None = None) -> np.ndarray:
    """Image or volume as a numpy array of its spatial axes only.

    Accepts ``(H, W)``, ``(D, H, W)``, ``(1, 1, H, W)`` and ``(1, 1, D, H, W)``,
    numpy or torch. ``ndim`` (2 or 3) demands that many spatial axes.
    """
    a = to_numpy(x, name)
    if a.ndim in (4, 5):
        if a.shape[0] != 1 or a.shape[1] != 1:
            raise ValueError(f"{name}: expected one single-channel image (1, 1, *spatial), got "
                             f"shape {a.shape}; pick one with {name}[i:i+1, c:c+1]")
        a = a[0, 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"{name}: expected an image (H, W), a volume (D, H, W) or either with "
                         f"batch and channel axes of size 1, got shape {a.shape}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}D {'image' if ndim == 2 else 'volume'}, "
                         f"got shape {a.shape} ({a.ndim}D)")
    return a


def field_tensor(disp, name: str = "disp", *, spatial: tuple[int, ...] | None = None) -> torch.Tensor:
    """Displacement as a float32 tensor ``(1, ndim, *spatial)``; ``(ndim, *spatial)`` is accepted."""
    u = as_tensor(disp, name).detach().cpu()
    if u.dim() in (3, 4) and u.shape[0] == u.dim() - 1:
        u = u[None]
    if u.dim() in (4, 5) and u.shape[0] != 1:
        raise ValueError(f"{name}: expected one field (1, ndim, *spatial), got a batch of "
                         f"{u.shape[0]}: pick one with {name}[i:i+1]")
    return check_field(u.float(), name, spatial=spatial)


def label_array(x, name: str, *, shape: tuple[int, ...]) -> np.ndarray:
    """A label map as an integer numpy array of the given spatial shape."""
    a = spatial_array(check_labels(x, name), name)
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected a label map of spatial shape {tuple(shape)} "
                         f"(the image's), got {a.shape}")
    return a.astype(np.int64, copy=False)


def default_index(shape: tuple[int, ...]) -> list[int]:
    """Starting slices: the centre voxel, ``n // 2`` per axis.

    For 160x192x224 volumes this is [80, 96, 112], the slices of the VV-Net
    paper's figure 4; smaller profiles get the same fractions.

    >>> default_index((160, 192, 224))
    [80, 96, 112]
    >>> default_index((40, 48, 56))
    [20, 24, 28]
    """
    return [int(n) // 2 for n in shape]


def plane(a: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice of a volume perpendicular to ``axis`` (2D arrays pass through)."""
    if a.ndim == 2:
        return a
    return np.take(a, int(index), axis=axis)


def field_plane(u: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """In-plane components of a field on one slice: ``(1, 2, h, w)`` (2D fields pass through)."""
    if u.shape[1] == 2:
        return u
    keep = [k for k in range(3) if k != axis]
    # Slice first: indexing the channels of the whole volume would copy all of it.
    return u.select(2 + axis, int(index))[:, keep].contiguous()


def check_axis_index(shape: tuple[int, ...], axis: int, index: int | None) -> int:
    """Validate a slice choice for a volume of ``shape``; ``None`` means the centre."""
    check_choice(axis, (0, 1, 2), "axis")
    if index is None:
        return default_index(shape)[axis]
    if not 0 <= int(index) < shape[axis]:
        raise ValueError(f"index: expected a slice in [0, {shape[axis] - 1}] along axis {axis} "
                         f"of a volume of shape {shape}, got {index}")
    return int(index)


def intensity_window(a: np.ndarray) -> tuple[float, float]:
    """Robust display range: the 0.5th and 99.5th percentiles (of a subsample)."""
    step = max(1, int(round((a.size / 2e5) ** (1 / a.ndim))))
    sample = a[(slice(None, None, step),) * a.ndim].astype(np.float32)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


@functools.lru_cache(maxsize=32)
def _lut(cmap: str) -> np.ndarray:
    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(a: np.ndarray, vmin: float, vmax: float, cmap: str = "gray") -> np.ndarray:
    """Map a 2D array to uint8 RGB ``(h, w, 3)`` through a matplotlib colormap."""
    scale = 255.0 / (vmax - vmin) if vmax > vmin else 0.0
    idx = np.clip((a - vmin) * scale, 0, 255).astype(np.uint8)
    return _lut(cmap)[idx]


def blend(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    """Paint ``colour`` over ``rgb`` with weight ``alpha * mask`` (mask in [0, 1])."""
    w = (alpha * mask)[..., None]
    return (rgb * (1 - w) + colour * w).astype(np.uint8)


def checkerboard_mask(shape: tuple[int, int], tile: int) -> np.ndarray:
    """Boolean tiles: True where the first image shows."""
    r = np.arange(shape[0])[:, None] // tile
    c = np.arange(shape[1])[None, :] // tile
    return (r + c) % 2 == 0


def warped_grid(u_plane: torch.Tensor, step: int) -> np.ndarray:
    """A regular grid drawn on the moving image, carried into the fixed image by the warp.

    ``u_plane`` is a 2D field ``(1, 2, h, w)``; the result is a boolean
    ``(h, w)`` mask of one-pixel lines: the curves ``x_k + u_k(x) = c`` at the
    grid levels ``c = step // 2 + j * step``, i.e. where the sampled moving
    coordinate crosses a grid line. The lines move with the content of the
    warped image. Same curves as the contours of :func:`plot_grid`.
    """
    h, w = u_plane.shape[2:]
    phi = u_plane[0].numpy() + np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), bool)
    for k in range(2):
        cell = np.floor((phi[k] - step // 2) / step)
        out[1:] |= cell[1:] != cell[:-1]
        out[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    return out


@functools.lru_cache(maxsize=8)
def label_palette(n: int) -> np.ndarray:
    """``n`` distinct colours (uint8 RGB); colour 0 (background) is black."""
    cols = np.concatenate([matplotlib.colormaps[c](np.arange(20))[:, :3]
                           for c in ("tab20", "tab20b", "tab20c")])
    rgb = (cols[np.arange(n) % len(cols)] * 255).round().astype(np.uint8)
    rgb[0] = 0
    return rgb


class LabelColours:
    """Label maps with arbitrary values, coloured through a rank map and a palette."""

    def __init__(self, *maps: np.ndarray):
        values = np.unique(np.concatenate([np.unique(m) for m in maps]))
        self.values = values[values != 0]
        self.palette = label_palette(len(self.values) + 1)

    def ranks(self, labels: np.ndarray) -> np.ndarray:
        """Rank of each voxel's label (1..n, 0 for background): a small index for the palette."""
        if len(self.values) == 0:
            return np.zeros(labels.shape, np.uint16)
        rank = np.minimum(np.searchsorted(self.values, labels), len(self.values) - 1)
        return np.where(self.values[rank] == labels, rank + 1, 0).astype(np.uint16)

    def rgb(self, labels2d: np.ndarray) -> np.ndarray:
        return self.palette[self.ranks(labels2d)]


def label_edges(labels2d: np.ndarray) -> np.ndarray:
    """Boolean one-pixel outline of every region in a 2D label map."""
    e = np.zeros(labels2d.shape, bool)
    e[1:] |= labels2d[1:] != labels2d[:-1]
    e[:, 1:] |= labels2d[:, 1:] != labels2d[:, :-1]
    return e


#: Colour-bar labels shared by the static figures and the viewers' static fallbacks.
JACOBIAN_LABEL = "det J (Jacobian determinant)\nyellow: det J <= 0, folding"
DIFFERENCE_LABEL = "intensity difference"


def colorbar(fig, ax, cmap: str, vmin: float, vmax: float, label: str, **kw):
    """A labelled colour bar for a panel drawn as RGB (no mappable of its own)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    sm = ScalarMappable(Normalize(vmin, vmax), matplotlib.colormaps[cmap])
    return fig.colorbar(sm, ax=ax, label=label, **kw)


def jacobian_rgb(det2d: np.ndarray) -> np.ndarray:
    """Jacobian determinant in coolwarm on [0, 2] (white = 1, volume kept), folds in yellow."""
    rgb = colorize(det2d, 0.0, 2.0, "coolwarm")
    rgb[det2d <= 0] = FOLD_RGB
    return rgb


def zoom_factor(shape: tuple[int, int], target: int) -> int:
    """Integer upscaling so that the longer side reaches about ``target`` pixels."""
    return max(1, int(round(target / max(shape))))


def encode(rgb: np.ndarray, zoom: int = 1, fmt: str = "jpeg") -> bytes:
    """Encode uint8 RGB as JPEG or PNG bytes, upscaled by pixel repetition (crisp voxels).

    JPEG at quality 95 without chroma subsampling looks like the PNG but
    encodes ~6x faster (about 1 ms against 8-10 ms for a 224x192 slice) and
    is ~2.5x smaller, which keeps slider redraws immediate even on a remote
    notebook server.
    """
    from PIL import Image
    check_choice(fmt, ("jpeg", "png"), "image_format")
    if zoom > 1:
        rgb = rgb.repeat(zoom, axis=0).repeat(zoom, axis=1)
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
