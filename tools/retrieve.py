"""ssae-retrieve: seed documents -> subdomain documents from a large corpus (BM25, dense or hybrid
retrieval, optionally reranked by TracIn), as `ssae.doc/1` records."""
from __future__ import annotations

import json
import logging
import os

import click

from ssae_tools.base import ssae_command
from ssae_common.core.errors import BadInput
from ssae_common.data.models import DEFAULT_MODEL, model_identity
from ssae_common.core.outputs import atomic_file, check_target
from ssae_common.core.provenance import config_hash, created_by
from ssae_common.core.records import iter_docs, stdin_is_terminal, write_record
from ssae_common.retrieval import engines as R

log = logging.getLogger("ssae")
RERANKERS = ("none", "tracin")


def _none(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("", "none", "off") else value


@ssae_command("retrieve")
@click.argument("seeds", nargs=-1)
@click.option("--corpus", multiple=True, help="Corpus to retrieve from (.jsonl[.gz], .txt, .parquet, hf:NAME[:SPLIT]); "
              "repeatable.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text (corpus, seeds, --exclude).")
@click.option("--method", default="bm25", show_default=True, help="bm25, dense or hybrid (reciprocal-rank fusion of both).")
@click.option("--engine", default="bm25s", show_default=True, help="BM25 engine: bm25s, or rank-bm25 (slow reference).")
@click.option("--k1", type=float, default=1.5, show_default=True, help="BM25 k1.")
@click.option("--b", "b", type=float, default=0.75, show_default=True, help="BM25 b.")
@click.option("--stopwords", default="en", show_default=True, help="BM25 stopword list: en, en_plus or none.")
@click.option("--stemmer", default="english", show_default=True, help="Snowball stemmer language for BM25, or none.")
@click.option("--dense-model", default=R.DEFAULT_DENSE_MODEL, show_default=True,
              help="sentence-transformers model: the bundled all-MiniLM-L6-v2, a Hugging Face name or a folder.")
@click.option("--dense-batch-size", type=int, default=64, show_default=True, help="Texts per encoder batch.")
@click.option("--dense-max-length", type=int, default=None,
              help="Encoder tokens per text (longer texts are cut) [default: the model's own, 256 for MiniLM].")
@click.option("--combine", default="rrf", show_default=True, help="How per-seed rankings combine: rrf, max or sum.")
@click.option("--rrf-k", type=int, default=R.RRF_K, show_default=True, help="k of reciprocal-rank fusion.")
@click.option("--depth", type=int, default=1000, show_default=True, help="Ranked documents kept per seed (and method).")
@click.option("--top-k", type=int, default=None, help="Documents to output [default: 1000 unless --budget-tokens].")
@click.option("--budget-tokens", type=int, default=None, help="Output documents until this many tokens (of --model's tokenizer).")
@click.option("--exclude", multiple=True, help="File of documents never to output (by id or normalised text); repeatable.")
@click.option("--include-seeds", is_flag=True, help="Allow the seed documents themselves in the output.")
@click.option("--rerank", default="none", show_default=True, help="none, or tracin (needs --sae).")
@click.option("--sae", multiple=True, help="SAE folder (ssae.sae/1) for TracIn; repeat for several checkpoints.")
@click.option("--model", default=None, help="Language model for TracIn and --budget-tokens [default: the SAE's, else smollm2].")
@click.option("--hook", default=None, help="Hook for TracIn activations [default: the SAE's].")
@click.option("--rerank-pool", type=float, default=3.0, show_default=True,
              help="TracIn reranks this many times the output size (documents or budget) of first-stage results.")
@click.option("--tracin-normalize/--tracin-raw", default=False, show_default=True,
              help="Divide each candidate's TracIn score by its gradient norm (cosine up to a constant).")
@click.option("--context-size", type=int, default=128, show_default=True, help="Tokens per document for TracIn (BOS included).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Documents per LM forward pass (TracIn).")
@click.option("-o", "--out", default=None, help="Write the records to this file instead of stdout.")
def main(common, seeds, corpus, text_field, method, engine, k1, b, stopwords, stemmer, dense_model, dense_batch_size,
         dense_max_length, combine, rrf_k, depth, top_k, budget_tokens, exclude, include_seeds, rerank, sae, model, hook, rerank_pool,
         tracin_normalize, context_size, batch_size, out):
    """Retrieve documents like SEEDS (paths, or - / stdin; each seed is one query) from --corpus."""
    R.check_choice("--method", method, R.METHODS)
    R.check_choice("--engine", engine, R.ENGINES)
    R.check_choice("--combine", combine, R.COMBINERS)
    R.check_choice("--rerank", rerank, RERANKERS)
    for name, value in (("--depth", depth), ("--top-k", top_k), ("--budget-tokens", budget_tokens),
                        ("--dense-batch-size", dense_batch_size), ("--dense-max-length", dense_max_length),
                        ("--batch-size", batch_size), ("--rrf-k", rrf_k)):
        if value is not None and value < 1:
            raise BadInput(f"{name} {value}: must be at least 1")
    if k1 < 0 or not 0 <= b <= 1:
        raise BadInput(f"--k1 {k1} --b {b}: need k1 >= 0 and 0 <= b <= 1")
    if rerank_pool < 1:
        raise BadInput(f"--rerank-pool {rerank_pool}: must be at least 1")
    if rerank == "tracin" and not sae:
        raise BadInput("--rerank tracin needs --sae FOLDER (one or more checkpoints)")
    if sae and rerank != "tracin":
        raise BadInput("--sae is only used with --rerank tracin")
    corpus = list(corpus)
    if not corpus:
        raise BadInput("no corpus: give --corpus FILE (or set SSAE_CORPUS)")
    if "-" in corpus:
        raise BadInput("--corpus -: the corpus must be a file or hf:NAME (stdin carries the seeds)")
    if top_k is None and budget_tokens is None:
        top_k = 1000
    if out:
        check_target(out, common.force)

    inputs = list(seeds) or ["-"]
    if inputs == ["-"] and stdin_is_terminal():
        raise BadInput("no seeds: give seed document paths or pipe them on stdin")
    seed_docs = [rec for rec, _ in iter_docs(inputs, text_field)]
    if not seed_docs:
        raise BadInput(f"{', '.join('<stdin>' if p == '-' else p for p in inputs)}: no seed documents")
    exclusions = R.Exclusions.from_files(exclude, text_field)
    if not include_seeds:
        for rec in seed_docs:
            exclusions.add(rec["id"], rec["text"])

    tokenization = R.Tokenization(stopwords=_none(stopwords), stemmer=_none(stemmer))
    params = R.BM25Params(k1=k1, b=b, tokenization=tokenization)
    sae_folders = list(sae)
    resolved = common.resolved(
        corpus=R.corpus_fingerprint(corpus, text_field)["inputs"], text_field=text_field, method=method,
        engine=engine if method != "dense" else None, bm25=params.describe() if method != "dense" else None,
        dense_model=R.dense_identity(dense_model) if method != "bm25" else None,
        dense_max_length=dense_max_length if method != "bm25" else None, combine=combine, rrf_k=rrf_k,
        depth=depth, top_k=top_k, budget_tokens=budget_tokens, exclude=list(exclude), include_seeds=include_seeds,
        rerank=rerank, sae=[os.path.abspath(p) for p in sae_folders], model=model, hook=hook,
        rerank_pool=rerank_pool, tracin_normalize=tracin_normalize, context_size=context_size,
        seeds=[{"id": r["id"]} for r in seed_docs])

    store = R.CorpusStore.open_or_build(corpus, text_field, quiet=common.quiet)
    queries = [r["text"] for r in seed_docs]
    per_method: dict[str, list[R.Ranking]] = {}
    if method in ("bm25", "hybrid"):
        index = R.BM25Index(store, params, engine, quiet=common.quiet)
        per_method["bm25"] = index.rank(queries, depth, quiet=common.quiet)
    if method in ("dense", "hybrid"):
        dense = R.DenseIndex(store, dense_model, device=common.device, batch_size=dense_batch_size,
                              quiet=common.quiet, max_length=dense_max_length)
        per_method["dense"] = dense.rank(queries, depth)
    if method == "hybrid":
        per_seed = [R.rrf_fuse([bm, de], rrf_k) for bm, de in zip(per_method["bm25"], per_method["dense"])]
        per_seed = [R.Ranking(r.positions[:depth], r.scores[:depth]) for r in per_seed]
    else:
        per_seed = per_method[method]
    combined = R.combine_seeds(per_seed, combine, rrf_k)
    order = combined.ranking.positions
    first_score = dict(zip(order.tolist(), combined.ranking.scores.tolist()))

    lm_spec = model
    saes = []
    if rerank == "tracin":
        from ssae_common.sae.autoencoder import SAE
        from ssae_common.retrieval.tracin import check_saes

        saes = [SAE.load(p, device=common.device) for p in sae_folders]
        sae_model, sae_hook = check_saes(saes, sae_folders)
        lm_spec = model or sae_model or DEFAULT_MODEL
        hook = hook or sae_hook
        if not hook:
            raise BadInput(f"--sae {sae_folders[0]}: cfg.json names no hook; give --hook")
    tokenizer = None
    if budget_tokens is not None:
        tokenizer = _budget_tokenizer(lm_spec or DEFAULT_MODEL)

    def count_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    scale = rerank_pool if rerank == "tracin" else 1.0
    kept, stats = R.select(store, order, exclusions, int(top_k * scale) if top_k else None,
                           int(budget_tokens * scale) if budget_tokens else None, count_tokens)
    method_label = method
    final_scores = {p: first_score[p] for p in kept}
    if rerank == "tracin":
        kept, final_scores = _tracin(common, saes, lm_spec, hook, store, kept, queries, context_size, batch_size,
                                     tracin_normalize)
        method_label += "+tracin"
        if budget_tokens is not None or top_k is not None:
            kept, _ = R.select(store, kept, R.Exclusions(), top_k, budget_tokens, count_tokens)
    wanted = f"{top_k} documents" if top_k else f"{budget_tokens} tokens"
    log.info("%d seeds, %d candidate(s) within depth %d; %d excluded, %d duplicate(s); %d output",
             len(seed_docs), len(order), depth, stats["excluded"], stats["duplicates"], len(kept))
    if top_k and len(kept) < top_k:
        log.warning("only %d documents found for --top-k %d (raise --depth to go further down each seed's ranking)",
                    len(kept), top_k)
    if not kept:
        log.warning("no documents retrieved (wanted %s)", wanted)

    records = []
    for rank, pos in enumerate(kept, 1):
        rec = store.record(pos)
        rec["score"] = float(final_scores[pos])
        rec["rank"] = rank
        rec["method"] = method_label
        rec["seed_ids"] = [seed_docs[s]["id"] for s in combined.seeds_of.get(pos, [])[:10]]
        if rerank == "tracin":
            rec.setdefault("meta", {})["first_stage_score"] = float(first_score[pos])
        records.append(rec)
    if out:
        resolved_hash = config_hash(resolved)
        with atomic_file(out, force=common.force) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records:
                    write_record(f, rec)
        with atomic_file(out + ".provenance.json", force=True) as tmp:
            with open(tmp, "w") as f:
                json.dump({"schema": "ssae.retrieval-provenance/1", "config": resolved, "config_hash": resolved_hash,
                           "n_docs": len(records), "created_by": created_by("ssae-retrieve"), **stats}, f, indent=1)
        log.info("wrote %d documents to %s (provenance in %s.provenance.json)", len(records), out, out)
    else:
        for rec in records:
            common.emit(rec)


def _budget_tokenizer(spec: str):
    from ssae_common.data.models import resolve_model_path
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise BadInput(f"--model {spec}: cannot load its tokenizer ({e})".splitlines()[0]) from None


def _tracin(common, saes, lm_spec, hook, store, kept, queries, context_size, batch_size, normalize):
    import time

    import numpy as np

    from ssae_common.data.models import document_activations, load_model
    from ssae_common.core.progress import Progress
    from ssae_common.retrieval.tracin import tracin_rerank_scores

    lm = load_model(lm_spec, device=common.device)
    lm.check_hook(hook)
    if lm.d_model != saes[0].d_in:
        raise BadInput(f"--sae: d_in {saes[0].d_in} does not match {model_identity(lm_spec)} at {hook} "
                       f"(d_model {lm.d_model})")
    t0 = time.perf_counter()
    texts = [store.record(p)["text"] for p in kept]
    with Progress("tracin activations", total=len(queries) + len(texts), unit="docs", quiet=common.quiet) as pr:
        seed_acts = document_activations(lm, queries, hook, context_size=context_size, batch_size=batch_size,
                                         progress=pr).acts
        cand_acts = document_activations(lm, texts, hook, context_size=context_size, batch_size=batch_size,
                                         progress=pr).acts
    scores = tracin_rerank_scores(saes, seed_acts, cand_acts, normalize=normalize)
    log.info("TracIn over %d candidates and %d seeds with %d checkpoint(s) in %.1f s", len(kept), len(queries),
             len(saes), time.perf_counter() - t0)
    pos = np.asarray(kept, dtype=np.int64)
    order = R.top_k(scores, len(scores), index=np.arange(len(scores)))
    return [int(p) for p in pos[order]], {int(p): float(s) for p, s in zip(pos, scores)}


if __name__ == "__main__":
    main()
