"""Documents -> activations: language models, the harvest, activation files.

`HarvestConfig` is light; `harvest` and `merge` (the stage, see data.stage) load the heavy modules when
first used."""
from .config import HarvestConfig

__all__ = ["HarvestConfig", "harvest", "merge"]


def __getattr__(name):
    if name in ("harvest", "merge"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)
