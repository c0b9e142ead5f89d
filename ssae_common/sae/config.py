"""The options of ssae-fit, declared once (the tool's flags are generated from these fields).

Only the standard library, ssae_common.core.config and the architecture registry's names are imported here,
so `ssae-fit --help` and `from ssae_common.sae import FitConfig` stay light; check() and resolve() import
the architecture's module (sae.architectures), whose checks and defaults they apply.

Defaults that depend on the data or on the parent SAE (--init) are None here and filled by
`FitConfig.resolve(d_in, n_rows, parent)`:

    architecture, d_sae, k, l1   the parent's with --init; else topk, expansion x d_in, 32, 5 / d_in
    l0 (jumprelu)                the parent's with --init; else 1 / d_in
    group_fractions              (matryoshka-batchtopk) the parent's groups; else 1/32, 1/16, 1/8, 1/4, 17/32
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
from .architectures import NAMES as ARCHITECTURES, get as get_architecture

if TYPE_CHECKING:
    from .autoencoder import SAE

FORMATS = ("auto", "ssae", "saelens", "sparsify", "dictionary_learning", "gemma_scope")  # of --init (sae.imports)
B_DEC_INITS = ("median", "mean", "zero", "parent")
TILT_GROUPS = ("none", "token")
DECODERS = ("auto", "dense", "sparse")  # sae.sparse.use_sparse
DEFAULT_EXPANSION = 8
DEFAULT_K = 32
DEAD_TOKENS_CAP = 10_000_000
DEFAULT_BANDWIDTH = 0.05  # SAELens 6's jumprelu_bandwidth
# the options ssae-fit takes as a comma-separated list (with --seed): one SAE per combination, one read of
# the data per seed (sae.stage.fit_sweep); the short names label each SAE's folder under -o
SWEEPS = {"tilt": "tilt", "tilt_ess": "ess", "k": "k"}


@dataclass(frozen=True)
class FitConfig:
    architecture: str | None = option(None, choices=ARCHITECTURES, derived="topk, or the parent's with --init",
                                      help="relu (L1 penalty), topk, jumprelu (L0 penalty), batchtopk or "
                                           "matryoshka-batchtopk (nested groups of latents; see docs/fit.md).")
    d_sae: int | None = option(None, min=1, derived="--expansion x d_in", help="Number of latents.")
    expansion: float | None = option(None, above=0, derived=str(DEFAULT_EXPANSION),
                                     help="d_sae as a multiple of d_in.")
    k: int | None = option(None, min=1, derived=f"{DEFAULT_K}, or the parent's",
                           help="Active latents per token for topk (the mean, for batchtopk and "
                                "matryoshka-batchtopk).")
    l1: float | None = option(None, min=0, derived="5/d_in, or the parent's",
                              help="L1 coefficient for relu (on the per-token loss, see docs/fit.md).")
    tilt: float = option(0.0, help="TERM tilt t, fixed; 0 is ERM (the mean loss). See docs/fit.md.")
    tilt_ess: float | None = option(
        None, above=0, max=1,
        help="TERM with t chosen per batch so the weights' effective sample size is this fraction of the "
             "batch (1 is ERM; instead of --tilt).")
    tilt_groups: str = option("none", choices=TILT_GROUPS,
                              help="token: tilt across token types (each type's mean loss in the batch) "
                                   "instead of across tokens; with --tilt or --tilt-ess.")
    init: str | None = option(
        None, help="Parent SAE to finetune (ours, SAELens, sparsify, dictionary_learning or Gemma Scope files).")
    init_format: str = option("auto", choices=FORMATS,
                              help="The --init parent's format (auto: told by its files).")
    allow_init_mismatch: bool = option(
        False, hashed=False, why="a permission: the parent and the data are hashed themselves",
        help="Finetune an --init parent trained on another model or hook than the activations'.")
    lr: float | None = option(None, above=0, derived="2e-4 / sqrt(d_sae / 2^14)", help="Adam learning rate.")
    batch_size: int = option(4096, min=1, help="Tokens per step (TERM tilts within a batch).")
    train_tokens: int | None = option(None, min=1, derived="the inputs' row count", help="Token budget.")
    warmup_steps: int = option(1000, min=0, help="LR warm-up (at most 10% of steps).")
    decay_fraction: float = option(0.0, min=0, max=1, help="Final share of steps with linear LR decay to 0.")
    l1_warmup_fraction: float = option(0.05, min=0, max=1, help="Share of steps ramping the L1 coefficient.")
    b_dec_init: str | None = option(
        None, choices=B_DEC_INITS, derived="median; parent with --init",
        help="Decoder bias start: geometric median or mean of the data, zero.")
    normalize: bool = option(
        True, help="Scale inputs so the mean squared norm is d_in (act_scale; a parent keeps its own).")
    dead_tokens: int | None = option(None, min=1, derived="min(10M, budget/5)",
                                     help="A latent unfired for this many tokens is dead.")
    aux_k: int = option(0, min=0, help="AuxK: dead latents reconstructing the residual (the topk and batchtopk "
                                       "architectures; 0 off).")
    aux_coefficient: float = option(1 / 32, min=0, help="Weight of the AuxK loss (with --aux-k).")
    normalize_grad: bool = option(
        True, help="Scale each step's gradient (all parameters together) to unit norm before Adam, so that every "
                   "step weighs alike in Adam's moment estimates (dictionary_learning's and SAELens's norm-1 clip "
                   "does this to theirs, which always exceed 1; docs/benchmarks.md).")
    # jumprelu (sae.objective: the straight-through estimator, as SAELens 6)
    l0: float | None = option(None, min=0, derived="1/d_in, or the parent's",
                              help="L0 coefficient for jumprelu (on the per-token loss, see docs/fit.md).")
    bandwidth: float = option(DEFAULT_BANDWIDTH, above=0, help="jumprelu: width of the straight-through estimator's kernel.")
    # matryoshka-batchtopk (sae.architectures.matryoshka)
    group_fractions: tuple[float, ...] = option(
        (), multiple=True, flag="group-fraction", above=0, max=1,
        derived="1/32, 1/16, 1/8, 1/4, 17/32; the parent's groups with --init",
        help="matryoshka-batchtopk: the share of the latents in each nested group, first group first; repeat "
             "the flag once per group (two or more, summing to 1).")
    val_tokens: int = option(8192, min=0, help="Held-out rows for validation (0: none).")
    val_every: int = option(1000, min=1, help="Steps between validation records.")
    log_every: int = option(100, min=1, help="Steps between train_log.jsonl records.")
    checkpoint_every: int = option(1000, min=1, help="Steps between checkpoints.")
    prefetch: bool = option(
        True, hashed=False, why="the batches are the same either way",
        help="Build the next batch in a background thread while the current step runs (on CUDA: pinned, "
                   "copied asynchronously); the batches are the same either way.")
    shuffle_rows: int = option(32768, min=1,
                               help="Rows shuffled together (memory: about 2 x rows x d_in x 4 bytes).")
    autocast: bool = option(True, help="bfloat16 autocast of the SAE forward on CUDA (CPU: never).")
    decoder: str = option("auto", choices=DECODERS,
                          help="topk: sparse decodes from the k active latents only (and takes the encoder's "
                               "gradient at them), dense uses full matrix products; auto: sparse on CPU when "
                               "k < d_sae/8, else dense. Equal up to float rounding.")
    # set by the stage from its RunContext (--seed, --device)
    seed: int = option(0, min=0, cli=False)
    device: str = option("cpu", cli=False)

    @property
    def is_resolved(self) -> bool:
        """Every derived default filled in (k stays None for relu)."""
        return None not in (self.architecture, self.d_sae, self.l1, self.lr, self.train_tokens, self.b_dec_init,
                            self.dead_tokens)

    @property
    def tilted(self) -> bool:
        """TERM rather than ERM (a fixed t, or one solved per batch for --tilt-ess < 1)."""
        return bool(self.tilt) or (self.tilt_ess is not None and self.tilt_ess < 1)

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.train_tokens / self.batch_size))

    def check(self) -> None:
        """Bounds and choices of every field, then the checks across fields, the architecture's in its module
        (sae.architectures; those of fields still None, i.e. before `resolve`, are skipped)."""
        check_bounds(self)
        if self.architecture is not None:
            get_architecture(self.architecture).check_config(self)
        if self.tilt and self.tilt_ess is not None:
            raise ConfigError("tilt_ess", self.tilt_ess, f"give --tilt ({self.tilt}) or --tilt-ess, not both")
        if self.tilt_groups != "none" and not (self.tilt or self.tilt_ess is not None):
            raise ConfigError("tilt_groups", self.tilt_groups, "needs --tilt or --tilt-ess (without one it is ERM)")
        if self.b_dec_init == "parent" and not self.init:
            raise ConfigError("b_dec_init", self.b_dec_init, "needs --init")

    def resolve(self, d_in: int, n_rows: int, parent: SAE | None = None) -> FitConfig:
        """This config with every derived default filled in, for activations of width `d_in` with
        `n_rows` rows and the parent SAE read from `init` (None without one); checked."""
        self.check()
        architecture, d_sae, k, l1, l0 = self.architecture, self.d_sae, self.k, self.l1, self.l0
        if parent is not None:
            if architecture and architecture != parent.architecture:
                raise ConfigError("architecture", architecture, f"the parent {self.init} is {parent.architecture}")
            if d_sae is not None and d_sae != parent.d_sae:
                raise ConfigError("d_sae", d_sae, f"the parent {self.init} has {parent.d_sae} latents")
            architecture, d_sae = parent.architecture, parent.d_sae
            k = parent.k if k is None else k
            if l1 is None and parent.cfg.get("l1_coefficient"):
                l1 = float(parent.cfg["l1_coefficient"])
            if l0 is None and parent.cfg.get("l0_coefficient"):
                l0 = float(parent.cfg["l0_coefficient"])
        architecture = architecture or "topk"
        if d_sae is None:
            d_sae = int(round((self.expansion or DEFAULT_EXPANSION) * d_in))
        values = get_architecture(architecture).resolve(
            {"k": k, "l1": l1, "l0": l0, "group_fractions": self.group_fractions}, d_in, d_sae, parent)
        train_tokens = n_rows if self.train_tokens is None else self.train_tokens
        resolved = replace(
            self, architecture=architecture, d_sae=d_sae, expansion=d_sae / d_in, **values,
            lr=self.lr if self.lr is not None else 2e-4 / math.sqrt(max(d_sae, 1) / 2**14),
            train_tokens=train_tokens,
            b_dec_init=self.b_dec_init or ("parent" if parent is not None else "median"),
            dead_tokens=(self.dead_tokens if self.dead_tokens is not None
                         else max(self.batch_size, min(DEAD_TOKENS_CAP, train_tokens // 5))))
        resolved.check()
        return resolved


# --- ssae-export (sae.export) ---------------------------------------------------------------------
EXPORT_FORMATS = ("saelens", "sparsify", "ssae")


@dataclass(frozen=True)
class ExportConfig:
    to: str = option("saelens", choices=EXPORT_FORMATS,
                     help="Format to write: a SAELens or sparsify folder (act_scale folded in), or ours.")
    model: str | None = option(None, help="Model name to record (default: the one the SAE's files record).")
    hook: str | None = option(None, help="Hook name to record (default: the one the SAE's files record).")

    def check(self) -> None:
        check_bounds(self)

