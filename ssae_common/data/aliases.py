"""One table of model names: the short names SAE libraries record (SAELens and TransformerLens:
`gpt2-small`, `gemma-2-2b`, `pythia-70m-deduped`) -> the Hugging Face id the model loads from.

The table is ours below, extended by the alias file TransformerLens ships
(tools/model_registry/data/model_aliases.json) when the installed version has one; ours wins on a clash.
"""
from __future__ import annotations

import functools
import json
import os

# Hugging Face id -> the short names SAE releases use for it
MODEL_ALIASES = {
    "gpt2": ("gpt2-small",),
    "gpt2-medium": ("gpt2-medium",),
    "EleutherAI/pythia-70m": ("pythia-70m",),
    "EleutherAI/pythia-70m-deduped": ("pythia-70m-deduped",),
    "EleutherAI/pythia-160m-deduped": ("pythia-160m-deduped",),
    "EleutherAI/pythia-410m-deduped": ("pythia-410m-deduped",),
    "google/gemma-2b": ("gemma-2b",),
    "google/gemma-2b-it": ("gemma-2b-it",),
    "google/gemma-2-2b": ("gemma-2-2b",),
    "google/gemma-2-2b-it": ("gemma-2-2b-it",),
    "google/gemma-2-9b": ("gemma-2-9b",),
    "google/gemma-2-9b-it": ("gemma-2-9b-it",),
    "google/gemma-2-27b": ("gemma-2-27b",),
    "google/gemma-3-270m": ("gemma-3-270m",),
    "google/gemma-3-1b-pt": ("gemma-3-1b-pt", "gemma-3-1b"),
    "google/gemma-3-1b-it": ("gemma-3-1b-it",),
    "google/gemma-3-4b-pt": ("gemma-3-4b-pt", "gemma-3-4b"),
    "google/gemma-3-12b-pt": ("gemma-3-12b-pt", "gemma-3-12b"),
    "meta-llama/Llama-3.1-8B": ("llama-3.1-8b", "llama3.1-8b"),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-8b-instruct", "llama3.1-8b-it"),
    "meta-llama/Llama-3.2-1B": ("llama-3.2-1b",),
    "meta-llama/Meta-Llama-3-8B": ("llama-3-8b", "meta-llama-3-8b"),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama-3-8b-instruct", "meta-llama-3-8b-instruct"),
    "mistralai/Mistral-7B-v0.1": ("mistral-7b",),
    "mistralai/Mistral-7B-Instruct-v0.1": ("mistral-7b-instruct",),
    "Qwen/Qwen2.5-0.5B": ("qwen2.5-0.5b",),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2.5-7b-instruct",),
    "Qwen/Qwen3-0.6B": ("qwen3-0.6b",),
    "microsoft/Phi-3-mini-4k-instruct": ("phi-3",),
    "allenai/OLMo-2-0425-1B": ("olmo-2-1b",),
}


def _transformer_lens_aliases() -> dict[str, list[str]]:
    import importlib.util

    spec = importlib.util.find_spec("transformer_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = os.path.join(list(spec.submodule_search_locations)[0], "tools", "model_registry", "data",
                        "model_aliases.json")
    try:
        with open(path) as f:
            aliases = json.load(f).get("aliases", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in aliases.items() if isinstance(k, str) and isinstance(v, list)}


@functools.lru_cache(maxsize=1)
def alias_table() -> dict[str, str]:
    """Lower-cased short name (and Hugging Face id) -> Hugging Face id."""
    table = {}
    for hf, names in [*_transformer_lens_aliases().items(), *MODEL_ALIASES.items()]:
        for name in (hf, *names):
            if isinstance(name, str):
                table[name.lower()] = hf
    return table
