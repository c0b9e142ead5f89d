"""TracIn (TracInCP) scores of candidate documents for an SAE: how much a gradient step on a
candidate's SAE loss would lower the loss on the seed documents,

    score(d) = sum over checkpoints c of < grad_theta L_c(d), mean over seeds s of grad_theta L_c(s) >,

with theta = (W_enc, b_enc, W_dec, b_dec) and L(d) the mean over d's tokens of the per-token SAE loss
    l(x) = ||x_hat - x||^2 + l1_coefficient * sum(f)      (l1_coefficient from the SAE's cfg.json).

Exact and cheap, without forming any per-document gradient: for one token (s = act_scale)
    z = s x - b_dec,  f = act(z W_enc + b_enc),  r = dl/d(f W_dec + b_dec) = 2 (x_hat - x) / s,
    delta = dl/d(pre-activation) = (r W_dec^T + l1) * [f > 0]
    dl/dW_dec = f (x) r,  dl/dW_enc = z (x) delta,  dl/db_enc = delta,  dl/db_dec = r - delta W_enc^T
so with G the (explicit, one per checkpoint) mean seed gradient,
    < dl/dtheta, G > = f^T G_dec r + z^T G_enc delta + delta . G_benc + (r - delta W_enc^T) . G_bdec,
which costs two [tokens, d_in] x [d_in, d_sae]-sized products per token, like the SAE's forward pass.
`tracin_scores_autograd` computes the same thing with explicit per-document autograd gradients (tests).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..core.config import ConfigError
from ..core.errors import BadInput

log = logging.getLogger("ssae")


def _terms(sae, x: torch.Tensor, l1: float):
    s = sae.act_scale
    z = x * s - sae.b_dec
    f = sae.activation(z @ sae.W_enc + sae.b_enc)
    x_hat = (f @ sae.W_dec + sae.b_dec) / s
    r = 2.0 * (x_hat - x) / s
    delta = (r @ sae.W_dec.T + l1) * (f > 0).to(x.dtype)
    return z, f, r, delta


def _weights(lengths: Sequence[int], scale: float, device) -> torch.Tensor:
    return torch.cat([torch.full((n,), scale / n, device=device) for n in lengths])


@dataclass
class SeedGradient:
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor


def l1_of(sae) -> float:
    return float(sae.cfg.get("l1_coefficient") or 0.0)


@torch.no_grad()
def seed_gradient(sae, seed_acts: Sequence[torch.Tensor], l1: float | None = None) -> SeedGradient:
    """Mean over seeds of each seed's (token-averaged) SAE-loss gradient, as explicit tensors."""
    l1 = l1_of(sae) if l1 is None else l1
    seed_acts = [a for a in seed_acts if len(a)]
    if not seed_acts:
        raise BadInput("TracIn: no seed document has any tokens")
    x = torch.cat(seed_acts).float()
    w = _weights([len(a) for a in seed_acts], 1.0 / len(seed_acts), x.device)[:, None]
    z, f, r, delta = _terms(sae, x, l1)
    return SeedGradient(W_enc=z.T @ (w * delta), b_enc=(w * delta).sum(0), W_dec=f.T @ (w * r),
                        b_dec=(w * (r - delta @ sae.W_enc.T)).sum(0))


@torch.no_grad()
def gradient_norms(sae, acts: Sequence[torch.Tensor], l1: float | None = None) -> np.ndarray:
    """||gradient of each document's mean token loss||, from token Gram matrices (never the gradient):
    ||F^T R||^2 = sum((F F^T) * (R R^T)), likewise for W_enc; the biases are sums of token vectors."""
    l1 = l1_of(sae) if l1 is None else l1
    out = np.zeros(len(acts))
    for i, a in enumerate(acts):
        if not len(a):
            continue
        z, f, r, delta = _terms(sae, a.float(), l1)
        u = r - delta @ sae.W_enc.T
        sq = ((f @ f.T) * (r @ r.T)).sum() + ((z @ z.T) * (delta @ delta.T)).sum() \
            + delta.sum(0).square().sum() + u.sum(0).square().sum()
        out[i] = float(sq.clamp_min(0).sqrt()) / len(a)
    return out


@torch.no_grad()
def tracin_scores(sae, grad: SeedGradient, acts: Sequence[torch.Tensor], l1: float | None = None) -> np.ndarray:
    """<gradient of each document's mean token loss, seed gradient>, factorised per token."""
    l1 = l1_of(sae) if l1 is None else l1
    out = np.zeros(len(acts))
    nonempty = [i for i, a in enumerate(acts) if len(a)]
    if not nonempty:
        return out
    x = torch.cat([acts[i] for i in nonempty]).float()
    z, f, r, delta = _terms(sae, x, l1)
    per_token = ((f @ grad.W_dec) * r).sum(1) + ((z @ grad.W_enc) * delta).sum(1) \
        + delta @ grad.b_enc + (r - delta @ sae.W_enc.T) @ grad.b_dec
    lengths = [len(acts[i]) for i in nonempty]
    doc = torch.repeat_interleave(torch.arange(len(nonempty), device=x.device),
                                  torch.tensor(lengths, device=x.device))
    sums = torch.zeros(len(nonempty), dtype=per_token.dtype, device=x.device).index_add_(0, doc, per_token)
    out[nonempty] = (sums / torch.tensor(lengths, dtype=sums.dtype, device=x.device)).double().cpu().numpy()
    return out


def _doc_loss(sae, x: torch.Tensor, l1: float) -> torch.Tensor:
    x_hat, f = sae(x)
    return (((x_hat - x) ** 2).sum(1) + l1 * f.sum(1)).mean()


def tracin_scores_autograd(sae, seed_acts: Sequence[torch.Tensor], acts: Sequence[torch.Tensor],
                           l1: float | None = None) -> np.ndarray:
    """The reference: explicit per-document gradients by autograd, flattened and dotted."""
    l1 = l1_of(sae) if l1 is None else l1
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]

    def flat_grad(x):
        grads = torch.autograd.grad(_doc_loss(sae, x.float(), l1), params)
        return torch.cat([g.reshape(-1) for g in grads])

    seeds = [a for a in seed_acts if len(a)]
    mean = torch.stack([flat_grad(a) for a in seeds]).mean(0)
    return np.array([float(flat_grad(a) @ mean) if len(a) else 0.0 for a in acts])


def check_saes(saes: Sequence, paths: Sequence[str]) -> tuple[str | None, str | None]:
    """The model and hook the SAE checkpoints share (from cfg.json), or BadInput."""
    hooks = {sae.hook for sae in saes}
    dims = {sae.d_in for sae in saes}
    if len(hooks) > 1 or len(dims) > 1:
        raise ConfigError("sae", list(paths), f"checkpoints disagree on hook or d_in "
                                              f"({sorted(hooks)}, {sorted(dims)}); give checkpoints of one SAE")
    models = {sae.model for sae in saes}
    return (models.pop() if len(models) == 1 else None) or None, hooks.pop() or None


def tracin_rerank_scores(saes: Sequence, seed_acts: Sequence[torch.Tensor], cand_acts: Sequence[torch.Tensor],
                         normalize: bool = False) -> np.ndarray:
    """TracInCP: the sum over checkpoints of the factorised scores (equal weights per checkpoint).
    `normalize`: each checkpoint's score divided by the candidate's gradient norm (so a document is
    not ranked up for a large gradient alone; the seed gradient's norm is a constant)."""
    total = np.zeros(len(cand_acts))
    for sae in saes:
        device = sae.W_enc.device
        grad = seed_gradient(sae, [a.to(device) for a in seed_acts])
        for start in range(0, len(cand_acts), 64):
            chunk = [a.to(device) for a in cand_acts[start:start + 64]]
            scores = tracin_scores(sae, grad, chunk)
            if normalize:
                scores = scores / np.maximum(gradient_norms(sae, chunk), 1e-30)
            total[start:start + len(chunk)] += scores
    return total
