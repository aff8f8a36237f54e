"""Seeing registration: static figures and ipywidgets viewers.

Static figures (each returns a matplotlib Figure; inputs are numpy arrays or
tensors shaped (H, W), (D, H, W) or with leading (1, 1) axes; volumes are
shown on one slice, the centre by default):

- :func:`plot_pair`, :func:`plot_overlay`, :func:`plot_checkerboard`,
  :func:`plot_difference`: compare fixed with moving (and warped);
- :func:`plot_grid`, :func:`plot_field`, :func:`plot_jacobian`: the deformation;
- :func:`plot_landmarks`: landmarks and TRE arrows;
- :func:`plot_dice`, :func:`plot_history`, :func:`plot_fire_curves`,
  :func:`plot_slices`: results (per-structure Dice bars, training curves,
  FIRE success curves, the three orthogonal slices at [80, 96, 112]);
- :func:`plot_fusion`: the best single atlas and a fused segmentation, side by side.

Viewers (ipywidgets only; display them, or call ``.show()``):

- :class:`SliceViewer`: three orthogonal views of a 3D registration with a
  slider each, a layer menu per row, and rows linked to the same slices;
- :class:`DeformationPlayground`: amplitude, smoothness, regularisation and
  interpolation of a 2D warp, with the warped image, grid and Jacobian;
- :class:`InteractiveFigure`: any figure-drawing function with sliders (what
  ``ipywidgets.interact`` does, but static front ends still show the figure).

Without a widget front end (nbval, nbconvert, a script) the viewers fall back
to a static picture of their current view; see :mod:`regedu.viz._viewers`.

Convention: arrays are shown as stored (rows down, columns right, no flips);
displacements follow docs/conventions.md (voxels, tensor-axis channels, pull warping).
"""
from ._figures import (plot_checkerboard, plot_dice, plot_difference, plot_field,
                       plot_fire_curves, plot_grid, plot_history, plot_jacobian, plot_landmarks,
                       plot_fusion, plot_overlay, plot_pair, plot_slices)
from ._render import default_index
from ._viewers import LAYERS, DeformationPlayground, InteractiveFigure, SliceViewer

__all__ = ["plot_pair", "plot_overlay", "plot_checkerboard", "plot_difference", "plot_grid",
           "plot_field", "plot_jacobian", "plot_landmarks", "plot_dice", "plot_history",
           "plot_fire_curves", "plot_slices", "plot_fusion", "default_index",
           "SliceViewer", "DeformationPlayground", "InteractiveFigure", "LAYERS"]
