"""TERM's point: a direction seen in ~0.3% of tokens, one latent too few.  Finetuning the same general
SAE (GSAE) with the same k and budget, TERM reconstructs the rare tokens markedly better than ERM."""
import json

import numpy as np
import torch
from click.testing import CliRunner

from ssae_common.sae.autoencoder import SAE
from ssae_tools.fit import main as fit_main
from helpers import make_store

D, N_COMMON = 32, 8


def tokens(n, p_rare, seed, dirs):
    g = np.random.default_rng(seed)
    rare = g.random(n) < p_rare
    which = np.where(rare, N_COMMON, g.integers(0, N_COMMON, n))
    acts = dirs[which] * (1 + 0.3 * g.random(n))[:, None] + 0.05 * g.standard_normal((n, D))
    return acts.astype(np.float32), rare


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
    general, _ = tokens(60000, 0.0, 1, dirs)  # the rare direction never occurs here
    domain, rare = tokens(60000, 0.003, 2, dirs)
    test, test_rare = tokens(60000, 0.003, 3, dirs)
    assert 0.002 < rare.mean() < 0.004 and test_rare.sum() > 100
    gsae = fit([make_store(tmp_path / "general.h5", general), "--architecture", "topk", "--d-sae", str(N_COMMON),
                "--k", "1", "--lr", "1e-2", "--batch-size", "1024", "--train-tokens", "300000",
                "--warmup-steps", "10", "-o", str(tmp_path / "gsae")])
    domain_h5 = make_store(tmp_path / "domain.h5", domain)
    common = ["--init", gsae, "--lr", "3e-3", "--batch-size", "1024", "--train-tokens", "100000", "--warmup-steps", "5"]
    erm = fit([domain_h5, *common, "--tilt", "0", "-o", str(tmp_path / "erm")])
    term = fit([domain_h5, *common, "--tilt", "500", "-o", str(tmp_path / "term")])

    err_gsae, err_erm, err_term = (squared_errors(p, test) for p in (gsae, erm, term))
    assert err_gsae[~test_rare].mean() < 0.15  # the GSAE learned the common directions
    assert err_erm[test_rare].mean() > 0.8 * err_gsae[test_rare].mean()  # ERM barely moves for 0.3%
    assert err_term[test_rare].mean() < 0.7 * err_erm[test_rare].mean()  # TERM: markedly better on rare
    assert err_term.max() < err_erm.max()  # and on the worst token
    assert err_term[~test_rare].mean() > err_erm[~test_rare].mean()  # paid for with the common tokens
