"""Tilted empirical risk (TERM, Li et al. 2021) over a batch of per-token losses.

    R_t(l) = (1/t) * log( (1/N) * sum_i exp(t * l_i) )

t = 0 is the mean (ERM), t -> +inf the maximum, t -> -inf the minimum.  The gradient with respect to
l_i is the softmax weight w_i = exp(t l_i) / sum_j exp(t l_j).

Computed in float32 without overflow for |t| up to 1e9 and beyond:
- when |t| * (max l - min l) > 1: shift by the extreme loss m (max for t > 0, min for t < 0) so every
  exponent t * (l_i - m) is <= 0:  R = m + (logsumexp(t (l - m)) - log N) / t;
- otherwise (t tiny relative to the spread, where log(mean(exp)) would drown in rounding):
  centre at the mean c and use expm1/log1p:  R = c + log1p(mean(expm1(t (l - c)))) / t.
Both shifts are detached: R does not depend on them, so the gradient is unchanged.  Exponents are
clamped at LOG_TINY = -80 (exp(-80) ~ 2e-35, above float32's smallest normal number): a term that small
next to the largest (exp(0) = 1) changes nothing measurable, while denormal numbers make exp about 30x
slower on x86 CPUs (measured here: t = 500 on N = 2048 losses took 24 ms per step instead of < 1 ms).

A tilt by effective sample size (`--tilt-ess F`, 0 < F <= 1).  A fixed t means different things for
different models, hooks and loss scales (t = 500 on losses of O(0.1-1) puts nearly all the weight on one
token).  The effective sample size of the weights,

    ESS(t) = (sum_i w_i)^2 / sum_i w_i^2 = 1 / sum_i w_i^2,   w = softmax(t * l),

falls monotonically from N (t = 0) to the number of tokens tied at the maximum (t -> inf): d/dt log
sum w^2 = 2 (E_{softmax(2tl)}[l] - E_{softmax(tl)}[l]) >= 0.  `solve_tilt` finds, per batch, the t with
ESS(t) = F * N on the detached losses: t = exp(z) / std(l) with z searched in [Z_LOW, Z_HIGH] by
vectorised multisection (each of ROUNDS rounds evaluates ESS at GRID points at once and keeps the
bracketing interval), all on the device with no read-back to the host.  The bracket's width after the
rounds is (Z_HIGH - Z_LOW) / (GRID - 1)^ROUNDS ~ 3e-5 in log t.  F = 1 is ERM (t = 0); when F * N is
below what any t reaches (ties at the maximum) t is the bracket's top, the closest it gets.

Tilt over token types (hierarchical TERM, Li et al. 2021, with ERM inside each type).  With the batch's
tokens grouped by token id, a type's loss is the mean over its tokens in the batch, L_g, and

    R = (1/t) * log( sum_g (n_g / N) * exp(t * L_g) ),

the types weighted by their count so that t = 0 is ERM again.  The weight of type g is
n_g exp(t L_g) / Z, spread evenly over its n_g tokens: each token of g gets exp(t L_g) / Z, i.e. the
token-level TERM weights of the vector L_{g(i)}.  So R = tilted_loss(group_means(l, ids), t), and
autograd gives d R / d l_i = exp(t L_{g(i)}) / Z.  Types absent from the batch get nothing: the tilt is
per batch, and an absent type has no token the gradient could act on (see docs/fit.md).
"""
from __future__ import annotations

import contextlib
import math

import torch

SMALL_REGIME = 1.0  # |t| * spread below which the expm1/log1p form is used
LOG_TINY = -80.0  # exponents are clamped here: no denormal numbers (slow on CPUs), nothing measurable lost
Z_LOW, Z_HIGH = -12.0, 14.0  # the search range of log(t * std(l)) for solve_tilt
GRID, ROUNDS = 32, 4


def tilted_loss(losses: torch.Tensor, tilt: float | torch.Tensor) -> torch.Tensor:
    """TERM of a 1-D tensor of per-token losses (differentiable).  `tilt` is a number, or a 0-d tensor
    >= 0 (the t of `solve_tilt`, left on the device; 0 gives the mean).

    Both forms are computed and one is picked with torch.where, so no value is read back to the host
    (no GPU sync).  The small-regime exponent is clamped to [-2, 2]: inside that regime it is within
    [-1, 1] anyway, and outside it the clamp keeps the unused branch (and its gradient) finite."""
    losses = losses.reshape(-1)
    tensor = isinstance(tilt, torch.Tensor)
    if not tensor and tilt == 0:
        return losses.mean()
    n = losses.numel()
    detached = losses.detach()
    low, high = detached.min(), detached.max()
    if tensor:
        positive = tilt > 0
        t = torch.where(positive, tilt, torch.ones_like(tilt)).to(losses.dtype)  # any t > 0 while unused
        spread, ref = t * (high - low), high
    else:
        t = float(tilt)
        spread, ref = abs(t) * (high - low), (high if t > 0 else low)
    small = spread <= SMALL_REGIME
    centre = detached.mean()
    z = (t * (losses - centre)).clamp(-2 * SMALL_REGIME, 2 * SMALL_REGIME)
    near = centre + torch.log1p(torch.expm1(z).mean()) / t
    # every exponent is <= 0 and the largest is 0, so the sum needs no further shift
    far = ref + (torch.log(torch.exp((t * (losses - ref)).clamp_min(LOG_TINY)).sum()) - math.log(n)) / t
    out = torch.where(small, near, far)
    return torch.where(positive, out, losses.mean()) if tensor else out


@torch.no_grad()
def tilt_weights(losses: torch.Tensor, tilt: float | torch.Tensor) -> torch.Tensor:
    """The weights TERM puts on each loss (they sum to 1; uniform 1/N for ERM)."""
    losses = losses.reshape(-1).float()
    if not isinstance(tilt, torch.Tensor) and tilt == 0:
        return torch.full_like(losses, 1.0 / losses.numel())
    w = torch.exp((tilt * (losses - losses.max())).clamp_min(LOG_TINY))
    return w / w.sum()


@torch.no_grad()
def weight_concentration(losses: torch.Tensor, tilt: float | torch.Tensor) -> dict:
    """How concentrated the tilted weights are: effective sample size as a fraction of N (1 = ERM,
    1/N = all weight on one token) and the largest weight times N (1 = uniform, N = one token)."""
    w = tilt_weights(losses, tilt)
    n = w.numel()
    return {"ess_fraction": float(1.0 / (w.pow(2).sum() * n)), "max_weight_x_n": float(w.max() * n)}


def _log_ess(losses: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log ESS of softmax(t_k * l) for each t_k >= 0 of `t` [K]: 2 logsumexp(t l) - logsumexp(2 t l), with
    the exponents shifted by the maximum (so the largest is 0) and clamped at LOG_TINY."""
    a = t[:, None] * (losses - losses.max())[None, :]
    return 2 * torch.exp(a.clamp_min(LOG_TINY)).sum(1).log() - torch.exp((2 * a).clamp_min(LOG_TINY)).sum(1).log()


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On CPU, run the small ops of the solve on one thread: split across threads, each op waits for the
    slowest, and on a loaded machine that costs a scheduler time slice per op (measured: 0.58 s instead
    of 14 ms per solve at N = 2048 on a shared 2-core machine).  Switching costs under a microsecond."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def solve_tilt(losses: torch.Tensor, ess_fraction: float) -> torch.Tensor:
    """The t >= 0 (a 0-d float32 tensor on the losses' device) at which the TERM weights softmax(t l) of
    the detached `losses` have an effective sample size of ess_fraction * N (module docstring)."""
    losses = losses.detach().reshape(-1).float()
    n = losses.numel()
    if ess_fraction >= 1 or n < 2:
        return losses.new_zeros(())
    with _one_cpu_thread(losses.device):
        return _solve(losses, ess_fraction)


def _solve(losses: torch.Tensor, ess_fraction: float) -> torch.Tensor:
    n = losses.numel()
    std = losses.std()
    scale = 1.0 / std.clamp_min(1e-30)
    target = math.log(ess_fraction * n)
    lo, hi = losses.new_tensor(Z_LOW), losses.new_tensor(Z_HIGH)
    steps = torch.linspace(0.0, 1.0, GRID, device=losses.device)
    for _ in range(ROUNDS):
        z = lo + (hi - lo) * steps
        above = _log_ess(losses, torch.exp(z) * scale) >= target  # True then False (ESS falls with t)
        i = (above.sum() - 1).clamp(0, GRID - 2)
        lo, hi = z[i], z[i + 1]
    t = torch.exp((lo + hi) / 2) * scale
    return torch.where(std > 0, t, torch.zeros_like(t))  # equal losses: every t gives uniform weights


def group_means(losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each token's loss replaced by the mean loss of its group (token type) in the batch (differentiable:
    d mean_g / d l_i = 1 / n_g).  Sort-based, every tensor of size N: no host sync."""
    losses = losses.reshape(-1)
    groups = groups.reshape(-1).to(losses.device)
    order = torch.argsort(groups)
    sorted_ids = groups[order]
    seg = torch.zeros_like(sorted_ids)
    seg[1:] = torch.cumsum(sorted_ids[1:] != sorted_ids[:-1], dim=0)  # segment of each sorted position
    n = losses.numel()
    sums = losses.new_zeros(n).index_add(0, seg, losses[order])
    counts = losses.new_zeros(n).index_add(0, seg, torch.ones_like(losses))
    means_sorted = sums[seg] / counts[seg]
    return torch.empty_like(means_sorted).scatter(0, order, means_sorted)
