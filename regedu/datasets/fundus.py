"""Offline fundus images and FIRE-like pairs with exact ground truth.

Two sources of retinas: ``skimage.data.retina()``, a real fundus photograph
(CC0, 1411x1411 RGB), and :func:`synthetic_fundus`, a procedural one (vessel
tree, optic disc, fovea, vignetting, noise) so that a network can be trained on
images other than the one it is tested on.

A pair imitates two photographs of the same eye: each image is a camera view
of the retina (a circular aperture looking at part of it), the views differ by
an affine map (and, for category A, a smooth elastic change), and the two get
different illumination. FIRE's categories (Hernandez-Matas et al., 2017):

- ``"S"``: more than 75% overlap, small affine change, no anatomical change;
- ``"P"``: less than 75% overlap (larger translation and rotation);
- ``"A"``: more than 75% overlap with anatomical change: a local elastic
  deformation, lesion-like spots and a change of illumination.

Convention: ``fixed`` is FIRE's image ``_1`` (the reference), ``moving`` is
``_2`` (the test). The ground-truth displacement ``disp`` lives on the fixed
grid and pulls: ``moving(x + disp(x))`` is what the fixed image shows at ``x``
(both views are sampled from one retina with :func:`regedu.spatial.warp`, so
this holds up to the bilinear interpolation of the sampling). Points are
``(row, col)`` pixel coordinates; a fixed point ``p`` maps to ``p + disp(p)``.
FIRE's text lines are ``x_ref y_ref x_test y_test`` (x = column, y = row) in a
full-resolution frame of ``fullres`` pixels (FIRE's 2912 by default).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from .._checks import check_choice, check_positive
from ..spatial import gaussian_blur, warp, warp_points
from ._image import resize_image, scale_points

__all__ = ["FundusPair", "retina_green", "synthetic_fundus", "make_fire_pair", "fire_lines",
           "parse_fire_lines", "canvas_size", "vessel_contrast", "CATEGORIES", "FIRE_SIZE"]

CATEGORIES = ("S", "P", "A")
FIRE_SIZE = 2912
_SOURCES = ("retina", "procedural")
# The views see a canvas this much larger than themselves, which leaves room
# for P pairs to look at different parts of the retina.
_CANVAS = 1.5
_APERTURE = 0.46  # radius of a view's circular field, as a fraction of its size


@dataclass
class FundusPair:
    """A fixed/moving fundus pair with its exact ground truth.

    Attributes
    ----------
    fixed, moving : Tensor, shape (1, H, W)
        Green channel in [0, 1], zero outside the fundus mask.
    fixed_mask, moving_mask : Tensor, shape (1, H, W), bool
        Where each image shows retina.
    disp : Tensor, shape (2, H, W)
        Ground truth on the fixed grid, voxels, (row, col) channels:
        ``moving(x + disp(x)) = fixed(x)``.
    fixed_points, moving_points : Tensor, shape (10, 2)
        Control points (row, col); ``moving_points = fixed_points + disp(fixed_points)``.
    category : str
        ``"S"``, ``"P"`` or ``"A"``.
    overlap : float
        Fraction of the fixed mask that sees retina in the moving image.
    fullres : int
        Size of the full-resolution frame of :attr:`fire_lines`.
    params : dict
        The random parameters drawn (rotation in degrees, scale, translations...).
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor
    moving_mask: torch.Tensor
    disp: torch.Tensor
    fixed_points: torch.Tensor
    moving_points: torch.Tensor
    category: str
    overlap: float
    fullres: int = FIRE_SIZE
    params: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Full-resolution pixels per pixel of this pair."""
        return (self.fullres - 1) / (self.fixed.shape[-1] - 1)

    @property
    def fire_lines(self) -> list[str]:
        """Control points as FIRE's ``x_ref y_ref x_test y_test`` lines (full resolution)."""
        return fire_lines(self.fixed_points, self.moving_points, shape=tuple(self.fixed.shape[-2:]),
                          fullres=(self.fullres, self.fullres))


def fire_lines(fixed_points, moving_points, *, shape, fullres=(FIRE_SIZE, FIRE_SIZE)) -> list[str]:
    """Write (row, col) points on a grid of ``shape`` as FIRE lines in the ``fullres`` frame."""
    ref = scale_points(np.asarray(fixed_points), shape, fullres)
    test = scale_points(np.asarray(moving_points), shape, fullres)
    return [f"{r[1]:.2f} {r[0]:.2f} {t[1]:.2f} {t[0]:.2f}" for r, t in zip(ref, test)]


def parse_fire_lines(lines, *, shape=None, fullres=(FIRE_SIZE, FIRE_SIZE)):
    """Read FIRE lines into (row, col) arrays, rescaled to ``shape`` if given.

    Returns ``(fixed_points, moving_points)``, each ``(N, 2)`` float64: the
    reference (image ``_1``) and test (image ``_2``) points.

    >>> f, m = parse_fire_lines(["10 20 30 40"])
    >>> f.tolist(), m.tolist()
    ([[20.0, 10.0]], [[40.0, 30.0]])
    """
    rows = []
    for line in lines:
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 4:
            raise ValueError(f"FIRE control points: expected 4 numbers 'x_ref y_ref x_test y_test' "
                             f"per line, got {line.strip()!r}")
        rows.append([float(v) for v in parts])
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    fixed, moving = arr[:, [1, 0]], arr[:, [3, 2]]
    if shape is not None:
        fixed, moving = scale_points(fixed, fullres, shape), scale_points(moving, fullres, shape)
    return fixed, moving


@functools.lru_cache(maxsize=1)
def _retina_full() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data
    rgb = data.retina().astype(np.float32) / 255.0
    # The camera's black surround: dark in all channels. Smooth first so that
    # dark vessels inside the fundus do not punch holes in the mask.
    bright = ndimage.gaussian_filter(rgb.sum(-1), 4)
    mask = ndimage.binary_fill_holes(bright > 0.15)
    mask = ndimage.binary_erosion(mask, iterations=6)
    return rgb[..., 1], mask


def retina_green(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The green channel of ``skimage.data.retina()`` and its fundus mask at ``size``.

    Returns ``(image, mask)``: float32 ``(size, size)`` in [0, 1] (zero outside
    the mask) and bool ``(size, size)``.
    """
    check_positive(size, "size", integer=True)
    image, mask = _retina_green(size)
    return image.copy(), mask.copy()


@functools.lru_cache(maxsize=4)
def _retina_green(size: int) -> tuple[np.ndarray, np.ndarray]:
    green, mask = _retina_full()
    m = resize_image(mask.astype(np.float32), (size, size)) > 0.5
    img = resize_image(green, (size, size))
    top = np.percentile(img[m], 99.7)
    return (np.clip(img / top, 0, 1) * m).astype(np.float32), m


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _smooth_noise(rng, shape, sigma, amplitude=1.0) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to std ``amplitude``."""
    # A wide Gaussian is costly at full size: smooth on a coarse grid, then upsample.
    factor = max(1, int(sigma // 4))
    coarse = tuple(max(2, -(-n // factor)) for n in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma / factor, mode="reflect")
    noise = resize_image(noise, shape)
    return (noise / (noise.std() + 1e-12) * amplitude).astype(np.float32)


def _vessel_tree(rng, size: int, disc: np.ndarray, fovea: np.ndarray, radius: float) -> np.ndarray:
    """Paint a branching vessel tree leaving the optic disc; returns darkness in [0, 1]."""
    step = size / 250.0
    centre = (size - 1) / 2
    temporal = float(np.sign(fovea[1] - disc[1]))
    fy, fx = float(fovea[0]), float(fovea[1])
    # Four main trunks: the temporal arcades curve around the fovea, the nasal ones run straight.
    stack = []
    for vertical in (-1.0, 1.0):
        stack.append((float(disc[0]), float(disc[1]), vertical * 0.8, temporal * 0.6, size * 0.009, True, vertical))
        stack.append((float(disc[0]), float(disc[1]), vertical * 0.6, -temporal * 0.8, size * 0.007, False, vertical))
    samples = []  # (row, col, width) along every vessel's centre line
    while stack:
        y, x, dy, dx, width, arcade, vertical = stack.pop()
        length = 0.0
        wiggle = rng.normal(0, 0.12, (int(size * 0.9 / step) + 2, 2))
        branch = rng.random(len(wiggle))
        for k in range(len(wiggle)):
            if width <= 0.35:
                break
            if arcade:
                # Steer along a circle around the fovea: the temporal arcades.
                ty, tx = -temporal * vertical * (x - fx), temporal * vertical * (y - fy)
                norm = math.hypot(ty, tx) + 1e-9
                dy, dx = 0.9 * dy + 0.1 * ty / norm, 0.9 * dx + 0.1 * tx / norm
            dy, dx = dy + wiggle[k, 0], dx + wiggle[k, 1]
            norm = math.hypot(dy, dx)
            dy, dx = dy / norm, dx / norm
            y, x = y + dy * step, x + dx * step
            length += step
            if math.hypot(y - centre, x - centre) > radius:
                break
            samples.append((y, x, width))
            if branch[k] < 0.03 * step:
                angle = float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.1))
                c, s = math.cos(angle), math.sin(angle)
                stack.append((y, x, c * dy - s * dx, s * dy + c * dx,
                              width * float(rng.uniform(0.55, 0.75)), False, vertical))
                width *= 0.9
            width *= 1 - 0.0015 * step
    # Rasterise by width class: distance to the centre lines of each class.
    pts = np.asarray(samples).reshape(-1, 3)
    darkness = np.zeros((size, size), np.float32)
    edges = np.arange(0.0, pts[:, 2].max() + 0.5, 0.5)
    for lo in edges:
        sel = pts[(pts[:, 2] >= lo) & (pts[:, 2] < lo + 0.5)]
        if not len(sel):
            continue
        centre_line = np.ones((size, size), bool)
        rows = np.clip(np.rint(sel[:, 0]).astype(int), 0, size - 1)
        cols = np.clip(np.rint(sel[:, 1]).astype(int), 0, size - 1)
        centre_line[rows, cols] = False
        dist = ndimage.distance_transform_edt(centre_line)
        width = lo + 0.25
        darkness = np.maximum(darkness, (dist <= max(width / 2, 0.5)) * min(1.0, 0.4 + width / 6))
    return ndimage.gaussian_filter(darkness, 0.6)


def synthetic_fundus(size: int = 256, seed=None) -> tuple[np.ndarray, np.ndarray]:
    """A procedural green-channel fundus image and its mask.

    Vessel tree (four trunks from the optic disc, the temporal arcades curving
    around the fovea, random branching), a bright optic disc with a cup, a dark
    fovea, vignetting, a slowly varying background and noise. Left or right
    eye at random.

    Parameters
    ----------
    size : int
    seed : int, numpy.random.Generator or None

    Returns
    -------
    (image, mask): float32 ``(size, size)`` in [0, 1], bool ``(size, size)``.
    """
    check_positive(size, "size", integer=True)
    rng = _rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    centre = (size - 1) / 2
    radius = 0.48 * size
    r = np.hypot(yy - centre, xx - centre)
    mask = r <= radius
    side = rng.choice([-1, 1])
    disc = np.array([centre + rng.normal(0, 0.03) * size, centre + side * rng.uniform(0.16, 0.22) * size])
    fovea = np.array([disc[0] + rng.uniform(0.0, 0.04) * size, disc[1] - side * rng.uniform(0.26, 0.32) * size])
    background = 0.5 + _smooth_noise(rng, (size, size), size / 12, 0.04)
    background *= 1 - 0.45 * (r / radius) ** 2  # vignetting
    d_disc = np.hypot(yy - disc[0], xx - disc[1])
    disc_r = size * rng.uniform(0.045, 0.06)
    background += 0.35 * np.exp(-(d_disc / disc_r) ** 4) + 0.15 * np.exp(-(d_disc / (0.45 * disc_r)) ** 2)
    background -= 0.12 * np.exp(-(np.hypot(yy - fovea[0], xx - fovea[1]) / (0.06 * size)) ** 2)
    vessels = _vessel_tree(rng, size, disc, fovea, radius)
    image = background * (1 - 0.45 * vessels) + rng.normal(0, 0.01, (size, size))
    return np.clip(image * mask, 0, 1).astype(np.float32), mask


def canvas_size(size: int) -> int:
    """Side of the retina image the views of a ``size`` pair are cut from."""
    return size + 2 * int(np.ceil((_CANVAS - 1) * size / 2))


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _draw_params(rng, category: str, n: int) -> dict:
    # Distances in view pixels; the two views sit symmetrically about the canvas centre.
    if category == "P":
        sep, rot, scale = rng.uniform(0.2, 0.32) * n, rng.uniform(-15, 15), rng.uniform(0.92, 1.08)
    else:
        sep, rot, scale = rng.uniform(0.0, 0.08) * n, rng.uniform(-5, 5), rng.uniform(0.96, 1.04)
    direction = rng.uniform(0, 2 * np.pi)
    shift = sep * np.array([np.cos(direction), np.sin(direction)])
    return dict(separation=float(sep), rotation_deg=float(rot), scale=float(scale),
                fixed_centre_offset=(-shift / 2).tolist(), moving_centre_offset=(shift / 2).tolist(),
                fixed_rotation_deg=float(rng.uniform(-10, 10)))


def _view_map(params: dict, n: int, m: int, which: str):
    """Affine view -> canvas: ``z = A y + b`` for view pixel ``y``."""
    theta_f = np.deg2rad(params["fixed_rotation_deg"])
    if which == "fixed":
        A, offset = _rotation(theta_f), np.asarray(params["fixed_centre_offset"])
    else:
        A = _rotation(theta_f + np.deg2rad(params["rotation_deg"])) * params["scale"]
        offset = np.asarray(params["moving_centre_offset"])
    cv, cc = (n - 1) / 2, (m - 1) / 2
    b = cc + offset - A @ np.array([cv, cv])
    return A, b


def _sample_view(canvas: torch.Tensor, points: torch.Tensor, pad: int, n: int) -> torch.Tensor:
    """Sample ``canvas`` (1, C, M, M) at canvas points (2, N, N) given on the view grid."""
    m = canvas.shape[-1]
    # warp() needs the field on the canvas grid: embed the view in its centre.
    disp = torch.zeros(1, 2, m, m, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")).float()
    disp[0, :, pad:pad + n, pad:pad + n] = points - grid[:, pad:pad + n, pad:pad + n]
    return warp(canvas, disp)[:, :, pad:pad + n, pad:pad + n]


def _photometric(rng, image: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    n = image.shape[0]
    gain = 1 + rng.normal(0, 0.08 * strength)
    gamma = np.exp(rng.normal(0, 0.12 * strength))
    light = 1 + _smooth_noise(rng, image.shape, n / 5, 0.08 * strength)
    out = np.clip(image, 0, 1) ** gamma * gain * light
    out = out + rng.normal(0, 0.008, image.shape)
    return (np.clip(out, 0, 1) * mask).astype(np.float32)


def _lesions(rng, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Add a few small bright (exudate-like) and dark (haemorrhage-like) spots."""
    n = image.shape[0]
    yy, xx = np.mgrid[:n, :n]
    out = image.copy()
    inside = np.argwhere(ndimage.binary_erosion(mask, iterations=max(1, n // 10)))
    for _ in range(int(rng.integers(3, 8))):
        cy, cx = inside[rng.integers(len(inside))]
        radius = rng.uniform(0.008, 0.02) * n
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))
        out = out + rng.choice([-0.25, 0.3]) * blob
    return np.clip(out, 0, 1) * mask


def _control_points(rng, fixed: np.ndarray, valid: np.ndarray, count: int) -> np.ndarray:
    """Pick ``count`` well-spread points on vessels (dark ridges) inside ``valid``."""
    from skimage.feature import peak_local_max
    n = fixed.shape[0]
    size = max(3, n // 40) | 1
    vesselness = ndimage.grey_closing(fixed, size=(size, size)) - fixed
    vesselness = ndimage.gaussian_filter(vesselness, 1.0) * valid
    peaks = peak_local_max(vesselness, min_distance=max(2, n // 16), exclude_border=False,
                           num_peaks=4 * count)
    if len(peaks) < count:
        extra = np.argwhere(valid)
        peaks = np.concatenate([peaks, extra[rng.choice(len(extra), count - len(peaks), replace=False)]])
    chosen = rng.choice(len(peaks), count, replace=False)
    return peaks[np.sort(chosen)].astype(np.float32)


def make_fire_pair(category: str = "S", size: int = 256, seed=None, *, source="retina",
                   n_points: int = 10, fullres: int = FIRE_SIZE, photometric: bool = True) -> FundusPair:
    """A FIRE-like pair with its exact ground-truth displacement and control points.

    Parameters
    ----------
    category : {"S", "P", "A"}
        FIRE's category (see the module docstring).
    size : int
        Side of the square images (128 for the ci profile, 256, 512...).
    seed : int, numpy.random.Generator or None
        Same seed, same pair.
    source : {"retina", "procedural"} or ndarray
        The retina photographed: ``skimage.data.retina()``, a fresh
        :func:`synthetic_fundus` (drawn from ``seed``), or your own square
        float image in [0, 1] (black outside the fundus), resized to
        ``canvas_size(size)`` if needed.
    n_points : int
        Number of control points (FIRE has 10 per pair).
    fullres : int
        Side of the frame of :attr:`FundusPair.fire_lines` (FIRE: 2912).
    photometric : bool
        Apply the illumination, gamma and noise changes (and category A's
        lesions). Without them, ``warp(moving, disp)`` equals ``fixed`` up to
        interpolation: a check of the ground truth.

    Returns
    -------
    FundusPair

    Examples
    --------
    >>> pair = make_fire_pair("S", size=64, seed=0)
    >>> pair.fixed.shape, pair.disp.shape, pair.fixed_points.shape
    (torch.Size([1, 64, 64]), torch.Size([2, 64, 64]), torch.Size([10, 2]))
    >>> pair.overlap > 0.75
    True
    """
    check_choice(category, CATEGORIES, "category")
    check_positive(size, "size", integer=True)
    check_positive(n_points, "n_points", integer=True)
    rng = _rng(seed)
    n = size
    m = canvas_size(n)
    pad = (m - n) // 2
    if isinstance(source, str):
        check_choice(source, _SOURCES, "source")
        canvas_img, canvas_mask = (retina_green(m) if source == "retina" else synthetic_fundus(m, rng))
    else:
        arr = np.asarray(source, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise ValueError(f"source: expected a square 2D image, got shape {arr.shape}")
        canvas_img = resize_image(arr, (m, m))
        canvas_mask = canvas_img > 0.02
    canvas = torch.from_numpy(np.stack([canvas_img, canvas_mask.astype(np.float32)]))[None]

    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    view = np.stack([yy, xx])
    aperture = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) <= _APERTURE * n
    for _ in range(50):
        params = _draw_params(rng, category, n)
        A_f, b_f = _view_map(params, n, m, "fixed")
        A_m, b_m = _view_map(params, n, m, "moving")
        elastic = np.zeros((2, n, n))
        if category == "A":
            amplitude = rng.uniform(0.01, 0.02) * n
            elastic = np.stack([_smooth_noise(rng, (n, n), n / 10, amplitude) for _ in range(2)])
            params["elastic_amplitude_px"] = float(amplitude)
        # Fixed pixel x sees canvas point z = A_f x + b_f + e(x); the moving
        # image shows canvas point z at view pixel A_m^-1 (z - b_m).
        z_fixed = np.einsum("ij,jhw->ihw", A_f, view) + b_f[:, None, None] + elastic
        to_moving = np.einsum("ij,jhw->ihw", np.linalg.inv(A_m), z_fixed - b_m[:, None, None])
        disp = (to_moving - view).astype(np.float32)
        z_moving = np.einsum("ij,jhw->ihw", A_m, view) + b_m[:, None, None]
        fixed_s = _sample_view(canvas, torch.from_numpy(z_fixed.astype(np.float32)), pad, n)[0].numpy()
        moving_s = _sample_view(canvas, torch.from_numpy(z_moving.astype(np.float32)), pad, n)[0].numpy()
        fixed_mask = aperture & (fixed_s[1] > 0.99)
        moving_mask = aperture & (moving_s[1] > 0.99)
        seen = warp(torch.from_numpy(moving_mask.astype(np.float32))[None, None],
                    torch.from_numpy(disp)[None])[0, 0].numpy() > 0.99
        both = fixed_mask & seen
        overlap = float(both.sum() / max(fixed_mask.sum(), 1))
        if (overlap < 0.75) == (category == "P") and overlap > 0.3:
            break
    else:
        raise RuntimeError(f"could not draw a category {category} pair with the required overlap "
                           f"at size {size}; try another seed")

    fixed = fixed_s[0] * fixed_mask
    moving = moving_s[0] * moving_mask
    if photometric:
        if category == "A":
            moving = _lesions(rng, moving, moving_mask)
        fixed = _photometric(rng, fixed, fixed_mask, 0.5)
        moving = _photometric(rng, moving, moving_mask, 2.0 if category == "A" else 1.0)

    valid = ndimage.binary_erosion(both, iterations=max(2, n // 32))
    if not valid.any():
        valid = both
    fixed_points = torch.from_numpy(_control_points(rng, fixed, valid, n_points))
    disp_t = torch.from_numpy(disp)
    moving_points = warp_points(fixed_points, disp_t[None])
    params["source"] = source if isinstance(source, str) else "array"
    return FundusPair(
        fixed=torch.from_numpy(fixed)[None], moving=torch.from_numpy(moving)[None],
        fixed_mask=torch.from_numpy(fixed_mask)[None], moving_mask=torch.from_numpy(moving_mask)[None],
        disp=disp_t, fixed_points=fixed_points, moving_points=moving_points, category=category,
        overlap=overlap, fullres=fullres, params=params)


def vessel_contrast(image, mask=None, sigma: float | None = None) -> torch.Tensor:
    """A fundus photograph's vessel contrast: the illumination removed inside its field of view.

    ``(image - local mean) * mask``, the local mean a Gaussian average over the
    field of view only (``blur(image * mask) / blur(mask)``, so the black
    outside does not leak in), scaled to unit standard deviation inside.

    Why registration needs it: a photograph's illumination (vignetting, the
    bright optic disc's halo) and its aperture belong to the *camera*, so they
    sit at the same place in both images. At the identity they match, and any
    similarity measure is pulled towards "no motion"; the vessels, which do
    move, are thin and faint. Without the illumination the vessels dominate,
    and the similarity improves steadily from the identity to the true
    alignment (notebook 04 measures it).

    Parameters
    ----------
    image : Tensor, shape (C, H, W) or (B, C, H, W)
    mask : Tensor of the same shape, optional
        Field of view (bool or 0/1). Default: ``image > 0`` (the aperture is black).
    sigma : float, optional
        Width of the local mean in pixels. Default: a 16th of the image side
        (wider than any vessel, narrower than the illumination's changes).

    Returns
    -------
    Tensor, the shape of ``image``, float32, zero outside the mask.

    >>> x = torch.rand(1, 64, 64) * 0.1 + torch.linspace(0, 1, 64)   # a strong gradient
    >>> y = vessel_contrast(x)
    >>> abs(float(y.mean())) < 0.05 and abs(float(y.std()) - 1) < 0.05
    True
    """
    x = torch.as_tensor(image, dtype=torch.float32)
    if x.dim() not in (3, 4):
        raise ValueError(f"image: expected (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    batched = x.dim() == 4
    x = x if batched else x[None]
    m = (x > 0) if mask is None else torch.as_tensor(mask).reshape(x.shape).bool()
    m = m.float()
    sigma = x.shape[-1] / 16 if sigma is None else sigma
    local_mean = gaussian_blur(x * m, sigma) / gaussian_blur(m, sigma).clamp_min(1e-3)
    out = (x - local_mean) * m
    count = m.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
    std = (out.square().sum(dim=(1, 2, 3), keepdim=True) / count).sqrt()
    out = out / std.clamp_min(1e-6)
    return out if batched else out[0]
