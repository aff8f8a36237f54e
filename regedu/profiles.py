"""Profiles: one switch for the size of everything the course runs.

``REGEDU_PROFILE`` = ``ci`` (seconds per notebook, still learns measurably),
``cpu`` (Binder-sized: minutes and < 2 GB per notebook, real results) or
``gpu`` (paper scale: 160x192x224, many steps). Default: ``gpu`` when CUDA is
available, else ``cpu``. The library and the notebooks read :func:`get_profile`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ._checks import check_choice

__all__ = ["Profile", "PROFILES", "get_profile", "set_profile"]


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets for one profile; ``device`` is filled in at selection."""
    name: str
    fundus_size: int            # side of the 2D fundus images, pixels
    brain_shape: tuple          # (D, H, W) of the 3D brain volumes
    brain_spacing_mm: float     # voxel size of those volumes
    steps_2d: int               # optimiser steps for a 2D training run
    steps_3d: int               # optimiser steps for a 3D training run
    n_train_pairs: int          # pairs drawn for training
    n_test_pairs: int           # pairs held out for evaluation
    amp: bool                   # mixed precision (CUDA only)
    train_spacing_mm: float     # voxel size the notebooks' 3D networks train at (their checkpoints': 4 mm)
    paper_scale: bool           # the papers' network widths and learning rate (else half widths, 1e-3)
    device: str = "cpu"

    @property
    def slices(self) -> tuple:
        """Default slices for viewers: [80, 96, 112] at 160x192x224, scaled otherwise."""
        return tuple(int(round(n / 2)) for n in self.brain_shape)


PROFILES = {
    "ci": Profile("ci", 128, (40, 48, 56), 4.0, 150, 40, 8, 4, False, 4.0, False),
    "cpu": Profile("cpu", 256, (80, 96, 112), 2.0, 1500, 400, 40, 10, False, 4.0, False),
    "gpu": Profile("gpu", 512, (160, 192, 224), 1.0, 6000, 6000, 200, 20, True, 1.0, True),
}

_override: str | None = None


def set_profile(name: str | None) -> Profile:
    """Choose the profile for this process (``None`` goes back to the default)."""
    global _override
    if name is not None:
        check_choice(name, tuple(PROFILES), "name")
    _override = name
    return get_profile()


def get_profile() -> Profile:
    """The active profile: :func:`set_profile`, else ``REGEDU_PROFILE``, else by hardware."""
    cuda = torch.cuda.is_available()
    name = _override or os.environ.get("REGEDU_PROFILE") or ("gpu" if cuda else "cpu")
    if name not in PROFILES:
        raise ValueError(f"REGEDU_PROFILE: expected one of {', '.join(PROFILES)}, got {name!r}")
    return dataclasses.replace(PROFILES[name], device="cuda" if cuda else "cpu")
