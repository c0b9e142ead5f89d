"""Streaming metric accumulators against hand-built cases with known answers and numpy recomputation."""
import math
import pickle

import numpy as np
import pytest
import torch

from ssae_common.eval.metrics import (EvalState, LMScores, MetricConfig, SaeMetrics, aligned_decoder_cosine,
                                 decoder_cosine, log_ratio_counts)
from helpers import identity_sae, random_sae
from ssae_common.sae.autoencoder import SAE


def feed(acc: SaeMetrics, sae: SAE, x: np.ndarray, tokens: np.ndarray, batch: int) -> None:
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(x[s:s + batch])
        with torch.no_grad():
            x_hat, f = sae(xb)
        acc.update(xb, x_hat, f, tokens[s:s + batch])


def test_identity_sae_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    acc = SaeMetrics(8, 16)
    feed(acc, identity_sae(8), x, rng.integers(0, 20, 300), 64)
    r = acc.result()
    assert r["mse"] < 1e-12 and r["fvu"] < 1e-12
    assert r["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert r["l0"] == 8.0  # each dimension is positive on exactly one of the two encoders
    assert r["dead_fraction"] == 0.0 and r["dense_fraction"] == 1.0


@pytest.mark.parametrize("architecture,k", [("relu", None), ("topk", 5)])
def test_streaming_matches_numpy(architecture, k):
    rng = np.random.default_rng(1)
    d, d_sae, n = 12, 40, 1000
    x = (rng.normal(size=(n, d)) * 3 + rng.normal(size=d) * 5).astype(np.float32)
    tokens = rng.integers(0, 50, n)
    sae = random_sae(d, d_sae, 3, architecture, k)
    acc = SaeMetrics(d, d_sae)
    feed(acc, sae, x, tokens, 97)  # uneven batches
    r = acc.result()
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    pre = np.maximum((x - b_dec) @ W_enc + b_enc, 0)
    if k:
        thresh = np.sort(pre, 1)[:, -k][:, None]
        pre = np.where(pre >= thresh, pre, 0)
    x_hat = pre @ W_dec + b_dec
    sq = ((x - x_hat) ** 2).sum()
    assert r["mse"] == pytest.approx(sq / x.size, rel=1e-5)
    assert r["fvu"] == pytest.approx(sq / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)
    assert r["l0"] == pytest.approx((pre > 0).sum(1).mean(), rel=1e-9)
    cos = (x * x_hat).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)
    assert r["cosine"] == pytest.approx(cos.mean(), rel=1e-5)
    counts = (pre > 0).sum(0)
    assert r["activation_counts_by_rank"] == sorted(counts.tolist(), reverse=True)
    assert r["dead_fraction"] == pytest.approx((counts == 0).mean())
    assert r["dense_fraction"] == pytest.approx((counts / n > 0.1).mean())
    if k:
        assert r["l0"] <= k


def crafted(acc: SaeMetrics, f_rows, tokens, err=None):
    f = torch.tensor(f_rows, dtype=torch.float32)
    n = f.shape[0]
    x = torch.ones(n, acc.d_in)
    x_hat = x.clone()
    if err is not None:
        x_hat[:, 0] -= torch.sqrt(torch.tensor(err, dtype=torch.float32))
    acc.update(x, x_hat, f, np.asarray(tokens))


def test_tail_coverage_known_answer():
    acc = SaeMetrics(2, 3)
    # latent 0 fires only on type 5; latent 1 puts 3/4 of its mass on 9; latent 2 splits 1:2 between 7 and 9
    crafted(acc, [[1, 0, 0], [2, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0], [0, 3, 2], [0, 0, 0]],
            [5, 5, 7, 7, 7, 9, 11])
    tc = acc.result()["tail_coverage"]
    assert set(acc.represented_types().tolist()) == {5, 9}
    assert tc["n_types"] == 4 and tc["n_types_represented"] == 2
    # frequencies: 5 -> 2, 7 -> 3 (bin [2,4)), 9 -> 1, 11 -> 1 (bin [1,2))
    assert tc["bin_lower"] == [1, 2]
    assert tc["n_types_per_bin"] == [2, 2]
    assert tc["n_represented_per_bin"] == [1, 1]
    assert tc["fraction_per_bin"] == [0.5, 0.5]
    assert tc["cumulative"] == [0.5, 1.0]
    assert tc["exact"] is True


def test_tail_coverage_exact_half_counts_and_minor_share_does_not():
    acc = SaeMetrics(2, 2)
    crafted(acc, [[1, 1], [1, 2], [0, 2]], [1, 2, 3])  # latent 0: 50/50 on 1 and 2; latent 1: 20/40/40
    assert set(acc.represented_types().tolist()) == {1, 2}


def test_pair_bound_keeps_dominant_types():
    rng = np.random.default_rng(0)
    d_sae, n = 30, 3000
    tokens = rng.integers(0, 500, n)
    f = np.zeros((n, d_sae), np.float32)
    f[np.arange(n), rng.integers(0, d_sae, n)] = 0.01  # noise spread over many pairs
    f[tokens == 3, 0] = 100.0  # latent 0 is about type 3
    acc = SaeMetrics(2, d_sae, MetricConfig(max_pairs=40, pending_limit=100))
    for s in range(0, n, 250):
        acc.update(torch.ones(len(f[s:s + 250]), 2), torch.ones(len(f[s:s + 250]), 2), torch.from_numpy(f[s:s + 250]),
                   tokens[s:s + 250])
    tc = acc.result()["tail_coverage"]
    assert tc["exact"] is False and tc["n_pairs"] <= 40
    assert 3 in acc.represented_types().tolist()


def test_entropy_and_max_activation():
    acc = SaeMetrics(2, 8)
    crafted(acc, [[1, 1, 1, 1, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0], [0] * 8], [1, 2, 3])
    r = acc.result()
    assert r["entropy"]["mean"] == pytest.approx(math.log(4) / 2)  # ln 4 and 0 over the two tokens with activity
    assert r["entropy"]["n_tokens_none_active"] == 1
    assert sum(r["entropy"]["histogram"]["counts"]) == 2
    assert r["max_activation"]["mean"] == pytest.approx(2.0)  # (1 + 5 + 0) / 3
    assert r["max_activation"]["max"] == 5.0
    assert sum(r["max_activation"]["histogram"]["counts"]) == 3


def test_error_by_frequency_rank():
    acc = SaeMetrics(2, 2)
    # type 4 occurs 4 times (rank 1), type 8 twice (rank 2), type 6 once (rank 3)
    crafted(acc, [[1, 0]] * 7, [4, 4, 4, 4, 8, 8, 6], err=[0.0, 0.2, 0.2, 0.0, 1.0, 3.0, 8.0])
    e = acc.result()["error_by_frequency_rank"]
    assert e["rank_lower"] == [1, 2]
    assert e["n_tokens_per_bin"] == [4, 3]
    assert e["mean"] == pytest.approx([0.4 / 4 / 2, 12.0 / 3 / 2], rel=1e-5)  # per-token squared error / d_in
    assert e["max"] == pytest.approx([0.1, 4.0], rel=1e-5)


def test_tail_error_of_the_rarest_decile():
    acc = SaeMetrics(2, 2)
    # 12 types: type 100 + i occurs 20 - i times, except 109 (twice), 110 and 111 (once each);
    # the rarest decile is ceil(1.2) = 2 types: 110 and 111
    tokens, err = [], []
    count = {i: {9: 2, 10: 1, 11: 1}.get(i, 20 - i) for i in range(12)}
    for i in range(12):
        tokens += [100 + i] * count[i]
        err += [0.1 * i] * (count[i] - 1) + [0.1 * i + 2.0]  # one worse token per type: mean 0.1 i + 2 / count
    crafted(acc, [[1, 0]] * len(tokens), tokens, err=err)
    r = acc.result()["tail_error"]
    type_mse = {i: (0.1 * i + 2.0 / count[i]) / 2 for i in range(12)}  # per dimension: / d_in
    assert (r["n_types"], r["n_types_seen"], r["max_count"], r["n_tokens"]) == (2, 12, 1, 2)
    assert r["mean"] == pytest.approx((type_mse[10] + type_mse[11]) / 2, rel=1e-5)
    assert r["max"] == pytest.approx(type_mse[11], rel=1e-5)
    assert r["all_types_mean"] == pytest.approx(np.mean(list(type_mse.values())), rel=1e-5)
    assert r["all_types_max"] == pytest.approx(max(type_mse.values()), rel=1e-5)
    acc.cfg = MetricConfig(tail_fraction=0.25)  # ceil(3) = 3 types: 110, 111, then 109 (count 2)
    r = acc.result()["tail_error"]
    assert (r["n_types"], r["max_count"]) == (3, 2)
    assert r["mean"] == pytest.approx((type_mse[9] + type_mse[10] + type_mse[11]) / 3, rel=1e-5)
    assert SaeMetrics(2, 2).result()["tail_error"]["mean"] is None


def test_tail_error_ties_at_the_boundary_are_averaged_over_every_choice():
    """5 types once (errors 1, 2, 4, 8, 16 / d_in) and one type 3 times; a tail of 0.5 x 6 = 3 types takes 3
    of the 5 tied ones: mean and max are the averages over all C(5, 3) = 10 choices."""
    import itertools

    acc = SaeMetrics(2, 2, MetricConfig(tail_fraction=0.5))
    tied = [1.0, 2.0, 4.0, 8.0, 16.0]
    crafted(acc, [[1, 0]] * 8, [7, 3, 9, 5, 11, 2, 2, 2], err=[4.0, 1.0, 8.0, 2.0, 16.0, 0.5, 0.5, 0.5])
    r = acc.result()["tail_error"]
    choices = [np.array(c) / 2 for c in itertools.combinations(tied, 3)]
    assert (r["n_types"], r["n_tied"], r["max_count"]) == (3, 5, 1)
    assert r["mean"] == pytest.approx(np.mean([c.mean() for c in choices]), rel=1e-6)
    assert r["max"] == pytest.approx(np.mean([c.max() for c in choices]), rel=1e-6)
    # with types below the boundary too: 1 type once (error 32), 4 types twice; a tail of 3 takes 2 of those 4
    acc = SaeMetrics(2, 2, MetricConfig(tail_fraction=0.6))
    crafted(acc, [[1, 0]] * 9, [1, 4, 4, 5, 5, 6, 6, 8, 8], err=[32.0, 1, 1, 2, 2, 3, 3, 0.5, 0.5])
    r = acc.result()["tail_error"]
    choices = [np.array([32.0, *c]) / 2 for c in itertools.combinations([1.0, 2.0, 3.0, 0.5], 2)]
    assert (r["n_types"], r["n_tied"], r["max_count"]) == (3, 4, 2)
    assert r["mean"] == pytest.approx(np.mean([c.mean() for c in choices]), rel=1e-6)
    assert r["max"] == pytest.approx(16.0, rel=1e-6)


def test_decoder_cosine_all_pairs_and_sampled():
    W = torch.eye(6)
    full = decoder_cosine(W)
    assert full["n_pairs"] == 15 and not full["sampled"]
    assert full["mean"] == pytest.approx(0.0) and full["max"] == pytest.approx(0.0)
    W2 = torch.tensor([[1.0, 0], [1, 0], [0, 1]])
    r = decoder_cosine(W2)
    assert r["max"] == pytest.approx(1.0) and r["mean"] == pytest.approx(1 / 3)
    assert r["nearest_neighbour_mean"] == pytest.approx(2 / 3)
    W3 = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    sampled = decoder_cosine(W3, max_pairs=5000, seed=1)
    assert sampled["sampled"] and sampled["n_latents_sampled"] == 100 and sampled["n_pairs"] == 4950
    every = decoder_cosine(W3)
    assert not every["sampled"] and every["n_pairs"] == 300 * 299 // 2
    assert sampled["mean"] == pytest.approx(every["mean"], abs=0.02)
    assert sampled["nearest_neighbour_mean"] <= every["nearest_neighbour_mean"] + 1e-9
    sims = torch.nn.functional.normalize(W3, dim=1) @ torch.nn.functional.normalize(W3, dim=1).T
    sims.fill_diagonal_(-2)
    assert every["nearest_neighbour_mean"] == pytest.approx(float(sims.max(1).values.mean()), rel=1e-5)
    same = aligned_decoder_cosine(W, W * 3)
    assert same["mean"] == pytest.approx(1.0) and same["fraction_below_0.9"] == 0.0


def test_log_ratio_counts():
    r = log_ratio_counts(np.array([0, 3, 9]), np.array([0, 1, 9]))
    assert r["mean"] == pytest.approx(math.log(2) / 3)
    assert r["fraction_more_active"] == 0.0  # ln 2 is not > ln 2
    assert r["fraction_below_zero"] == 0.0
    fewer = log_ratio_counts(np.array([0, 0, 1, 9, 2]), np.array([1, 0, 3, 9, 1]))
    assert fewer["fraction_below_zero"] == pytest.approx(2 / 5)  # latents 0 and 2 fire less than in the baseline
    assert sum(r["histogram"]["counts"]) == 3


def test_lm_scores():
    s = LMScores(["a"])
    s.n, s.clean, s.zero, s.spliced["a"] = 10, 20.0, 60.0, 30.0
    r = s.result("a")
    assert r["ce_clean"] == 2.0 and r["ce_zero_ablation"] == 6.0 and r["ce_spliced"] == 3.0
    assert r["ce_recovered"] == pytest.approx(0.75)
    assert r["ppl_spliced"] == pytest.approx(math.exp(3.0))


def test_state_checkpoint_resume_equals_one_pass(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    tokens = rng.integers(0, 30, 400)
    sae = random_sae(6, 20, 1)
    one = EvalState("k", {"s": (6, 20)}, MetricConfig(), with_lm=False)
    feed(one.acc["s"], sae, x, tokens, 50)
    half = EvalState("k", {"s": (6, 20)}, MetricConfig(), with_lm=False)
    feed(half.acc["s"], sae, x[:200], tokens[:200], 50)
    half.save(str(tmp_path / "state"))
    assert EvalState.load(str(tmp_path / "state"), "other") is None
    resumed = EvalState.load(str(tmp_path / "state"), "k")
    feed(resumed.acc["s"], sae, x[200:], tokens[200:], 50)
    a, b = one.acc["s"].result(), resumed.acc["s"].result()
    for key in ("mse", "fvu", "l0", "cosine"):
        assert a[key] == pytest.approx(b[key], rel=1e-9)
    assert a["tail_coverage"] == b["tail_coverage"]
    assert a["activation_counts_by_rank"] == b["activation_counts_by_rank"]
    pickle.dumps(resumed)
