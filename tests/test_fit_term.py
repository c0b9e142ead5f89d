"""TERM's point: a direction seen in ~0.3% of tokens, one latent too few.  Finetuning the same general
SAE (GSAE) with the same k and budget, TERM (a fixed t, a t solved for an effective sample size, a tilt
across token types) reconstructs the rare tokens markedly better than ERM."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ssae_common.sae.autoencoder import SAE
from ssae_tools.fit import main as fit_main
from helpers import invoke, make_store

D, N_COMMON = 32, 8


def tokens(n, p_rare, seed, dirs):
    g = np.random.default_rng(seed)
    rare = g.random(n) < p_rare
    which = np.where(rare, N_COMMON, g.integers(0, N_COMMON, n))
    acts = dirs[which] * (1 + 0.3 * g.random(n))[:, None] + 0.05 * g.standard_normal((n, D))
    return acts.astype(np.float32), rare, which  # `which` doubles as the token id


def fit(args):
    r = CliRunner().invoke(fit_main, [*args, "--val-tokens", "0", "--dead-tokens", "1000000000", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["path"]


def squared_errors(path, x):
    with torch.no_grad():
        x_hat, _ = SAE.load(path)(torch.from_numpy(x))
    return ((x_hat.numpy() - x) ** 2).sum(1)


def test_term_reconstructs_rare_tokens_better_than_erm(tmp_path):
    g = np.random.default_rng(0)
    dirs = g.standard_normal((N_COMMON + 1, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    general, _, _ = tokens(60000, 0.0, 1, dirs)  # the rare direction never occurs here
    domain, rare, ids = tokens(60000, 0.003, 2, dirs)
    test, test_rare, _ = tokens(60000, 0.003, 3, dirs)
    assert 0.002 < rare.mean() < 0.004 and test_rare.sum() > 100
    gsae = fit([make_store(tmp_path / "general.h5", general), "--architecture", "topk", "--d-sae", str(N_COMMON),
                "--k", "1", "--lr", "1e-2", "--batch-size", "1024", "--train-tokens", "300000",
                "--warmup-steps", "10", "-o", str(tmp_path / "gsae")])
    domain_h5 = make_store(tmp_path / "domain.h5", domain, token_ids=ids)
    common = ["--init", gsae, "--lr", "3e-3", "--batch-size", "1024", "--train-tokens", "100000", "--warmup-steps", "5"]
    erm = fit([domain_h5, *common, "--tilt", "0", "-o", str(tmp_path / "erm")])
    term = fit([domain_h5, *common, "--tilt", "500", "-o", str(tmp_path / "term")])
    by_ess = fit([domain_h5, *common, "--tilt-ess", "0.01", "-o", str(tmp_path / "ess")])
    by_type = fit([domain_h5, *common, "--tilt-ess", "0.1", "--tilt-groups", "token", "-o", str(tmp_path / "type")])

    err_gsae, err_erm, err_term, err_ess, err_type = (squared_errors(p, test) for p in (gsae, erm, term, by_ess, by_type))
    for err in (err_ess, err_type):
        assert err[test_rare].mean() < 0.7 * err_erm[test_rare].mean()
    assert err_gsae[~test_rare].mean() < 0.15  # the GSAE learned the common directions
    assert err_erm[test_rare].mean() > 0.8 * err_gsae[test_rare].mean()  # ERM barely moves for 0.3%
    assert err_term[test_rare].mean() < 0.7 * err_erm[test_rare].mean()  # TERM: markedly better on rare
    assert err_term.max() < err_erm.max()  # and on the worst token
    assert err_term[~test_rare].mean() > err_erm[~test_rare].mean()  # paid for with the common tokens


def log_records(path):
    with open(f"{path}/train_log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_tilt_ess_and_token_groups_log_the_tilt_they_used(tmp_path):
    g = np.random.default_rng(1)
    dirs = g.standard_normal((N_COMMON + 1, D))
    acts, _, ids = tokens(8192, 0.01, 4, dirs / np.linalg.norm(dirs, axis=1, keepdims=True))
    store = make_store(tmp_path / "a.h5", acts, token_ids=ids)
    common = [store, "--d-sae", "16", "--k", "2", "--batch-size", "512", "--train-tokens", "4096", "--log-every", "2"]
    ess = fit([*common, "--tilt-ess", "0.1", "-o", str(tmp_path / "ess")])
    recs = log_records(ess)
    assert len(recs) == 4 and all(r["tilt"] > 0 for r in recs)
    assert all(abs(r["tilt_ess_fraction"] - 0.1) < 1e-3 for r in recs)  # what was asked, at every step
    with open(f"{ess}/cfg.json") as f:
        cfg = json.load(f)
    assert (cfg["tilt_ess"], cfg["tilt_groups"], cfg["tilt"]) == (0.1, "none", 0.0)

    # across 9 token types the weights are 9 blocks: the ESS is that of the types, at most 9 groups' worth
    typed = fit([*common, "--tilt-ess", "0.5", "--tilt-groups", "token", "-o", str(tmp_path / "typed")])
    recs = log_records(typed)
    assert all(r["tilt"] > 0 and abs(r["tilt_ess_fraction"] - 0.5) < 2e-3 for r in recs)
    fixed = fit([*common, "--tilt", "3", "--tilt-groups", "token", "-o", str(tmp_path / "fixed")])
    assert all(r["tilt"] == 3 and r["tilt_ess_fraction"] < 1 for r in log_records(fixed))
    erm = fit([*common, "-o", str(tmp_path / "erm")])
    assert all(r["tilt"] == 0 and r["tilt_ess_fraction"] == 1 for r in log_records(erm))


def test_token_groups_give_back_erm_when_every_token_is_its_own_type(tmp_path):
    """With one type per token the tilt across types is the tilt across tokens: the same SAE."""
    g = np.random.default_rng(2)
    acts = g.standard_normal((4096, D)).astype(np.float32)
    common = ["--d-sae", "16", "--k", "2", "--batch-size", "512", "--train-tokens", "2048", "--tilt-ess", "0.2"]
    a = fit([make_store(tmp_path / "a.h5", acts, token_ids=np.arange(4096)), *common, "--tilt-groups", "token",
             "-o", str(tmp_path / "a")])
    b = fit([make_store(tmp_path / "b.h5", acts), *common, "-o", str(tmp_path / "b")])
    wa, wb = SAE.load(a).W_dec.detach(), SAE.load(b).W_dec.detach()
    assert torch.allclose(wa, wb, atol=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--tilt", "1", "--tilt-ess", "0.1"], "--tilt-ess 0.1: give --tilt (1.0) or --tilt-ess, not both"),
    (["--tilt-groups", "token"], "--tilt-groups token: needs --tilt or --tilt-ess"),
    (["--tilt-ess", "0"], "--tilt-ess 0.0: must be greater than 0"),
    (["--tilt-ess", "1.5"], "--tilt-ess 1.5: must be at most 1"),
    (["--tilt-ess", "0.1", "--tilt-groups", "type"], "--tilt-groups"),
])
def test_bad_tilt_options_exit_2_and_write_nothing(tmp_path, flags, message):
    store = make_store(tmp_path / "a.h5", np.ones((64, D), np.float32))
    r = invoke(fit_main, [store, *flags, "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
