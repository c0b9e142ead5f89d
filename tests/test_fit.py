"""ssae-fit: CLI, saved files, batches, imports of other libraries' SAEs, bad inputs."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import invoke, make_store, parse_records, sparse_data
from ssae_common.data.batches import ActivationStream
from ssae_common.data.activations import ActivationStore
from ssae_common.core.config import ConfigError
from ssae_common.core.outputs import sha256_file
from ssae_common.core.runtime import RunContext
from ssae_common.sae import FitConfig, fit
from ssae_common.sae.autoencoder import SAE
from ssae_common.sae.imports import import_sae
from ssae_tools.fit import main as fit_main


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "acts.h5", sparse_data())


def run(args, input=None):
    return invoke(fit_main, args, input=input)


FAST = ["--batch-size", "256", "--train-tokens", "12800", "--log-every", "10", "--val-every", "25",
        "--val-tokens", "512", "--warmup-steps", "5"]


def test_fit_cli_writes_sae_dir_and_record(store, tmp_path):
    out = tmp_path / "sae"
    r = run([store, "--architecture", "topk", "--k", "4", "--d-sae", "48", "--tilt", "500", "--lr", "2e-3",
             "--seed", "0", "-o", str(out), *FAST])
    assert r.exit_code == 0, r.stderr
    (rec,) = parse_records(r.stdout)
    assert rec["schema"] == "ssae.artifact/1" and rec["kind"] == "sae" and rec["path"] == str(out)
    assert sorted(os.listdir(out)) == ["cfg.json", "sae.safetensors", "train_log.jsonl"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no partial or temp left
    cfg = json.load(open(out / "cfg.json"))
    assert cfg["schema"] == "ssae.sae/1" and cfg["architecture"] == "topk" and cfg["k"] == 4
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 48 and cfg["tilt"] == 500.0 and cfg["parent"] is None
    assert cfg["model"] == "synthetic-lm" and cfg["hook"] == "blocks.0.hook_resid_post"
    assert cfg["created_by"]["tool"] == "ssae-fit" and cfg["seed"] == 0 and cfg["config"]["lr"] == 2e-3
    assert cfg["training"]["tokens"] == 12800 and cfg["training"]["steps"] == 50
    x = ActivationStore(store).rows(0, 6000)
    assert np.mean(np.sum((x * cfg["act_scale"]) ** 2, axis=1)) == pytest.approx(16, rel=0.05)
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [10, 20, 25, 30, 40, 50]
    for key in ("step", "tokens", "loss", "mse", "l0", "dead_fraction", "lr", "tilt_ess_fraction",
                "tilt_max_weight_x_n"):
        assert key in log[-1]
    assert all(r["l0"] == 4 for r in log)
    assert all(0 < r["tilt_ess_fraction"] < 0.5 for r in log)  # t = 500 concentrates the weights
    assert log[-1]["loss"] >= log[-1]["erm_loss"]  # TERM >= the mean for t > 0
    assert log[-1]["val_fvu"] < 0.85 and "val_fvu" in log[2]


def test_saved_files_read_with_plain_numpy(store, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "sae"
    assert run([store, "--architecture", "topk", "--k", "3", "--d-sae", "32", "-o", str(out), *FAST]).exit_code == 0
    cfg = json.load(open(out / "cfg.json"))
    w = load_file(str(out / "sae.safetensors"))
    x = ActivationStore(store).rows(0, 500)
    pre = (x * cfg["act_scale"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    pre = np.maximum(pre, 0)
    keep = np.argsort(-pre, axis=1)[:, :cfg["k"]]
    f = np.zeros_like(pre)
    np.put_along_axis(f, keep, np.take_along_axis(pre, keep, 1), 1)
    x_hat = (f @ w["W_dec"] + w["b_dec"]) / cfg["act_scale"]
    sae = SAE.load(str(out))
    with torch.no_grad():
        ref, f_ref = sae(torch.from_numpy(x))
    np.testing.assert_allclose(x_hat, ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(w["W_dec"], axis=1), 1.0, atol=1e-5)  # unit-norm decoder rows
    fvu = np.sum((x_hat - x) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert fvu < 0.6  # it learned something


def test_relu_with_l1(store, tmp_path):
    out = tmp_path / "relu"
    r = run([store, "--architecture", "relu", "--d-sae", "32", "--l1", "0.02", "--lr", "3e-3", "--l1-warmup-fraction", "0.5", "-o", str(out), *FAST])
    assert r.exit_code == 0, r.stderr
    cfg = json.load(open(out / "cfg.json"))
    assert cfg["architecture"] == "relu" and cfg["l1_coefficient"] == 0.02 and cfg["k"] is None
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert log[-1]["l1"] == pytest.approx(0.02) and log[0]["l1"] < 0.02  # warm-up
    assert log[-1]["l0"] < 16 and log[-1]["loss"] > log[-1]["mse"]


def test_stdin_record_default_output_and_reuse(store, tmp_path):
    record = json.dumps({"schema": "ssae.artifact/1", "kind": "activations", "path": store}) + "\n"
    args = ["--k", "4", "--d-sae", "32", "--tilt", "500", *FAST]
    r1 = run(args, input=record)
    assert r1.exit_code == 0, r1.stderr
    (rec,) = parse_records(r1.stdout)
    assert rec["path"].startswith(os.environ["SSAE_WORKDIR"]) and os.path.isfile(os.path.join(rec["path"], "cfg.json"))
    r2 = run(args, input=record)
    assert r2.exit_code == 0 and "reusing" in r2.stderr
    assert parse_records(r2.stdout)[0]["path"] == rec["path"]
    r3 = run([*args[:-2], "--val-tokens", "256"], input=record)  # another config, another folder
    assert parse_records(r3.stdout)[0]["path"] != rec["path"]


def test_fit_from_python_writes_sae_dir_and_returns_record(store, tmp_path):
    out = tmp_path / "sae"
    config = FitConfig(k=4, d_sae=32, tilt=500.0, batch_size=256, train_tokens=12800, log_every=10, val_every=25,
                       val_tokens=512, warmup_steps=5)
    rec = fit(config, [store], out=str(out), context=RunContext(device_spec="cpu", seed=1))
    assert rec["kind"] == "sae" and rec["path"] == str(out) and rec["d_sae"] == 32 and rec["tokens"] == 12800
    cfg = json.load(open(out / "cfg.json"))
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["seed"] == 1
    assert cfg["created_by"]["tool"] == "python" and cfg["config"]["shuffle_rows"] == 32768
    # the derived defaults, resolved from the data: d_in 16, 6000 rows
    assert cfg["config"]["lr"] == pytest.approx(2e-4 / np.sqrt(32 / 2**14)) and cfg["config"]["b_dec_init"] == "median"
    assert cfg["config"]["dead_tokens"] == 12800 // 5 and cfg["config"]["device"] == "cpu"


def test_resolve_fills_derived_defaults():
    cfg = FitConfig().resolve(d_in=16, n_rows=1000)
    assert (cfg.architecture, cfg.d_sae, cfg.k, cfg.l1, cfg.train_tokens) == ("topk", 128, 32, 0.0, 1000)
    assert cfg.dead_tokens == 4096 and cfg.b_dec_init == "median" and cfg.is_resolved  # max(batch, budget / 5)
    relu = FitConfig(architecture="relu", expansion=2, k=7).resolve(d_in=16, n_rows=1000)
    assert (relu.d_sae, relu.k, relu.l1) == (32, None, 5 / 16)
    parent = SAE(16, 24, "topk", 3)
    tuned = FitConfig(init="gsae").resolve(d_in=16, n_rows=1000, parent=parent)
    assert (tuned.architecture, tuned.d_sae, tuned.k, tuned.b_dec_init) == ("topk", 24, 3, "parent")
    with pytest.raises(ConfigError) as e:
        FitConfig(init="gsae", d_sae=48).resolve(d_in=16, n_rows=1000, parent=parent)
    assert e.value.field_name == "d_sae"


@pytest.mark.parametrize("changes,field,flags,message", [
    ({"batch_size": 0}, "batch_size", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    ({"b_dec_init": "parent"}, "b_dec_init", ["--b-dec-init", "parent"], "--b-dec-init parent: needs --init"),
    ({"decay_fraction": 1.5}, "decay_fraction", ["--decay-fraction", "1.5"], "--decay-fraction 1.5: must be at most 1"),
])
def test_bad_value_names_the_field_in_python_and_the_flag_on_the_command_line(store, changes, field, flags,
                                                                               message):
    with pytest.raises(ConfigError) as e:
        FitConfig(**changes).check()
    assert e.value.field_name == field and str(e.value).startswith(f"{field} ")
    r = run([store, *flags])
    assert r.exit_code == 2 and f"ssae-fit: error: {message}" in r.stderr


# --- batches --------------------------------------------------------------------------------------
def test_stream_is_deterministic_covers_each_row_once_and_holds_out_validation(tmp_path):
    n, d = 9000, 4
    acts = np.zeros((n, d), np.float32)
    acts[:, 0] = np.arange(n)
    a = make_store(tmp_path / "a.h5", acts[:5000])
    b = make_store(tmp_path / "b.h5", acts[5000:])
    stores = [ActivationStore(a), ActivationStore(b)]
    s1 = ActivationStream(stores, 300, seed=7, shuffle_rows=4500, val_rows=800)
    s2 = ActivationStream(stores, 300, seed=7, shuffle_rows=4500, val_rows=800)
    val = s1.validation()[:, 0]
    assert len(val) == 800 and s1.n_train == n - 800
    epoch = np.concatenate([s1.batch(i)[:, 0] for i in range(s1.n_train // 300)])
    assert len(np.unique(epoch)) == len(epoch)  # no repeats within an epoch
    assert not set(epoch) & set(val)
    assert set(epoch) <= set(range(n)) and len(set(epoch) | set(val)) == n - s1.n_train % 300
    wrapped = np.concatenate([s1.batch(i)[:, 0] for i in range(s1.n_train // 300, 2 * s1.n_train // 300)])
    assert set(wrapped) | set(epoch) == set(range(n)) - set(val)  # the second epoch continues seamlessly
    for step in (0, 5, 17, 40, 3):  # random access == sequential, and across epochs
        np.testing.assert_array_equal(s1.batch(step), s2.batch(step))
    assert not np.array_equal(s1.batch(0), ActivationStream(stores, 300, seed=8, shuffle_rows=4500).batch(0))
    shuffled = s1.batch(0)[:, 0]
    assert len(set(shuffled // 2048)) > 1  # rows of several blocks are mixed
    s1.close(), s2.close()


# --- imports ----------------------------------------------------------------------------------------
def _random_weights(d_in=16, d_sae=24, seed=1):
    g = np.random.default_rng(seed)
    return {"W_enc": g.standard_normal((d_in, d_sae)).astype(np.float32) * 0.3,
            "b_enc": g.standard_normal(d_sae).astype(np.float32) * 0.1,
            "W_dec": g.standard_normal((d_sae, d_in)).astype(np.float32) * 0.3,
            "b_dec": g.standard_normal(d_in).astype(np.float32) * 0.2}


def _topk(pre, k):
    pre = np.maximum(pre, 0)
    keep = np.argsort(-pre, axis=1)[:, :k]
    f = np.zeros_like(pre)
    np.put_along_axis(f, keep, np.take_along_axis(pre, keep, 1), 1)
    return f


def _check_same(sae, x, reference):
    with torch.no_grad():
        got, _ = sae(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), reference, rtol=1e-4, atol=1e-5)


def test_import_saelens(tmp_path):
    from safetensors.numpy import save_file

    w = _random_weights()
    x = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
    relu = tmp_path / "saelens_relu"
    relu.mkdir()
    save_file(w, str(relu / "sae_weights.safetensors"))
    json.dump({"architecture": "standard", "d_in": 16, "d_sae": 24, "activation_fn_str": "relu",
               "apply_b_dec_to_input": False, "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post"},
              open(relu / "cfg.json", "w"))
    sae, fmt = import_sae(str(relu))
    assert fmt == "saelens" and sae.architecture == "relu" and sae.cfg["hook"] == "blocks.3.hook_resid_post"
    _check_same(sae, x, np.maximum(x @ w["W_enc"] + w["b_enc"], 0) @ w["W_dec"] + w["b_dec"])

    topk = tmp_path / "saelens_topk"
    topk.mkdir()
    save_file(w, str(topk / "sae_weights.safetensors"))
    json.dump({"architecture": "topk", "d_in": 16, "d_sae": 24, "k": 5, "apply_b_dec_to_input": True},
              open(topk / "cfg.json", "w"))
    sae, fmt = import_sae(str(topk))
    assert sae.architecture == "topk" and sae.k == 5
    _check_same(sae, x, _topk((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 5) @ w["W_dec"] + w["b_dec"])


def test_import_sparsify(tmp_path):
    from safetensors.numpy import save_file

    w = _random_weights()
    x = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    folder = tmp_path / "layers.6"
    folder.mkdir()
    save_file({"encoder.weight": np.ascontiguousarray(w["W_enc"].T), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    json.dump({"expansion_factor": 1.5, "normalize_decoder": True, "num_latents": 0, "k": 4, "d_in": 16},
              open(folder / "cfg.json", "w"))
    sae, fmt = import_sae(str(folder))
    assert fmt == "sparsify" and sae.architecture == "topk" and sae.k == 4 and sae.d_sae == 24
    # sparsify: top-k of relu(encoder(x - b_dec)), decoded as top_acts @ W_dec[top_indices] + b_dec
    pre = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    idx = np.argsort(-pre, axis=1)[:, :4]
    ref = np.einsum("nk,nkd->nd", np.take_along_axis(pre, idx, 1), w["W_dec"][idx]) + w["b_dec"]
    _check_same(sae, x, ref)
    with pytest.raises(Exception, match="several SAEs"):
        import_sae(str(tmp_path))


def test_import_dictionary_learning(tmp_path):
    w = _random_weights()
    x = np.random.default_rng(4).standard_normal((64, 16)).astype(np.float32)
    std = tmp_path / "dl_standard"
    std.mkdir()
    torch.save({"encoder.weight": torch.tensor(w["W_enc"].T), "encoder.bias": torch.tensor(w["b_enc"]),
                "decoder.weight": torch.tensor(w["W_dec"].T), "bias": torch.tensor(w["b_dec"])}, std / "ae.pt")
    json.dump({"trainer": {"dict_class": "AutoEncoder", "activation_dim": 16, "dict_size": 24, "lm_name": "m",
                           "submodule_name": "resid_post_layer_3"}}, open(std / "config.json", "w"))
    sae, fmt = import_sae(str(std))
    assert fmt == "dictionary_learning" and sae.architecture == "relu"
    _check_same(sae, x, np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0) @ w["W_dec"] + w["b_dec"])

    tk = tmp_path / "dl_topk"
    tk.mkdir()
    torch.save({"encoder.weight": torch.tensor(w["W_enc"].T), "encoder.bias": torch.tensor(w["b_enc"]),
                "decoder.weight": torch.tensor(w["W_dec"].T), "b_dec": torch.tensor(w["b_dec"]),
                "k": torch.tensor(6), "threshold": torch.tensor(-1.0)}, tk / "ae.pt")
    json.dump({"trainer": {"dict_class": "AutoEncoderTopK", "k": 6}}, open(tk / "config.json", "w"))
    sae, _ = import_sae(str(tk / "ae.pt"))
    assert sae.architecture == "topk" and sae.k == 6
    _check_same(sae, x, _topk((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 6) @ w["W_dec"] + w["b_dec"])


def test_finetune_from_imported_parent_records_it(store, tmp_path):
    w = _random_weights()
    parent = tmp_path / "gsae"
    parent.mkdir()
    torch.save({"encoder.weight": torch.tensor(w["W_enc"].T), "encoder.bias": torch.tensor(w["b_enc"]),
                "decoder.weight": torch.tensor(w["W_dec"].T), "b_dec": torch.tensor(w["b_dec"]),
                "k": torch.tensor(3)}, parent / "ae.pt")
    out = tmp_path / "ssae"
    r = run([store, "--init", str(parent), "--tilt", "500", "--lr", "1e-3", "-o", str(out), *FAST])
    assert r.exit_code == 0, r.stderr
    cfg = json.load(open(out / "cfg.json"))
    assert cfg["parent"] == {"path": str(parent), "sha256": sha256_file(str(parent / "ae.pt")),
                             "format": "dictionary_learning"}
    assert cfg["d_sae"] == 24 and cfg["k"] == 3 and cfg["architecture"] == "topk" and cfg["act_scale"] == 1.0

    # and an SSAE of an SSAE: our own format, act_scale inherited, weights moved
    out2 = tmp_path / "ssae2"
    r = run([store, "--init", str(out), "--lr", "1e-3", "-o", str(out2), *FAST])
    assert r.exit_code == 0, r.stderr
    cfg2 = json.load(open(out2 / "cfg.json"))
    assert cfg2["parent"]["format"] == "ssae" and cfg2["parent"]["sha256"] == sha256_file(str(out / "sae.safetensors"))
    assert cfg2["act_scale"] == cfg["act_scale"] and cfg2["tilt"] == 0.0
    assert not torch.equal(SAE.load(str(out)).W_enc, SAE.load(str(out2)).W_enc)


# --- bad inputs -------------------------------------------------------------------------------------
def _nothing_written(folder):
    return [p for p in os.listdir(folder) if p not in ("acts.h5", "ssae-work", "bad.h5", "parent")]


@pytest.mark.parametrize("case", ["incomplete", "init_d_in", "nan", "k_too_big", "negative_l1"])
def test_bad_inputs_exit_2_and_write_nothing(tmp_path, case):
    acts = sparse_data(n=3000)
    args = ["--k", "4", "--d-sae", "32", *FAST]
    if case == "incomplete":
        path = make_store(tmp_path / "bad.h5", acts, complete=False)
        expect = "bad.h5: incomplete activation file"
    elif case == "nan":
        acts[1234, 3] = np.nan
        acts[1240, 0] = np.inf
        path = make_store(tmp_path / "bad.h5", acts)
        expect = "bad.h5: NaN or inf in the activations, rows 1234-1240"
        args = ["--k", "4", "--d-sae", "32", "--batch-size", "256", "--train-tokens", "3000"]
    else:
        path = make_store(tmp_path / "acts.h5", acts)
        if case == "init_d_in":
            parent = tmp_path / "parent"
            parent.mkdir()
            SAE(8, 16, "topk", 2).save(str(parent))
            args += ["--init", str(parent)]
            expect = "d_in 8 differs from the activations' d_model 16"
        elif case == "k_too_big":
            args = ["--k", "40", "--d-sae", "32", *FAST]
            expect = "--k 40: must be between 1 and --d-sae (32)"
        else:
            args = ["--architecture", "relu", "--l1", "-1", "--d-sae", "32", *FAST]
            expect = "--l1 -1.0: must be at least 0"
    r = run([path, *args, "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert _nothing_written(tmp_path) == []


@pytest.mark.parametrize("normalize_grad", [True, False])
def test_normalize_grad_hands_adam_a_unit_norm_gradient(tmp_path, normalize_grad):
    """--normalize-grad scales the whole step's gradient (after the decoder-row projection) to norm 1;
    without it Adam gets the raw gradient, whose norm here is far from 1."""
    from helpers import random_sae
    from ssae_common.sae.trainer import Trainer

    cfg = FitConfig(k=4, d_sae=64, batch_size=128, train_tokens=128 * 4, warmup_steps=0,
                    normalize_grad=normalize_grad).resolve(d_in=16, n_rows=512)
    trainer = Trainer(cfg, random_sae(16, 64, 0, "topk", k=4), None, str(tmp_path), np.empty((0, 16), np.float32))
    trainer.sae.normalize_decoder()
    seen, adam_step = [], trainer.opt.step

    def spy(lr: float) -> None:
        W = trainer.sae.W_dec
        seen.append((float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.opt.params]))),
                     float((W.grad * W).sum(1).abs().max())))
        adam_step(lr)
    trainer.opt.step = spy
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)) * 30 + 5
    trainer.train_step(x)
    norm, along_rows = seen[0]
    assert along_rows < 1e-5 * max(norm, 1.0)  # the projection came first
    assert (norm == pytest.approx(1.0, rel=1e-5)) is normalize_grad
