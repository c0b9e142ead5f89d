"""TopK (Gao et al. 2024): f keeps the k largest pre-activations of each token, after ReLU.  Training can
take the sparse path (sparse.py: the decoder-side products of the k active latents only)."""
from __future__ import annotations

import torch

from .. import sparse as sparse_ops
from ..config import DEFAULT_BANDWIDTH
from .base import Architecture, pre_train


class TopK(Architecture):
    name = "topk"
    options = ("k",)
    auxk = True
    sparse_decoder = True
    per_latent = False
    saelens = "topk"
    saelens_reads = ("topk",)
    sparsify = True
    dictionary_learning = ("AutoEncoderTopK",)

    def saelens_fields(self, sae):
        return {"k": sae.k, "rescale_acts_by_decoder_norm": False}, {}

    def activation(self, sae, pre, latents=None):
        if latents is not None:
            raise ValueError("a TopK latent's activation depends on every pre-activation of its token")
        values, index = torch.relu(pre).topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, values)

    def encode_train(self, sae, x, bandwidth=DEFAULT_BANDWIDTH, inference=False, sparse=False, pre_out=None):
        """ReLU is applied to the k selected values only (the same f as the top k of ReLU(pre): a row with
        fewer than k positive entries just adds zeros).  `sparse`: f is None and pre carries no gradient, the
        values get theirs through sparse.pre_at; `pre_out` a [batch, d_sae] float32 tensor to hold pre
        (reused across steps: a fresh one of that size page-faults every step, 10% of a one-thread CPU step
        at d_sae 4608)."""
        if sparse:
            bias = sae.b_enc - sae.b_dec @ sae.W_enc
            with torch.no_grad():
                pre = torch.addmm(bias, x, sae.W_enc, out=pre_out)
                index = pre.topk(sae.k, dim=-1, sorted=False).indices
            return None, pre, index, torch.relu(sparse_ops.pre_at(x, sae.W_enc, bias, pre, index))
        pre = pre_train(sae, x)
        values, index = pre.topk(sae.k, dim=-1, sorted=False)
        values = torch.relu(values)
        return torch.zeros_like(pre).scatter(-1, index, values), pre, index, values


ARCHITECTURE = TopK()
