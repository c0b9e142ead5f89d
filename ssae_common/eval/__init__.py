"""Evaluation of SAEs: `EvalConfig` (the options), `evaluate` (the stage), `metrics_artifact`."""
from .config import EvalConfig

__all__ = ["EvalConfig", "evaluate", "metrics_artifact"]


def __getattr__(name):
    if name in ("evaluate", "metrics_artifact"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)
