"""JumpReLU (Rajamanoharan et al. 2024), trained as SAELens 6 does: f = ReLU(pre) * (pre > threshold) per
latent; the per-token loss adds l0 * #{j : pre_j > threshold_j}.  The threshold gets its gradient from a
straight-through estimator with a rectangle kernel of width --bandwidth (from the reconstruction through
JumpReLU and from the L0 term through the step function; the pre-activations get none from the step),
starts at 0.01 and is kept >= 0."""
from __future__ import annotations

import torch

from ..config import DEFAULT_BANDWIDTH
from .base import Architecture, pre_train

INIT_THRESHOLD = 0.01  # SAELens 6 (normalised units)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * 1[pre > threshold]; d/dpre = the step, d/dthreshold = -(threshold / bw) K((pre - threshold) / bw)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        g_threshold = -(threshold / bw) * _rectangle((pre - threshold) / bw) * grad
        return (pre > threshold) * grad, g_threshold.reshape(-1, pre.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """1[pre > threshold]; d/dpre = 0, d/dthreshold = -(1 / bw) K((pre - threshold) / bw)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        g_threshold = -(1.0 / bw) * _rectangle((pre - threshold) / bw) * grad
        return torch.zeros_like(pre), g_threshold.reshape(-1, pre.shape[-1]).sum(0), None


def thresholded(sae, pre: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
    """ReLU(pre) * (pre > threshold), the threshold of `latents` (all when None)."""
    threshold = sae.threshold if latents is None else sae.threshold[latents]
    return torch.relu(pre) * (pre > threshold)


class JumpReLU(Architecture):
    name = "jumprelu"
    options = ("l0", "bandwidth")
    penalty = "l0"
    threshold = "trained"
    saelens = "jumprelu"
    saelens_reads = ("jumprelu",)
    dictionary_learning = ("JumpReluAutoEncoder",)

    def activation(self, sae, pre, latents=None):
        return thresholded(sae, pre, latents)

    def encode_train(self, sae, x, bandwidth=DEFAULT_BANDWIDTH, inference=False, sparse=False, pre_out=None):
        pre = pre_train(sae, x)
        return _JumpReLU.apply(pre, sae.threshold.to(pre.dtype), bandwidth), pre, None, None

    def penalty_terms(self, sae, enc, bandwidth):
        pre = enc[1]
        return _Step.apply(pre, sae.threshold.to(pre.dtype), bandwidth).float().sum(-1)

    def coefficient(self, cfg, step=None):
        return cfg.l0 or 0.0

    @torch.no_grad()
    def init_weights(self, sae):
        sae.threshold.fill_(INIT_THRESHOLD)

    @torch.no_grad()
    def after_step(self, sae, enc, dp):
        sae.threshold.data.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations


ARCHITECTURE = JumpReLU()
