"""The sparse TopK path (sae/sparse.py) against the dense one: the same forward, every parameter's
gradient (with and without AuxK) and a few whole training steps, to float32 rounding."""
import numpy as np
import pytest
import torch

from helpers import random_sae
from ssae_common.core.config import ConfigError
from ssae_common.sae.config import FitConfig
from ssae_common.sae.sparse import decode, use_sparse
from ssae_common.sae.objective import auxk_loss, token_losses, validation_metrics
from ssae_common.sae.trainer import Trainer

D_IN, D_SAE, K = 24, 384, 6
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _x(n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy((np.random.default_rng(seed).standard_normal((n, D_IN)) * 0.7 + 0.2).astype(np.float32))


def _grads(sae, x, sparse: bool, dead: torch.Tensor | None):
    sae.zero_grad()
    loss, mse, err, enc = token_losses(sae, x, 0.0, sparse=sparse)
    total = (loss * torch.linspace(0.5, 1.5, len(x))).mean()  # unequal token weights, as TERM gives
    if dead is not None:
        total = total + auxk_loss(sae, err, enc[1], dead, 16, x=x if sparse else None)
    total.backward()
    return loss.detach(), enc, {name: getattr(sae, name).grad.clone() for name in PARAMS}


@pytest.mark.parametrize("dead_latents", [None, 300, 5])  # AuxK off; more dead latents than aux_k; fewer
def test_forward_and_gradients_match_the_dense_path(dead_latents):
    sae, x = random_sae(D_IN, D_SAE, 0, "topk", k=K), _x()
    dead = None
    if dead_latents is not None:
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(2))[:dead_latents]] = True
    loss_d, enc_d, grads_d = _grads(sae, x, False, dead)
    loss_s, enc_s, grads_s = _grads(sae, x, True, dead)
    assert enc_s[0] is None  # no dense code is built
    assert torch.equal(enc_d[2], enc_s[2])  # the same latents, from the same pre-activations
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    for name in PARAMS:
        assert grads_d[name].abs().max() > 0
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


def test_decode_is_the_dense_product_and_has_its_input_gradient():
    sae, x = random_sae(D_IN, D_SAE, 3, "topk", k=K), _x(64).requires_grad_()
    f = sae.encode(x)
    values, index = f.topk(K, dim=-1)
    torch.testing.assert_close(decode(index, values, sae.W_dec), f @ sae.W_dec, rtol=1e-5, atol=1e-6)
    grads = []
    for sparse in (False, True):  # the sparse encoder's backward also gives x its gradient when x needs one
        x.grad = None
        token_losses(sae, x, 0.0, sparse=sparse)[0].sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _trainer(decoder: str, tmp_path) -> Trainer:
    cfg = FitConfig(k=K, d_sae=D_SAE, batch_size=256, train_tokens=256 * 8, aux_k=16, dead_tokens=256,
                    warmup_steps=0, tilt=2.0, decoder=decoder).resolve(d_in=D_IN, n_rows=4096)
    trainer = Trainer(cfg, random_sae(D_IN, D_SAE, 4, "topk", k=K), None, str(tmp_path), np.empty((0, D_IN), np.float32))
    trainer.sae.normalize_decoder()
    return trainer


def test_training_steps_match_the_dense_path(tmp_path):
    """Six Adam steps (TERM, AuxK on the latents left dead, decoder renormalisation) from the same start."""
    dense, sparse = _trainer("dense", tmp_path / "d"), _trainer("sparse", tmp_path / "s")
    assert (dense.sparse, sparse.sparse) == (False, True)
    for step in range(6):
        x = _x(256, seed=10 + step)
        dense.train_step(x.clone())
        sparse.train_step(x.clone())
    assert int((dense.since_fired >= 256).sum()) > 16  # AuxK had dead latents to work with
    for name in PARAMS:
        torch.testing.assert_close(getattr(sparse.sae, name), getattr(dense.sae, name), rtol=1e-4, atol=1e-5,
                                   msg=name)
    torch.testing.assert_close(sparse.acc, dense.acc, rtol=1e-4, atol=1e-6)
    assert torch.equal(sparse.since_fired, dense.since_fired)
    val = _x(512, seed=99)
    got, want = validation_metrics(sparse.sae, val, sparse.cfg), validation_metrics(sparse.sae, val, dense.cfg)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_which_path():
    assert use_sparse("auto", "topk", 32, 4608, "cpu")
    assert not use_sparse("auto", "topk", 576, 4608, "cpu")  # too dense a code for the sparse path to win
    assert not use_sparse("auto", "topk", 32, 4608, "cuda")
    assert not use_sparse("auto", "relu", None, 4608, "cpu") and not use_sparse("sparse", "batchtopk", 32, 4608, "cpu")
    assert use_sparse("sparse", "topk", 1024, 4608, "cuda") and not use_sparse("dense", "topk", 32, 4608, "cpu")
    with pytest.raises(ConfigError, match="decoder"):
        FitConfig(architecture="relu", decoder="sparse").check()
