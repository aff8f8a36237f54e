"""regedu.viz: figures show the right data, viewers redraw, fallbacks work without a front end."""
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from regedu import metrics, spatial, viz
from regedu.spatial import warp
from regedu.viz import _render as R


@pytest.fixture(scope="module")
def vol():
    # A smooth blob volume with structure along every axis.
    z, y, x = np.mgrid[0:20, 0:24, 0:28].astype(np.float32)
    return np.sin(z / 3) + np.cos(y / 4) + np.sin(x / 5)


@pytest.fixture(scope="module")
def img():
    y, x = np.mgrid[0:32, 0:40].astype(np.float32)
    return np.sin(y / 3) * np.cos(x / 4)


def _translation(shape, shift):
    u = torch.zeros(1, len(shape), *shape)
    for k, s in enumerate(shift):
        u[:, k] = s
    return u


def _images(fig):
    return [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]


# --- input handling -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 40), (1, 1, 32, 40), (20, 24, 28), (1, 1, 20, 24, 28)])
def test_spatial_array_accepts_images_and_volumes(shape):
    a = R.spatial_array(torch.zeros(shape), "fixed")
    assert a.shape == shape[-3:] if len(shape) in (3, 5) else a.shape == shape[-2:]


def test_spatial_array_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"moving: expected one single-channel image .* \(2, 1, 8, 8\)"):
        R.spatial_array(np.zeros((2, 1, 8, 8)), "moving")
    with pytest.raises(ValueError, match="warped: expected a 3D volume"):
        R.spatial_array(np.zeros((8, 8)), "warped", ndim=3)
    with pytest.raises(TypeError, match="fixed: expected a numpy array or torch.Tensor, got a list"):
        R.spatial_array([[0.0]], "fixed")


def test_default_index_is_the_papers_slices_at_full_size():
    assert viz.default_index((160, 192, 224)) == [80, 96, 112]
    assert viz.default_index((80, 96, 112)) == [40, 48, 56]


# --- static figures -------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [viz.plot_pair, viz.plot_overlay, viz.plot_checkerboard,
                                viz.plot_difference])
def test_comparison_figures_2d_and_3d(fn, img, vol):
    for a in (img, torch.from_numpy(vol)[None, None]):
        fig = fn(a, a + 0.5, a)
        assert isinstance(fig, Figure)
        assert len(_images(fig)) == (3 if fn is viz.plot_pair else 2)


def test_pair_shows_the_requested_slice(vol):
    fig = viz.plot_pair(vol, vol * 2, axis=2, index=5)
    shown = _images(fig)
    np.testing.assert_array_equal(shown[0], vol[:, :, 5])
    np.testing.assert_array_equal(shown[1], 2 * vol[:, :, 5])
    assert "axis 2 = 5" in fig.axes[0].get_title()


def test_difference_is_signed_and_checkerboard_alternates(img):
    fig = viz.plot_difference(img, img + 1.0)
    np.testing.assert_allclose(_images(fig)[0], np.ones_like(img))
    board = _images(viz.plot_checkerboard(img, img + 1.0, tile=4))[0]
    assert board[0, 0] == img[0, 0] and board[0, 4] == img[0, 4] + 1.0


def test_errors_are_clear(img, vol):
    with pytest.raises(ValueError, match="fixed and moving must have the same shape"):
        viz.plot_pair(img, img[:10])
    with pytest.raises(ValueError, match=r"index: expected a slice in \[0, 19\] along axis 0"):
        viz.plot_pair(vol, vol, index=20)
    with pytest.raises(ValueError, match="kind: expected one of"):
        viz.plot_field(torch.zeros(1, 2, 8, 8), kind="quiver")


def test_warped_grid_moves_with_the_warped_content():
    # u = +3 along columns samples 3 columns to the right: content moves 3 left, and so do the
    # grid lines (the same pixels warp() gives for a grid image shifted by whole voxels).
    u = _translation((16, 32), (0.0, 3.0))
    lines = R.warped_grid(u, 8)
    grid = torch.zeros(1, 1, 16, 32)
    grid[..., 4::8] = 1  # vertical lines of the moving grid, at step // 2 + j * step
    expected = warp(grid, u)[0, 0].numpy()
    cols = np.flatnonzero(lines[8])
    np.testing.assert_array_equal(cols, [1, 9, 17, 25])
    np.testing.assert_array_equal(cols, np.flatnonzero(expected[8] == 1))
    assert not R.warped_grid(torch.zeros(1, 2, 16, 32), 8)[8, 3]  # identity: lines at 4, 12, ...
    assert R.warped_grid(torch.zeros(1, 2, 16, 32), 8)[8, 4]


def test_plot_grid_draws_contours_of_phi(img):
    fig = viz.plot_grid(_translation(img.shape, (0.0, 2.0)), img, step=8)
    ax = fig.axes[0]
    assert len(ax.collections) == 2  # one contour set per axis
    levels = ax.collections[1].levels
    np.testing.assert_array_equal(levels, np.arange(4, 40, 8))


def test_plot_field_arrows_point_to_x_plus_u():
    u = _translation((20, 20), (2.0, -1.0))
    fig = viz.plot_field(u, kind="arrows", step=5)
    q = fig.axes[0].collections[0]
    np.testing.assert_allclose(q.U, -1.0)  # column component drawn along x
    np.testing.assert_allclose(q.V, 2.0)   # row component along (downward) y
    assert q.scale == 1 and q.scale_units == "xy"


def test_plot_field_colour_and_3d_slice(vol):
    u = torch.zeros(1, 3, *vol.shape)
    u[:, 1] = 1.5
    fig = viz.plot_field(u, kind="color", axis=0)
    assert "max |u| = 1.5" in fig.axes[0].get_title()


def test_plot_jacobian_marks_folds():
    # u = -2 x along columns: phi = -x, det = -1 everywhere: every pixel folds.
    u = torch.zeros(1, 2, 8, 8)
    u[:, 1] = -2 * torch.arange(8.0)
    fig = viz.plot_jacobian(u)
    assert "64 folded voxels here" in fig.axes[0].get_title()
    assert "100% of all" in fig.axes[0].get_title()


def test_plot_landmarks_reports_tre(img):
    fixed_pts = torch.tensor([[5.0, 5.0], [10.0, 20.0], [20.0, 30.0]])
    moving_pts = fixed_pts + torch.tensor([2.0, 1.0])
    title = viz.plot_landmarks(img, img, fixed_pts, moving_pts).axes[1].get_title()
    assert f"mean {np.sqrt(5):.3g}" in title
    u = _translation(img.shape, (2.0, 1.0))
    title = viz.plot_landmarks(img, img, fixed_pts, moving_pts, u).axes[1].get_title()
    assert "mean 0," in title


def test_plot_dice_bars_have_the_values():
    a = np.array([[0, 2, 2], [3, 3, 4]])
    r = metrics.dice(a, a, [2, 3, 4])
    per_pair = np.array([[0.5, 0.6, 0.7], [0.7, 0.8, 0.9]])
    fig = viz.plot_dice({"ideal": r, "net": per_pair}, labels=[2, 3, 4])
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [1, 1, 1, 0.6, 0.7, 0.8])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["L cerebral WM", "L cerebral cortex",
                                                            "L lateral ventricle"]
    with pytest.raises(ValueError, match="labels: needed"):
        viz.plot_dice({"net": per_pair})


def test_plot_history_groups_validation_with_training():
    hist = {"epoch": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "val_loss": [3.5, 2.5, 2.0], "dice": [.1, .2, .3]}
    fig = viz.plot_history(hist)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loss", "dice"]
    assert [ln.get_label() for ln in visible[0].lines] == ["training", "validation"]
    np.testing.assert_array_equal(visible[0].lines[1].get_ydata(), [3.5, 2.5, 2.0])
    rows = [{"loss": 1.0}, {"loss": 0.5}]
    assert len(viz.plot_history(rows).axes[0].lines) == 1


def _trainer_history():
    # The layout regedu.train.fit returns: validation every few steps, on its own step list.
    return {"train": {"step": [1, 2, 3, 4], "loss": [4.0, 3.0, 2.0, 1.0], "ncc": [-.1, -.2, -.3, -.4]},
            "val": {"step": [2, 4], "loss": [2.5, 1.5], "dice": [0.5, 0.6],
                    "percent_folding": [0.0, 0.1]}}


def test_plot_history_reads_the_trainers_nested_history():
    hist = _trainer_history()
    fig = viz.plot_history(hist, smooth=2)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loss", "ncc", "dice", "percent_folding"]
    val = [ln for ln in visible[0].lines if ln.get_label() == "validation"][0]
    np.testing.assert_array_equal(val.get_xdata(), [2, 4])  # validation on its own steps
    smoothed = [ln for ln in visible[0].lines if ln.get_label().startswith("training")][0]
    np.testing.assert_allclose(smoothed.get_ydata(), [3.5, 2.5, 1.5])
    with pytest.raises(ValueError, match="keys: 'psnr' is not in history"):
        viz.plot_history(hist, keys=["psnr"])


def test_plot_history_draws_validation_beside_training_with_markers():
    ax = viz.plot_history(_trainer_history(), keys=["loss"]).axes[0]
    labelled = {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}
    assert set(labelled) == {"training", "validation"}
    val = labelled["validation"]
    assert val.get_marker() not in (None, "None", "", " ")  # a point at every validation step
    np.testing.assert_array_equal(val.get_xdata(), [2, 4])
    np.testing.assert_array_equal(val.get_ydata(), [2.5, 1.5])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training", "validation"]


def test_plot_history_without_validation_draws_training_only():
    hist = {"train": {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0]}, "val": {"step": []}}
    fig = viz.plot_history(hist)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loss"]
    assert [ln.get_label() for ln in visible[0].lines] == ["training"]


def test_plot_fire_curves_match_the_metric():
    errors = {"S": [0.5, 3.0, 30.0], "P": [12.0, None]}
    fig = viz.plot_fire_curves(errors)
    lines = fig.axes[0].lines
    assert len(lines) == 3  # S, P and all
    _, expected = metrics.fire_success_curve(errors["S"])
    np.testing.assert_allclose(lines[0].get_ydata(), expected)
    assert f"AUC {metrics.fire_auc(errors['S']):.3f}" in lines[0].get_label()


def test_plot_slices_three_views_per_volume(vol):
    fig = viz.plot_slices({"fixed": vol, "moving": vol + 1})
    shown = _images(fig)
    assert len(shown) == 6
    np.testing.assert_array_equal(shown[1], vol[:, 12])
    np.testing.assert_array_equal(shown[5], vol[:, :, 14] + 1)


# --- every scale and axis is labelled -------------------------------------------------------

def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _folding_field():
    u = torch.zeros(1, 2, 16, 16)
    u[:, 1] = 3 * torch.sin(torch.arange(16.0) / 2)
    return u


@pytest.mark.parametrize("make", [
    lambda img: viz.plot_difference(img, img + 0.5, img),
    lambda img: viz.plot_jacobian(_folding_field()),
    lambda img: viz.plot_field(_folding_field(), kind="color"),
    lambda img: viz.plot_field(_folding_field(), kind="arrows"),
    lambda img: viz.plot_landmarks(img, img, torch.tensor([[5.0, 5.0], [10.0, 20.0]]),
                                   torch.tensor([[6.0, 5.0], [10.0, 23.0]])),
], ids=["difference", "jacobian", "field-colour", "field-arrows", "landmarks"])
def test_scalar_maps_have_a_labelled_colour_bar(make, img):
    bars = _colorbars(make(img))
    assert len(bars) == 1
    assert bars[0].get_ylabel().strip(), "the colour bar needs a label saying what the colours measure"


def test_jacobian_colour_bar_spans_the_map_and_names_the_folds():
    fig = viz.plot_jacobian(_folding_field())
    bar = _colorbars(fig)[0]
    assert bar.get_ylim() == (0.0, 2.0)
    assert "det J" in bar.get_ylabel() and "fold" in bar.get_ylabel()


def test_viewer_static_figures_label_their_scalar_rows(vol):
    u = torch.zeros(1, 3, *vol.shape)
    u[:, 2] = 2.0
    v = viz.SliceViewer(vol, vol + 0.3, disp=u, rows=["fixed", "difference", "jacobian"])
    labels = [ax.get_ylabel() for ax in _colorbars(v.figure())]
    assert len(labels) == 2 and any("difference" in t for t in labels) and any("det J" in t for t in labels)
    p = viz.DeformationPlayground(np.asarray(vol[0]), amplitude=2.0)
    assert [("det J" in ax.get_ylabel()) for ax in _colorbars(p.figure())] == [True]


def _plots(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


@pytest.mark.parametrize("make", [
    lambda: viz.plot_history(_trainer_history()),
    lambda: viz.plot_history({"epoch": [1, 2], "loss": [2.0, 1.0], "val_loss": [2.5, 1.5]}),
    lambda: viz.plot_fire_curves({"S": [0.5, 3.0], "P": [12.0]}),
    lambda: viz.plot_dice({"net": np.array([0.5, 0.6, 0.7])}, labels=[2, 3, 4]),
], ids=["trainer-history", "flat-history", "fire", "dice"])
def test_curves_label_both_axes(make):
    for ax in _plots(make()):
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), f"panel {ax.get_title()!r}"


# --- viewers -------------------------------------------------------------------------------

def _viewer(vol):
    labels = (vol > 0.5).astype(np.int64) + (vol > 1.5)
    u = torch.zeros(1, 3, *vol.shape)
    u[:, 2] = 2.0
    warped = warp(torch.from_numpy(vol)[None, None], u)[0, 0].numpy()
    return viz.SliceViewer(vol, vol + 0.3, warped, disp=u, fixed_labels=labels,
                           warped_labels=labels[:, :, ::-1].copy())


def test_slice_viewer_layers_and_defaults(vol):
    v = _viewer(vol)
    assert v.index == [10, 12, 14] and v.rows == ["fixed", "moving", "warped"]
    assert v.available == list(viz.LAYERS)
    sizes = {0: (24, 28), 1: (20, 28), 2: (20, 24)}
    for layer in viz.LAYERS:
        for k in range(3):
            rgb = v.render(layer, k)
            assert rgb.dtype == np.uint8 and rgb.shape == (*sizes[k], 3)
    # One intensity scale: fixed rendered as grey, the crosshair tinted.
    v.crosshair = False
    g = v.render("fixed", 0)
    lo, hi = v._window
    np.testing.assert_array_equal(g[..., 0], R.colorize(vol[10], lo, hi)[..., 0])


def test_slice_viewer_missing_inputs_are_explained(vol):
    v = viz.SliceViewer(vol)
    assert v.available == ["fixed"]
    with pytest.raises(ValueError, match=r"layer 'jacobian' needs a displacement field \(disp=...\)"):
        viz.SliceViewer(vol, rows=["jacobian"])
    with pytest.raises(ValueError, match="moving: expected shape"):
        viz.SliceViewer(vol, vol[:10])


def test_slice_viewer_jacobian_shows_folds_in_yellow():
    n = 8
    u = torch.zeros(1, 3, n, n, n)
    u[:, 2] = -2 * torch.arange(float(n))  # det = -1 everywhere
    v = viz.SliceViewer(np.zeros((n, n, n), np.float32), disp=u, crosshair=False, rows=["jacobian"])
    assert (v.render("jacobian", 0) == R.FOLD_RGB).all()


def test_slice_viewer_widget_links_rows_and_redraws(vol):
    v = _viewer(vol)
    w = v.widget
    assert len(v._sliders) == 3 and len(v._images) == 3 and len(v._menus) == 3
    assert [s.value for s in v._sliders] == [10, 12, 14]
    before = [[im.value for im in row] for row in v._images]
    v._sliders[0].value = 3  # as the browser would
    assert v.index[0] == 3
    after = [[im.value for im in row] for row in v._images]
    for r in range(3):  # every row follows the one slider
        assert after[r][0] != before[r][0]
    v._menus[1].value = "jacobian"
    assert v.rows[1] == "jacobian" and v._images[1][0].value != after[1][0]
    assert w is v.widget


def test_viewer_fallbacks_without_front_end(vol):
    v = _viewer(vol)
    assert isinstance(v.show(), Figure)  # no kernel: a static figure
    bundle = v._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    fig = v.figure()
    assert len(_images(fig)) == 9
    np.testing.assert_array_equal(_images(fig)[4], v.render("moving", 1))


def test_label_colours_handle_any_label_values():
    a = np.array([[0, 2, 41], [1000, 41, 0]])
    c = R.LabelColours(a)
    np.testing.assert_array_equal(c.ranks(a), [[0, 1, 2], [3, 2, 0]])
    rgb = c.rgb(a)
    assert (rgb[0, 0] == 0).all() and (rgb[0, 2] == rgb[1, 1]).all() and (rgb[0, 1] != rgb[0, 2]).any()


def test_panels_encode_as_jpeg_or_png():
    rgb = np.zeros((4, 5, 3), np.uint8)
    assert R.encode(rgb, 2)[:2] == b"\xff\xd8"
    assert R.encode(rgb, 1, "png")[:4] == b"\x89PNG"


# --- playground -----------------------------------------------------------------------------

def test_diffusion_fit_solves_the_normal_equations():
    u = spatial.random_field((12, 10), 3.0, 6, seed=1)
    lam = 4.0
    v = spatial.diffusion_fit(u, lam).double()
    # (I + lam * L) v = u with L = sum_k D_k^T D_k (forward differences, mirrored border).
    # D^T d for d = D v along an axis: d[i - 1] - d[i], with d = 0 outside (Neumann border).
    F = torch.nn.functional
    Lv = torch.zeros_like(v)
    for before, after, dim in (((1, 0, 0, 0), (0, 1, 0, 0), 3), ((0, 0, 1, 0), (0, 0, 0, 1), 2)):
        d = torch.diff(v, dim=dim)
        Lv += F.pad(d, before) - F.pad(d, after)
    np.testing.assert_allclose((v + lam * Lv).numpy(), u.double().numpy(), atol=1e-5)
    const = torch.ones(1, 2, 6, 6) * 2.5
    np.testing.assert_allclose(spatial.diffusion_fit(const, 100.0).numpy(), const.numpy(), atol=1e-5)


def test_playground_regularisation_removes_folds(img):
    p = viz.DeformationPlayground(img, amplitude=10.0, smoothness=2.0)
    assert p.stats["% folded"] > 5
    assert p.update(weight=100.0)["% folded"] == 0.0
    assert p.stats["change from raw (RMS)"] > 0
    assert set(p.panels) == {"warped image", "deformation grid", "Jacobian (yellow: folds)"}
    with pytest.raises(ValueError, match="unknown parameters"):
        p.update(sigma=3)


def test_playground_widget_redraws_and_falls_back(img):
    p = viz.DeformationPlayground(img, amplitude=2.0)
    w = p.widget
    first = [im.value for im in p._images]
    assert all(first)
    p.update(interpolation="nearest")
    assert p._images[0].value != first[0] and p._images[2].value == first[2]
    assert isinstance(p.show(), Figure)
    assert w is p.widget


def test_playground_default_image_is_the_retina():
    p = viz.DeformationPlayground(size=64, amplitude=1.0)
    assert p.image.shape == (64, 64) and 0.0 <= p.image.min() and p.image.max() <= 1.0


# --- interactive figures ---------------------------------------------------------------------

def _row_plot(row):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot(np.arange(4) * row)
    ax.set_xlabel("column")
    ax.set_ylabel("value")
    return fig


def test_interactive_figure_draws_at_the_controls_values_and_redraws():
    import ipywidgets as W
    import matplotlib.pyplot as plt
    slider = W.IntSlider(value=2, min=1, max=5)
    view = viz.InteractiveFigure(_row_plot, row=slider)
    np.testing.assert_array_equal(view.figure().axes[0].lines[0].get_ydata(), [0, 2, 4, 6])
    box = view.widget
    assert slider in box.children[0].children
    slider.value = 3  # as the browser would: the figure follows
    assert view.values == {"row": 3}
    np.testing.assert_array_equal(view.figure().axes[0].lines[0].get_ydata(), [0, 3, 6, 9])
    assert not plt.get_fignums(), "figures are closed after drawing: none piles up"


def test_interactive_figure_shows_without_a_widget_front_end():
    import ipywidgets as W
    view = viz.InteractiveFigure(_row_plot, row=W.IntSlider(value=2))
    bundle = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["image/png"][:8] == b"\x89PNG\r\n\x1a\n"  # what nbconvert and web viewers show
    assert isinstance(view.show(), Figure)


def test_interactive_figure_errors_are_clear():
    import ipywidgets as W
    with pytest.raises(ValueError, match="controls: expected at least one"):
        viz.InteractiveFigure(_row_plot)
    with pytest.raises(TypeError, match="row: expected an ipywidgets control"):
        viz.InteractiveFigure(_row_plot, row=3)
    with pytest.raises(TypeError, match="draw: must return a matplotlib Figure"):
        viz.InteractiveFigure(lambda row: None, row=W.IntSlider()).figure()
