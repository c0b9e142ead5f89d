"""ssae-fit: activations -> a sparse autoencoder (`ssae.sae/1` directory), by ERM or tilted ERM,
from scratch or finetuned from a general SAE (--init).  Under torchrun it trains data-parallel
(ssae_common.sae.train.DataParallel); rank 0 writes the output and prints the record."""
from __future__ import annotations

import math
import os
from dataclasses import asdict

import click

from ssae_common.data.activations import open_stores
from ssae_common.data.activations import store_fingerprint
from ssae_tools.base import ssae_command
from ssae_common.core.outputs import default_output
from ssae_common.core.errors import BadInput
from ssae_common.core.provenance import config_hash, created_by
from ssae_common.core.records import resolve_artifacts
from ssae_common.sae.imports import FORMATS, import_sae
from ssae_common.sae.train import FitConfig, Parent, fit, parent_sha256, sae_artifact


@ssae_command("fit")
@click.argument("activations", nargs=-1)
@click.option("--architecture", type=click.Choice(["relu", "topk"]), default=None,
              help="relu (L1 penalty) or topk [default: topk, or the parent's with --init].")
@click.option("--d-sae", type=int, default=None, help="Number of latents [default: --expansion x d_in].")
@click.option("--expansion", type=float, default=None, help="d_sae as a multiple of d_in [default: 8].")
@click.option("--k", type=int, default=None, help="Active latents per token for topk [default: 32, or the parent's].")
@click.option("--l1", type=float, default=None,
              help="L1 coefficient for relu (on the per-token loss, see README) [default: 5/d_in, or the parent's].")
@click.option("--tilt", type=float, default=0.0, show_default=True, help="TERM tilt t; 0 is ERM (the mean loss).")
@click.option("--init", "init_path", default=None,
              help="Parent SAE to finetune (ours, SAELens, sparsify or dictionary_learning files).")
@click.option("--init-format", type=click.Choice(FORMATS), default="auto", show_default=True)
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: 2e-4 / sqrt(d_sae / 2^14)].")
@click.option("--batch-size", type=int, default=4096, show_default=True, help="Tokens per step (TERM tilts within a batch).")
@click.option("--train-tokens", type=int, default=None, help="Token budget [default: the inputs' row count].")
@click.option("--warmup-steps", type=int, default=1000, show_default=True, help="LR warm-up (at most 10%% of steps).")
@click.option("--decay-fraction", type=float, default=0.2, show_default=True, help="Final share of steps with linear LR decay to 0.")
@click.option("--l1-warmup-fraction", type=float, default=0.05, show_default=True, help="Share of steps ramping the L1 coefficient.")
@click.option("--b-dec-init", type=click.Choice(["median", "mean", "zero", "parent"]), default=None,
              help="Decoder bias start: geometric median or mean of the data, zero [default: median; parent with --init].")
@click.option("--normalize/--no-normalize", default=True, show_default=True,
              help="Scale inputs so the mean squared norm is d_in (act_scale; a parent keeps its own).")
@click.option("--dead-tokens", type=int, default=None,
              help="A latent unfired for this many tokens is dead [default: min(10M, budget/5)].")
@click.option("--aux-k", type=int, default=0, show_default=True, help="AuxK: dead latents reconstructing the residual (topk; 0 off).")
@click.option("--aux-coefficient", type=float, default=1 / 32, show_default=True)
@click.option("--val-tokens", type=int, default=8192, show_default=True, help="Held-out rows for validation (0: none).")
@click.option("--val-every", type=int, default=1000, show_default=True, help="Steps between validation records.")
@click.option("--log-every", type=int, default=100, show_default=True, help="Steps between train_log.jsonl records.")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True, help="Steps between checkpoints.")
@click.option("--shuffle-rows", type=int, default=32768, show_default=True,
              help="Rows shuffled together (memory: about 2 x rows x d_in x 4 bytes).")
@click.option("--autocast/--no-autocast", default=False, show_default=True, help="bfloat16 autocast on CUDA.")
@click.option("-o", "--out", default=None, help="Output SAE folder (default: under $SSAE_WORKDIR, named by a hash).")
def main(common, activations, architecture, d_sae, expansion, k, l1, tilt, init_path, init_format, lr, batch_size,
         train_tokens, warmup_steps, decay_fraction, l1_warmup_fraction, b_dec_init, normalize, dead_tokens, aux_k,
         aux_coefficient, val_tokens, val_every, log_every, checkpoint_every, shuffle_rows, autocast, out):
    """Train an SAE on ACTIVATIONS (.h5 paths, or ssae.artifact/1 records on stdin)."""
    paths = resolve_artifacts(activations, "activations")
    stores = open_stores(paths)
    try:
        d_in, model, hook = stores[0].d_model, stores[0].model, stores[0].hook
        n_rows = sum(s.n_tokens for s in stores)
    finally:
        for s in stores:
            s.close()

    parent = None
    if init_path:
        sae, fmt = import_sae(init_path, init_format)
        parent = Parent(init_path, fmt, parent_sha256(init_path), sae)
        if sae.d_in != d_in:
            raise BadInput(f"--init {init_path}: d_in {sae.d_in} differs from the activations' d_model {d_in} "
                           f"({paths[0]})")
        if architecture and architecture != sae.architecture:
            raise BadInput(f"--architecture {architecture}: the parent {init_path} is {sae.architecture}")
        if d_sae is not None and d_sae != sae.d_sae:
            raise BadInput(f"--d-sae {d_sae}: the parent {init_path} has {sae.d_sae} latents")
        architecture, d_sae = sae.architecture, sae.d_sae
        k = sae.k if k is None else k
        if l1 is None and sae.cfg.get("l1_coefficient"):
            l1 = float(sae.cfg["l1_coefficient"])
    architecture = architecture or "topk"
    if d_sae is None:
        if expansion is not None and expansion <= 0:
            raise BadInput(f"--expansion {expansion}: must be > 0")
        d_sae = int(round((expansion or 8) * d_in))
    if architecture == "topk":
        k = 32 if k is None else k
        if l1:
            raise BadInput("--l1: only for --architecture relu (topk sets sparsity with --k)")
        l1 = 0.0
    else:
        k = None
        l1 = 5.0 / d_in if l1 is None else l1
    train_tokens = n_rows if train_tokens is None else train_tokens
    cfg = FitConfig(architecture=architecture, d_sae=d_sae, k=k, l1=l1, tilt=tilt,
                    lr=lr if lr is not None else 2e-4 / math.sqrt(max(d_sae, 1) / 2**14),
                    batch_size=batch_size, train_tokens=train_tokens, seed=common.seed, warmup_steps=warmup_steps,
                    decay_fraction=decay_fraction, l1_warmup_fraction=l1_warmup_fraction,
                    b_dec_init=b_dec_init or ("parent" if parent else "median"), normalize=normalize,
                    dead_tokens=dead_tokens if dead_tokens is not None else max(batch_size, min(10_000_000, train_tokens // 5)),
                    aux_k=aux_k, aux_coefficient=aux_coefficient, val_tokens=val_tokens, val_every=val_every,
                    log_every=log_every, checkpoint_every=checkpoint_every, window_rows=shuffle_rows,
                    autocast=autocast, device=common.device)
    cfg.check()
    if cfg.b_dec_init == "parent" and parent is None:
        raise BadInput("--b-dec-init parent: needs --init")

    inputs = [{"path": os.path.abspath(p), "fingerprint": store_fingerprint(p)} for p in paths]
    resolved = common.resolved(**asdict(cfg), inputs=inputs, init=parent.record() if parent else None)
    digest = config_hash(resolved)
    if out is None:
        out = default_output("sae", digest, "")
        if os.path.exists(os.path.join(out, "cfg.json")) and not common.force:
            if main_rank():
                click.echo(f"ssae-fit: reusing {out}", err=True)
                common.emit(sae_artifact(out))
            return
    extra = {"model": model, "hook": hook, "tilt": cfg.tilt, "l1_coefficient": cfg.l1,
             "parent": parent.record() if parent else None, "seed": common.seed, "inputs": inputs,
             "config": resolved, "created_by": created_by("ssae-fit")}
    record = fit(paths, cfg, out, parent=parent, resolved=resolved, config_digest=digest, extra_cfg=extra,
                 force=common.force, quiet=common.quiet)
    if record is not None:  # under torchrun only rank 0 writes and reports
        common.emit(record)


def main_rank() -> bool:
    """False on the ranks of a torchrun job other than 0."""
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    main()
