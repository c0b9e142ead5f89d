"""Retrieval of subdomain documents: the stage's config (light) and its entry point (loaded on use)."""
from .config import RetrieveConfig


def __getattr__(name):
    if name in ("retrieve", "rank_documents", "write_retrieval", "Retrieval"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)


__all__ = ["RetrieveConfig", "Retrieval", "rank_documents", "retrieve", "write_retrieval"]
