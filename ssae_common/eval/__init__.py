"""Evaluation of SAEs: `EvalConfig` (the options), `evaluate_saes` (the stage), `metrics_artifact`."""
from .config import EvalConfig

__all__ = ["EvalConfig", "evaluate_saes", "metrics_artifact"]


def __getattr__(name):
    if name in ("evaluate_saes", "metrics_artifact"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)
