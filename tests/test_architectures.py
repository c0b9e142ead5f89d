"""Every registered SAE architecture passes the same checks: its training encode in inference form equals the
SAE's inference encode, its files and its exports read back to the same SAE, and TERM tilts its update.
Then Matryoshka BatchTopK's own: its nested prefix loss, its groups, and a fit through the tools."""
import json

import numpy as np
import pytest
import torch

from helpers import invoke, make_store, sparse_data
from ssae_common.core.config import ConfigError
from ssae_common.sae.architectures import NAMES, every, get
from ssae_common.sae.architectures.matryoshka import prefix_fvu
from ssae_common.sae.autoencoder import SAE
from ssae_common.sae.config import FitConfig
from ssae_common.sae.export import write
from ssae_common.sae.imports import load_any
from ssae_common.sae.objective import token_losses
from ssae_common.sae.term import tilt_weights
from ssae_common.sae.train import init_sae
from ssae_common.sae.trainer import Trainer

D_IN, D_SAE, K = 8, 64, 3


def config(name: str, **changes) -> FitConfig:
    return FitConfig(architecture=name, d_sae=D_SAE, k=K, batch_size=64, train_tokens=640, lr=1e-2,
                     **changes).resolve(D_IN, 640)


def rows(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(sparse_data(n=n, d=D_IN, n_dirs=12, seed=seed))


def trained_like(name: str, seed: int = 0) -> SAE:
    """An SAE of architecture `name` as init_sae makes it, moved off its initialisation (act_scale != 1, biases
    and positive thresholds that some pre-activations cross)."""
    cfg = config(name, seed=seed)
    sae = init_sae(cfg, D_IN, rows(256, seed=seed + 7).numpy(), None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        if sae.arch.threshold:
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.5)
    sae.cfg = {"model": "synthetic-lm", "hook": "blocks.0.hook_resid_post"}
    assert float((sae.encode(rows()) > 0).float().mean()) > 0.01  # some latents fire
    return sae


@pytest.mark.parametrize("name", NAMES)
def test_training_encode_in_inference_form_is_the_inference_encode(name):
    sae = trained_like(name).eval()
    x = rows()
    with torch.no_grad():
        expected = sae.encode(x)
        f = sae.arch.encode_train(sae, x * sae.act_scale, inference=True)[0]
        torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-6)
        if sae.arch.sparse_decoder:  # the sparse path: the same code, as k (index, value) pairs
            _, _, index, values = sae.arch.encode_train(sae, x * sae.act_scale, inference=True, sparse=True)
            torch.testing.assert_close(torch.zeros_like(expected).scatter(-1, index, values), expected,
                                       rtol=1e-5, atol=1e-6)
        if sae.arch.per_latent:  # a subset of latents reads as the same columns
            latents = torch.tensor([3, 0, 17, D_SAE - 1])
            pre = sae.pre_acts(x)[:, latents]
            torch.testing.assert_close(sae.arch.activation(sae, pre, latents), expected[:, latents])


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_give_the_same_sae(tmp_path, name):
    sae = trained_like(name)
    sae.save(str(tmp_path))
    back = SAE.load(str(tmp_path))
    assert (back.architecture, back.d_in, back.d_sae, back.k, back.act_scale, back.group_sizes) == \
        (name, D_IN, D_SAE, sae.k, sae.act_scale, sae.group_sizes)
    assert set(back.state_dict()) == set(sae.state_dict()) == set(sae.arch.tensor_names())
    for key, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert json.load(open(tmp_path / "cfg.json"))["architecture"] == name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("to", ["saelens", "sparsify", "ssae"])
def test_export_and_import_give_the_same_reconstruction(tmp_path, name, to):
    sae = trained_like(name)
    if to == "sparsify" and not sae.arch.sparsify:
        with pytest.raises(ConfigError, match="sparsify holds TopK SAEs only"):
            write(sae, str(tmp_path), to)
        return
    write(sae, str(tmp_path), to)
    back = load_any(str(tmp_path))
    read_as = name if to != "saelens" else next(a.name for a in every() if sae.arch.saelens in a.saelens_reads)
    assert back.architecture == read_as  # SAELens has no BatchTopK for inference: those come back as jumprelu
    assert (back.model, back.hook) == (sae.model, sae.hook)
    x = rows()
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], sae(x)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.encode(x), sae.encode(x) / sae.act_scale * back.act_scale,
                                   rtol=1e-5, atol=1e-5)  # the latents read in the activations' units


@pytest.mark.parametrize("name", NAMES)
def test_term_tilts_the_per_token_weights_and_the_update(tmp_path, name):
    x = rows(64) * 1.0
    x[:4] *= 3.0  # a few hard tokens
    updates, weights = {}, {}
    for tilt in (0.0, 5.0):
        sae = trained_like(name)
        trainer = Trainer(config(name, tilt=tilt, warmup_steps=0), sae, None, str(tmp_path),
                          np.empty((0, D_IN), np.float32))
        before = {k: v.clone() for k, v in sae.state_dict().items()}
        with torch.no_grad():
            losses = token_losses(sae, x * sae.act_scale, sae.arch.coefficient(trainer.cfg))[0]
        weights[tilt] = tilt_weights(losses, tilt) * len(losses)
        trainer.train_step(x * sae.act_scale)
        updates[tilt] = torch.cat([(sae.state_dict()[k] - before[k]).reshape(-1) for k in ("W_enc", "W_dec")])
    assert torch.allclose(weights[0.0], torch.ones(64))
    assert float(weights[5.0][:4].mean()) > 2 * float(weights[5.0][4:].mean())  # the hard tokens weigh more
    assert not torch.allclose(updates[0.0], updates[5.0], rtol=1e-3, atol=1e-7)


def test_every_architecture_declares_what_it_reads():
    for name in NAMES:
        arch = get(name)
        assert arch.name == name
        assert set(arch.options) <= {"k", "l1", "l0", "bandwidth", "group_fractions"}, name
        assert (arch.penalty is None) or arch.penalty in arch.options, name
        assert arch.saelens in ("standard", "topk", "jumprelu"), name


# --- Matryoshka BatchTopK ----------------------------------------------------------------------------
def test_matryoshka_loss_is_the_mean_of_its_prefixes_mse():
    sae = trained_like("matryoshka-batchtopk")
    assert sae.group_sizes == (2, 4, 8, 16, 34)  # 1/32, 1/16, 1/8, 1/4, 17/32 of 64
    x = rows() * sae.act_scale
    with torch.no_grad():
        loss, mse, err, enc = token_losses(sae, x)
        f, ends, prefixes = enc[0], np.cumsum(sae.group_sizes), []
        assert int((f > 0).sum()) == K * len(x)  # BatchTopK while training: k x batch over the whole batch
        for end in ends:
            prefixes.append((f[:, :end] @ sae.W_dec[:end] + sae.b_dec - x).pow(2).mean(-1))
        torch.testing.assert_close(loss, torch.stack(prefixes).mean(0))
        torch.testing.assert_close(mse, prefixes[-1])
        assert not torch.allclose(prefixes[0], prefixes[-1])  # the groups add to the reconstruction
        fvu = prefix_fvu(sae, x, ends.tolist())
        variance = float((x - x.mean(0)).pow(2).sum())
        for g, end in enumerate(ends):
            f_inf = sae.encode(x / sae.act_scale)
            expected = float((f_inf[:, :end] @ sae.W_dec[:end] + sae.b_dec - x).pow(2).sum()) / variance
            assert abs(fvu[g] - expected) < 1e-5


@pytest.mark.parametrize("fractions,message", [
    ((0.5, 0.25), "give two or more fractions that sum to 1"),
    ((1.0,), "give two or more fractions that sum to 1"),
    ((0.001, 0.999), "a group would have no latent of --d-sae 64"),
])
def test_matryoshka_bad_group_fractions_are_refused(fractions, message):
    with pytest.raises(ConfigError, match=message):
        config("matryoshka-batchtopk", group_fractions=fractions)


def test_group_fractions_only_for_matryoshka():
    with pytest.raises(ConfigError, match="only for --architecture matryoshka-batchtopk"):
        config("batchtopk", group_fractions=(0.5, 0.5))


def test_matryoshka_fits_evaluates_exports_and_finetunes_through_the_tools(tmp_path):
    """ssae-fit, ssae-eval, ssae-export --to saelens and ssae-fit --init on a Matryoshka BatchTopK SAE."""
    from ssae_tools.eval import main as eval_main
    from ssae_tools.export import main as export_main
    from ssae_tools.fit import main as fit_main

    store = make_store(tmp_path / "acts.h5", sparse_data(n=3000))
    fast = ["--batch-size", "128", "--train-tokens", "6400", "--warmup-steps", "5", "--val-tokens", "512",
            "--val-every", "25", "-q"]
    out = tmp_path / "m"
    record = json.loads(invoke(fit_main, [store, "--architecture", "matryoshka-batchtopk", "--k", "4", "--d-sae", "48",
                                          "--group-fraction", "0.25", "--group-fraction", "0.75", "-o", out, *fast],
                               code=0).stdout)
    cfg = json.load(open(out / "cfg.json"))
    assert (record["architecture"], cfg["group_sizes"], cfg["k"]) == ("matryoshka-batchtopk", [12, 36], 4)
    assert cfg["training"]["val_fvu"] < 0.6
    sae = SAE.load(str(out))
    assert float(sae.threshold.min()) > 0 and bool((sae.threshold == sae.threshold[0]).all())

    evaluated = json.loads(invoke(eval_main, [out, "--activations", store, "-o", tmp_path / "eval", "-q"],
                                  code=0).stdout)
    metrics = json.load(open(evaluated["path"]))["saes"][0]
    assert metrics["architecture"] == "matryoshka-batchtopk" and metrics["fvu"] < 0.6 and 1 < metrics["l0"] < 12

    exported = tmp_path / "sl"
    invoke(export_main, [out, "--to", "saelens", "-o", exported, "-q"], code=0)
    saelens = json.load(open(exported / "cfg.json"))
    assert saelens["architecture"] == "jumprelu"
    assert saelens["metadata"]["ssae_architecture"] == "matryoshka-batchtopk"
    assert (saelens["metadata"]["k"], saelens["metadata"]["group_sizes"]) == (4, [12, 36])
    x = torch.from_numpy(sparse_data(n=200, seed=3))
    with torch.no_grad():
        torch.testing.assert_close(load_any(str(exported))(x)[0], sae(x)[0], rtol=1e-5, atol=1e-5)

    child = tmp_path / "child"  # finetuning keeps the parent's groups
    invoke(fit_main, [store, "--init", out, "-o", child, *fast], code=0)
    assert json.load(open(child / "cfg.json"))["group_sizes"] == [12, 36]
    r = invoke(fit_main, [store, "--init", out, "--group-fraction", "0.5", "--group-fraction", "0.5",
                          "-o", tmp_path / "bad", *fast], code=2)
    assert "--group-fraction 0.5,0.5: the parent has groups of [12, 36] latents" in r.stderr


def test_architecture_names_are_compared_only_inside_the_registry():
    """What differs between architectures lives in their modules: nowhere else compares an architecture with
    a name (`architecture == "topk"`, `architecture in ("topk", ...)`)."""
    import os
    import re

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ssae_common")
    pattern = re.compile(r"architecture\s*(==|!=|(not )?in)\s*[(\[]?\s*[\"']")
    found = []
    for folder, _, files in os.walk(root):
        if os.path.join("sae", "architectures") in folder:
            continue
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                found += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not found
