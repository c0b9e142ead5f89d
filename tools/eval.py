"""ssae-eval: the paper's metrics for one SAE or many (reconstruction, sparsity, spliced-in perplexity,
tail coverage, entropy, activation counts, decoder similarity), PNG plots and an HTML report."""
from __future__ import annotations

import json
import logging
import os

import click

from ssae_tools.base import ssae_command
from ssae_common.core.outputs import default_output, workdir
from ssae_common.core.errors import BadInput
from ssae_common.eval.metrics import SCHEMA, EvalState, MetricConfig, evaluate_store, summarise
from ssae_common.data.models import DEFAULT_MODEL, load_model, model_identity
from ssae_common.core.outputs import atomic_dir, check_target, exclusive, partial_path, sha256_file
from ssae_common.core.provenance import config_hash, created_by, input_fingerprint
from ssae_common.core.records import artifact_record, iter_docs, resolve_artifacts, spool_stdin
from ssae_common.sae.autoencoder import SAE, read_config
from ssae_common.core.signals import StopFlag

log = logging.getLogger("ssae")
INFO_FIELDS = ("architecture", "d_in", "d_sae", "k", "tilt", "l1_coefficient", "model", "hook", "parent")


def _names(paths: list[str]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        base = os.path.basename(os.path.normpath(p)) or p
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _check_identity(path: str, cfg: dict, model: str, hook: str, where: str) -> None:
    sae_model, sae_hook = cfg.get("model"), cfg.get("hook")
    if not sae_model or not sae_hook:
        log.warning("%s/cfg.json records no model or hook: cannot check it matches %s", path, where)
        return
    if sae_model != model or sae_hook != hook:
        raise BadInput(f"{path}: SAE was trained on model {sae_model!r} at hook {sae_hook!r}, "
                       f"but {where} is model {model!r} at hook {hook!r}")


@ssae_command("eval")
@click.argument("saes", nargs=-1)
@click.option("--docs", "docs", multiple=True,
              help="Test documents (.jsonl[.gz], .txt, .parquet, hf:NAME[:SPLIT]; repeatable): runs the LM "
                   "for spliced-in perplexity and every activation metric.")
@click.option("--activations", default=None, help="A harvested activation file (.h5): activation metrics only.")
@click.option("--baseline", default=None, help="The baseline SAE (the GSAE): relative perplexity, count log-ratios.")
@click.option("--model", default=None,
              help=f"With --docs: the LM [default: the model in the SAEs' cfg.json, else {DEFAULT_MODEL}].")
@click.option("--hook", default=None,
              help="With --docs: the hook point to splice [default: the hook in the SAEs' cfg.json].")
@click.option("--context-size", type=int, default=128, show_default=True, help="With --docs: tokens per window, BOS included.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="With --docs: windows per forward pass.")
@click.option("--rows", type=int, default=4096, show_default=True, help="With --activations: rows per chunk.")
@click.option("--max-tokens", type=int, default=None, help="Evaluate at most this many tokens.")
@click.option("--splice-bos/--no-splice-bos", default=False, show_default=True,
              help="Also replace the BOS position in the spliced and zero-ablated runs.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in JSON inputs.")
@click.option("--max-pairs", type=int, default=8_000_000, show_default=True,
              help="Bound on (latent, token type) pairs kept for tail coverage (16 bytes each).")
@click.option("--cosine-pairs", type=int, default=2_000_000, show_default=True,
              help="Decoder cosine: all pairs up to this many, else a random sample of this size.")
@click.option("--dense-threshold", type=float, default=0.1, show_default=True,
              help="A latent is dense when active on more than this fraction of tokens.")
@click.option("-o", "--out", default=None, help="Output folder (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, saes, docs, activations, baseline, model, hook, context_size, batch_size, rows, max_tokens, splice_bos,
         text_field, max_pairs, cosine_pairs, dense_threshold, out):
    """Evaluate SAEs (folders, or ssae.artifact/1 records on stdin) on test DOCS or an ACTIVATIONS file.

    Writes OUT/metrics.json (ssae.metrics/1), PNG plots and report.html; prints one artifact record."""
    if bool(docs) == bool(activations):
        raise BadInput("give exactly one of --docs TEST or --activations TEST.h5")
    for opt, value, low in (("--context-size", context_size, 2), ("--batch-size", batch_size, 1), ("--rows", rows, 1),
                            ("--max-pairs", max_pairs, 2), ("--cosine-pairs", cosine_pairs, 1)):
        if value < low:
            raise BadInput(f"{opt} {value}: must be at least {low}")
    if max_tokens is not None and max_tokens < 1:
        raise BadInput(f"--max-tokens {max_tokens}: must be positive")
    if not saes and "-" in docs:
        raise BadInput("documents and SAE records cannot both come from stdin: give SAE folders as arguments")
    paths = resolve_artifacts(saes, "sae")
    spooled = None
    if "-" in docs and out is None:  # stdin gets a file, so its hash can name the default output
        spooled = spool_stdin(os.path.join(workdir(), "tmp"))
        docs = tuple(spooled if d == "-" else d for d in docs)
    try:
        _evaluate(common, paths, docs, activations, baseline, model, hook, context_size, batch_size, rows,
                  max_tokens, splice_bos, text_field, max_pairs, cosine_pairs, dense_threshold, out, spooled)
    finally:
        if spooled:
            os.remove(spooled)


def _evaluate(common, paths, docs, activations, baseline, model, hook, context_size, batch_size, rows, max_tokens,
              splice_bos, text_field, max_pairs, cosine_pairs, dense_threshold, out, spooled=None):
    if baseline is not None:
        if not any(os.path.realpath(p) == os.path.realpath(baseline) for p in paths):
            paths.append(baseline)
    cfgs = [read_config(p) for p in paths]  # BadInput when a folder lacks cfg.json
    names = _names(paths)
    baseline_name = None
    if baseline is not None:
        baseline_name = next(n for n, p in zip(names, paths) if os.path.realpath(p) == os.path.realpath(baseline))

    store = None
    if activations:
        from ssae_common.data.activations import ActivationStore

        store = ActivationStore(activations)
        if store.n_tokens == 0:
            raise BadInput(f"{activations}: empty activation file (no tokens to evaluate)")
        for opt, given, held in (("--model", model and model_identity(model), store.model), ("--hook", hook, store.hook)):
            if given and given != held:
                raise BadInput(f"{opt} {given}: {activations} holds activations of {held!r}")
        lm_name, hook = store.model, store.hook
        for p, c in zip(paths, cfgs):
            _check_identity(p, c, lm_name, hook, activations)
        inputs = [{"path": os.path.abspath(activations), "sha256": input_fingerprint(activations)}]
    else:
        spec = model or next((c["model"] for c in cfgs if c.get("model")), DEFAULT_MODEL)
        lm_name = model_identity(spec)
        hook = hook or next((c["hook"] for c in cfgs if c.get("hook")), None)
        if hook is None:
            raise BadInput(f"{paths[0]}/cfg.json: no hook recorded; cannot tell where to splice")
        for p, c in zip(paths, cfgs):
            _check_identity(p, c, lm_name, hook, f"--model {spec} --hook {hook}")
        inputs = [{"path": "-" if d == spooled else (d if d.startswith("hf:") else os.path.abspath(d)),
                   "sha256": input_fingerprint(d)} for d in docs if d != "-"]

    sae_shas = [sha256_file(p) for p in paths]
    resolved = common.resolved(
        saes=[{"name": n, "path": os.path.abspath(p), "sha256": s} for n, p, s in zip(names, paths, sae_shas)],
        baseline=baseline_name, mode="docs" if docs else "activations", inputs=inputs, model=lm_name, hook=hook,
        context_size=context_size if docs else None, batch_size=batch_size if docs else None,
        rows=rows if activations else None, max_tokens=max_tokens, splice_bos=splice_bos if docs else None,
        text_field=text_field if docs else None, max_pairs=max_pairs, cosine_pairs=cosine_pairs,
        dense_threshold=dense_threshold)
    key = config_hash(resolved)
    if out is None:
        out = default_output("metrics", key, "")
        if os.path.exists(os.path.join(out, "metrics.json")) and not common.force:
            click.echo(f"ssae-eval: reusing {out}", err=True)
            with open(os.path.join(out, "metrics.json")) as f:
                common.emit(_artifact(out, json.load(f)))
            return
    check_target(out, common.force)
    with exclusive(out):  # one writer per output (and per resume state)

        device = common.device
        loaded = []
        for n, p in zip(names, paths):
            sae = SAE.load(p, device)
            sae.eval()
            loaded.append((n, sae))
        d_model = store.d_model if store is not None else None
        lm = None
        if docs:
            lm = load_model(spec, device=device)
            lm.check_hook(hook)
            d_model = lm.d_model
        for (n, sae), p in zip(loaded, paths):
            if sae.d_in != d_model:
                raise BadInput(f"{p}: SAE input width d_in {sae.d_in} differs from the activations' width {d_model}")

        mcfg = MetricConfig(dense_threshold=dense_threshold, max_pairs=max_pairs, cosine_pairs=cosine_pairs)
        ckpt = partial_path(out) + ".state"
        state = EvalState.load(ckpt, key)
        if state is not None:
            log.info("resuming from %s (%d tokens done)", ckpt, state.n_tokens)
        else:
            state = EvalState(key, {n: (s.d_in, s.d_sae) for n, s in loaded}, mcfg, with_lm=bool(docs))
        save = lambda: state.save(ckpt)  # noqa: E731
        with StopFlag() as stop:
            if store is not None:
                evaluate_store(store, loaded, state, rows=rows, max_tokens=max_tokens, device=device, stop=stop,
                               quiet=common.quiet, save=save)
            else:
                from ssae_common.eval.splice import DocsEvalConfig, evaluate_docs

                dcfg = DocsEvalConfig(hook=hook, context_size=context_size, batch_size=batch_size, max_tokens=max_tokens,
                                      splice_bos=splice_bos)
                evaluate_docs(lm, loaded, iter_docs(docs, text_field), dcfg, state, stop=stop, quiet=common.quiet,
                              save=save)
        if state.n_tokens == 0:
            if os.path.exists(ckpt):
                os.remove(ckpt)
            where = activations or ", ".join(docs)
            raise BadInput(f"{where}: empty evaluation set (no tokens to evaluate)")
        if state.n_short_docs:
            log.warning("%d empty document(s) were skipped", state.n_short_docs)

        infos = []
        for n, p, c, s in zip(names, paths, cfgs, sae_shas):
            infos.append({"name": n, "path": os.path.abspath(p), "sha256": s, "is_baseline": n == baseline_name,
                          **{k: c.get(k) for k in INFO_FIELDS}})
        results = summarise(state, loaded, infos, baseline_name, cosine_pairs, common.seed)
        doc = {"schema": SCHEMA,
               "dataset": {"kind": "docs" if docs else "activations", "paths": [i["path"] for i in inputs] or ["-"],
                           "inputs": inputs, "model": lm_name, "hook": hook,
                           "context_size": context_size if docs else (store.context_size or None)},
               "n_tokens": int(state.n_tokens), "baseline": baseline_name, "saes": results, "config": resolved,
               "created_by": created_by("ssae-eval")}
        from ssae_common.eval.plots import make_plots
        from ssae_common.eval.report import text_table, write_report

        with atomic_dir(out, common.force) as tmp:
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump(_finite(doc), f, indent=1, allow_nan=False, default=_json_default)
            plots = make_plots(results, tmp)
            write_report(os.path.join(tmp, "report.html"), doc, tmp, plots)
        if os.path.exists(ckpt):
            os.remove(ckpt)
        if store is not None:
            store.close()
        if not common.quiet:
            click.echo(text_table(results), err=True)
        log.info("wrote %s (metrics.json, report.html, %d plots)", out, len(plots))
        common.emit(_artifact(out, doc))


def _finite(value):
    """NaN/inf -> null, so metrics.json stays strict JSON."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _artifact(out: str, doc: dict) -> dict:
    return artifact_record("metrics", os.path.join(out, "metrics.json"), report=os.path.abspath(os.path.join(out, "report.html")),
                           n_tokens=doc["n_tokens"], dataset=doc["dataset"]["kind"],
                           saes=[{k: s.get(k) for k in ("name", "l0", "fvu", "ppl_spliced", "rel_ppl_vs_baseline")
                                  if s.get(k) is not None} for s in doc["saes"]])


if __name__ == "__main__":
    main()
