"""The TopK SAE's training step without its dense decoder-side products.

A TopK code has k of d_sae entries non-zero per row, so of the five batch x d_in x d_sae products of a
dense step (encoder, decoder, the decoder's two gradients, the encoder's gradient) only the encoder's
forward is needed: the top-k must see every pre-activation.  Here

    x_hat          = sum_j values_j * W_dec[index_j]           (embedding_bag: k rows per token)
    grad values    = rowwise dot(grad x_hat, W_dec[index])     (embedding_bag's backward)
    grad W_dec     = index_add over latents of values x grad   (embedding_bag's backward)
    grad W_enc     = x^T @ grad pre, grad pre k-sparse         (a sparse (latent, row) matrix times x)
    grad bias      = index_add over latents of grad pre

each a few batch x k x d_in operations.  Single-threaded on CPU at d_in 576, d_sae 4608, k 32, batch 4096
the decoder forward and backward take 7 and 36 ms against 222 and 467 ms dense, the encoder's gradient
15 ms against 227 ms, and a whole step 400 ms against 1473 ms, of which the encoder's product and the
top-k are 290 ms.  The results equal the dense path's up to float rounding (the sums run in another
order; tests/test_sparse_decoder.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# auto on CPU: sparse when k < d_sae / SPARSE_RATIO (one thread, batch 1024, d_sae 4608: a step takes
# 0.33x the dense one's time at d_sae/k = 144, 0.68x at 16, 0.99x at 8, 1.57x at 4); on CUDA the sparse
# path is unmeasured, so auto stays dense there
SPARSE_RATIO = 8


def use_sparse(decoder: str, architecture: str, k: int | None, d_sae: int, device_type: str) -> bool:
    """Whether a step of this SAE takes the sparse path (--decoder; only TopK has a fixed k per row)."""
    from .architectures import get

    if not get(architecture).sparse_decoder or decoder == "dense":
        return False
    if decoder == "sparse":
        return True
    return device_type == "cpu" and k * SPARSE_RATIO < d_sae


class _PreAt(torch.autograd.Function):
    """pre[b, index[b, j]] where pre = x @ W_enc + bias was computed without gradient (the top-k needs
    all of it); the backward touches only those k entries of each row."""

    @staticmethod
    def forward(ctx, x, W_enc, bias, pre, index):
        ctx.save_for_backward(x, W_enc, index)
        return pre.gather(-1, index)

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, index = ctx.saved_tensors
        rows = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
        latents = index.reshape(-1)
        grad = grad.reshape(-1).to(W_enc.dtype)
        # grad pre^T as a sparse (d_sae, batch) matrix: (latent, row) pairs are distinct (top-k indices)
        grad_pre_t = torch.sparse_coo_tensor(torch.stack([latents, rows]), grad, (W_enc.shape[1], index.shape[0]),
                                             check_invariants=False)
        grad_x = grad_W = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.sparse.mm(grad_pre_t.t(), W_enc.t())
        if ctx.needs_input_grad[1]:
            grad_W = torch.sparse.mm(grad_pre_t, x.to(W_enc.dtype)).t().contiguous()
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device).index_add_(0, latents, grad)
        return grad_x, grad_W, grad_bias, None, None


def pre_at(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, pre: torch.Tensor,
           index: torch.Tensor) -> torch.Tensor:
    """The pre-activations at `index` ([batch, k]), `pre` = x @ W_enc + bias (computed without gradient),
    with the gradient of x @ W_enc + bias taken at those entries only."""
    return _PreAt.apply(x, W_enc, bias, pre, index)


def decode(index: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * W_dec[index[:, j]], i.e. f @ W_dec for the code f with those non-zeros."""
    return F.embedding_bag(index, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
