"""The options of ssae-fit, declared once (the tool's flags are generated from these fields).

Only the standard library and ssae_common.core.config are imported here, so `ssae-fit --help` and
`from ssae_common.sae import FitConfig` stay light.

Defaults that depend on the data or on the parent SAE (--init) are None here and filled by
`FitConfig.resolve(d_in, n_rows, parent)`:

    architecture, d_sae, k, l1   the parent's with --init; else topk, expansion x d_in, 32, 5 / d_in
    lr                           2e-4 / sqrt(d_sae / 2^14)
    train_tokens                 the inputs' row count
    dead_tokens                  max(batch_size, min(10M, train_tokens / 5))
    b_dec_init                   parent with --init, else median
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.config import ConfigError, check_bounds, option, replace

if TYPE_CHECKING:
    from .autoencoder import SAE

ARCHITECTURES = ("relu", "topk")
FORMATS = ("auto", "ssae", "saelens", "sparsify", "dictionary_learning")  # of --init (sae.imports)
B_DEC_INITS = ("median", "mean", "zero", "parent")
DEFAULT_EXPANSION = 8
DEFAULT_K = 32
DEAD_TOKENS_CAP = 10_000_000


@dataclass(frozen=True)
class FitConfig:
    architecture: str | None = option(None, choices=ARCHITECTURES, derived="topk, or the parent's with --init",
                                      help="relu (L1 penalty) or topk.")
    d_sae: int | None = option(None, min=1, derived="--expansion x d_in", help="Number of latents.")
    expansion: float | None = option(None, above=0, derived=str(DEFAULT_EXPANSION),
                                     help="d_sae as a multiple of d_in.")
    k: int | None = option(None, derived=f"{DEFAULT_K}, or the parent's",
                           help="Active latents per token for topk.")
    l1: float | None = option(None, derived="5/d_in, or the parent's",
                              help="L1 coefficient for relu (on the per-token loss, see docs/fit.md).")
    tilt: float = option(0.0, help="TERM tilt t; 0 is ERM (the mean loss).")
    init: str | None = option(
        None, help="Parent SAE to finetune (ours, SAELens, sparsify or dictionary_learning files).")
    init_format: str = option("auto", choices=FORMATS)
    allow_init_mismatch: bool = option(
        False, help="Finetune an --init parent trained on another model or hook than the activations'.")
    lr: float | None = option(None, above=0, derived="2e-4 / sqrt(d_sae / 2^14)", help="Adam learning rate.")
    batch_size: int = option(4096, min=1, help="Tokens per step (TERM tilts within a batch).")
    train_tokens: int | None = option(None, min=1, derived="the inputs' row count", help="Token budget.")
    warmup_steps: int = option(1000, min=0, help="LR warm-up (at most 10% of steps).")
    decay_fraction: float = option(0.2, min=0, max=1, help="Final share of steps with linear LR decay to 0.")
    l1_warmup_fraction: float = option(0.05, min=0, max=1, help="Share of steps ramping the L1 coefficient.")
    b_dec_init: str | None = option(
        None, choices=B_DEC_INITS, derived="median; parent with --init",
        help="Decoder bias start: geometric median or mean of the data, zero.")
    normalize: bool = option(
        True, help="Scale inputs so the mean squared norm is d_in (act_scale; a parent keeps its own).")
    dead_tokens: int | None = option(None, min=1, derived="min(10M, budget/5)",
                                     help="A latent unfired for this many tokens is dead.")
    aux_k: int = option(0, min=0, help="AuxK: dead latents reconstructing the residual (topk; 0 off).")
    aux_coefficient: float = option(1 / 32, min=0)
    val_tokens: int = option(8192, min=0, help="Held-out rows for validation (0: none).")
    val_every: int = option(1000, min=1, help="Steps between validation records.")
    log_every: int = option(100, min=1, help="Steps between train_log.jsonl records.")
    checkpoint_every: int = option(1000, min=1, help="Steps between checkpoints.")
    shuffle_rows: int = option(32768, min=1,
                               help="Rows shuffled together (memory: about 2 x rows x d_in x 4 bytes).")
    autocast: bool = option(False, help="bfloat16 autocast on CUDA.")
    # set by the stage from its RunContext (--seed, --device)
    seed: int = option(0, cli=False)
    device: str = option("cpu", cli=False)

    @property
    def is_resolved(self) -> bool:
        """Every derived default filled in (k stays None for relu)."""
        return None not in (self.architecture, self.d_sae, self.l1, self.lr, self.train_tokens, self.b_dec_init,
                            self.dead_tokens)

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.train_tokens / self.batch_size))

    def check(self) -> None:
        """Bounds and choices of every field, then the checks across fields (those of fields still None,
        i.e. before `resolve`, are skipped)."""
        check_bounds(self)
        for name in ("l1", "tilt", "lr"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(name, value, "must be a finite number")
        if self.l1 is not None and self.l1 < 0:
            raise ConfigError("l1", self.l1, "must be >= 0")
        if self.architecture == "topk" and self.d_sae is not None and not (self.k is not None and 1 <= self.k <= self.d_sae):
            raise ConfigError("k", self.k, f"must be between 1 and --d-sae ({self.d_sae})")
        if self.architecture == "topk" and self.l1:
            raise ConfigError("l1", self.l1, "only for --architecture relu (topk sets sparsity with --k)")
        if self.b_dec_init == "parent" and not self.init:
            raise ConfigError("b_dec_init", self.b_dec_init, "needs --init")

    def resolve(self, d_in: int, n_rows: int, parent: SAE | None = None) -> FitConfig:
        """This config with every derived default filled in, for activations of width `d_in` with
        `n_rows` rows and the parent SAE read from `init` (None without one); checked."""
        self.check()
        architecture, d_sae, k, l1 = self.architecture, self.d_sae, self.k, self.l1
        if parent is not None:
            if architecture and architecture != parent.architecture:
                raise ConfigError("architecture", architecture, f"the parent {self.init} is {parent.architecture}")
            if d_sae is not None and d_sae != parent.d_sae:
                raise ConfigError("d_sae", d_sae, f"the parent {self.init} has {parent.d_sae} latents")
            architecture, d_sae = parent.architecture, parent.d_sae
            k = parent.k if k is None else k
            if l1 is None and parent.cfg.get("l1_coefficient"):
                l1 = float(parent.cfg["l1_coefficient"])
        architecture = architecture or "topk"
        if d_sae is None:
            d_sae = int(round((self.expansion or DEFAULT_EXPANSION) * d_in))
        if architecture == "topk":
            k = DEFAULT_K if k is None else k
            l1 = l1 or 0.0  # a non-zero one is refused by check()
        else:
            k = None  # relu: sparsity comes from the L1 penalty; a --k is ignored
            l1 = 5.0 / d_in if l1 is None else l1
        train_tokens = n_rows if self.train_tokens is None else self.train_tokens
        resolved = replace(
            self, architecture=architecture, d_sae=d_sae, expansion=d_sae / d_in, k=k, l1=l1,
            lr=self.lr if self.lr is not None else 2e-4 / math.sqrt(max(d_sae, 1) / 2**14),
            train_tokens=train_tokens,
            b_dec_init=self.b_dec_init or ("parent" if parent is not None else "median"),
            dead_tokens=(self.dead_tokens if self.dead_tokens is not None
                         else max(self.batch_size, min(DEAD_TOKENS_CAP, train_tokens // 5))))
        resolved.check()
        return resolved
