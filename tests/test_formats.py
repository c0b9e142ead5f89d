"""The field's SAE formats both ways: every tool reads SAELens, sparsify, dictionary_learning and Gemma Scope
files; ssae-export writes SAELens and sparsify folders that those libraries' own loaders read (checked
with the real libraries in the peers environment, `make -C shell peers`, else against the documented
layout); JumpReLU and BatchTopK SAEs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import invoke, make_store, random_sae, sparse_data
from ssae_common.sae.autoencoder import SAE
from ssae_common.sae.imports import import_sae, load_any
from ssae_tools.eval import main as eval_main
from ssae_tools.export import main as export_main
from ssae_tools.fit import main as fit_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ.get("SSAE_PEERS_PYTHON") or os.path.join(ROOT, ".peers-venv", "bin", "python")
HOOK = "blocks.0.hook_resid_post"
FAST = ["--batch-size", "256", "--train-tokens", "20000", "--warmup-steps", "10", "--val-tokens", "1000", "-q"]


def _sae(architecture: str, act_scale: float = 2.5, seed: int = 0) -> SAE:
    k = 4 if architecture in ("topk", "batchtopk", "matryoshka-batchtopk") else None
    groups = (6, 18) if architecture == "matryoshka-batchtopk" else None
    sae = random_sae(16, 24, seed, architecture, k=k, act_scale=act_scale, group_sizes=groups)
    if architecture == "jumprelu":
        sae.threshold.data = torch.rand(24, generator=torch.Generator().manual_seed(seed)) * 0.3
    elif architecture in ("batchtopk", "matryoshka-batchtopk"):
        sae.threshold.data.fill_(0.1)
    sae.cfg = {"model": "synthetic-lm", "hook": HOOK}
    return sae


def _x(n: int = 256, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 16)) * 0.8 + 0.3).astype(np.float32)


def _recon(sae: SAE, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return sae(torch.from_numpy(x))[0].numpy()


def _saved(sae: SAE, folder) -> str:
    os.makedirs(folder)
    sae.save(str(folder))
    return str(folder)


# --- the real libraries (peers environment) -----------------------------------------------------------
PEER_SCRIPT = """
import json, sys
import numpy as np, torch
jobs, x_path = json.load(open(sys.argv[1])), sys.argv[2]
x = torch.from_numpy(np.load(x_path))
for fmt, folder, out_npy, resave in jobs:
    with torch.no_grad():
        if fmt == "saelens":
            from sae_lens import SAE
            sae = SAE.load_from_disk(folder)
            y = sae.decode(sae.encode(x))
            sae.save_model(resave)
        else:
            from sparsify import SparseCoder
            coder = SparseCoder.load_from_disk(folder)
            y = coder(x).sae_out
            coder.save_to_disk(resave)
    np.save(out_npy, y.float().numpy())
"""
ROUND_TRIPS = [("relu", "saelens"), ("topk", "saelens"), ("jumprelu", "saelens"), ("batchtopk", "saelens"),
               ("matryoshka-batchtopk", "saelens"), ("topk", "sparsify")]
WRITTEN_AS_JUMPRELU = ("batchtopk", "matryoshka-batchtopk")  # as SAELens saves them for inference


def _peer_run(script: str, args: list, tmp) -> None:
    """Run `script` under the peers venv's python; skip when the venv or one of its libraries is missing."""
    if not os.path.exists(PEERS):
        pytest.skip(f"no peers environment at {PEERS} (make -C shell peers installs sae-lens, eai-sparsify and "
                    "dictionary-learning)")
    path = os.path.join(str(tmp), "peer_script.py")
    with open(path, "w") as f:
        f.write(script)
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "PYTHONPATH": ""}  # eager sparse decoder: no GPU here
    done = subprocess.run([PEERS, path, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        pytest.skip(f"the peers environment lacks a library: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Each ROUND_TRIPS SAE written by ssae-export, then loaded, run and saved again by the library (one
    subprocess for all): {(architecture, to): (sae, x, the library's reconstruction, the folder it saved)}."""
    tmp = tmp_path_factory.mktemp("round-trips")
    x = _x()
    np.save(tmp / "x.npy", x)
    saes, jobs = {}, []
    for architecture, to in ROUND_TRIPS:
        sae = _sae(architecture)
        src = tmp / f"{architecture}-ours"
        if not src.exists():
            _saved(sae, src)
        out = tmp / f"{architecture}-as-{to}"
        invoke(export_main, [src, "--to", to, "-o", out], code=0)
        saes[architecture, to] = sae
        jobs.append([to, str(out), str(tmp / f"{architecture}-{to}.npy"), str(tmp / f"{architecture}-{to}-resaved")])
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    _peer_run(PEER_SCRIPT, [tmp / "jobs.json", tmp / "x.npy"], tmp)
    return {key: (saes[key], x, np.load(job[2]), job[3]) for key, job in zip(ROUND_TRIPS, jobs)}


@pytest.mark.parametrize("architecture,to", ROUND_TRIPS)
def test_round_trip_through_the_real_library(round_trips, architecture, to):
    """ssae -> (ssae-export) -> the library's loader -> the library's save -> ssae: the same reconstruction."""
    sae, x, theirs, resaved = round_trips[architecture, to]
    reference = _recon(sae, x)
    assert np.abs(theirs - reference).max() < 1e-4
    back = load_any(resaved)
    assert back.architecture == ("jumprelu" if architecture in WRITTEN_AS_JUMPRELU else architecture)
    assert np.abs(_recon(back, x) - reference).max() < 1e-4
    if to == "saelens":  # SAELens keeps the metadata through its own save
        assert (back.model, back.hook) == ("synthetic-lm", HOOK)


DL_SCRIPT = """
import json, os, sys, types
import numpy as np, torch
sys.modules.setdefault("nnsight", types.SimpleNamespace(LanguageModel=object))  # used by its activation buffer only
from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
from dictionary_learning.trainers.top_k import AutoEncoderTopK
root, x_path = sys.argv[1:]
x = torch.from_numpy(np.load(x_path))
torch.manual_seed(0)
models = {"AutoEncoder": AutoEncoder(16, 24), "AutoEncoderTopK": AutoEncoderTopK(16, 24, 4),
          "BatchTopKSAE": BatchTopKSAE(16, 24, 4), "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE(16, 24, 4, [8, 16]),
          "JumpReluAutoEncoder": JumpReluAutoEncoder(16, 24)}
for name, ae in models.items():
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # away from the initialisation: biases and thresholds non-zero
        if name == "JumpReluAutoEncoder":
            ae.threshold.copy_(torch.rand(24) * 0.3)
        elif hasattr(ae, "threshold"):
            ae.threshold.fill_(0.1)
        y = ae.decode(ae.encode(x))  # the library's inference path
    folder = os.path.join(root, name)
    os.makedirs(folder)
    torch.save(ae.state_dict(), os.path.join(folder, "ae.pt"))
    trainer = {"dict_class": name, "lm_name": "m", "submodule_name": "blocks.0.hook_resid_post"}
    if hasattr(ae, "k"):
        trainer["k"] = int(ae.k)
    json.dump({"trainer": trainer}, open(os.path.join(folder, "config.json"), "w"))
    np.save(os.path.join(folder, "y.npy"), y.float().numpy())
"""


def test_dictionary_learning_models_import_exactly(tmp_path):
    """Each dictionary_learning class, built and run by the library itself, imports with its reconstruction."""
    x = _x()
    np.save(tmp_path / "x.npy", x)
    _peer_run(DL_SCRIPT, [tmp_path, tmp_path / "x.npy"], tmp_path)
    expected = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                "MatryoshkaBatchTopKSAE": "matryoshka-batchtopk", "JumpReluAutoEncoder": "jumprelu"}
    for name, architecture in expected.items():
        sae, fmt = import_sae(str(tmp_path / name))
        assert (fmt, sae.architecture, sae.hook) == ("dictionary_learning", architecture, HOOK), name
        if name == "MatryoshkaBatchTopKSAE":
            assert sae.group_sizes == (8, 16)
        assert np.abs(_recon(sae, x) - np.load(tmp_path / name / "y.npy")).max() < 1e-4, name


BUILD_SCRIPT = """
import os, sys
import numpy as np, torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sparsify import SparseCoder, SparseCoderConfig
root, x_path = sys.argv[1:]
x = torch.from_numpy(np.load(x_path))
def meta():
    return SAEMetadata(model_name="synthetic-lm", hook_name="blocks.0.hook_resid_post")
torch.manual_seed(0)
saes = {
    "standard_no_b_dec_in": StandardSAE(StandardSAEConfig(d_in=16, d_sae=24, apply_b_dec_to_input=False, metadata=meta())),
    "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=16, d_sae=24, k=4, rescale_acts_by_decoder_norm=True, metadata=meta())),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=24, apply_b_dec_to_input=False, metadata=meta())),
}
for name, sae in saes.items():
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        sae.W_dec.mul_(torch.rand(24, 1) * 2 + 0.2)  # decoder rows far from unit norm
        if name == "jumprelu":
            sae.threshold.copy_(torch.rand(24) * 0.3)
        y = sae.decode(sae.encode(x))
    sae.save_model(os.path.join(root, name))
    np.save(os.path.join(root, name, "y.npy"), y.float().numpy())
coder = SparseCoder(16, SparseCoderConfig(k=4, num_latents=24))
with torch.no_grad():
    for p in coder.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
    y = coder(x).sae_out
coder.save_to_disk(os.path.join(root, "sparsify"))
np.save(os.path.join(root, "sparsify", "y.npy"), y.float().numpy())
"""


def test_saes_saved_by_saelens_and_sparsify_import_exactly(tmp_path):
    """SAEs made and saved by the libraries themselves (SAELens apply_b_dec_to_input false,
    rescale_acts_by_decoder_norm, jumprelu; sparsify TopK) import with the libraries' reconstruction."""
    x = _x()
    np.save(tmp_path / "x.npy", x)
    _peer_run(BUILD_SCRIPT, [tmp_path, tmp_path / "x.npy"], tmp_path)
    for name, architecture in (("standard_no_b_dec_in", "relu"), ("topk_rescaled", "topk"), ("jumprelu", "jumprelu"),
                               ("sparsify", "topk")):
        sae = load_any(str(tmp_path / name))
        assert sae.architecture == architecture, name
        if name != "sparsify":
            assert (sae.model, sae.hook) == ("synthetic-lm", HOOK), name
        assert np.abs(_recon(sae, x) - np.load(tmp_path / name / "y.npy")).max() < 1e-4, name


# --- the exported files, without the libraries --------------------------------------------------------
def _numpy_saelens(folder, x):
    """SAELens 6's inference forward for what ssae-export writes (apply_b_dec_to_input, no normalisation)."""
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    w = load_file(os.path.join(folder, "sae_weights.safetensors"))
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        f = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=1)[:, :cfg["k"]]
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    elif cfg["architecture"] == "jumprelu":
        f = np.maximum(pre, 0) * (pre > w["threshold"])
    else:
        f = np.maximum(pre, 0)
    return f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("architecture", ["relu", "topk", "jumprelu", "batchtopk", "matryoshka-batchtopk"])
def test_saelens_export_follows_the_documented_layout(tmp_path, architecture):
    sae = _sae(architecture)
    out = tmp_path / "sl"
    record = json.loads(invoke(export_main, [_saved(sae, tmp_path / "ours"), "-o", out], code=0).stdout)
    assert record["kind"] == "sae" and record["format"] == "saelens"
    cfg = json.load(open(out / "cfg.json"))
    assert cfg["architecture"] == ("standard" if architecture == "relu" else
                                   "jumprelu" if architecture in WRITTEN_AS_JUMPRELU else architecture)
    assert cfg["metadata"]["sae_lens_version"].startswith("6.") and cfg["metadata"]["hook_name"] == HOOK
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["apply_b_dec_to_input"]) == (16, 24, "float32", True)
    x = _x()
    assert np.abs(_numpy_saelens(out, x) - _recon(sae, x)).max() < 1e-4  # act_scale 2.5 folded in


def test_sparsify_export_follows_the_documented_layout_and_refuses_non_topk(tmp_path):
    from safetensors.numpy import load_file

    sae = _sae("topk")
    out = tmp_path / "layers.0"
    invoke(export_main, [_saved(sae, tmp_path / "ours"), "--to", "sparsify", "-o", out], code=0)
    cfg = json.load(open(out / "cfg.json"))
    assert (cfg["activation"], cfg["k"], cfg["num_latents"], cfg["d_in"]) == ("topk", 4, 24, 16)
    w = load_file(str(out / "sae.safetensors"))
    assert sorted(w) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"] and w["encoder.weight"].shape == (24, 16)
    x = _x()
    pre = np.maximum((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=1)[:, :4]
    ref = np.einsum("nk,nkd->nd", np.take_along_axis(pre, idx, 1), w["W_dec"][idx]) + w["b_dec"]
    assert np.abs(ref - _recon(sae, x)).max() < 1e-4

    r = invoke(export_main, [_saved(_sae("relu"), tmp_path / "relu"), "--to", "sparsify", "-o", tmp_path / "no"], code=2)
    assert "--to" in r.stderr and "TopK" in r.stderr and not os.path.exists(tmp_path / "no")


# --- foreign folders in every tool ----------------------------------------------------------------------
def _saelens_folder(folder, w: dict, cfg: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(folder)
    save_file(w, os.path.join(folder, "sae_weights.safetensors"))
    json.dump(cfg, open(os.path.join(folder, "cfg.json"), "w"))
    return str(folder)


def _weights(seed=0, d_in=16, d_sae=24):
    rng = np.random.default_rng(seed)
    return {"W_enc": (rng.standard_normal((d_in, d_sae)) / 4).astype(np.float32),
            "b_enc": (rng.standard_normal(d_sae) * 0.1 - 0.1).astype(np.float32),
            "W_dec": (rng.standard_normal((d_sae, d_in)) * 0.7).astype(np.float32),
            "b_dec": (rng.standard_normal(d_in) * 0.1).astype(np.float32)}


def test_saelens6_metadata_rescale_and_normalisation(tmp_path):
    w, x = _weights(), _x()
    base = {"d_in": 16, "d_sae": 24, "dtype": "float32", "apply_b_dec_to_input": True,
            "normalize_activations": "expected_average_only_in", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.54.12", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post"}}
    folder = _saelens_folder(tmp_path / "topk", w, {**base, "architecture": "topk", "k": 5,
                                                    "rescale_acts_by_decoder_norm": True})
    sae = load_any(folder)
    assert (sae.model, sae.hook, sae.architecture, sae.k) == ("gpt2", "blocks.3.hook_resid_post", "topk", 5)
    # SAELens TopKSAE with rescale_acts_by_decoder_norm: top-k of pre * ||W_dec_j||, decoded with f / ||W_dec_j||
    norms = np.linalg.norm(w["W_dec"], axis=1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    idx = np.argsort(-pre, axis=1)[:, :5]
    f = np.zeros_like(pre)
    np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    assert np.abs(_recon(sae, x) - ((f / norms) @ w["W_dec"] + w["b_dec"])).max() < 1e-4
    # the decoder norms are not the same: ignoring the flag would change both the selection and the output
    assert np.abs(norms - 1).max() > 0.3

    per_token = _saelens_folder(tmp_path / "cnr", w, {**base, "architecture": "standard",
                                                      "normalize_activations": "constant_norm_rescale"})
    with pytest.raises(Exception, match="constant_norm_rescale"):
        load_any(per_token)


def test_eval_on_saelens_and_sparsify_folders_equals_the_imported_copy(tmp_path):
    """ssae-eval reads the foreign folders directly, with the metrics of their `ssae-export --to ssae` copies."""
    from safetensors.numpy import save_file

    store = make_store(tmp_path / "acts.h5", sparse_data(n=1500, d=16))
    w = _weights(3)
    saelens = _saelens_folder(tmp_path / "saelens", w, {
        "architecture": "jumprelu", "d_in": 16, "d_sae": 24, "dtype": "float32", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "metadata": {"sae_lens_version": "6.54.12", "model_name": "synthetic-alias",
                                                      "hook_name": HOOK}})
    save_file({**w, "threshold": np.full(24, 0.05, np.float32)}, os.path.join(saelens, "sae_weights.safetensors"))
    sparsify = tmp_path / "layers.0"
    sparsify.mkdir()
    save_file({"encoder.weight": np.ascontiguousarray(w["W_enc"].T), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(sparsify / "sae.safetensors"))
    json.dump({"activation": "topk", "expansion_factor": 1, "normalize_decoder": True, "num_latents": 24, "k": 4,
               "d_in": 16}, open(sparsify / "cfg.json", "w"))

    for name, folder in (("saelens", saelens), ("sparsify", str(sparsify))):
        copy = tmp_path / f"{name}-copy"
        invoke(export_main, [folder, "--to", "ssae", "--model", "synthetic-lm", "-o", copy], code=0)
        results = []
        for sae in (folder, copy):
            out = tmp_path / f"eval-{name}-{os.path.basename(str(sae))}"
            if sae == saelens:  # another model's name: refused, unless allowed (then said)
                r = invoke(eval_main, [sae, "--activations", store, "-o", out], code=2)
                assert "trained on model 'synthetic-alias'" in r.stderr and "--allow-model-mismatch" in r.stderr
            r = invoke(eval_main, [sae, "--activations", store, "--allow-model-mismatch", "-o", out], code=0)
            if sae == saelens:
                assert "trained on model 'synthetic-alias'; evaluating on 'synthetic-lm'" in r.stderr
            results.append(json.load(open(out / "metrics.json"))["saes"][0])
        ours, theirs = results[1], results[0]
        assert theirs["architecture"] == ("jumprelu" if name == "saelens" else "topk")
        for key in ("mse", "fvu", "cosine", "l0", "dead_fraction", "entropy", "max_activation"):
            mine, other = (v["mean"] if isinstance(v, dict) else v for v in (ours[key], theirs[key]))
            assert other == pytest.approx(mine, rel=1e-5, abs=1e-7), (name, key)
        assert theirs["l0"] > 0


def test_eval_names_a_folder_it_cannot_read(tmp_path):
    store = make_store(tmp_path / "acts.h5", sparse_data(n=200, d=16))
    (tmp_path / "empty").mkdir()
    r = invoke(eval_main, [tmp_path / "empty", "--activations", store, "-o", tmp_path / "out"], code=2)
    assert "empty" in r.stderr and "no SAE files" in r.stderr and not os.path.exists(tmp_path / "out")


# --- JumpReLU, Gemma Scope and BatchTopK ----------------------------------------------------------------
def _gemma_scope(folder, seed=5, d_in=16, d_sae=32) -> tuple[str, dict]:
    rng = np.random.default_rng(seed)
    p = {"W_enc": (rng.standard_normal((d_in, d_sae)) / 4).astype(np.float32),
         "W_dec": (rng.standard_normal((d_sae, d_in)) / 4).astype(np.float32),
         "b_enc": (rng.standard_normal(d_sae) * 0.1).astype(np.float32),
         "b_dec": (rng.standard_normal(d_in) * 0.5 + 3.0).astype(np.float32),
         "threshold": (rng.random(d_sae) * 0.5 + 0.05).astype(np.float32)}
    os.makedirs(folder)
    np.savez(os.path.join(folder, "params.npz"), **p)
    return str(folder), p


def test_gemma_scope_params_import_finetune_and_evaluate(tmp_path):
    data = sparse_data(n=3000, d=16)
    store = make_store(tmp_path / "acts.h5", data)
    folder, p = _gemma_scope(tmp_path / "width_32" / "average_l0_5")
    sae, fmt = import_sae(folder)
    assert fmt == "gemma_scope" and sae.architecture == "jumprelu"
    # Gemma Scope's reference forward: JumpReLU on x @ W_enc + b_enc (no b_dec subtracted)
    pre = data[:200] @ p["W_enc"] + p["b_enc"]
    ref = (np.maximum(pre, 0) * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"]
    assert np.abs(_recon(sae, data[:200]) - ref).max() < 1e-4

    out = tmp_path / "ssae"
    tilt = ["--tilt-ess", "0.5"] if "--tilt-ess" in invoke(fit_main, ["--help"]).output else ["--tilt", "50"]
    invoke(fit_main, [store, "--init", folder, *tilt, "--lr", "1e-3", "-o", out, *FAST], code=0)
    cfg = json.load(open(out / "cfg.json"))
    assert cfg["architecture"] == "jumprelu" and cfg["parent"]["format"] == "gemma_scope"
    assert cfg["d_sae"] == 32 and cfg["l0_coefficient"] == pytest.approx(1 / 16)
    tuned = SAE.load(str(out))
    assert not torch.equal(tuned.threshold, sae.threshold)

    metrics = tmp_path / "eval"
    invoke(eval_main, [out, folder, "--activations", store, "--baseline", folder, "-o", metrics, "-q"], code=0)
    saes = {s["name"]: s for s in json.load(open(metrics / "metrics.json"))["saes"]}
    assert len(saes) == 2 and all(s["architecture"] == "jumprelu" and s["l0"] > 0 for s in saes.values())
    assert saes["ssae"]["fvu"] < saes["average_l0_5"]["fvu"], saes  # finetuned on these activations


def test_jumprelu_from_scratch_l0_penalty_sets_sparsity(tmp_path):
    store = make_store(tmp_path / "acts.h5", sparse_data(n=4000, d=16))
    l0s = {}
    for l0 in ("0.001", "1.0"):
        out = tmp_path / f"j{l0}"
        invoke(fit_main, [store, "--architecture", "jumprelu", "--d-sae", "48", "--l0", l0, "-o", out, *FAST], code=0)
        cfg = json.load(open(out / "cfg.json"))
        assert cfg["architecture"] == "jumprelu" and cfg["l0_coefficient"] == float(l0)
        l0s[l0] = cfg["training"]["val_l0"]
        assert float(SAE.load(str(out)).threshold.min()) >= 0
    assert l0s["1.0"] < 0.7 * l0s["0.001"], l0s
    r = invoke(fit_main, [store, "--architecture", "topk", "--l0", "0.1", "-o", tmp_path / "bad"], code=2)
    assert "--l0" in r.stderr
    r = invoke(fit_main, [store, "--architecture", "relu", "--bandwidth", "0.1", "-o", tmp_path / "bad"], code=2)
    assert "--bandwidth" in r.stderr and not os.path.exists(tmp_path / "bad")


def test_batchtopk_kept_with_its_threshold(tmp_path):
    w = _weights(7)
    folder = tmp_path / "dl_batchtopk"
    folder.mkdir()
    torch.save({"encoder.weight": torch.tensor(w["W_enc"].T), "encoder.bias": torch.tensor(w["b_enc"]),
                "decoder.weight": torch.tensor(w["W_dec"].T), "b_dec": torch.tensor(w["b_dec"]),
                "k": torch.tensor(6), "threshold": torch.tensor(0.2)}, folder / "ae.pt")
    json.dump({"trainer": {"dict_class": "BatchTopKSAE", "k": 6}}, open(folder / "config.json", "w"))
    sae, fmt = import_sae(str(folder))
    assert (fmt, sae.architecture, sae.k) == ("dictionary_learning", "batchtopk", 6)
    x = _x()
    # dictionary_learning BatchTopKSAE.encode(use_threshold=True): relu(pre) * (relu(pre) > threshold)
    post = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    assert np.abs(_recon(sae, x) - ((post * (post > 0.2)) @ w["W_dec"] + w["b_dec"])).max() < 1e-4

    store = make_store(tmp_path / "acts.h5", sparse_data(n=4000, d=16))
    out = tmp_path / "btk"
    invoke(fit_main, [store, "--architecture", "batchtopk", "--k", "4", "--d-sae", "32", "-o", out, *FAST], code=0)
    trained = SAE.load(str(out))
    threshold = trained.threshold
    assert trained.architecture == "batchtopk" and float(threshold.min()) > 0 and torch.all(threshold == threshold[0])
    val_l0 = json.load(open(out / "cfg.json"))["training"]["val_l0"]
    assert 1 < val_l0 < 12  # the threshold, not a per-token k, sets inference sparsity: near k on average


def test_explain_reads_a_saelens_folder_as_its_ssae_original(tmp_path, tiny_model):
    from helpers import sample_docs, write_jsonl
    from ssae_tools.explain import main as explain_main
    from ssae_tools.harvest import main as harvest_main

    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(20, 30, seed=4))
    store = tmp_path / "acts.h5"
    invoke(harvest_main, [docs, "--model", tiny_model, "--hook", HOOK, "--dtype", "float32", "-o", store, "-q"], code=0)
    from ssae_common.data.activations import ActivationStore

    sae = random_sae(16, 8, seed=2, architecture="jumprelu", act_scale=1.5, enc_bias=0.0)
    with ActivationStore(str(store)) as s:
        pre = sae.pre_acts(torch.from_numpy(s.rows(0, s.n_tokens))).detach()
    sae.threshold.data = torch.quantile(pre, 0.8, dim=0).clamp_min(1e-3)  # each latent fires on ~20% of tokens
    ours = tmp_path / "ours"
    ours.mkdir()
    sae.save(str(ours), model=tiny_model, hook=HOOK)
    theirs = tmp_path / "theirs"
    invoke(export_main, [ours, "--to", "saelens", "-o", theirs], code=0)
    results = []
    for folder in (ours, theirs):
        out = tmp_path / f"ex-{folder.name}"
        invoke(explain_main, [folder, "--activations", store, "--explainer", "none", "--latents", "0-7", "-o", out,
                              "-q"], code=0)
        results.append([json.loads(line) for line in open(out / "explanations.jsonl")])
    for mine, other in zip(*results):
        assert (mine["latent"], mine["status"], mine["n_active"]) == (other["latent"], other["status"], other["n_active"])
        assert [t["id"] for t in mine["top_tokens"]] == [t["id"] for t in other["top_tokens"]]
        # the exported latents read in the activations' units: ours divided by act_scale
        if mine["max_activation"]:
            assert other["max_activation"] == pytest.approx(mine["max_activation"] / 1.5, rel=1e-3)  # 4 digits kept
    assert any(r["n_active"] for r in results[0])


@pytest.mark.integration
def test_jumprelu_and_batchtopk_under_torchrun(tmp_path):
    """JumpReLU data-parallel (2 CPU ranks, TERM over the global batch) gives one process's weights; BatchTopK
    (selection per rank, so not the same run) keeps one threshold on every rank."""
    from safetensors.torch import load_file

    store = make_store(tmp_path / "acts.h5", sparse_data(n=3000))
    common = ["--d-sae", "32", "--lr", "2e-3", "--batch-size", "130", "--train-tokens", str(130 * 30),
              "--warmup-steps", "5", "--val-tokens", "300", "--shuffle-rows", "700", "--seed", "3", "--device", "cpu",
              "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for name, arch in (("jumprelu", ["--architecture", "jumprelu", "--tilt", "50"]),
                       ("batchtopk", ["--architecture", "batchtopk", "--k", "3"])):
        outs[name] = tmp_path / f"{name}-ddp"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                               "-m", "ssae_tools.fit", store, *arch, *common, "-o", outs[name]], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "jumprelu-single"
    invoke(fit_main, [store, "--architecture", "jumprelu", "--tilt", "50", *common, "-o", single], code=0)
    a, b = load_file(str(single / "sae.safetensors")), load_file(str(outs["jumprelu"] / "sae.safetensors"))
    for name in a:
        assert float((a[name] - b[name]).abs().max()) < 2e-5, name
    threshold = load_file(str(outs["batchtopk"] / "sae.safetensors"))["threshold"]
    assert float(threshold.min()) > 0 and torch.all(threshold == threshold[0])
    assert json.load(open(outs["batchtopk"] / "cfg.json"))["training"]["ranks"] == 2
