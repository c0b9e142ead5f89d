"""The ssae-harvest stage from Python: documents -> an activation file, and shard files -> one file.

    from ssae_common.core.runtime import RunContext
    from ssae_common.data import HarvestConfig, harvest
    record = harvest(HarvestConfig(layer=3), ["docs.jsonl"], out="acts.h5", context=RunContext(device_spec="cpu"))
"""
from __future__ import annotations

import json
import logging
import os

from .activations import ActivationStore, activation_artifact, merge_shards, store_fingerprint
from .composition import merge_compositions
from .config import HarvestConfig
from .harvester import document_lengths, harvest_activations, spread_cap
from .models import check_hook_name, load_model, model_identity, resolve_model_dtype
from ..core.config import ConfigError, hashed_values, replace
from ..core.errors import BadInput
from ..core.outputs import atomic_file, check_target, exclusive, existing_output, workdir
from ..core.provenance import config_hash, created_by, input_fingerprint
from ..core.records import count_docs, follow_doc_artifacts, iter_docs, resolve_artifacts, spool_stdin, stdin_is_terminal
from ..core.runtime import RunContext

log = logging.getLogger("ssae")


def harvest(config: HarvestConfig, docs: list[str], *, out: str | None = None,
            context: RunContext | None = None) -> dict:
    """Run `docs` (paths, hf:NAME[:SPLIT], or "-" / nothing for stdin; an `ssae.artifact/1` record of
    kind `docs`, or a file of them, stands for the documents file it points to) through the config's
    model and store the activations at its hook in `out` (default: under $SSAE_WORKDIR, named by a hash
    of the inputs and resolved configuration, and reused when already there).  Returns the artifact
    record."""
    context = context or RunContext()
    config = config.resolve()
    check_hook_name(config.model, config.hook)  # before any input is read
    inputs = list(docs) or ["-"]
    if config.spread and any(p.startswith("hf:") for p in inputs):
        raise ConfigError("spread", None, "reads the inputs twice: not for hf: streams")
    spooled = None
    if "-" in inputs:
        if stdin_is_terminal():
            raise BadInput("no input: give document paths or pipe documents on stdin")
        # a file: its hash names the default output, and it is read twice (checked, then harvested)
        spooled = spool_stdin(os.path.join(workdir(), "tmp"))
        inputs = [spooled if p == "-" else p for p in inputs]
    try:
        inputs = follow_doc_artifacts(inputs)
        model_dtype = resolve_model_dtype(config.model_dtype, context.device, config.model)
        resolved = context.resolved(**hashed_values(
            config, model=model_identity(config.model), model_dtype=model_dtype,
            # stdin is named by its bytes' hash (never by the spool's per-process name), so that an
            # identical pipe reuses the output and an interrupted one resumes it
            inputs=[{"path": "-" if p == spooled else p, "sha256": input_fingerprint(p)}
                    for p in inputs if p != "-"]))
        if out is None:
            out, reuse = existing_output("activations", config_hash(resolved), ".h5", force=context.force)
            if reuse:
                return activation_artifact(out)
        # everything that can be refused is checked before the model loads (seconds to minutes)
        check_target(out, context.force)
        with exclusive(out):
            n_docs = count_docs(inputs, config.text_field)
            if n_docs == 0:
                raise BadInput(f"{', '.join('<stdin>' if p == spooled else p for p in inputs)}: no documents")
            if n_docs is not None:
                log.info("%d document(s) to harvest", n_docs)
            lm = load_model(config.model, device=context.device, model_dtype=model_dtype, prepend_bos=config.bos)
            hook_module = lm.check_hook(config.hook)
            if config.spread:
                config = _spread(lm, config, inputs)
            attrs = {"model": lm.name, "hook": config.hook, "hook_module": hook_module,
                     "hook_shape": list(lm.hook_shape(config.hook)), "model_dtype": lm.model_dtype,
                     "prepend_bos": lm.prepends_bos, "context_size": config.context_size,
                     "dtype": config.dtype, "bos_dropped": bool(config.drop_bos and lm.prepends_bos),
                     "config": resolved, "created_by": created_by(context.program),
                     "store_text": config.store_text, "shard": config.shard, "seed": context.seed}
            return harvest_activations(lm, iter_docs(inputs, config.text_field), out, config, attrs,
                                       force=context.force, quiet=context.quiet, locked=True)
    finally:
        if spooled:
            os.remove(spooled)


def _spread(lm, config: HarvestConfig, inputs: list[str]) -> HarvestConfig:
    """The config with its per-document cap lowered so that max_tokens reaches every input document."""
    lengths = document_lengths(lm, iter_docs(inputs, config.text_field), config)
    bos_rows = lm.prepends_bos and not config.drop_bos
    window = config.context_size - (1 if lm.prepends_bos else 0)
    cap = spread_cap(lengths, config.max_tokens, config.max_tokens_per_doc, window, bos_rows)
    fits = cap == config.max_tokens_per_doc  # the budget reaches every document without a lower cap
    log.info("spread: %d documents of %d tokens in all; %s", len(lengths), sum(lengths),
             "all fit within the budget" if fits else f"each cut at {cap} tokens")
    if cap == 1 and len(lengths) > config.max_tokens:
        log.warning("spread: %d documents, more than --max-tokens %d: the last ones are left out",
                    len(lengths), config.max_tokens)
    return replace(config, max_tokens_per_doc=cap)


def merge(shards: list[str], *, out: str | None = None, context: RunContext | None = None) -> dict:
    """Merge the outputs of a sharded harvest (paths, or artifact records on stdin for "-" / nothing) into
    input order: what one unsharded run stores.  Returns the artifact record."""
    context = context or RunContext()
    paths = resolve_artifacts(shards, "activations")
    if out is None:
        resolved = context.resolved(merge=[{"path": p, "fingerprint": store_fingerprint(p)} for p in paths])
        out, reuse = existing_output("activations", config_hash(resolved), ".h5", force=context.force)
        if reuse:
            return activation_artifact(out)
    attrs = {"created_by": created_by(context.program)}
    compositions = [_composition(p) for p in paths]
    if all(compositions):
        attrs["composition"] = merge_compositions(compositions)
    with exclusive(out), atomic_file(out, force=context.force, suffix=".h5") as tmp:
        n_tokens, n_docs = merge_shards(paths, tmp, attrs)
    log.info("merged %d shards into %s: %d tokens, %d documents", len(paths), out, n_tokens, n_docs)
    return activation_artifact(out)


def _composition(path: str) -> dict | None:
    """A shard's composition (None for a file written before compositions were counted)."""
    with ActivationStore(path) as store:
        value = store.f.attrs.get("composition")
    return json.loads(value) if value else None
