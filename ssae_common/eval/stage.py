"""Evaluate SAEs from Python: `evaluate_saes(EvalConfig(...), [sae_dir, ...])`.

Does everything ssae-eval does: SAE inputs (folders or artifact records on stdin), the identity checks
(each SAE was trained on the evaluated model and hook), provenance, the default output under
$SSAE_WORKDIR and its reuse, resuming an interrupted run, and writing OUT/metrics.json
(`ssae.metrics/1`), the PNG plots and report.html.  Heavy modules are imported only when needed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

from ..core.config import hashed_values, replace
from ..core.errors import BadInput
from ..core.outputs import (atomic_dir, check_target, exclusive, existing_output, partial_path, refuse_link,
                            sha256_file, workdir)
from ..core.parse import unique_names
from ..core.provenance import config_hash, created_by, input_fingerprint
from ..core.records import artifact_record, dump_json, resolve_artifacts, spool_stdin
from ..core.runtime import RunContext
from .config import EvalConfig

log = logging.getLogger("ssae")
INFO_FIELDS = ("architecture", "d_in", "d_sae", "k", "tilt", "tilt_ess", "tilt_groups", "l1_coefficient", "model",
               "hook", "parent")
SUMMARY_FIELDS = ("name", "l0", "fvu", "ppl_spliced", "rel_ppl_vs_baseline")


def evaluate_saes(config: EvalConfig, saes: list[str], *, out: str | None = None,
                  context: RunContext | None = None) -> dict:
    """Evaluate the SAEs (folders; none or "-": artifact records on stdin) and return the metrics record.

    `out` is the output folder; None puts it under $SSAE_WORKDIR named by a hash of the inputs and the
    resolved configuration, and reuses a complete one there (unless `context.force`)."""
    context = context or RunContext()
    config.check()
    if not saes and "-" in config.docs:
        raise BadInput("documents and SAE records cannot both come from stdin: give SAE folders as arguments")
    paths = resolve_artifacts(saes, "sae")
    if "-" not in config.docs or out is not None:
        return _evaluate(config, paths, out, context)
    # stdin gets a file, so its hash can name the default output
    spooled = spool_stdin(os.path.join(workdir(), "tmp"))
    try:
        docs = tuple(spooled if d == "-" else d for d in config.docs)
        return _evaluate(replace(config, docs=docs), paths, out, context, spooled)
    finally:
        os.remove(spooled)


def metrics_artifact(out: str) -> dict:
    """The `ssae.artifact/1` record of an evaluation folder, summarised from its metrics.json."""
    path = os.path.join(out, "metrics.json")
    with open(path) as f:
        doc = json.load(f)
    return artifact_record("metrics", path, report=os.path.abspath(os.path.join(out, "report.html")),
                           n_tokens=doc["n_tokens"], dataset=doc["dataset"]["kind"],
                           saes=[{k: s[k] for k in SUMMARY_FIELDS if s.get(k) is not None} for s in doc["saes"]])


def _evaluate(config: EvalConfig, paths: list[str], out: str | None, context: RunContext,
              spooled: str | None = None) -> dict:
    from ..data.composition import training_composition
    from ..data.models import model_identity
    from ..sae.imports import sae_config

    if config.baseline is not None and not any(_same(p, config.baseline) for p in paths):
        paths = [*paths, config.baseline]
    cfgs = [sae_config(p) for p in paths]  # any supported format; BadInput naming the path otherwise
    names = unique_names(paths)
    baseline = None
    if config.baseline is not None:
        baseline = next(n for n, p in zip(names, paths) if _same(p, config.baseline))

    with contextlib.ExitStack() as stack:
        store = None
        if config.activations:
            from ..data.activations import ActivationStore, store_fingerprint

            store = stack.enter_context(ActivationStore(config.activations))
            if store.n_tokens == 0:
                raise BadInput(f"{config.activations}: empty activation file (no tokens to evaluate)")
            config = config.resolve(cfgs, store.model, store.hook)
            where = config.activations
            inputs = [{"path": os.path.abspath(config.activations),
                       "fingerprint": store_fingerprint(config.activations)}]
        else:
            config = config.resolve(cfgs)
            where = f"--model {config.model} --hook {config.hook}"
            inputs = [{"path": "-" if d == spooled else (d if d.startswith("hf:") else os.path.abspath(d)),
                       "sha256": input_fingerprint(d)} for d in config.docs if d != "-"]
        lm_name = model_identity(config.model)
        for p, c in zip(paths, cfgs):
            check_identity(p, c, lm_name, config.hook, where, config.allow_model_mismatch)
        bos = _windows_bos(paths, cfgs) if config.docs else None
        if config.docs:
            from ..data.models import check_hook_name, resolve_model_dtype

            check_hook_name(config.model, config.hook)
            model_dtype = resolve_model_dtype(config.model_dtype, context.device, config.model)
        else:
            model_dtype = None

        sae_shas = [sha256_file(p) for p in paths]
        infos = [{"name": n, "path": os.path.abspath(p), "sha256": s, "is_baseline": n == baseline,
                  **{k: c.get(k) for k in INFO_FIELDS}, "training_data": training_composition(c)}
                 for n, p, c, s in zip(names, paths, cfgs, sae_shas)]
        resolved = _resolved(config, context, infos, baseline, inputs, lm_name, model_dtype, bos)
        key = config_hash(resolved)
        if out is None:
            out, reuse = existing_output("metrics", key, "", marker="metrics.json", force=context.force)
            if reuse:
                return metrics_artifact(out)
        check_target(out, context.force)
        with exclusive(out):  # one writer per output (and per resume state)
            refuse_link(partial_path(out) + ".state")
            state, loaded = _accumulate(config, paths, names, store, key, out, context, model_dtype, bos, spooled)
            doc = _metrics_doc(config, state, loaded, infos, baseline, inputs, lm_name, store, resolved, context)
            _write(out, doc, context)
            _remove(partial_path(out) + ".state")
    return metrics_artifact(out)


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_identity(path: str, cfg: dict, model: str, hook: str, where: str, allow_model_mismatch: bool = False) -> None:
    """Refuse an SAE recorded at another hook, or on another model (names compared through the alias table:
    SAELens's gpt2-small is gpt2) unless `allow_model_mismatch`."""
    from ..data.models import same_hook, same_model

    sae_model, sae_hook = cfg.get("model"), cfg.get("hook")
    if not sae_model or not sae_hook:
        log.warning("%s records no model or hook: cannot check it matches %s", path, where)
        return
    if not same_hook(sae_hook, hook):
        raise BadInput(f"{path}: SAE was trained on model {sae_model!r} at hook {sae_hook!r}, "
                       f"but {where} is model {model!r} at hook {hook!r}")
    if not same_model(sae_model, model):
        if allow_model_mismatch:
            log.warning("%s was trained on model %r; evaluating on %r (--allow-model-mismatch)", path, sae_model, model)
            return
        raise BadInput(f"{path}: SAE was trained on model {sae_model!r}, but {where} is model {model!r} "
                       "(--allow-model-mismatch to evaluate it anyway)")


def _windows_bos(paths: list[str], cfgs: list[dict]) -> bool:
    """Whether the evaluated windows start with BOS: as the SAEs' activations were taken (cfg.json
    prepend_bos; an SAE that does not record it had BOS); SAEs that disagree cannot share windows."""
    recorded = {p: c.get("prepend_bos") for p, c in zip(paths, cfgs) if c.get("prepend_bos") is not None}
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{p} prepend_bos={v}" for p, v in recorded.items())
        raise BadInput(f"the SAEs were trained on windows with and without BOS ({listed}): evaluate them apart")
    return next(iter(recorded.values()), True)


def _resolved(config: EvalConfig, context: RunContext, infos: list[dict], baseline: str | None,
              inputs: list[dict], lm_name: str, model_dtype: str | None, bos: bool | None) -> dict:
    """The configuration recorded in metrics.json, whose hash names the default output and the resume
    state; options of the other mode are None so they do not change the hash."""
    docs = bool(config.docs)
    other_mode = ("rows",) if docs else ("context_size", "batch_size", "splice_bos", "text_field")
    return context.resolved(**hashed_values(
        config, saes=[{k: i[k] for k in ("name", "path", "sha256")} for i in infos], baseline=baseline,
        mode="docs" if docs else "activations", inputs=inputs, model=lm_name, model_dtype=model_dtype, bos=bos,
        **dict.fromkeys(other_mode)))


def _accumulate(config: EvalConfig, paths: list[str], names: list[str], store, key: str, out: str,
                context: RunContext, model_dtype: str | None = None, bos: bool = True, spooled: str | None = None):
    """Run every SAE over the evaluation set (resuming from OUT's partial state) -> (EvalState, [(name, SAE)])."""
    from ..core.records import iter_docs
    from ..core.signals import StopFlag
    from ..sae.imports import load_any
    from .metrics import EvalState, MetricConfig, evaluate_store

    device = context.device
    loaded = []
    for n, p in zip(names, paths):
        sae = load_any(p, device)
        sae.eval()
        loaded.append((n, sae))
    lm = None
    if store is not None:
        d_model = store.d_model
    else:
        from ..core.records import count_docs
        from ..data.models import load_model

        # bad input is refused before the model loads
        if count_docs(config.docs, config.text_field) == 0:
            raise BadInput(f"{', '.join('<stdin>' if d == spooled else d for d in config.docs)}: no documents")
        lm = load_model(config.model, device=device, model_dtype=model_dtype or "auto", prepend_bos=bos)
        lm.check_hook(config.hook)
        d_model = lm.hook_width(config.hook)
    for (_, sae), p in zip(loaded, paths):
        if sae.d_in != d_model:
            raise BadInput(f"{p}: SAE input width d_in {sae.d_in} differs from the activations' width {d_model}")

    ckpt = partial_path(out) + ".state"
    state = EvalState.load(ckpt, key)
    if state is not None:
        log.info("resuming from %s (%d tokens done)", ckpt, state.n_tokens)
    else:
        mcfg = MetricConfig(dense_threshold=config.dense_threshold, max_pairs=config.max_pairs,
                            cosine_pairs=config.cosine_pairs)
        state = EvalState(key, {n: (s.d_in, s.d_sae) for n, s in loaded}, mcfg, with_lm=lm is not None)

    def save():
        state.save(ckpt)

    with StopFlag() as stop:
        if store is not None:
            evaluate_store(store, loaded, state, rows=config.rows, max_tokens=config.max_tokens, device=device,
                           stop=stop, quiet=context.quiet, save=save)
        else:
            from .splice import DocsEvalConfig, evaluate_docs

            dcfg = DocsEvalConfig(hook=config.hook, context_size=config.context_size, batch_size=config.batch_size,
                                  max_tokens=config.max_tokens, splice_bos=config.splice_bos)
            evaluate_docs(lm, loaded, iter_docs(config.docs, config.text_field), dcfg, state, stop=stop,
                          quiet=context.quiet, save=save)
    if state.n_tokens == 0:
        _remove(ckpt)
        raise BadInput(f"{config.activations or ', '.join(config.docs)}: empty evaluation set (no tokens to evaluate)")
    if state.n_short_docs:
        log.warning("%d empty document(s) were skipped", state.n_short_docs)
    return state, loaded


def _metrics_doc(config: EvalConfig, state, loaded: list, infos: list[dict], baseline: str | None,
                 inputs: list[dict], lm_name: str, store, resolved: dict, context: RunContext) -> dict:
    """The `ssae.metrics/1` document."""
    from .metrics import SCHEMA, summarise

    results = summarise(state, loaded, infos, baseline, config.cosine_pairs, context.seed)
    docs = bool(config.docs)
    return {"schema": SCHEMA,
            "dataset": {"kind": "docs" if docs else "activations", "paths": [i["path"] for i in inputs] or ["-"],
                        "inputs": inputs, "model": lm_name, "hook": config.hook,
                        "context_size": config.context_size if docs else (store.context_size or None)},
            "n_tokens": int(state.n_tokens), "baseline": baseline, "saes": results, "config": resolved,
            "created_by": created_by(context.program)}


def _write(out: str, doc: dict, context: RunContext) -> None:
    """OUT/metrics.json, the plots and report.html, all at once; the comparison table on stderr."""
    from .plots import make_plots
    from .report import text_table, write_report

    with atomic_dir(out, context.force) as tmp:
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            dump_json(doc, f, indent=1)
        plots = make_plots(doc["saes"], tmp)
        write_report(os.path.join(tmp, "report.html"), doc, tmp, plots)
    if not context.quiet:
        print(text_table(doc["saes"]), file=sys.stderr)
    log.info("wrote %s (metrics.json, report.html, %d plots)", out, len(plots))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)

