"""regedu: deep-learning medical image registration, taught by doing it.

Submodules load on first use (``regedu.spatial``, ``regedu.losses``, ...), so
``import regedu`` stays fast in a notebook's first cell.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("spatial", "losses", "metrics", "profiles", "datasets", "nets", "train", "checkpoints",
               "classic", "evaluate", "viz", "cli", "exercises", "fiducials", "stats", "fusion",
               "adversarial", "agents", "augment", "joint", "supervised")
__all__ = list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'regedu' has no attribute {name!r}")


def __dir__():
    return __all__
