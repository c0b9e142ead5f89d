"""Matryoshka BatchTopK (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders"), trained as dictionary_learning's MatryoshkaBatchTopKSAE: BatchTopK (batchtopk.py: the
batch's k x batch largest activations while training, the running threshold at inference) whose latents
form nested groups.  Prefix g is groups 1..g; each prefix reconstructs on its own,

    x_hat_g = b_dec + f[:, :end_g] @ W_dec[:end_g]

and the per-token reconstruction loss is the mean of the G prefixes' mse (dictionary_learning's default
weights, 1/G each; its logged loss is this times d_in / G), so the first latents learn what is common and
the later ones refine it.  Group g holds floor(fraction_g x d_sae) latents, the last one the rest; the
default fractions 1/32, 1/16, 1/8, 1/4, 17/32 double from group to group.  The rest is batchtopk.py's:
the running threshold (SAELens's rate 0.01 from the first step, where dictionary_learning uses 0.001 from
step 1000) and AuxK on --aux-k, reconstructing the whole SAE's residual.  For inference it is a BatchTopK
SAE: SAELens saves it as jumprelu, and so does ssae-export.
"""
from __future__ import annotations

import math

import torch

from ...core.config import ConfigError
from ...core.errors import BadInput
from .base import pre_train
from .batchtopk import BatchTopK

DEFAULT_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)


def group_sizes(fractions, d_sae: int) -> tuple[int, ...]:
    """Latents per group: floor(fraction x d_sae) (with a margin for float rounding), the last the rest."""
    sizes = [math.floor(f * d_sae + 1e-6) for f in fractions[:-1]]
    return tuple(sizes + [d_sae - sum(sizes)])


@torch.no_grad()
def prefix_fvu(sae, x: torch.Tensor, ends, batch: int = 4096) -> list[float]:
    """The fraction of variance unexplained by the first `end` latents alone, for each of `ends`, in the
    SAE's inference encode of the normalised rows x (a matryoshka SAE's group ends: the last is its FVU)."""
    errors = torch.zeros(len(ends), dtype=torch.float64)
    for s in range(0, len(x), batch):
        rows = x[s:s + batch]
        f, x_hat, start = sae.arch.activation(sae, pre_train(sae, rows)), sae.b_dec, 0
        for g, end in enumerate(ends):
            x_hat = x_hat + f[:, start:end] @ sae.W_dec[start:end]
            errors[g] += float((x_hat - rows).double().pow(2).sum())
            start = end
    variance = float((x.double() - x.double().mean(0)).pow(2).sum())
    return [float(e) / max(variance, 1e-12) for e in errors]


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka-batchtopk"
    options = ("k", "group_fractions")
    dictionary_learning = ("MatryoshkaBatchTopKSAE",)

    def build(self, sae, group_sizes=None):
        super().build(sae)
        sizes = tuple(group_sizes) if isinstance(group_sizes, (list, tuple)) else ()
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes) \
                or sum(sizes) != sae.d_sae:
            raise BadInput(f"group_sizes {group_sizes}: a matryoshka-batchtopk SAE needs positive integer group "
                           f"sizes that sum to d_sae ({sae.d_sae})")
        sae.group_sizes = sizes

    def group_sizes_of(self, cfg):
        return group_sizes(cfg.group_fractions, cfg.d_sae)

    def cfg_fields(self, sae):
        return {"group_sizes": list(sae.group_sizes)}

    def reconstruction(self, sae, x, enc, sparse=False):
        f, x, start = enc[0], x.float(), 0
        x_hat, total = sae.b_dec, 0.0
        for size in sae.group_sizes:
            x_hat = x_hat + f[:, start:start + size] @ sae.W_dec[start:start + size]
            start += size
            err = x_hat.float() - x
            mse = err.pow(2).mean(-1)
            total = total + mse
        return total / len(sae.group_sizes), mse, err

    def check_config(self, cfg):
        super().check_config(cfg)
        fractions = cfg.group_fractions
        if fractions:
            if len(fractions) < 2 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
                raise ConfigError("group_fractions", fractions, "give two or more fractions that sum to 1")
            if cfg.d_sae is not None and min(group_sizes(fractions, cfg.d_sae)) < 1:
                raise ConfigError("group_fractions", fractions, f"a group would have no latent of --d-sae {cfg.d_sae}")

    def resolve(self, values, d_in, d_sae, parent=None):
        values = super().resolve(values, d_in, d_sae, parent)
        fractions = values["group_fractions"]
        if parent is not None:
            if fractions and group_sizes(fractions, d_sae) != parent.group_sizes:
                raise ConfigError("group_fractions", fractions, f"the parent has groups of "
                                                                f"{list(parent.group_sizes)} latents")
            fractions = tuple(s / d_sae for s in parent.group_sizes)
        values["group_fractions"] = fractions or DEFAULT_FRACTIONS
        return values


ARCHITECTURE = MatryoshkaBatchTopK()
