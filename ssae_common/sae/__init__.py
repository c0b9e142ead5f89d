"""Sparse autoencoders: the model (SAE), training by ERM or tilted ERM (FitConfig, fit), imports of
other libraries' SAEs.  Importing the package is light: `fit` and `SAE` (torch) load on first use."""
from .config import FitConfig

__all__ = ["FitConfig", "fit", "fit_sweep", "SAE"]


def __getattr__(name):
    if name in ("fit", "fit_sweep"):
        from . import stage
        return getattr(stage, name)
    if name == "SAE":
        from .autoencoder import SAE
        return SAE
    raise AttributeError(name)
