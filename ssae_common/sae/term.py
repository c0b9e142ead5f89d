"""Tilted empirical risk (TERM, Li et al. 2021) over a batch of per-token losses.

    R_t(l) = (1/t) * log( (1/N) * sum_i exp(t * l_i) )

t = 0 is the mean (ERM), t -> +inf the maximum, t -> -inf the minimum.  The gradient with respect to
l_i is the softmax weight w_i = exp(t l_i) / sum_j exp(t l_j).

Computed in float32 without overflow for |t| up to 1e9 and beyond:
- when |t| * (max l - min l) > 1: shift by the extreme loss m (max for t > 0, min for t < 0) so every
  exponent t * (l_i - m) is <= 0:  R = m + (logsumexp(t (l - m)) - log N) / t;
- otherwise (t tiny relative to the spread, where log(mean(exp)) would drown in rounding):
  centre at the mean c and use expm1/log1p:  R = c + log1p(mean(expm1(t (l - c)))) / t.
Both shifts are detached: R does not depend on them, so the gradient is unchanged.
"""
from __future__ import annotations

import math

import torch

SMALL_REGIME = 1.0  # |t| * spread below which the expm1/log1p form is used


def tilted_loss(losses: torch.Tensor, tilt: float) -> torch.Tensor:
    """TERM of a 1-D tensor of per-token losses (differentiable).

    Both forms are computed and one is picked with torch.where, so no value is read back to the host
    (no GPU sync).  The small-regime exponent is clamped to [-2, 2]: inside that regime it is within
    [-1, 1] anyway, and outside it the clamp keeps the unused branch (and its gradient) finite."""
    losses = losses.reshape(-1)
    if tilt == 0:
        return losses.mean()
    t = float(tilt)
    n = losses.numel()
    detached = losses.detach()
    low, high = detached.min(), detached.max()
    small = abs(t) * (high - low) <= SMALL_REGIME
    centre = detached.mean()
    z = (t * (losses - centre)).clamp(-2 * SMALL_REGIME, 2 * SMALL_REGIME)
    near = centre + torch.log1p(torch.expm1(z).mean()) / t
    ref = high if t > 0 else low
    far = ref + (torch.logsumexp(t * (losses - ref), dim=0) - math.log(n)) / t
    return torch.where(small, near, far)


@torch.no_grad()
def tilt_weights(losses: torch.Tensor, tilt: float) -> torch.Tensor:
    """The weights TERM puts on each loss (they sum to 1; uniform 1/N for ERM)."""
    losses = losses.reshape(-1).float()
    if tilt == 0:
        return torch.full_like(losses, 1.0 / losses.numel())
    return torch.softmax(float(tilt) * (losses - losses.max()), dim=0)


@torch.no_grad()
def weight_concentration(losses: torch.Tensor, tilt: float) -> dict:
    """How concentrated the tilted weights are: effective sample size as a fraction of N (1 = ERM,
    1/N = all weight on one token) and the largest weight times N (1 = uniform, N = one token)."""
    w = tilt_weights(losses, tilt)
    n = w.numel()
    return {"ess_fraction": float(1.0 / (w.pow(2).sum() * n)), "max_weight_x_n": float(w.max() * n)}
