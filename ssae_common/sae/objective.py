"""The training objective, in normalised units (inputs multiplied by act_scale so that E||x||^2 = d_in).
Per-token loss:

    l_i = recon_i + lambda * penalty_i

recon_i is ||x_hat_i - x_i||^2 / d_in (matryoshka-batchtopk: the mean of its nested prefixes'), and the
penalty the architecture's (architectures/: relu sum_j f_ij ||W_dec_j|| with lambda --l1, jumprelu
#{j : pre_ij > threshold_j} with lambda --l0, none for the TopK family).  The objective of each batch is
TERM(l, t) (term.py; t = 0 is the mean), plus, for the TopK family with AuxK, aux_coefficient * the
normalised AuxK loss of dead latents.  t is --tilt, or with --tilt-ess F the t solved on the batch's
detached losses so that the weights' effective sample size is F x batch (term.solve_tilt).  With
--tilt-groups token the tilt acts across token types: each token's loss in the TERM is its type's mean loss
in the batch (term.group_means; the batches carry the token ids).
"""
from __future__ import annotations

import torch

from . import sparse as sparse_ops
from .autoencoder import SAE
from .config import DEFAULT_BANDWIDTH, FitConfig
from .distributed import DataParallel
from .term import solve_tilt, tilted_loss


def token_losses(sae: SAE, x: torch.Tensor, coefficient: float = 0.0, bandwidth: float = DEFAULT_BANDWIDTH,
                 inference: bool = False, sparse: bool = False, pre_out: torch.Tensor | None = None):
    """Per-token loss and mse, the residual x_hat - x, and the architecture's training encode
    (f, pre, index, values) of normalised inputs `x`.  The loss is the architecture's reconstruction loss
    plus `coefficient` x its per-token penalty; `inference`: the inference encode; `sparse`:
    sparse.use_sparse."""
    arch = sae.arch
    enc = arch.encode_train(sae, x, bandwidth, inference, sparse, pre_out)
    loss, mse, err = arch.reconstruction(sae, x, enc, sparse)
    if coefficient > 0:
        loss = loss + coefficient * arch.penalty_terms(sae, enc, bandwidth)
    return loss, mse, err, enc


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
        loss, mse, _, enc = token_losses(sae, x[s:s + batch], sae.arch.coefficient(cfg), cfg.bandwidth,
                                          inference=True, sparse=sparse)
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
