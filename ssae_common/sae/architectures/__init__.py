"""The SAE architectures, one module each behind this registry (name -> module).

Everything that differs between architectures lives in its module, as one `Architecture` (base.py):
the extra tensors, the inference and training encodes, the sparsity penalty or constraint, the per-step
hooks, the options it reads and their checks and defaults, and its names in the other libraries' files.
Adding an architecture is one module plus its line here.  This file imports nothing heavy, so the names
are known to `ssae-fit --help`; `get` imports a module (and torch) on first use.
"""
from __future__ import annotations

import importlib

MODULES = {
    "relu": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
    "matryoshka-batchtopk": "matryoshka",
}
NAMES = tuple(MODULES)


def get(name: str):
    """The registered Architecture called `name` (KeyError for another name: callers check NAMES first)."""
    return importlib.import_module(f"{__name__}.{MODULES[name]}").ARCHITECTURE


def every():
    """Every registered Architecture, in registration order."""
    return [get(name) for name in NAMES]
