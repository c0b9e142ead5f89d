"""TracIn: the factorised scores equal explicit per-document autograd gradients; the rerank CLI."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import parse_records, random_sae, sample_docs, write_jsonl
from ssae_common.retrieval import tracin as T
from ssae_common.sae.autoencoder import SAE
from ssae_tools.retrieve import main

HOOK = "blocks.0.hook_resid_post"


def tracin_sae(d_in=6, d_sae=12, architecture="relu", k=None, act_scale=1.0, l1=0.0, seed=0, **cfg):
    """A random SAE with the L1 coefficient TracIn's loss gradient uses."""
    sae = random_sae(d_in, d_sae, seed, architecture, k, act_scale)
    sae.cfg = {"l1_coefficient": l1, **cfg}
    return sae


@pytest.mark.parametrize("architecture,k,act_scale,l1", [("relu", None, 1.0, 0.0), ("relu", None, 1.7, 0.3),
                                                          ("topk", 3, 0.8, 0.05)])
def test_factorised_equals_autograd(architecture, k, act_scale, l1):
    sae = tracin_sae(architecture=architecture, k=k, act_scale=act_scale, l1=l1)
    gen = torch.Generator().manual_seed(1)
    seeds = [torch.randn(n, 6, generator=gen) for n in (3, 5, 1, 0)]
    cands = [torch.randn(n, 6, generator=gen) for n in (4, 2, 7, 0, 1)]
    fast = T.tracin_scores(sae, T.seed_gradient(sae, seeds), cands)
    slow = T.tracin_scores_autograd(sae, seeds, cands)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    assert fast[3] == 0.0 and np.abs(fast).min() < np.abs(fast).max()  # not a constant


def test_gradient_norms_equal_autograd():
    sae = tracin_sae(architecture="topk", k=4, act_scale=1.3, l1=0.2)
    docs = [torch.randn(n, 6) for n in (5, 1, 0)]
    got = T.gradient_norms(sae, docs)
    for x, norm in zip(docs[:2], got):
        grads = torch.autograd.grad(T._doc_loss(sae, x, 0.2), [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
        assert norm == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-4)
    assert got[2] == 0.0
    seeds = [torch.randn(3, 6)]
    raw = T.tracin_rerank_scores([sae], seeds, docs[:2])
    np.testing.assert_allclose(T.tracin_rerank_scores([sae], seeds, docs[:2], normalize=True), raw / got[:2], rtol=1e-6)


def test_seed_gradient_is_the_mean_gradient():
    sae = tracin_sae(l1=0.1)
    seeds = [torch.randn(n, 6) for n in (2, 9)]
    grad = T.seed_gradient(sae, seeds)
    explicit = []
    for x in seeds:
        sae.zero_grad()
        x_hat, f = sae(x)
        (((x_hat - x) ** 2).sum(1) + 0.1 * f.sum(1)).mean().backward()
        explicit.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        want = (explicit[0][name] + explicit[1][name]) / 2
        torch.testing.assert_close(getattr(grad, name), want, rtol=1e-4, atol=1e-5)


def test_checkpoints_sum():
    a, b = tracin_sae(seed=1), tracin_sae(seed=2)
    seeds = [torch.randn(4, 6)]
    cands = [torch.randn(3, 6), torch.randn(5, 6)]
    both = T.tracin_rerank_scores([a, b], seeds, cands)
    np.testing.assert_allclose(both, T.tracin_scores_autograd(a, seeds, cands) + T.tracin_scores_autograd(b, seeds, cands),
                               rtol=1e-4)
    with pytest.raises(Exception, match="disagree"):
        T.check_saes([tracin_sae(d_in=6), tracin_sae(d_in=8)], ["x", "y"])


@pytest.fixture
def sae_dir(tiny_model, tmp_path):
    folder = tmp_path / "gsae"
    folder.mkdir()
    sae = tracin_sae(d_in=16, d_sae=32, l1=0.01, seed=3)
    sae.cfg.update(model=os.path.abspath(tiny_model), hook=HOOK)
    sae.save(str(folder))
    return str(folder)


def test_cli_tracin_rerank(tiny_model, sae_dir, tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(40, 20, seed=5))
    seeds = write_jsonl(str(tmp_path / "s.jsonl"), [{"id": "s0", "text": "star galaxy orbit of the planet"},
                                                    {"id": "s1", "text": "the light of a star and its mass"}])
    args = [seeds, "--corpus", corpus, "--top-k", 5, "--rerank", "tracin", "--sae", sae_dir, "--rerank-pool", 2]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.stderr
    recs = parse_records(res.stdout)
    assert len(recs) == 5 and {r["method"] for r in recs} == {"bm25+tracin"}
    scores = [r["score"] for r in recs]
    assert scores == sorted(scores, reverse=True)
    assert all("first_stage_score" in r["meta"] for r in recs)

    # the same scores from the library: the 10 first-stage candidates, activations, factorised TracIn
    first = parse_records(CliRunner().invoke(main, [seeds, "--corpus", corpus, "--top-k", 10]).stdout)
    from ssae_common.data.models import document_activations, load_model

    lm = load_model(tiny_model)
    sae = SAE.load(sae_dir)
    seed_acts = document_activations(lm, ["star galaxy orbit of the planet", "the light of a star and its mass"],
                                     HOOK).acts
    cand_acts = document_activations(lm, [r["text"] for r in first], HOOK).acts
    want = T.tracin_rerank_scores([sae], seed_acts, cand_acts)
    by_id = dict(zip([r["id"] for r in first], want))
    assert [r["id"] for r in recs] == sorted(by_id, key=lambda i: -by_id[i])[:5]
    np.testing.assert_allclose(scores, [by_id[r["id"]] for r in recs], rtol=1e-5)
    assert np.allclose(T.tracin_scores_autograd(sae, seed_acts, cand_acts), want, rtol=1e-3, atol=1e-6)

    norm = parse_records(CliRunner().invoke(main, args + ["--tracin-normalize"]).stdout)
    cosine = dict(zip(by_id, want / T.gradient_norms(sae, cand_acts)))
    assert [r["id"] for r in norm] == sorted(cosine, key=lambda i: -cosine[i])[:5]
    np.testing.assert_allclose([r["score"] for r in norm], [cosine[r["id"]] for r in norm], rtol=1e-5)

    two = CliRunner().invoke(main, args + ["--sae", sae_dir])  # the same checkpoint twice: doubled scores
    np.testing.assert_allclose([r["score"] for r in parse_records(two.stdout)], np.array(scores) * 2, rtol=1e-6)


def test_cli_tracin_bad_inputs(tiny_model, sae_dir, tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(10, 10))
    seeds = write_jsonl(str(tmp_path / "s.jsonl"), [{"id": "s", "text": "star galaxy"}])
    res = CliRunner().invoke(main, [seeds, "--corpus", corpus, "--rerank", "tracin", "--sae", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no such SAE folder" in res.stderr
    res = CliRunner().invoke(main, [seeds, "--corpus", corpus, "--rerank", "tracin", "--sae", sae_dir,
                                    "--hook", "blocks.9.hook_resid_post"])
    assert res.exit_code == 2 and "--hook blocks.9.hook_resid_post: not a hook of" in res.stderr
    res = CliRunner().invoke(main, [seeds, "--corpus", corpus, "--sae", sae_dir])
    assert res.exit_code == 2 and "only used with --rerank tracin" in res.stderr
