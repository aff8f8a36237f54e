"""Interactive viewers built from plain ipywidgets.

Each panel is an ``ipywidgets.Image`` holding JPEG (or PNG) bytes rendered
with numpy (no matplotlib in the redraw path), and a control redraws only
the panels it changes. Measured with ``benchmarks/bench_viz.py`` on 2 busy
CPU cores: a slider move of the 3D viewer on 160x192x224 volumes takes
10-35 ms (nine panels, JPEG), a playground change at 256x256 45-75 ms, under
the 100 ms at which a slider stops feeling immediate. Works in plain
JupyterLab with ipywidgets; no ipympl needed.

Rule for front ends without widgets: a viewer shown in a notebook carries
both its live widget and a PNG of its current view. JupyterLab and Notebook
render the widget; nbval, nbconvert or a notebook viewer on the web show the
PNG. In a script (no IPython kernel), :meth:`show` returns the same picture
as a static matplotlib Figure, and :meth:`figure` does so everywhere.
"""
from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import torch

from .._checks import check_choice, check_positive
from . import _render as R

__all__ = ["SliceViewer", "DeformationPlayground", "InteractiveFigure", "LAYERS"]

#: Layers the 3D viewer can show in each row.
LAYERS = ("fixed", "moving", "warped", "difference", "checkerboard", "labels", "grid", "jacobian")


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class _Viewer:
    """Shared display logic: live widget in a kernel, static figure otherwise."""

    _widget = None

    @property
    def widget(self):
        """The ipywidgets box (built on first use)."""
        if self._widget is None:
            self._widget = self._build()
        return self._widget

    def show(self):
        """Display the live viewer in a kernel; outside one, return :meth:`figure`."""
        if _in_kernel():
            from IPython.display import display
            display(self)
            return None
        return self.figure()

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=80)
        bundle["image/png"] = buf.getvalue()
        return bundle


class SliceViewer(_Viewer):
    """Three orthogonal views of a registration, one slider per axis.

    Each row shows one layer (chosen from a menu) in the three views; all rows
    share the sliders, so fixed, moving and warped stay on the same slices.

    Parameters
    ----------
    fixed, moving, warped : array or Tensor, shape (D, H, W) or (1, 1, D, H, W)
        ``moving`` and ``warped`` are optional.
    disp : array or Tensor, shape (1, 3, D, H, W) or (3, D, H, W), optional
        Displacement in voxels (docs/conventions.md); enables "grid" and "jacobian".
    fixed_labels, warped_labels : label maps (D, H, W), optional
        Enable "labels": the fixed image with the warped labels filled in
        (the fixed labels when no warped ones) and, given both, the fixed
        labels' outlines in white: where fill and outline disagree, the
        registration missed.
    rows : list of str, optional
        Starting layer of each row (default: fixed, moving, warped as given).
    index : three ints, optional
        Starting slices (default: the centre; [80, 96, 112] at 160x192x224).
    tile : int, optional
        Checkerboard tile in voxels (default 1/8 of the largest side).
    grid_step : int, optional
        Grid spacing in voxels (default 1/16 of the largest side, at least 4).
    crosshair : bool
        Mark where the other two views cut each view.
    display_size : int
        Panels are upscaled by a whole factor to about this many pixels.
    image_format : {"jpeg", "png"}
        How panels travel to the browser: JPEG (quality 95, fast, default)
        or lossless PNG (several times slower to encode).

    Notes
    -----
    Layers: fixed, moving, warped (grey, one intensity scale); difference
    (``warped - fixed``, else ``moving - fixed``; blue negative, red positive);
    checkerboard (fixed against warped, else moving); labels; grid (a regular
    grid on the moving image carried by the in-plane part of ``disp``, over
    the warped image); jacobian (det of ``id + grad u``: blue shrinks, red
    grows, yellow folds).

    Examples
    --------
    >>> vol = np.random.default_rng(0).random((20, 24, 28)).astype(np.float32)
    >>> v = SliceViewer(vol, vol[::-1].copy())
    >>> v.index, v.rows
    ([10, 12, 14], ['fixed', 'moving'])
    >>> v.render("moving", 0).shape
    (24, 28, 3)
    >>> v.render("moving", 0, zoom=2).shape
    (48, 56, 3)
    """

    def __init__(self, fixed, moving=None, warped=None, *, disp=None, fixed_labels=None,
                 warped_labels=None, rows=None, index=None, tile: int | None = None,
                 grid_step: int | None = None, crosshair: bool = True, display_size: int = 256,
                 image_format: str = "jpeg"):
        f = R.spatial_array(fixed, "fixed", ndim=3).astype(np.float32, copy=False)
        self.shape = f.shape
        self.volumes = {"fixed": f}
        for name, v in (("moving", moving), ("warped", warped)):
            if v is not None:
                a = R.spatial_array(v, name, ndim=3).astype(np.float32, copy=False)
                if a.shape != self.shape:
                    raise ValueError(f"{name}: expected shape {self.shape} like fixed, got {a.shape}")
                self.volumes[name] = a
        self.disp = None if disp is None else R.field_tensor(disp, spatial=self.shape)
        self.labels = {k: R.label_array(v, k, shape=self.shape)
                       for k, v in (("fixed_labels", fixed_labels), ("warped_labels", warped_labels))
                       if v is not None}
        self.available = [layer for layer in LAYERS if self._needs(layer) is None]
        rows = list(rows) if rows is not None else [k for k in ("fixed", "moving", "warped")
                                                     if k in self.volumes]
        for layer in rows:
            check_choice(layer, LAYERS, "rows")
            if self._needs(layer):
                raise ValueError(f"rows: layer {layer!r} needs {self._needs(layer)}")
        self.rows = rows
        self.index = [R.check_axis_index(self.shape, k, None if index is None else index[k])
                      for k in range(3)]
        self.tile = tile if tile is not None else max(2, max(self.shape) // 8)
        self.grid_step = grid_step if grid_step is not None else max(4, max(self.shape) // 16)
        check_positive(self.tile, "tile", integer=True)
        check_positive(self.grid_step, "grid_step", integer=True)
        self.crosshair = bool(crosshair)
        self.image_format = check_choice(image_format, ("jpeg", "png"), "image_format")
        self.zoom = R.zoom_factor(self.shape[1:], display_size)
        self._window = R.intensity_window(f)
        self._jacobian = None
        self._diff_limit = None
        if self.labels:
            # Colour lookups per redraw index a small palette with precomputed ranks.
            colours = R.LabelColours(*self.labels.values())
            self._palette = colours.palette
            self._ranks = {k: colours.ranks(v) for k, v in self.labels.items()}
        self._sliders, self._menus, self._images = [], [], []

    def _needs(self, layer: str) -> str | None:
        """What is missing for ``layer``, or None when it can be shown."""
        if layer in ("moving", "warped") and layer not in self.volumes:
            return f"the {layer} volume"
        if layer in ("difference", "checkerboard") and len(self.volumes) < 2:
            return "a moving or warped volume"
        if layer in ("grid", "jacobian") and self.disp is None:
            return "a displacement field (disp=...)"
        if layer == "labels" and not self.labels:
            return "a label map (fixed_labels=... or warped_labels=...)"
        return None

    def _other(self) -> np.ndarray:
        return self.volumes.get("warped", self.volumes.get("moving"))

    def _gray(self, vol: np.ndarray, axis: int) -> np.ndarray:
        return R.colorize(R.plane(vol, axis, self.index[axis]), *self._window)

    def render(self, layer: str, axis: int, *, zoom: int = 1) -> np.ndarray:
        """One panel as uint8 RGB ``(h * zoom, w * zoom, 3)``: ``layer`` on the current slice."""
        check_choice(layer, LAYERS, "layer")
        if self._needs(layer):
            raise ValueError(f"layer: {layer!r} needs {self._needs(layer)}")
        i = self.index[axis]
        fixed = self.volumes["fixed"]
        if layer in self.volumes:
            rgb = self._gray(self.volumes[layer], axis)
        elif layer == "difference":
            if self._diff_limit is None:
                self._diff_limit = R.intensity_window(np.abs(self._other() - fixed))[1] or 1.0
            d = R.plane(self._other(), axis, i) - R.plane(fixed, axis, i)
            rgb = R.colorize(d, -self._diff_limit, self._diff_limit, "RdBu_r")
        elif layer == "checkerboard":
            a, b = self._gray(fixed, axis), self._gray(self._other(), axis)
            rgb = np.where(R.checkerboard_mask(a.shape[:2], self.tile)[..., None], a, b)
        elif layer == "labels":
            rgb = self._gray(fixed, axis)
            fill = R.plane(self._ranks.get("warped_labels", self._ranks.get("fixed_labels")), axis, i)
            rgb = R.blend(rgb, (fill != 0).astype(np.float32), self._palette[fill], 0.45)
            if len(self._ranks) == 2:
                rgb[R.label_edges(R.plane(self._ranks["fixed_labels"], axis, i))] = 255
        elif layer == "grid":
            rgb = self._gray(self._other(), axis)
            rgb[R.warped_grid(R.field_plane(self.disp, axis, i), self.grid_step)] = R.GRID_RGB
        else:
            if self._jacobian is None:
                from .. import metrics
                self._jacobian = metrics.jacobian_determinant(self.disp)[0].numpy()
            rgb = R.jacobian_rgb(R.plane(self._jacobian, axis, i))
        if zoom > 1:
            rgb = rgb.repeat(zoom, axis=0).repeat(zoom, axis=1)
        if self.crosshair:
            # Drawn after upscaling: a one-pixel line through the voxel centres, not a thick bar.
            r_axis, c_axis = [k for k in range(3) if k != axis]
            rgb = rgb.copy()
            for sl in ((self.index[r_axis] * zoom + zoom // 2, slice(None)),
                       (slice(None), self.index[c_axis] * zoom + zoom // 2)):
                rgb[sl] = (0.4 * rgb[sl] + 0.6 * R.LINE_RGB).astype(np.uint8)
        return rgb

    def set_index(self, axis: int, value: int) -> None:
        """Move the slice along ``axis`` (moves the slider when the widget exists)."""
        value = R.check_axis_index(self.shape, axis, value)
        if self._sliders:
            self._sliders[axis].value = value  # the observer redraws
        else:
            self.index[axis] = value

    def set_layer(self, row: int, layer: str) -> None:
        """Show ``layer`` in ``row`` (moves the menu when the widget exists)."""
        check_choice(layer, self.available, "layer")
        if self._menus:
            self._menus[row].value = layer
        else:
            self.rows[row] = layer

    def _redraw(self, cells) -> None:
        with R.one_thread():
            panels = [(r, k, R.encode(self.render(self.rows[r], k, zoom=self.zoom), 1,
                                      self.image_format))
                      for r, k in cells]
        for r, k, data in panels:
            self._images[r][k].value = data

    def _on_slider(self, axis: int, change) -> None:
        self.index[axis] = int(change["new"])
        cols = range(3) if self.crosshair else [axis]
        self._redraw([(r, k) for r in range(len(self.rows)) for k in cols])

    def _on_menu(self, row: int, change) -> None:
        self.rows[row] = change["new"]
        self._redraw([(row, k) for k in range(3)])

    def _build(self):
        import ipywidgets as W
        sizes = [(self.shape[1], self.shape[2]), (self.shape[0], self.shape[2]),
                 (self.shape[0], self.shape[1])]
        menu_w = "130px"
        self._sliders = []
        for k in range(3):
            s = W.IntSlider(value=self.index[k], min=0, max=self.shape[k] - 1, description=f"axis {k}",
                            continuous_update=True,
                            layout=W.Layout(width=f"{max(sizes[k][1] * self.zoom, 160)}px"),
                            style={"description_width": "45px"})
            s.observe(lambda ch, k=k: self._on_slider(k, ch), names="value")
            self._sliders.append(s)
        self._menus, self._images = [], []
        for r, layer in enumerate(self.rows):
            m = W.Dropdown(options=self.available, value=layer, layout=W.Layout(width=menu_w))
            m.observe(lambda ch, r=r: self._on_menu(r, ch), names="value")
            self._menus.append(m)
            self._images.append([W.Image(format=self.image_format, layout=W.Layout(
                width=f"{max(sizes[k][1] * self.zoom, 160)}px", height=f"{sizes[k][0] * self.zoom}px",
                object_fit="contain")) for k in range(3)])
        self._redraw([(r, k) for r in range(len(self.rows)) for k in range(3)])
        header = W.HBox([W.Label("slices", layout=W.Layout(width=menu_w))] + self._sliders)
        body = [W.HBox([m] + imgs) for m, imgs in zip(self._menus, self._images)]
        return W.VBox([header] + body)

    def figure(self):
        """The current view as a static matplotlib Figure (same pixels as the widget)."""
        d, h, w = self.shape
        fig, axes = plt.subplots(len(self.rows), 3, squeeze=False, layout="constrained",
                                 figsize=(9, 9 * len(self.rows) * h / (2 * w + h) + 0.5),
                                 gridspec_kw={"width_ratios": [w, w, h]})
        plt.close(fig)
        for r, layer in enumerate(self.rows):
            for k in range(3):
                ax = axes[r, k]
                ax.imshow(self.render(layer, k), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"axis {k} = {self.index[k]}")
                if k == 0:
                    ax.set_ylabel(layer)
            # Rows drawn from a scalar map get its scale; render() has set the limits by now.
            if layer == "difference":
                R.colorbar(fig, axes[r].tolist(), "RdBu_r", -self._diff_limit, self._diff_limit,
                           f"{R.DIFFERENCE_LABEL}\n({'warped' if 'warped' in self.volumes else 'moving'}"
                           " - fixed)", shrink=0.9)
            elif layer == "jacobian":
                R.colorbar(fig, axes[r].tolist(), "coolwarm", 0.0, 2.0, R.JACOBIAN_LABEL, shrink=0.9)
        return fig


def _default_image(size: int) -> np.ndarray:
    from skimage.data import retina
    from skimage.transform import resize
    # The green channel has the best vessel contrast; crop the black rim of the photo.
    g = retina()[..., 1].astype(np.float32) / 255.0
    n = g.shape[0]
    c = g[n // 6: n - n // 6, n // 6: n - n // 6]
    return resize(c, (size, size), anti_aliasing=True).astype(np.float32)


class DeformationPlayground(_Viewer):
    """2D deformation playground: how amplitude, smoothness and regularisation shape a warp.

    A random field (:func:`regedu.spatial.random_field`, interpolated
    bicubically from control points ``smoothness`` pixels apart, scaled so
    that its largest displacement is ``amplitude`` pixels) is regularised by
    :func:`regedu.spatial.diffusion_fit` with the chosen weight, then warps
    the image (bilinear or nearest). The panels
    show the warped image, the deformation grid and the Jacobian determinant
    (yellow: folds); a line reports max |u|, % folded pixels, SDlogJ and how
    far the regularised field moved from the raw one. Large amplitude with
    little smoothness folds; raising the weight unfolds it at the price of
    following the raw field less.

    Parameters
    ----------
    image : array or Tensor (H, W), optional
        Default: the green channel of ``skimage.data.retina()``, ``size`` x ``size``.
    size : int
        Side of the default image.
    amplitude, smoothness, weight : float
        Starting values of the sliders.
    interpolation : {"bilinear", "nearest"}
    seed : int
        Seed of the random field ("new field" adds one).
    grid_step, display_size, image_format
        As for :class:`SliceViewer`.
    """

    def __init__(self, image=None, *, size: int = 256, amplitude: float = 8.0,
                 smoothness: float = 16.0, weight: float = 0.0, interpolation: str = "bilinear",
                 seed: int = 0, grid_step: int | None = None, display_size: int = 320,
                 image_format: str = "jpeg"):
        if image is None:
            check_positive(size, "size", integer=True)
            image = _default_image(size)
        self.image = R.spatial_array(image, "image", ndim=2).astype(np.float32)
        check_choice(interpolation, ("bilinear", "nearest"), "interpolation")
        self.params = dict(amplitude=float(amplitude), smoothness=float(smoothness),
                           weight=float(weight), interpolation=interpolation, seed=int(seed))
        self.grid_step = grid_step if grid_step is not None else max(4, max(self.image.shape) // 16)
        self.image_format = check_choice(image_format, ("jpeg", "png"), "image_format")
        self.zoom = R.zoom_factor(self.image.shape, display_size)
        self._window = R.intensity_window(self.image)
        self._images = None
        self._unit_key = None
        self.update()

    def update(self, **params) -> dict:
        """Set parameters, recompute the field and the panels; returns the statistics."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"update: unknown parameters {sorted(unknown)}; "
                             f"expected some of {sorted(self.params)}")
        self.params.update(params)
        with R.one_thread():
            self._compute()
        if self._images is not None:
            for wimg, rgb in zip(self._images, self.panels.values()):
                wimg.value = R.encode(rgb, self.zoom, self.image_format)
            self._stats.value = self._stats_html()
        return self.stats

    def _compute(self) -> None:
        from .. import metrics
        from ..spatial import diffusion_fit, random_field, warp
        p = self.params
        check_choice(p["interpolation"], ("bilinear", "nearest"), "interpolation")
        # Both steps are linear in the amplitude: cache them at amplitude 1 and scale, so the
        # amplitude and interpolation controls skip the filtering and the fit.
        key = (p["smoothness"], p["seed"], p["weight"])
        if self._unit_key != key:
            points = [max(2, round((n - 1) / p["smoothness"]) + 1) for n in self.image.shape]
            unit = random_field(self.image.shape, 1.0, points, cubic=True, seed=p["seed"])
            unit /= unit.norm(dim=1).max()  # the amplitude slider sets the largest displacement
            self._unit = (unit, diffusion_fit(unit, p["weight"]) if p["weight"] > 0 else unit)
            self._unit_key = key
        raw, self.disp = (f * p["amplitude"] for f in self._unit)
        img = torch.from_numpy(self.image)[None, None]
        self.warped = warp(img, self.disp, mode=p["interpolation"])[0, 0].numpy()
        det = metrics.jacobian_determinant(self.disp)[0].numpy()
        stats = metrics.folding_stats(self.disp)
        # Lengths in numpy: torch's norm over the channel axis is slow on CPU (~20 ms here).
        u, change = self.disp[0].numpy(), (self.disp - raw)[0].numpy()
        self.stats = {"max |u|": float(np.sqrt((u ** 2).sum(0)).max()),
                      "% folded": float(stats["percent_folding"]),
                      "SDlogJ": float(stats["sdlogj"]),
                      "change from raw (RMS)": float(np.sqrt((change ** 2).sum(0).mean()))}
        warped_rgb = R.colorize(self.warped, *self._window)
        self.panels = {
            "warped image": warped_rgb,
            "deformation grid": np.where(R.warped_grid(self.disp, self.grid_step)[..., None],
                                         np.uint8(0), np.uint8(255)).repeat(3, -1),
            "Jacobian (yellow: folds)": R.jacobian_rgb(det),
        }

    def _stats_html(self) -> str:
        return " &nbsp;·&nbsp; ".join(f"{k}: <b>{v:.3g}</b>" for k, v in self.stats.items())

    def _build(self):
        import ipywidgets as W
        p = self.params
        style = {"description_width": "110px"}
        lay = W.Layout(width="380px")
        controls = {
            "amplitude": W.FloatSlider(value=p["amplitude"], min=0, max=30, step=0.5, style=style,
                                       description="amplitude (px)", layout=lay),
            "smoothness": W.FloatSlider(value=p["smoothness"], min=2, max=64, step=1, style=style,
                                        description="smoothness (px)", layout=lay),
            "weight": W.FloatLogSlider(value=max(p["weight"], 1e-2), min=-2, max=4, step=0.1,
                                       base=10, style=style, description="regularisation λ",
                                       layout=lay),
            "interpolation": W.ToggleButtons(options=["bilinear", "nearest"], style=style,
                                             value=p["interpolation"], description="interpolation"),
        }
        for name, c in controls.items():
            c.observe(lambda ch, name=name: self.update(**{name: ch["new"]}), names="value")
        new = W.Button(description="new random field")
        new.on_click(lambda _: self.update(seed=self.params["seed"] + 1))
        self._images = [W.Image(format=self.image_format) for _ in self.panels]
        self._stats = W.HTML()
        self.update()  # fills the new panels
        titles = [W.VBox([W.HTML(f"<b>{t}</b>"), im]) for t, im in zip(self.panels, self._images)]
        return W.VBox([W.HBox([W.VBox(list(controls.values())[:2]),
                               W.VBox(list(controls.values())[2:] + [new])]),
                       self._stats, W.HBox(titles)])

    def figure(self):
        """The current state as a static matplotlib Figure."""
        fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), layout="constrained")
        plt.close(fig)
        for ax, (title, rgb) in zip(axes, self.panels.items()):
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        jacobian = [t.startswith("Jacobian") for t in self.panels].index(True)
        R.colorbar(fig, axes[jacobian], "coolwarm", 0.0, 2.0, R.JACOBIAN_LABEL, shrink=0.8)
        p = self.params
        fig.suptitle(f"amplitude {p['amplitude']:g} px, smoothness {p['smoothness']:g}, "
                     f"λ {p['weight']:g}, {p['interpolation']}  |  "
                     + ", ".join(f"{k} {v:.3g}" for k, v in self.stats.items()), fontsize=9)
        return fig


class InteractiveFigure(_Viewer):
    """A figure-drawing function with ipywidgets controls, which static front ends still show.

    ``ipywidgets.interact`` draws into an Output widget, which nbconvert, nbval
    and notebook viewers on the web leave empty. This viewer follows the rule
    of the others: the live widget redraws the figure when a control moves,
    and a static view shows the PNG of the figure at the controls' values.

    Parameters
    ----------
    draw : callable
        ``draw(**values) -> matplotlib.figure.Figure``, one keyword per control;
        the figure is closed after each call, so ``draw`` may use pyplot freely.
    **controls : ipywidgets ValueWidget
        Name -> control (e.g. ``IntSlider``); its ``value`` is passed to ``draw``.

    Examples
    --------
    >>> import ipywidgets as widgets, matplotlib.pyplot as plt
    >>> def draw(n):
    ...     fig, ax = plt.subplots()
    ...     ax.plot(range(n))
    ...     return fig
    >>> view = InteractiveFigure(draw, n=widgets.IntSlider(5, 1, 10))
    >>> len(view.figure().axes[0].lines[0].get_xdata())
    5
    """

    def __init__(self, draw, **controls):
        if not callable(draw):
            raise TypeError(f"draw: expected a function returning a matplotlib Figure, got {type(draw).__name__}")
        if not controls:
            raise ValueError("controls: expected at least one name=widget (e.g. row=IntSlider(...))")
        for name, c in controls.items():
            if not hasattr(c, "value") or not hasattr(c, "observe"):
                raise TypeError(f"{name}: expected an ipywidgets control with a value (e.g. IntSlider), "
                                f"got {type(c).__name__}")
        self.draw, self.controls = draw, dict(controls)
        self._out = None

    @property
    def values(self) -> dict:
        """The controls' current values, as ``draw`` receives them."""
        return {name: c.value for name, c in self.controls.items()}

    def figure(self):
        """The figure at the controls' current values (closed: display it to show it)."""
        fig = self.draw(**self.values)
        if not isinstance(fig, plt.Figure):
            raise TypeError(f"draw: must return a matplotlib Figure, got {type(fig).__name__}")
        plt.close(fig)
        return fig

    def _redraw(self, change=None) -> None:
        from IPython.display import display
        with self._out:
            self._out.clear_output(wait=True)
            display(self.figure())

    def _build(self):
        import ipywidgets as W
        self._out = W.Output()
        for c in self.controls.values():
            c.observe(self._redraw, names="value")
        self._redraw()
        return W.VBox([W.HBox(list(self.controls.values())), self._out])
