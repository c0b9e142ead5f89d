"""Latent explanations: contexts from activation files, LM explainers and scorers, the feature browser.

`ExplainConfig` is light to import; `explain` (the stage) loads the heavy modules when first used."""
from .config import ContextConfig, ExplainConfig

__all__ = ["ContextConfig", "ExplainConfig", "explain"]


def __getattr__(name):
    if name == "explain":
        from .stage import explain

        return explain
    raise AttributeError(name)
