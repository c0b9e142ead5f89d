"""The whole pipeline from Python, without click: retrieve -> harvest -> fit -> evaluate -> explain ->
shift, each stage through its config object and entry point, on the tiny model."""
from __future__ import annotations

import json
import os

from helpers import sample_docs, synthetic_bios, write_jsonl
from ssae_common.core.runtime import RunContext
from ssae_common.data import HarvestConfig, harvest
from ssae_common.eval import EvalConfig, evaluate_saes
from ssae_common.explain import ExplainConfig, explain
from ssae_common.retrieval import RetrieveConfig, retrieve
from ssae_common.sae import FitConfig, fit
from ssae_common.shift import ShiftConfig, shift

HOOK = "blocks.0.hook_resid_post"


def test_every_stage_runs_from_python(tiny_model, tmp_path):
    run = RunContext(device_spec="cpu", seed=0)
    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), sample_docs(60, words=40, seed=1))
    seeds = write_jsonl(str(tmp_path / "seeds.jsonl"),
                        [{"id": "s0", "text": "star galaxy planet orbit mass light"}])
    docs = retrieve(RetrieveConfig(corpus=(corpus,), top_k=30), [seeds], out=str(tmp_path / "docs.jsonl"),
                    context=run)
    assert docs["n_docs"] == 30 and os.path.exists(tmp_path / "docs.jsonl")

    acts = harvest(HarvestConfig(model=tiny_model, hook=HOOK, context_size=32), [str(tmp_path / "docs.jsonl")],
                   out=str(tmp_path / "acts.h5"), context=run)
    assert acts["kind"] == "activations" and acts["n_tokens"] > 500

    gsae = fit(FitConfig(d_sae=32, k=4, batch_size=128, warmup_steps=2, val_tokens=0, log_every=5),
               [acts["path"]], out=str(tmp_path / "gsae"), context=run)
    ssae = fit(FitConfig(init=gsae["path"], tilt=1.0, batch_size=128, warmup_steps=2, val_tokens=0),
               [acts["path"]], out=str(tmp_path / "ssae"), context=run)
    assert gsae["kind"] == ssae["kind"] == "sae" and ssae["parent"]["path"] == os.path.abspath(gsae["path"])

    test_docs = write_jsonl(str(tmp_path / "test.jsonl"), sample_docs(8, seed=7))
    metrics = evaluate_saes(EvalConfig(docs=(test_docs,), baseline=gsae["path"], context_size=32),
                       [ssae["path"]], out=str(tmp_path / "eval"), context=run)
    saes = {s["name"]: s for s in json.load(open(metrics["path"]))["saes"]}
    assert set(saes) == {"gsae", "ssae"}
    trained_on = saes["ssae"]["training_data"]  # the harvest's composition, carried into the metrics
    assert trained_on[0]["path"] == os.path.abspath(acts["path"])
    assert trained_on[0]["composition"]["sources"] == {"corpus.jsonl": 1.0}  # retrieve records the source file
    assert "trained on acts.h5: corpus.jsonl 100.0%" in open(os.path.join(str(tmp_path / "eval"), "report.html")).read()

    explained = explain(ExplainConfig(activations=acts["path"], explainer="none", latents="0-3"), ssae["path"],
                        out=str(tmp_path / "explain"), context=run)
    lines = open(explained["explanations"]).read().splitlines()
    assert [json.loads(line)["latent"] for line in lines] == [0, 1, 2, 3]

    bios = write_jsonl(str(tmp_path / "bios.jsonl"), synthetic_bios())
    report = shift(ShiftConfig(data=(bios,), professions=("nurse", "physician,surgeon"), context_size=32),
                   [ssae["path"]], out=str(tmp_path / "shift.json"), context=run)
    assert report["kind"] == "shift" and "original" in report["worst_group_accuracy"]
