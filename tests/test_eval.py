"""ssae-eval end to end on the tiny model: known answers, JSON keys, plots, report, bad inputs, resume."""
import json
import math
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from helpers import identity_sae, invoke, parse_records, random_sae, sample_docs, write_jsonl
from ssae_common.data.models import model_identity
from ssae_common.sae.autoencoder import SAE
from ssae_tools.eval import main as eval_main
from ssae_tools.harvest import main as harvest_main

HOOK = "blocks.0.hook_resid_post"
D = 16
SAE_KEYS = {"name", "path", "sha256", "mse", "fvu", "cosine", "l0", "dead_fraction", "dense_fraction", "tail_coverage",
            "entropy", "max_activation", "activation_counts_by_rank", "error_by_frequency_rank", "decoder_cosine",
            "tail_error"}
LM_KEYS = {"ce_clean", "ce_spliced", "ce_zero_ablation", "ce_recovered", "ppl_spliced", "ppl_clean"}


def save_sae(folder, sae, model, hook=HOOK, **extra):
    os.makedirs(folder, exist_ok=True)
    sae.save(str(folder), model=model, hook=hook, **extra)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = model_identity(tiny_model)
    docs = write_jsonl(str(root / "docs.jsonl"), sample_docs(24, 40, seed=3))
    acts = str(root / "acts.h5")
    r = CliRunner().invoke(harvest_main, [docs, "--model", tiny_model, "--hook", HOOK, "--dtype", "float32",
                                          "--context-size", "32", "-o", acts, "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    saes = {
        "ident": save_sae(root / "ident", identity_sae(D), model),
        "zero": save_sae(root / "zero", SAE(D, 2 * D), model),  # W_dec = 0, b_dec = 0: reconstruction is 0
        "rand": save_sae(root / "rand", random_sae(D, 48, 0, enc_bias=-0.01, dec_bias=False), model),
        "rand2": save_sae(root / "rand2", random_sae(D, 48, 1, dec_scale=0.5, enc_bias=-0.01, dec_bias=False), model,
                          parent={"path": str(root / "rand"), "sha256": None}),
    }
    return {"root": root, "model": tiny_model, "docs": docs, "acts": acts, "saes": saes}


def run(args, code=0):
    return invoke(eval_main, [*args, "--device", "cpu"], code=code)


def test_docs_mode_known_answers_baseline_plots_report(setup, tmp_path):
    s = setup["saes"]
    out = tmp_path / "ev"
    r = run([s["ident"], s["zero"], s["rand2"], "--baseline", s["rand"], "--docs", setup["docs"],
             "--model", setup["model"], "--context-size", "32", "-o", str(out)])
    recs = parse_records(r.stdout)
    assert len(recs) == 1 and recs[0]["kind"] == "metrics" and recs[0]["path"] == str(out / "metrics.json")
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["schema"] == "ssae.metrics/1" and {"dataset", "n_tokens", "saes"} <= set(doc)
    assert [e["name"] for e in doc["saes"]] == ["ident", "zero", "rand2", "rand"] and doc["baseline"] == "rand"
    ident, zero, ssae, base = doc["saes"]
    for e in doc["saes"]:
        assert SAE_KEYS | LM_KEYS | {"rel_ppl_vs_baseline"} <= set(e)
    # the identity SAE splices in exactly what was there
    assert ident["ce_spliced"] == pytest.approx(ident["ce_clean"], abs=1e-5)
    assert ident["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert ident["fvu"] < 1e-10 and ident["l0"] == pytest.approx(D)
    # the zero SAE is zero ablation
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero_ablation"], abs=1e-5)
    assert zero["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert zero["dead_fraction"] == 1.0 and zero["l0"] == 0.0
    assert ssae["ce_spliced"] != pytest.approx(ssae["ce_clean"], abs=1e-4)
    assert ssae["ppl_spliced"] == pytest.approx(math.exp(ssae["ce_spliced"]))
    assert ident["n_predictions"] == doc["n_tokens"]  # every evaluated (non-BOS) token is predicted once
    # against the baseline
    assert base["is_baseline"] and base["rel_ppl_vs_baseline"] == pytest.approx(1.0)
    assert ssae["rel_ppl_vs_baseline"] == pytest.approx(ssae["ppl_spliced"] / base["ppl_spliced"])
    assert ident["rel_ppl_vs_baseline"] < 1.0
    assert ssae["aligned_with_baseline"] is True
    lr = ssae["activation_count_log_ratio"]
    assert sum(lr["histogram"]["counts"]) == 48
    c, cb = np.array(ssae["activation_counts_by_rank"]), np.array(base["activation_counts_by_rank"])
    assert c.sum() > 0 and cb.sum() > 0 and len(c) == len(cb) == 48
    assert "decoder_cosine_vs_baseline" in ssae and "activation_count_log_ratio" not in base
    assert "activation_count_log_ratio" not in ident  # other width: latents not comparable
    for f in ("report.html", "pareto_ppl.png", "pareto_rel_ppl.png", "activation_log_ratio.png", "tail_coverage.png",
              "entropy_max_activation.png", "activation_counts.png", "error_by_rank.png", "decoder_cosine.png"):
        assert (out / f).stat().st_size > 1000, f
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 9 and "src='http" not in html and "rand2" in html
    assert "CE spliced" in r.stderr and "ppl/base" in r.stderr and "* baseline" in r.stderr  # comparison table
    assert "rare MSE" in r.stderr and "rare max" in r.stderr and "lr<0" in r.stderr
    assert ident["tail_error"]["max"] < 1e-10 and ident["tail_error"]["n_types"] >= 1
    assert zero["tail_error"]["max"] >= zero["tail_error"]["mean"] > 0
    assert 0 <= lr["fraction_below_zero"] <= 1


def test_activations_mode_matches_docs_mode_and_numpy(setup, tmp_path):
    s = setup["saes"]
    a = run([s["rand"], "--activations", setup["acts"], "-o", str(tmp_path / "a")])
    # documents on stdin, default output under $SSAE_WORKDIR
    d = CliRunner().invoke(eval_main, [s["rand"], "--docs", "-", "--model", setup["model"], "--context-size", "32",
                                       "--device", "cpu"], input=open(setup["docs"]).read())
    assert d.exit_code == 0, d.stderr
    rec = parse_records(d.stdout)[0]
    assert rec["path"].startswith(os.environ["SSAE_WORKDIR"]) and not os.listdir(os.path.join(os.environ["SSAE_WORKDIR"], "tmp"))
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    md = json.loads(open(rec["path"]).read())
    assert md["dataset"]["inputs"][0]["path"] == "-"
    assert "ce_spliced" not in ma["saes"][0] and not (tmp_path / "a" / "pareto_ppl.png").exists()
    assert ma["n_tokens"] == md["n_tokens"]
    for key in ("l0", "fvu", "mse", "cosine", "dead_fraction"):
        assert ma["saes"][0][key] == pytest.approx(md["saes"][0][key], rel=1e-4, abs=1e-7), key
    assert ma["saes"][0]["tail_coverage"]["n_types_per_bin"] == md["saes"][0]["tail_coverage"]["n_types_per_bin"]
    # numpy recomputation from the files alone
    w = load_file(os.path.join(s["rand"], "sae.safetensors"))
    with h5py.File(setup["acts"]) as f:
        x = f["activations"][:].astype(np.float64)
    pre = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    x_hat = pre @ w["W_dec"] + w["b_dec"]
    assert 0 < ma["saes"][0]["l0"] == pytest.approx((pre > 0).sum(1).mean(), rel=1e-9)
    assert ma["saes"][0]["fvu"] == pytest.approx(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)
    assert a.stdout.count("\n") == 1 and d.stdout.count("\n") == 1


def test_default_output_is_reused(setup):
    args = [setup["saes"]["rand"], "--activations", setup["acts"]]
    first = parse_records(run(args).stdout)[0]
    second = run(args)
    assert "reusing" in second.stderr and parse_records(second.stdout)[0]["path"] == first["path"]


@pytest.mark.parametrize("field,value", [("model", "some-other-model"), ("hook", "blocks.1.hook_resid_post")])
def test_mismatched_sae_is_refused(setup, tmp_path, field, value):
    cfg = {"model": model_identity(setup["model"]), "hook": HOOK, field: value}
    bad = save_sae(tmp_path / "bad", identity_sae(D), cfg["model"], cfg["hook"])
    out = tmp_path / "ev"
    for args in ([bad, "--activations", setup["acts"]],
                 [bad, "--docs", setup["docs"], "--model", setup["model"], "--hook", HOOK],
                 [setup["saes"]["ident"], bad, "--docs", setup["docs"], "--model", setup["model"]]):
        r = run([*args, "-o", str(out)], code=2)
        line = r.stderr.strip()
        assert "\n" not in line and bad in line and value in line and "SAE was trained on" in line
        assert not out.exists()


def test_bad_inputs(setup, tmp_path):
    out = tmp_path / "ev"
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    r = run([str(nocfg), "--activations", setup["acts"], "-o", str(out)], code=2)
    assert r.stderr.strip() == (f"ssae-eval: error: {nocfg}: no SAE files found (expected the ssae, SAELens, "
                                "sparsify, dictionary_learning or Gemma Scope layout)")
    empty = write_jsonl(str(tmp_path / "empty.jsonl"), [{"id": "e", "text": ""}])
    r = run([setup["saes"]["ident"], "--docs", empty, "--model", setup["model"], "-o", str(out)], code=2)
    assert r.stderr.strip().endswith(f"{empty}: empty evaluation set (no tokens to evaluate)")
    r = run([setup["saes"]["ident"], "-o", str(out)], code=2)
    assert "exactly one of --docs" in r.stderr
    r = run([setup["saes"]["ident"], "--docs", setup["docs"], "--activations", setup["acts"], "-o", str(out)], code=2)
    assert "exactly one of --docs" in r.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".ev")]


def test_interrupted_docs_eval_resumes_to_the_same_result(setup, tmp_path):
    from ssae_common.core.errors import Interrupted
    from ssae_common.eval.metrics import EvalState, MetricConfig
    from ssae_common.data.models import load_model
    from ssae_common.core.records import iter_docs
    from ssae_common.eval.splice import DocsEvalConfig, evaluate_docs

    lm = load_model(setup["model"])
    sae = SAE.load(setup["saes"]["rand"])
    cfg = DocsEvalConfig(hook=HOOK, context_size=32, batch_size=4)
    whole = EvalState("k", {"r": (D, 48)}, MetricConfig(), with_lm=True)
    evaluate_docs(lm, [("r", sae)], iter_docs([setup["docs"]]), cfg, whole, quiet=True)

    class StopAfter:
        def __init__(self, n):
            self.n = n

        def check(self, save=None):
            self.n -= 1
            if self.n == 0:
                save()
                raise Interrupted("stop")

    path = str(tmp_path / "state")
    part = EvalState("k", {"r": (D, 48)}, MetricConfig(), with_lm=True)
    with pytest.raises(Interrupted):
        evaluate_docs(lm, [("r", sae)], iter_docs([setup["docs"]]), cfg, part, stop=StopAfter(2),
                      save=lambda: part.save(path), quiet=True)
    resumed = EvalState.load(path, "k")
    assert 0 < resumed.n_tokens < whole.n_tokens
    evaluate_docs(lm, [("r", sae)], iter_docs([setup["docs"]]), cfg, resumed, quiet=True)
    assert resumed.n_tokens == whole.n_tokens and resumed.lm.n == whole.lm.n
    assert resumed.lm.spliced["r"] == pytest.approx(whole.lm.spliced["r"], rel=1e-6)
    assert resumed.acc["r"].result()["l0"] == pytest.approx(whole.acc["r"].result()["l0"], rel=1e-9)
    # a token budget cuts the last window short; every evaluated token is also predicted
    bounded = EvalState("k", {"r": (D, 48)}, MetricConfig(), with_lm=True)
    evaluate_docs(lm, [("r", sae)], iter_docs([setup["docs"]]), DocsEvalConfig(HOOK, 32, 4, max_tokens=50), bounded,
                  quiet=True)
    assert bounded.n_tokens == 50 and bounded.lm.n == 50 and bounded.acc["r"].n == 50


@pytest.mark.integration
def test_bundled_model_identity_splice(shared_data, tmp_path):
    """On SmolLM2 at the default hook, an exact SAE leaves the CE untouched and zero ablation hurts."""
    from ssae_common.data.config import DEFAULT_HOOK

    ident = save_sae(tmp_path / "ident", identity_sae(576), "smollm2", DEFAULT_HOOK)
    out = tmp_path / "ev"
    run([ident, "--docs", os.path.join(shared_data, "physics", "astro_ph_test.jsonl.gz"), "--max-tokens", "64",
         "--batch-size", "1", "--cosine-pairs", "1000", "-o", str(out)])
    e = json.loads((out / "metrics.json").read_text())["saes"][0]
    assert e["ce_spliced"] == pytest.approx(e["ce_clean"], abs=1e-4)
    assert e["ce_zero_ablation"] > e["ce_clean"] + 1.0
    assert 1.5 < e["ce_clean"] < 6.0


def test_python_api_writes_metrics_and_returns_the_record(setup, tmp_path):
    from ssae_common.core.runtime import RunContext
    from ssae_common.data.activations import store_fingerprint
    from ssae_common.eval import EvalConfig, evaluate_saes, metrics_artifact

    out = tmp_path / "py"
    rec = evaluate_saes(EvalConfig(activations=setup["acts"]), [setup["saes"]["rand"]], out=str(out),
                   context=RunContext(device_spec="cpu", quiet=True))
    doc = json.loads((out / "metrics.json").read_text())
    assert rec == metrics_artifact(str(out))
    assert rec["kind"] == "metrics" and rec["path"] == str(out / "metrics.json") and rec["n_tokens"] == doc["n_tokens"]
    assert [s["name"] for s in rec["saes"]] == ["rand"] and rec["saes"][0]["l0"] == doc["saes"][0]["l0"]
    assert doc["config"]["tool"] == "python" and doc["created_by"]["tool"] == "python"
    # an activation file is identified cheaply, never by a full sha256 of its bytes
    assert doc["dataset"]["inputs"] == [{"path": setup["acts"], "fingerprint": store_fingerprint(setup["acts"])}]


def test_config_errors_name_the_field_in_python_and_the_flag_on_the_command_line(setup, tmp_path):
    from ssae_common.core.config import ConfigError
    from ssae_common.core.runtime import RunContext
    from ssae_common.data.config import DEFAULT_MODEL
    from ssae_common.eval import EvalConfig, evaluate_saes

    with pytest.raises(ConfigError) as e:
        evaluate_saes(EvalConfig(activations=setup["acts"], context_size=1), [setup["saes"]["rand"]],
                 out=str(tmp_path / "x"), context=RunContext(device_spec="cpu"))
    assert e.value.field_name == "context_size" and str(e.value) == "context_size 1: must be at least 2"
    r = run([setup["saes"]["rand"], "--activations", setup["acts"], "--context-size", "1", "-o", str(tmp_path / "x")],
            code=2)
    assert r.stderr == "ssae-eval: error: --context-size 1: must be at least 2\n"
    with pytest.raises(ConfigError) as e:
        EvalConfig().check()
    assert e.value.field_name == "docs" and str(e.value).startswith("docs: give exactly one of")
    r = run([setup["saes"]["rand"], "--activations", setup["acts"], "--hook", "blocks.1.hook_resid_post"], code=2)
    assert r.stderr.strip() == (f"ssae-eval: error: --hook blocks.1.hook_resid_post: {setup['acts']} holds "
                                f"activations of {HOOK!r}")
    assert not (tmp_path / "x").exists()
    # the help's derived default names the real default model
    assert DEFAULT_MODEL in run(["--help"]).stdout
