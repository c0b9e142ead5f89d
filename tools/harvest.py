"""ssae-harvest: documents -> activations at one hook point (an `ssae.activations/1` HDF5 file)."""
from __future__ import annotations

import os

import click

from ssae_tools.base import ssae_command
from ssae_common.core.outputs import default_output, workdir
from ssae_common.core.runtime import parse_shard
from ssae_common.core.errors import BadInput
from ssae_common.data.harvest import HarvestConfig, activation_artifact, harvest
from ssae_common.data.models import DEFAULT_MODEL, load_model, model_identity, parse_hook
from ssae_common.core.provenance import config_hash, created_by, input_fingerprint
from ssae_common.data.activations import DTYPES, merge_shards
from ssae_common.core.outputs import atomic_file
from ssae_common.core.records import iter_docs, resolve_artifacts, spool_stdin, stdin_is_terminal


@ssae_command("harvest")
@click.argument("docs", nargs=-1)
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Bundled alias (smollm2), Hugging Face name, local folder or .gguf file.")
@click.option("--hook", default=None, help="TransformerLens hook name [default: blocks.6.hook_resid_post].")
@click.option("--layer", type=int, default=None, help="Shorthand for --hook blocks.L.hook_resid_post.")
@click.option("--context-size", type=int, default=128, show_default=True, help="Tokens per window, BOS included.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Windows per forward pass.")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many stored tokens.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True)
@click.option("--drop-bos/--keep-bos", default=True, show_default=True, help="Store the BOS position or not.")
@click.option("--min-tokens", type=int, default=1, show_default=True,
              help="Documents with fewer tokens are skipped (and counted on stderr).")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in JSON inputs.")
@click.option("--store-text/--no-store-text", default=True, show_default=True, help="Keep document text in /docs/text.")
@click.option("--shard", default=None, help="i/n: harvest every n-th document from the i-th (default from SLURM).")
@click.option("--merge", is_flag=True, help="Merge the --shard outputs given as arguments into one file.")
@click.option("-o", "--out", default=None, help="Output .h5 (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, docs, model, hook, layer, context_size, batch_size, max_tokens, dtype, drop_bos, min_tokens,
         text_field, store_text, shard, merge, out):
    """Run DOCS (paths, hf:NAME[:SPLIT], or - / stdin) through MODEL and store activations at HOOK.

    With --merge, DOCS are shard outputs (paths or artifact records on stdin), merged into input order.
    """
    if merge:
        paths = resolve_artifacts(docs, "activations")
        resolved = common.resolved(merge=[{"path": p, "sha256": input_fingerprint(p)} for p in paths])
        out = out or default_output("activations", config_hash(resolved), ".h5")
        with atomic_file(out, force=common.force, suffix=".h5") as tmp:
            n_tokens, n_docs = merge_shards(paths, tmp, {"created_by": created_by("ssae-harvest")})
        click.echo(f"ssae-harvest: merged {len(paths)} shards into {out}: {n_tokens} tokens, {n_docs} documents",
                   err=True)
        common.emit(activation_artifact(out))
        return
    hook = parse_hook(hook, layer)
    cfg = HarvestConfig(hook=hook, context_size=context_size, batch_size=batch_size, max_tokens=max_tokens,
                        dtype=dtype, drop_bos=drop_bos, min_tokens=min_tokens, shard=parse_shard(shard),
                        store_text=store_text)
    cfg.check()
    inputs = list(docs) or ["-"]
    spooled = None
    if "-" in inputs:
        if stdin_is_terminal():
            raise BadInput("no input: give document paths or pipe documents on stdin")
        if out is None:
            spooled = spool_stdin(os.path.join(workdir(), "tmp"))
            inputs = [spooled if p == "-" else p for p in inputs]
    try:
        resolved = common.resolved(model=model_identity(model), hook=hook, context_size=context_size,
                                   batch_size=batch_size, max_tokens=max_tokens, dtype=dtype, drop_bos=drop_bos,
                                   min_tokens=min_tokens, text_field=text_field, store_text=store_text,
                                   shard=f"{cfg.shard[0]}/{cfg.shard[1]}",
                                   inputs=[{"path": p, "sha256": input_fingerprint(p)} for p in inputs
                                           if p != "-"])
        if out is None:
            out = default_output("activations", config_hash(resolved), ".h5")
            if os.path.exists(out) and not common.force:
                click.echo(f"ssae-harvest: reusing {out}", err=True)
                common.emit(activation_artifact(out))
                return
        lm = load_model(model, device=common.device)
        lm.check_hook(hook)
        attrs = {"model": lm.name, "hook": hook, "context_size": context_size, "dtype": dtype,
                 "bos_dropped": bool(drop_bos and lm.bos_token_id is not None), "config": resolved,
                 "created_by": created_by("ssae-harvest"), "store_text": store_text,
                 "shard": f"{cfg.shard[0]}/{cfg.shard[1]}", "seed": common.seed}
        record = harvest(lm, iter_docs(inputs, text_field), out, cfg, attrs, force=common.force, quiet=common.quiet)
        common.emit(record)
    finally:
        if spooled:
            os.remove(spooled)
