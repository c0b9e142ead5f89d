"""BatchTopK (Bussmann et al. 2024): while it trains, f keeps the k x batch largest entries of ReLU(pre)
over the whole batch (each rank's slice under torchrun); at inference f = ReLU(pre) * (pre > threshold),
the threshold a running average (rate 0.01, SAELens 6's topk_threshold_lr) of the smallest activation kept,
as SAELens does.  SAELens and dictionary_learning save it for inference with that threshold, so it is
written to SAELens as jumprelu."""
from __future__ import annotations

import torch

from ..config import DEFAULT_BANDWIDTH
from .base import Architecture, pre_train
from .jumprelu import thresholded

THRESHOLD_RATE = 0.01


class BatchTopK(Architecture):
    name = "batchtopk"
    options = ("k",)
    threshold = "running"
    auxk = True
    saelens = "jumprelu"
    dictionary_learning = ("BatchTopKSAE",)

    def activation(self, sae, pre, latents=None):
        return thresholded(sae, pre, latents)

    def encode_train(self, sae, x, bandwidth=DEFAULT_BANDWIDTH, inference=False, sparse=False, pre_out=None):
        pre = pre_train(sae, x)
        if inference:
            return self.activation(sae, pre), pre, None, None
        flat = torch.relu(pre).reshape(-1)
        values, index = flat.topk(min(sae.k * pre.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(-1, index, values).view_as(pre), pre, None, None

    @torch.no_grad()
    def after_step(self, sae, enc, dp):
        f = enc[0].detach().float()
        smallest = dp.all_min(torch.where(f > 0, f, torch.full_like(f, float("inf"))).min().reshape(1))[0]
        moved = sae.threshold.lerp(smallest.expand_as(sae.threshold), THRESHOLD_RATE)
        sae.threshold.copy_(torch.where(torch.isfinite(smallest), moved, sae.threshold))


ARCHITECTURE = BatchTopK()
