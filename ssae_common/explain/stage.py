"""ssae-explain from Python: contexts of each latent, LM explanations with detection scores, and the
feature browser, written to one output folder.

    from ssae_common.core.runtime import RunContext
    from ssae_common.explain import ExplainConfig, explain

    record = explain(ExplainConfig(activations="acts.h5", explainer="none", latents="0-99"), "sae-folder",
                     out="explained", context=RunContext(device_spec="cpu"))

Work goes into a `.OUT.partial` folder beside OUT: run.json (the resolved configuration),
contexts.jsonl.gz, and explanations.jsonl appended after every batch of latents.  A rerun of the same
configuration resumes there; at the end the browser page is written and the folder renamed to OUT.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import time

from ..core.config import hashed_values
from ..core.errors import BadInput
from ..core.records import dump_json, to_json
from ..core.runtime import RunContext
from .config import LM_LATENTS, ExplainConfig
from .explainers import EndpointError, explain_latent, make_backend, redact_url, score_latent

log = logging.getLogger("ssae")

SCHEMA = "ssae.explanation/1"
STATISTICS_NOTE = "token statistics only: not an LM explanation"


def explain(config: ExplainConfig, sae: str, *, out: str | None = None, context: RunContext | None = None) -> dict:
    """Explain the latents of the SAE folder `sae` from contexts in `config.activations`; write OUT (default:
    under $SSAE_WORKDIR, named by a hash of the inputs and configuration, reused when complete) and return
    its `ssae.artifact/1` record."""
    from ..core.outputs import check_target, commit, exclusive, existing_output, partial_path, sha256_file
    from ..core.parse import parse_latent_ranges
    from ..core.progress import Progress
    from ..core.provenance import config_hash
    from ..core.records import resolve_artifacts
    from ..core.signals import StopFlag
    from ..data.activations import ActivationStore, store_fingerprint
    from ..data.models import load_tokenizer
    from ..sae.imports import load_any
    from .browser import write_browser
    from .contexts import extract_contexts

    context = context or RunContext()
    config.check()
    (store_path,) = resolve_artifacts([config.activations], "activations")
    model = load_any(sae, "cpu")
    store = ActivationStore(store_path)
    try:
        _check_inputs(store, model, sae)
        config = config.resolve(store.model)
        latents = parse_latent_ranges(config.latents, model.d_sae)
        if config.latents is None and config.explainer != "none" and len(latents) > LM_LATENTS:
            latents = latents[:LM_LATENTS]
            log.info("explaining the first %d of %d latents (--latents all for every one, or a list)",
                     LM_LATENTS, model.d_sae)
        resolved = context.resolved(**hashed_values(
            config, sae={"path": os.path.abspath(sae), "sha256": sha256_file(sae)},
            activations={"path": os.path.abspath(store_path), "fingerprint": store_fingerprint(store_path)},
            latents=config.latents or ("all" if len(latents) == model.d_sae else f"0-{len(latents) - 1}"),
            n_latents=len(latents), explainer_url=redact_url(config.explainer_url),
            scorer_url=redact_url(config.scorer_url)))
        digest = config_hash(resolved)
        if out is None:
            out, reuse = existing_output("explanations", digest, marker="explanations.jsonl", force=context.force)
            if reuse:
                return explanations_artifact(out)
        check_target(out, context.force)
        tokenizer = None
        if not os.path.exists(os.path.join(partial_path(out), "contexts.jsonl.gz")):
            tokenizer = load_tokenizer(config.tokenizer_model)  # a bad model is refused before anything is written
        with exclusive(out), _cleared_when_refused(partial_path(out)):
            work = partial_path(out)
            run_file = os.path.join(work, "run.json")
            _open_work(work, run_file, digest, resolved, context)

            contexts_file = os.path.join(work, "contexts.jsonl.gz")
            records_file = os.path.join(work, "explanations.jsonl")
            with StopFlag() as stop:
                if os.path.exists(contexts_file):
                    contexts = read_contexts(contexts_file)
                else:
                    tokenizer = tokenizer or load_tokenizer(config.tokenizer_model)
                    log.info("extracting contexts of %d latent(s) from %s (%d tokens)", len(latents), store_path,
                             store.n_tokens)
                    with Progress("contexts", total=store.n_tokens, unit="tokens", quiet=context.quiet) as progress:
                        contexts = extract_contexts(store, model, latents, config, tokenizer, seed=context.seed,
                                                    device=context.device, stop=stop, progress=progress)
                    write_contexts(contexts_file, contexts)
                store.close()
                done = _explain_all(config, contexts, records_file, work, digest, context, stop)

            records = [done[c["latent"]] for c in contexts]
            with open(records_file + ".tmp", "w", encoding="utf-8") as f:
                for r in records:
                    f.write(to_json(r, ensure_ascii=False) + "\n")
            os.replace(records_file + ".tmp", records_file)
            with open(run_file) as f:
                run_info = json.load(f)
            write_browser(os.path.join(work, "index.html"), contexts, records, run_info)
            commit(work, out)
            log.info("wrote %s: %d explanation record(s) and index.html", out, len(records))
            return explanations_artifact(out)
    finally:
        store.close()


def explanations_artifact(out: str) -> dict:
    """The `ssae.artifact/1` record of an explanations folder, summarised from its explanations.jsonl."""
    from ..core.records import artifact_record

    folder = os.path.abspath(out)
    records = read_done(os.path.join(folder, "explanations.jsonl"))
    ok = [r for r in records if r.get("status") == "ok"]
    f1 = [r["f1"] for r in ok if r.get("f1") is not None]
    return artifact_record("explanations", out, explanations=os.path.join(folder, "explanations.jsonl"),
                           browser=os.path.join(folder, "index.html"), n_latents=len(records),
                           n_explained=len(ok), mean_f1=round(sum(f1) / len(f1), 4) if f1 else None)


def _check_inputs(store, model, sae: str) -> None:
    if not store.has_text:
        raise BadInput(f"{store.path}: no document text stored (harvested with --no-store-text); "
                       "ssae-explain needs it for contexts")
    if model.d_in != store.d_model:
        raise BadInput(f"{store.path}: activations have width {store.d_model}, the SAE {sae} expects "
                       f"d_in {model.d_in}")
    sae_bos, store_bos = model.cfg.get("prepend_bos"), store.prepend_bos
    if sae_bos is not None and store_bos is not None and sae_bos != store_bos:
        raise BadInput(f"{store.path}: harvested {'with' if store_bos else 'without'} BOS, but the SAE {sae} was "
                       f"trained {'with' if sae_bos else 'without'} "
                       f"(harvest again with {'--bos' if sae_bos else '--no-bos'})")
    from ..eval.stage import check_identity

    if store.model and store.hook:
        check_identity(sae, model.cfg, store.model, store.hook, store.path)


@contextlib.contextmanager
def _cleared_when_refused(work: str):
    """Remove the partial folder `work` when this run made it and then refused its input (exit 2): nothing
    of a refused run is left to block the corrected one.  An interrupted or failed run keeps it."""
    fresh = not os.path.exists(work)
    try:
        yield
    except BadInput:
        if fresh and os.path.isdir(work) and not os.path.islink(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _open_work(work: str, run_file: str, digest: str, resolved: dict, context: RunContext) -> None:
    """Resume the partial folder of the same configuration, or start one (a different one needs force)."""
    from ..core.provenance import created_by

    if os.path.isdir(work):
        try:
            with open(run_file) as f:
                same = json.load(f).get("config_hash") == digest
        except (OSError, ValueError):
            same = False
        if same:
            log.info("resuming %s", work)
            return
        if not context.force:
            raise BadInput(f"{work}: an interrupted ssae-explain with a different configuration is there "
                           "(use --force to start over)")
        shutil.rmtree(work)
    os.makedirs(work)
    with open(run_file + ".tmp", "w") as f:
        dump_json({"schema": "ssae.explain-run/1", "config_hash": digest, "config": resolved,
                   "created_by": created_by(context.program), "seed": context.seed}, f, indent=2)
    os.replace(run_file + ".tmp", run_file)


def _explain_all(config: ExplainConfig, contexts: list[dict], records_file: str, work: str, digest: str,
                 context: RunContext, stop) -> dict[int, dict]:
    """Explain (and score) the latents not yet in records_file, appending a batch at a time; return every
    latent's record."""
    from ..core.progress import Progress

    done = {r["latent"]: r for r in read_done(records_file)}
    todo = [c for c in contexts if c["latent"] not in done]
    if done:
        log.info("%d latent(s) already explained, %d to go", len(done), len(todo))
    explainer = scorer = None
    if config.explainer != "none" and any(c["n_active"] for c in todo):
        explainer, scorer = _backends(config, context.device)
        log.info("%d latent(s) to explain with %s, one LM call each (an estimate follows the first)",
                 sum(1 for c in todo if c["n_active"]), explainer.name)
    timed = 0  # LM-explained latents timed so far (the first gives the estimate)
    with Progress("explain", total=len(todo), unit="latents", quiet=context.quiet) as progress:
        for s in range(0, len(todo), config.batch_latents):
            batch = []
            try:
                for ctx in todo[s:s + config.batch_latents]:
                    started = time.monotonic()
                    batch.append(_explain_one(ctx, config, explainer, scorer, digest, context.seed))
                    progress.update(1)
                    if explainer is not None and ctx["n_active"] and not timed:
                        timed = 1
                        took = time.monotonic() - started
                        left = sum(1 for c in todo if c["n_active"]) - 1
                        log.info("the first latent took %.0f s: about %s for the %d still to explain",
                                 took, _duration(took * left), left)
            except EndpointError as e:
                append_records(records_file, batch)
                kept = len(done) + len(batch)
                raise EndpointError(f"{e}; {kept} explanation(s) so far kept in {work}, rerun the same "
                                    "command to continue") from None
            append_records(records_file, batch)
            done.update((r["latent"], r) for r in batch)
            stop.check()
    return done


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _backends(config: ExplainConfig, device: str):
    """The explainer and the scorer (None when not scoring; the explainer itself unless told otherwise)."""
    key = os.environ.get(config.api_key_env) if config.api_key_env else None
    if config.explainer == "openai" and not key:
        log.info("%s is not set: calling %s without an API key", config.api_key_env, redact_url(config.explainer_url))
    explainer = make_backend(config.explainer, model=config.explainer_model, url=config.explainer_url,
                             api_key=key, device=device, timeout=config.timeout)
    if not config.score:
        return explainer, None
    if config.scorer_url:
        scorer = make_backend("openai", model=config.scorer_model or config.explainer_model, url=config.scorer_url,
                              api_key=key, device=device, timeout=config.timeout, option_prefix="--scorer")
    elif config.scorer_model:
        scorer = make_backend("local", model=config.scorer_model, url=None, api_key=None, device=device,
                              timeout=config.timeout, option_prefix="--scorer")
    else:
        scorer = explainer
    return explainer, scorer


def _explain_one(ctx: dict, config: ExplainConfig, explainer, scorer, digest: str, seed: int) -> dict:
    explainer_name = explainer.name if explainer else "none"
    if explainer is None or ctx["n_active"] == 0:
        return latent_record(ctx, explainer=explainer_name, scorer=None, result=None, score=None, config_hash=digest)
    latent_seed = seed * 1_000_003 + ctx["latent"]
    result = explain_latent(explainer, ctx["explain"], retries=config.retries, max_tokens=config.max_new_tokens,
                            temperature=config.temperature, seed=latent_seed)
    score = None
    if scorer is not None:
        if result["status"] != "ok":
            score = {"score_status": "no_explanation"}
        elif not any(w.get("active") for w in ctx["score"]):
            score = {"score_status": "no_held_out_activations"}
        else:
            score = score_latent(scorer, result["explanation"], ctx["score"], retries=config.retries,
                                 seed=latent_seed)
    return latent_record(ctx, explainer=explainer_name, scorer=scorer.name if score else None, result=result,
                         score=score, config_hash=digest)


def _round(x, digits=4):
    return None if x is None else round(float(x), digits)


def latent_record(ctx: dict, *, explainer: str, scorer: str | None, result: dict | None, score: dict | None,
                  config_hash: str) -> dict:
    """One `ssae.explanation/1` record."""
    rec = {"schema": SCHEMA, "latent": ctx["latent"], "status": None, "explanation": None, "diversity": None,
           "diversity_justification": None, "f1": None, "precision": None, "recall": None, "accuracy": None,
           "auc": None, "n_contexts": len(ctx["explain"]) + len(ctx["score"]), "n_explain": len(ctx["explain"]),
           "n_scored": len(ctx["score"]), "top_tokens": ctx["top_tokens"], "density": ctx["density"],
           "n_active": ctx["n_active"], "max_activation": ctx["max_activation"], "explainer": explainer,
           "scorer": scorer, "config_hash": config_hash}
    if ctx["n_active"] == 0:
        rec["status"] = "dead"
        rec["note"] = "the latent never activates on this store"
        return rec
    if result is None:
        rec["status"] = "statistics"
        rec["note"] = STATISTICS_NOTE
        return rec
    rec["status"] = result["status"]
    rec["explanation"] = result["explanation"]
    rec["diversity"] = result["diversity"]
    rec["diversity_justification"] = result["justification"]
    rec["attempts"] = result["attempts"]
    if result["status"] != "ok":
        rec["raw_reply"] = result["raw"]
    if score is not None:
        for key in ("precision", "recall", "f1", "accuracy", "auc"):
            rec[key] = _round(score.get(key))
        rec["score_status"] = score["score_status"]
        if "predictions" in score:
            rec["predictions"] = score["predictions"]
        if score.get("score_raw") is not None and score["score_status"] != "ok":
            rec["score_raw"] = score["score_raw"]
    return rec


def read_done(path: str) -> list[dict]:
    """Records of an interrupted run; a torn last line (killed mid-write) is dropped and the file trimmed."""
    if not os.path.exists(path):
        return []
    good, size = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
                if not line.endswith(b"\n"):
                    raise ValueError
            except ValueError:
                break
            good.append(rec)
            size += len(line)
    if size != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(size)
    return good


def append_records(path: str, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(to_json(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_contexts(path: str, contexts: list[dict]) -> None:
    """The extracted contexts of a run, one latent a line, gzipped (written atomically)."""
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=3) as f:
        for c in contexts:
            f.write(to_json(c, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_contexts(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
