"""The retrieve stage from Python: seed documents -> ranked `ssae.doc/1` records from a corpus.

    first stage: per seed, a BM25 and/or dense ranking of the corpus (hybrid: reciprocal-rank fusion
                 of the two), `depth` documents deep; the per-seed rankings combine into one (rrf, max
                 or sum);
    selection:   walk the combined ranking, skipping excluded documents (the seeds too, unless
                 include_seeds) and duplicates, until top_k documents or budget_tokens tokens;
    rerank:      optionally TracIn over rerank_pool times that selection, then the same cut again.

    from ssae_common.core.runtime import RunContext
    from ssae_common.retrieval import RetrieveConfig, rank_documents, retrieve
    record = retrieve(RetrieveConfig(corpus=("pool.jsonl.gz",)), ["seeds.jsonl"])  # written, like every stage
    record["path"]  # the ssae.doc/1 records, best first (OUT.provenance.json beside them)
    result = rank_documents(RetrieveConfig(corpus=("pool.jsonl.gz",)), ["seeds.jsonl"])
    result.records  # the same records in memory (ssae-retrieve's stdout); written only with out=
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

from ..core.config import ConfigError, hashed_values
from ..core.errors import BadInput
from ..core.outputs import atomic_file, check_target, exclusive, existing_output
from ..core.provenance import config_hash, created_by
from ..core.records import artifact_record, dump_json, iter_docs, iter_raw, stdin_is_terminal, write_record
from ..core.runtime import RunContext
from ..data.config import DEFAULT_MODEL
from ..data.models import load_tokenizer, model_identity, resolve_model_dtype
from . import dense as D
from . import engines as R
from .config import RetrieveConfig

log = logging.getLogger("ssae")
PROVENANCE_SCHEMA = "ssae.retrieval-provenance/1"


@dataclass
class Retrieval:
    """The ranked records (best first) and the provenance written beside them in an output file."""

    records: list[dict]
    provenance: dict
    artifact: dict | None = None  # the record of the file written, when there is one


def retrieve(config: RetrieveConfig, seeds: Sequence[str] = (), *, out: str | None = None,
             context: RunContext | None = None) -> dict:
    """Retrieve documents like the seeds (paths in any input format, or "-" / nothing for stdin; each
    seed document is one query) from `config.corpus`, write them to `out` (default: under $SSAE_WORKDIR,
    named by a hash of the seeds and the resolved configuration, and reused when already there) with the
    provenance beside them (OUT.provenance.json), and return the `ssae.artifact/1` record (kind docs)."""
    return _retrieve(config, seeds, out, context or RunContext(), default_output=True).artifact


def rank_documents(config: RetrieveConfig, seeds: Sequence[str] = (), *, out: str | None = None,
                   context: RunContext | None = None) -> Retrieval:
    """As `retrieve`, but the ranked records are returned (what ssae-retrieve prints without -o); they
    are written only when `out` is given."""
    return _retrieve(config, seeds, out, context or RunContext(), default_output=False)


def _retrieve(config: RetrieveConfig, seeds: Sequence[str], out: str | None, context: RunContext, *,
              default_output: bool) -> Retrieval:
    config = config.resolve()
    if out:
        check_target(out, context.force)
    seed_docs = _read_seeds(seeds, config.text_field)
    exclusions = R.Exclusions.from_files(config.exclude, config.text_field)
    if not config.include_seeds:
        for rec in seed_docs:
            exclusions.add(rec["id"], rec["text"])
    params = R.BM25Params(k1=config.k1, b=config.b, tokenization=R.Tokenization(
        stopwords=_off(config.stopwords), stemmer=_off(config.stemmer)))
    _check_before_reading(config, context, params)
    lm_spec, hook, saes, model_dtype = config.model, config.hook, [], None
    if config.rerank == "tracin":  # the SAEs are read and checked before the corpus pass
        saes, lm_spec, hook = _load_saes(config, context)
        model_dtype = resolve_model_dtype(config.model_dtype, context.device, lm_spec)
    resolved = _resolved(config, context, params, seed_docs, model_dtype)
    if out is None and default_output:
        # the seeds' text names the output too: the provenance records their ids only
        out, reuse = existing_output("docs", config_hash(resolved, [r["text"] for r in seed_docs]), ".jsonl",
                                     force=context.force)
        if reuse:
            return Retrieval([], {}, docs_artifact(out))
        check_target(out, context.force)

    store = R.CorpusStore.open_or_build(list(config.corpus), config.text_field, quiet=context.quiet)
    queries = [r["text"] for r in seed_docs]
    combined = R.combine_seeds(_first_stage(config, context, store, params, queries), config.combine, config.rrf_k)
    order = combined.ranking.positions
    first_score = dict(zip(order.tolist(), combined.ranking.scores.tolist()))

    count_tokens = None
    if config.budget_tokens is not None:
        tokenizer = load_tokenizer(lm_spec or DEFAULT_MODEL)

        def count_tokens(text):  # what ssae-harvest stores of the document (its cap cuts the rest)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            return min(n, config.max_tokens_per_doc) if config.max_tokens_per_doc else n

    # TracIn reranks a pool larger than the output, then cuts it to the output size
    scale = config.rerank_pool if config.rerank == "tracin" else 1.0
    kept, stats = R.select(store, order, exclusions, int(config.top_k * scale) if config.top_k else None,
                           int(config.budget_tokens * scale) if config.budget_tokens else None, count_tokens)
    final_scores = {p: first_score[p] for p in kept}
    if config.rerank == "tracin":
        kept, final_scores = _tracin(config, context, saes, lm_spec, hook, model_dtype, store, kept, queries)
        kept, _ = R.select(store, kept, R.Exclusions(), config.top_k, config.budget_tokens, count_tokens)
    _log_summary(config, seed_docs, order, stats, kept)

    method_label = config.method + ("+tracin" if config.rerank == "tracin" else "")
    records = []
    for rank, pos in enumerate(kept, 1):
        rec = store.record(pos)
        rec["score"] = float(final_scores[pos])
        rec["rank"] = rank
        rec["method"] = method_label
        rec["seed_ids"] = [seed_docs[s]["id"] for s in combined.seeds_of.get(pos, [])[:10]]
        if config.rerank == "tracin":
            rec.setdefault("meta", {})["first_stage_score"] = float(first_score[pos])
        records.append(rec)
    result = Retrieval(records, {
        "schema": PROVENANCE_SCHEMA, "config": resolved, "config_hash": config_hash(resolved),
        "n_docs": len(records), "created_by": created_by(context.program), **stats})
    if out:
        with exclusive(out):
            write_retrieval(result, out, force=context.force)
        result.artifact = docs_artifact(out)
    return result


def _check_before_reading(config: RetrieveConfig, context: RunContext, params) -> None:
    """Refuse a bad --stopwords, --stemmer, --dense-model, --sae or --device before the corpus is read (minutes
    on a large one) and any model loads."""
    if config.method != "dense":
        params.tokenization.build()
    if config.method != "bm25":
        D.resolve_dense_model(config.dense_model)
    if config.rerank == "tracin":
        from ..sae.imports import detect_format

        for path in config.sae:
            detect_format(path, field="sae")
    if config.method != "bm25" or config.rerank == "tracin":
        context.device  # noqa: B018 (resolving it refuses a device this machine lacks)


def docs_artifact(path: str) -> dict:
    """The `ssae.artifact/1` record (kind docs) of a documents file, its count read from the file."""
    return artifact_record("docs", path, n_docs=sum(1 for _ in iter_raw(path)))


def write_retrieval(result: Retrieval, out: str, *, force: bool = False) -> None:
    """The records as JSONL at `out` and the provenance at OUT.provenance.json (each written atomically)."""
    with atomic_file(out, force=force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in result.records:
                write_record(f, rec)
    with atomic_file(out + ".provenance.json", force=True) as tmp:
        with open(tmp, "w") as f:
            dump_json(result.provenance, f, indent=1)
    log.info("wrote %d documents to %s (provenance in %s.provenance.json)", len(result.records), out, out)


def _off(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("", "none", "off") else value


def _read_seeds(paths: Sequence[str] | str, text_field: str) -> list[dict]:
    inputs = [paths] if isinstance(paths, str) else list(paths) or ["-"]
    if inputs == ["-"] and stdin_is_terminal():
        raise BadInput("no seeds: give seed document paths or pipe them on stdin")
    seed_docs, empty = [], []
    for rec, source in iter_docs(inputs, text_field):
        (seed_docs if rec["text"].strip() else empty).append((rec, source))
    where = ", ".join("<stdin>" if p == "-" else p for p in inputs)
    if empty:
        named = ", ".join(f"{s} (id {r['id']})" for r, s in empty[:3]) + (" ..." if len(empty) > 3 else "")
        if not seed_docs:
            raise BadInput(f"{where}: every seed has empty text ({named}): nothing to search for")
        log.warning("%d seed(s) with empty text skipped: %s", len(empty), named)
    if not seed_docs:
        raise BadInput(f"{where}: no seed documents")
    return [rec for rec, _ in seed_docs]


def _resolved(config: RetrieveConfig, context: RunContext, params, seed_docs: list[dict],
              model_dtype: str | None) -> dict:
    """The provenance's config: what decides the output; model and hook as given, the model's dtype
    (TracIn) and the dense runtime resolved as they run.  The options of a method not used are None, so they do not change the hash."""
    sparse, dense = config.method != "dense", config.method != "bm25"
    given = {"corpus": R.corpus_fingerprint(config.corpus, config.text_field)["inputs"],
             "bm25": params.describe() if sparse else None, "dense_model": D.dense_identity(config.dense_model) if dense else None,
             "exclude": list(config.exclude), "sae": [os.path.abspath(p) for p in config.sae],
             "seeds": [{"id": r["id"]} for r in seed_docs], "model_dtype": model_dtype,
             # the runtime auto picks decides the embeddings (bf16 and float32 rank slightly differently)
             "dense_backend": D.resolve_dense_backend(config.dense_backend, config.dense_model, context.device)
             if dense else None}
    unused = ((() if sparse else ("engine", "k1", "b", "stopwords", "stemmer"))
              + (() if dense else ("dense_model", "dense_max_length", "dense_backend"))
              + (() if config.budget_tokens else ("max_tokens_per_doc",)))
    return context.resolved(**hashed_values(config, **{**given, **dict.fromkeys(unused)}))


def _first_stage(config: RetrieveConfig, context: RunContext, store, params, queries: list[str]) -> list:
    """One ranking per seed, `depth` documents deep."""
    per_method: dict[str, list[R.Ranking]] = {}
    if config.method in ("bm25", "hybrid"):
        index = R.BM25Index(store, params, config.engine, quiet=context.quiet)
        per_method["bm25"] = index.rank(queries, config.depth, quiet=context.quiet)
    if config.method in ("dense", "hybrid"):
        dense = D.DenseIndex(store, config.dense_model, device=context.device, batch_size=config.dense_batch_size,
                             quiet=context.quiet, max_length=config.dense_max_length,
                             backend=config.dense_backend)
        per_method["dense"] = dense.rank(queries, config.depth)
    if config.method != "hybrid":
        return per_method[config.method]
    fused = [R.rrf_fuse([bm, de], config.rrf_k) for bm, de in zip(per_method["bm25"], per_method["dense"])]
    return [R.Ranking(r.positions[:config.depth], r.scores[:config.depth]) for r in fused]


def _load_saes(config: RetrieveConfig, context: RunContext):
    """The TracIn checkpoints, and the language model and hook (defaulting to the SAEs' own)."""
    from ..sae.imports import load_any
    from .tracin import check_saes

    from ..data.models import check_hook_name

    saes = [load_any(p, context.device, field="sae") for p in config.sae]
    sae_model, sae_hook = check_saes(saes, list(config.sae))
    hook = config.hook or sae_hook
    if not hook:
        raise ConfigError("sae", config.sae[0], "cfg.json names no hook; give the hook")
    model = config.model or sae_model or DEFAULT_MODEL
    check_hook_name(model, hook)
    return saes, model, hook


def _tracin(config: RetrieveConfig, context: RunContext, saes, lm_spec: str, hook: str, model_dtype: str, store,
            kept: list[int], queries: list[str]) -> tuple[list[int], dict[int, float]]:
    """The kept positions reordered by TracIn score (best first), and each one's score."""
    import numpy as np

    from ..core.progress import Progress
    from ..data.models import document_activations, load_model
    from .tracin import tracin_rerank_scores

    # documents are cut as the SAEs' activations were (with BOS unless their cfg.json says otherwise)
    bos = saes[0].cfg.get("prepend_bos")
    lm = load_model(lm_spec, device=context.device, model_dtype=model_dtype, prepend_bos=bos is not False)
    lm.check_hook(hook)
    if lm.hook_width(hook) != saes[0].d_in:
        raise ConfigError("sae", None, f"d_in {saes[0].d_in} does not match {model_identity(lm_spec)} at {hook} "
                                       f"(width {lm.hook_width(hook)})")
    t0 = time.perf_counter()
    texts = [store.record(p)["text"] for p in kept]
    with Progress("tracin activations", total=len(queries) + len(texts), unit="docs", quiet=context.quiet) as pr:
        seed_acts = document_activations(lm, queries, hook, context_size=config.context_size,
                                         batch_size=config.batch_size, progress=pr).acts
        cand_acts = document_activations(lm, texts, hook, context_size=config.context_size,
                                         batch_size=config.batch_size, progress=pr).acts
    scores = tracin_rerank_scores(saes, seed_acts, cand_acts, normalize=config.tracin_normalize)
    log.info("TracIn over %d candidates and %d seeds with %d checkpoint(s) in %.1f s", len(kept), len(queries),
             len(saes), time.perf_counter() - t0)
    pos = np.asarray(kept, dtype=np.int64)
    order = R.top_k(scores, len(scores), index=np.arange(len(scores)))
    return [int(p) for p in pos[order]], {int(p): float(s) for p, s in zip(pos, scores)}


def _log_summary(config: RetrieveConfig, seed_docs: list[dict], order, stats: dict, kept: list[int]) -> None:
    log.info("%d seeds, %d candidate(s) within depth %d; %d excluded, %d duplicate(s); %d output",
             len(seed_docs), len(order), config.depth, stats["excluded"], stats["duplicates"], len(kept))
    if config.top_k and len(kept) < config.top_k:
        log.warning("only %d documents found for --top-k %d (raise --depth to go further down each seed's ranking)",
                    len(kept), config.top_k)
    if not kept:
        wanted = f"{config.top_k} documents" if config.top_k else f"{config.budget_tokens} tokens"
        log.warning("no documents retrieved (wanted %s)", wanted)
