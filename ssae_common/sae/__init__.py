"""Sparse autoencoders: the model (SAE), training by ERM or tilted ERM (FitConfig, fit), imports of
other libraries' SAEs.  Importing the package is light: `fit` and `SAE` (torch) load on first use."""
from .config import FitConfig

__all__ = ["FitConfig", "fit", "SAE"]


def __getattr__(name):
    if name == "fit":
        from .stage import fit
        return fit
    if name == "SAE":
        from .autoencoder import SAE
        return SAE
    raise AttributeError(name)
