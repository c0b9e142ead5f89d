"""ReLU with an L1 penalty: f = ReLU(pre); the per-token loss adds l1 * sum_j f_j ||W_dec_j||, its
coefficient warmed up over the first --l1-warmup-fraction of the steps."""
from __future__ import annotations

from ..optim import l1_at
from .base import Architecture


class ReLU(Architecture):
    name = "relu"
    options = ("l1",)
    penalty = "l1"
    saelens = "standard"
    saelens_reads = ("standard", "relu")
    dictionary_learning = ("AutoEncoder",)

    def penalty_terms(self, sae, enc, bandwidth):
        return (enc[0].float() * sae.W_dec.norm(dim=1)).sum(-1)

    def coefficient(self, cfg, step=None):
        return cfg.l1 if step is None else l1_at(cfg, step)


ARCHITECTURE = ReLU()
