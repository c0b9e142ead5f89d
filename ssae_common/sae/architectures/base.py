"""What an SAE architecture is: the class every module of this package subclasses once.

The shared parts of an SAE (W_enc, b_enc, W_dec, b_dec, act_scale) and of its training (Adam, TERM over
the per-token losses, decoder rows kept at unit norm) are the same for all; an Architecture supplies the
rest.  Units are the normalised ones of training (inputs times act_scale).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ...core.config import ConfigError
from ...core.errors import BadInput
from .. import sparse as sparse_ops
from ..config import DEFAULT_BANDWIDTH, DEFAULT_K
from . import every

if TYPE_CHECKING:
    from ..autoencoder import SAE
    from ..config import FitConfig
    from ..distributed import DataParallel

# FitConfig fields that belong to some architectures only, and when a value counts as given: one given for
# an architecture that does not read it is refused (k is not: a parent's or a sweep's k is left unused)
SPECIFIC = {"l1": bool, "l0": bool, "bandwidth": lambda v: v != DEFAULT_BANDWIDTH, "group_fractions": bool}


def pre_train(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Pre-activations of normalised inputs, (x - b_dec) @ W_enc + b_enc computed as x @ W_enc - b_dec @ W_enc
    + b_enc, so that b_dec's gradient does not cost a batch x d_in x d_sae product."""
    return x @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)


class Architecture:
    name = ""
    options: tuple[str, ...] = ()  # the FitConfig fields of SPECIFIC (and k) it reads
    penalty: str | None = None  # the FitConfig field holding the coefficient of its per-token penalty
    threshold: str | None = None  # a `threshold` tensor [d_sae]: "trained" (a parameter), "running" (a buffer)
    auxk = False  # --aux-k applies (dead latents reconstruct the residual)
    sparse_decoder = False  # --decoder sparse applies (a fixed k per token)
    per_latent = True  # at inference a latent's activation depends on its own pre-activation only
    # names in the other libraries' files (sae.imports, sae.export)
    saelens = "standard"  # the SAELens architecture it is written as
    saelens_reads: tuple[str, ...] = ()  # SAELens architectures read as this one
    sparsify = False  # sparsify holds it
    dictionary_learning: tuple[str, ...] = ()  # dictionary_learning classes read as this one

    # --- the model -------------------------------------------------------------------------------------
    def build(self, sae: SAE, group_sizes=None) -> None:
        """Check the SAE's shape options and add this architecture's tensors to a new SAE."""
        if "k" in self.options and (sae.k is None or not 0 < sae.k <= sae.d_sae):
            raise ConfigError("k", sae.k, f"must be between 1 and d_sae ({sae.d_sae}) for a {self.name} SAE")
        if group_sizes is not None:
            raise BadInput(f"group sizes: only for a matryoshka-batchtopk SAE, not {self.name}")
        if self.threshold == "trained":
            sae.threshold = nn.Parameter(torch.zeros(sae.d_sae))
        elif self.threshold == "running":
            sae.register_buffer("threshold", torch.zeros(sae.d_sae))

    def group_sizes_of(self, cfg: FitConfig):
        """The group sizes of a new SAE of this config (matryoshka.py); None for an architecture without groups."""
        return None

    def tensor_names(self) -> tuple[str, ...]:
        return ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if self.threshold else ())

    def cfg_fields(self, sae: SAE) -> dict:
        """cfg.json fields of this architecture beyond the shared ones."""
        return {}

    def saelens_fields(self, sae: SAE) -> tuple[dict, dict]:
        """(cfg.json fields, `metadata` fields) of its SAELens export beyond the shared ones: SAELens's jumprelu
        has no k, so the k (and the fields) of an architecture written as one go in metadata."""
        return {}, ({"k": sae.k, **self.cfg_fields(sae)} if "k" in self.options else {})

    def activation(self, sae: SAE, pre: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """f at inference from the pre-activations; `latents`: pre holds only these latents' columns
        (per_latent architectures)."""
        return torch.relu(pre)

    # --- training ----------------------------------------------------------------------------------------
    def encode_train(self, sae: SAE, x: torch.Tensor, bandwidth: float = DEFAULT_BANDWIDTH, inference: bool = False,
                     sparse: bool = False, pre_out: torch.Tensor | None = None):
        """(f, pre-activations, top-k indices, top-k values) of normalised inputs while training; index and
        values are None but for TopK.  `inference`: the inference form (where the two differ).  `sparse`
        and `pre_out`: the sparse TopK step (topk.py)."""
        pre = pre_train(sae, x)
        return self.activation(sae, pre), pre, None, None

    def reconstruction(self, sae: SAE, x: torch.Tensor, enc, sparse: bool = False):
        """(per-token reconstruction loss, per-token mse, the error x_hat - x) in normalised units; the loss
        is the mse here (matryoshka.py sums its prefixes')."""
        f, _, index, values = enc
        x_hat = (sparse_ops.decode(index, values, sae.W_dec) if sparse else f @ sae.W_dec) + sae.b_dec
        err = x_hat.float() - x.float()
        mse = err.pow(2).mean(-1)
        return mse, mse, err

    def penalty_terms(self, sae: SAE, enc, bandwidth: float) -> torch.Tensor:
        """The per-token sparsity penalty before its coefficient (architectures with a `penalty`)."""
        raise NotImplementedError(self.name)

    def coefficient(self, cfg: FitConfig, step: int | None = None) -> float:
        """The penalty's coefficient at `step` (None: its final value); 0 without a penalty."""
        return 0.0

    @torch.no_grad()
    def init_weights(self, sae: SAE) -> None:
        """Set this architecture's tensors of a new SAE (the shared ones are set by train.init_sae)."""

    @torch.no_grad()
    def rescale(self, sae: SAE, norms: torch.Tensor) -> None:
        """The encoder's latents were multiplied by `norms`: scale what is in pre-activation units with them."""
        if self.threshold:
            sae.threshold.mul_(norms)

    @torch.no_grad()
    def after_step(self, sae: SAE, enc, dp: DataParallel) -> None:
        """After each optimiser step (and the decoder's renormalisation): update or clamp what needs it."""

    # --- configuration -----------------------------------------------------------------------------------
    def check_config(self, cfg: FitConfig) -> None:
        """The checks of cfg's fields that depend on the architecture (fields still None are skipped)."""
        if "k" in self.options and cfg.d_sae is not None and not (cfg.k is not None and 1 <= cfg.k <= cfg.d_sae):
            raise ConfigError("k", cfg.k, f"must be between 1 and --d-sae ({cfg.d_sae})")
        for name, given in SPECIFIC.items():
            value = getattr(cfg, name)
            if name not in self.options and value is not None and given(value):
                users = " or ".join(a.name for a in every() if name in a.options)
                sets = f" ({self.name} sets sparsity with --{self.penalty or 'k'})" if name in ("l1", "l0") else ""
                raise ConfigError(name, value, f"only for --architecture {users}{sets}")
        if cfg.decoder == "sparse" and not self.sparse_decoder:
            raise ConfigError("decoder", cfg.decoder, "only for --architecture topk (a fixed k per token)")

    def resolve(self, values: dict, d_in: int, d_sae: int, parent: SAE | None = None) -> dict:
        """The derived defaults of this architecture's fields (k, l1, l0, group_fractions) in `values`, for
        activations of width d_in, d_sae latents and the parent SAE (None without one); a field it does not
        read gets its neutral value."""
        k, l1, l0 = values["k"], values["l1"], values["l0"]
        values["k"] = (DEFAULT_K if k is None else k) if "k" in self.options else None
        values["l1"] = (5.0 / d_in if l1 is None else l1) if self.penalty == "l1" else (l1 or 0.0)
        values["l0"] = (1.0 / d_in if l0 is None else l0) if self.penalty == "l0" else (l0 or 0.0)
        values["group_fractions"] = values["group_fractions"] or ()
        return values
