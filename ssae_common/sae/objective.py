"""The training objective, in normalised units (inputs multiplied by act_scale so that E||x||^2 = d_in).
Per-token loss:

    l_i = ||x_hat_i - x_i||^2 / d_in  +  lambda * sum_j f_ij * ||W_dec_j||     (the L1 term: relu only)
                                      +  lambda_0 * #{j : pre_ij > threshold_j}    (the L0 term: jumprelu only)

and the objective of each batch is TERM(l, t) (term.py; t = 0 is the mean), plus, for TopK with
AuxK, aux_coefficient * the normalised AuxK loss of dead latents.  t is --tilt, or with --tilt-ess F the t
solved on the batch's detached losses so that the weights' effective sample size is F x batch
(term.solve_tilt).  With --tilt-groups token the tilt acts across token types: each token's loss in the
TERM is its type's mean loss in the batch (term.group_means; the batches carry the token ids).

JumpReLU (Rajamanoharan et al. 2024, trained as SAELens 6 does): the threshold gets its gradient from a
straight-through estimator with a rectangle kernel of width `bandwidth` (from the reconstruction through
JumpReLU and from the L0 term through the step function; the pre-activations get none from the step),
starts at 0.01 and is kept >= 0.  BatchTopK keeps the k x batch largest activations of the whole batch
(each rank's slice under torchrun) and tracks its inference threshold as a running average (rate 0.01)
of the smallest activation kept, as SAELens does.
"""
from __future__ import annotations

import torch

from . import sparse as sparse_ops
from .autoencoder import SAE
from .config import FitConfig
from .distributed import DataParallel
from .term import solve_tilt, tilted_loss

JUMPRELU_INIT_THRESHOLD = 0.01  # SAELens 6 (normalised units)
BATCHTOPK_THRESHOLD_RATE = 0.01  # SAELens 6's topk_threshold_lr


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


def encode_train(sae: SAE, x: torch.Tensor, bandwidth: float = 0.05, inference: bool = False,
                 sparse: bool = False, pre_out: torch.Tensor | None = None):
    """(f, pre-activations, top-k indices, top-k values) for normalised inputs; index/values are None
    for relu.  (x - b_dec) @ W_enc is computed as x @ W_enc - b_dec @ W_enc so that b_dec's gradient
    does not cost a batch x d_in x d_sae matmul; for TopK, ReLU is applied to the k selected values only
    (same output as top-k of ReLU(pre): rows with fewer than k positive entries just add zeros).
    `sparse` (TopK): f is None and pre carries no gradient; the values get theirs through sparse.pre_at;
    `pre_out` a [batch, d_sae] float32 tensor to hold pre (reused across steps: a fresh one of that size
    page-faults every step, 10% of a one-thread CPU step at d_sae 4608)."""
    if sparse:
        bias = sae.b_enc - sae.b_dec @ sae.W_enc
        with torch.no_grad():
            pre = torch.addmm(bias, x, sae.W_enc, out=pre_out)
            index = pre.topk(sae.k, dim=-1, sorted=False).indices
        return None, pre, index, torch.relu(sparse_ops.pre_at(x, sae.W_enc, bias, pre, index))
    pre = x @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)
    if sae.architecture == "jumprelu":
        return _JumpReLU.apply(pre, sae.threshold.to(pre.dtype), bandwidth), pre, None, None
    if sae.architecture == "batchtopk":
        if inference:  # the threshold, as at inference
            return torch.relu(pre) * (pre > sae.threshold), pre, None, None
        flat = torch.relu(pre).reshape(-1)
        values, index = flat.topk(min(sae.k * pre.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(-1, index, values).view_as(pre), pre, None, None
    if sae.architecture == "topk":
        values, index = pre.topk(sae.k, dim=-1, sorted=False)
        values = torch.relu(values)
        return torch.zeros_like(pre).scatter(-1, index, values), pre, index, values
    return torch.relu(pre), pre, None, None


def token_losses(sae: SAE, x: torch.Tensor, l1: float, l0: float = 0.0, bandwidth: float = 0.05,
                 inference: bool = False, sparse: bool = False, pre_out: torch.Tensor | None = None):
    """Per-token loss and mse, the residual, and encode_train's outputs (`sparse`: sparse.use_sparse)."""
    f, pre, index, values = encode_train(sae, x, bandwidth, inference, sparse, pre_out)
    x_hat = (sparse_ops.decode(index, values, sae.W_dec) if sparse else f @ sae.W_dec) + sae.b_dec
    err = x_hat.float() - x.float()
    mse = err.pow(2).mean(-1)
    loss = mse
    if l1 > 0:
        loss = mse + l1 * (f.float() * sae.W_dec.norm(dim=1)).sum(-1)
    if l0 > 0 and sae.architecture == "jumprelu":
        loss = loss + l0 * _Step.apply(pre, sae.threshold.to(pre.dtype), bandwidth).float().sum(-1)
    return loss, mse, err, (f, pre, index, values)


def active(sae: SAE, enc) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token L0, how many tokens of the batch each latent fired on, as float32)."""
    f, _, index, values = enc
    if index is None:
        on = f > 0
        return on.sum(-1), on.sum(0, dtype=torch.float32)
    on = values > 0
    counts = torch.zeros(sae.d_sae, dtype=torch.float32, device=values.device)
    counts.index_add_(0, index.reshape(-1), on.reshape(-1).float())
    return on.sum(-1), counts


def auxk_loss(sae: SAE, err: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, aux_k: int,
              dp: DataParallel | None = None, n_global: int | None = None, x: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Reconstruct the residual from the top `aux_k` dead latents (normalised by the residual's variance).
    Live latents are masked to -1 and clamped to 0 after the top-k, so when fewer than aux_k are dead
    the extra picks add nothing (no need to count the dead ones on the host).  With `dp`, this rank's
    share of the global-batch loss (mean and variance over the global batch; the shares sum to it).
    With the inputs `x`, the sparse path (encode_train's `sparse`: `pre` carries no gradient; live
    latents are masked to -inf and their picks multiplied by 0)."""
    if x is None:
        masked = torch.relu(pre).masked_fill(~dead[None, :], -1.0)
        values, index = masked.topk(min(aux_k, sae.d_sae), dim=-1, sorted=False)
        recon = torch.zeros_like(pre).scatter(-1, index, values.clamp_min(0)) @ sae.W_dec
    else:
        index = pre.masked_fill(~dead[None, :], -torch.inf).topk(min(aux_k, sae.d_sae), dim=-1, sorted=False).indices
        bias = sae.b_enc - sae.b_dec @ sae.W_enc
        values = torch.relu(sparse_ops.pre_at(x, sae.W_enc, bias, pre, index)) * dead[index]
        recon = sparse_ops.decode(index, values, sae.W_dec)
    residual = -err.detach()
    if dp is None or not dp.active:
        denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (recon.float() - residual).pow(2).sum(-1).mean() / denom
    mean = dp.all_reduce(residual.sum(0)) / n_global
    denom = dp.all_reduce((residual - mean).pow(2).sum().reshape(1))[0] / n_global
    return (recon.float() - residual).pow(2).sum() / n_global / denom.clamp_min(1e-12)


def batch_tilt(cfg: FitConfig, losses: torch.Tensor) -> float | torch.Tensor:
    """The t of this batch: --tilt, or solved for --tilt-ess (a 0-d tensor on the device)."""
    if cfg.tilt_ess is not None and cfg.tilt_ess < 1:
        return solve_tilt(losses, cfg.tilt_ess)
    return cfg.tilt


@torch.no_grad()
def validation_metrics(sae: SAE, x: torch.Tensor, cfg: FitConfig, batch: int = 1024) -> dict:
    """Validation metrics on normalised rows."""
    sparse = sparse_ops.use_sparse(cfg.decoder, sae.architecture, sae.k, sae.d_sae, x.device.type)
    losses, mses, l0s = [], [], []
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    for s in range(0, len(x), batch):
        loss, mse, _, enc = token_losses(sae, x[s:s + batch], cfg.l1, cfg.l0 or 0.0, cfg.bandwidth, inference=True,
                                          sparse=sparse)
        l0, fired_now = active(sae, enc)
        losses.append(loss)
        mses.append(mse)
        l0s.append(l0.float())
        fired |= fired_now > 0
    loss, mse, l0 = torch.cat(losses), torch.cat(mses), torch.cat(l0s)
    var = (x - x.mean(0)).pow(2).mean(-1).sum()
    return {"val_loss": float(loss.mean()), "val_tilted_loss": float(tilted_loss(loss, batch_tilt(cfg, loss))),
            "val_mse": float(mse.mean()), "val_max_mse": float(mse.max()),
            "val_fvu": float(mse.sum() / var.clamp_min(1e-12)), "val_l0": float(l0.mean()),
            "val_unfired_fraction": float(1 - fired.float().mean())}
