"""The copy-and-paste pipelines in shell/examples/, run as a user runs them (tiny model, tiny corpus)."""
import json
import os
import random
import subprocess
import sys

import h5py
import pytest

from helpers import WORDS, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "shell", "examples")
BIN = os.path.dirname(sys.executable)
PHYSICS = "star galaxy planet orbit mass light energy field quantum particle wave spin".split()


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    general = [w for w in WORDS if w not in PHYSICS]
    docs = []
    for i in range(240):
        vocab = PHYSICS + general[:10] if i % 6 == 0 else general
        docs.append({"id": f"c{i}", "text": " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 40)))})
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("the star and the galaxy in orbit\nquantum particle spin and wave energy\n")
    test = write_jsonl(str(tmp_path / "test.jsonl"),
                       [{"id": f"t{i}", "text": " ".join(rng.choice(PHYSICS) for _ in range(30))} for i in range(6)])
    return {"corpus": write_jsonl(str(tmp_path / "corpus.jsonl"), docs), "seeds": str(seeds), "test": test}


def run_example(name, args, env, cwd):
    return subprocess.run(["bash", os.path.join(EXAMPLES, name), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def env_for(tiny_model, **extra):
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", SSAE_MODEL=tiny_model,
                SSAE_HOOK="blocks.1.hook_resid_post", SSAE_FIT_BATCH_SIZE="64", SSAE_FIT_VAL_TOKENS="256", SSAE_FIT_K="8",
                **extra)


def test_one_line_pipeline_as_typed(tmp_path, tiny_model, corpus):
    p = run_example("pipeline.sh", [corpus["seeds"]], env_for(tiny_model, SSAE_CORPUS=corpus["corpus"]), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["schema"] == "ssae.artifact/1" and rec["kind"] == "sae"
    cfg = json.load(open(os.path.join(rec["path"], "cfg.json")))
    assert cfg["tilt_ess"] == 0.5 and cfg["hook"] == "blocks.1.hook_resid_post"


@pytest.mark.integration
def test_gsae_to_ssae_recipe(tmp_path, tiny_model, corpus):
    out = tmp_path / "run"
    p = run_example("gsae_to_ssae.sh", [corpus["corpus"], corpus["seeds"], corpus["corpus"], corpus["test"], str(out)],
                    env_for(tiny_model, GENERAL_TOKENS="3000", TOP_K="60"), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.load(open(out / "eval" / "metrics.json"))
    assert len(metrics["saes"]) == 2
    assert json.load(open(out / "ssae" / "cfg.json"))["parent"]["path"].endswith("gsae")

    # the paper's best recipe on the same GSAE, then the feature browser for the SSAE
    acts = tmp_path / "tracin.h5"
    p = run_example("dense_tracin.sh", [corpus["seeds"], corpus["corpus"], str(out / "gsae"), str(acts)],
                    env_for(tiny_model, TOP_K="30"), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    with h5py.File(acts) as f:
        assert f["token_ids"].shape[0] > 0 and f.attrs["hook"] == "blocks.1.hook_resid_post"
        ids = [i.decode() for i in f["docs/id"][:]]
    assert 0 < len(ids) <= 30 and all(i.startswith("c") for i in ids)
    browser = tmp_path / "browser"
    p = run_example("explain_latents.sh", [str(out / "ssae"), str(acts), str(browser), "0-3"],
                    env_for(tiny_model, EXPLAINER="none"), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (browser / "index.html").exists() and f"feature browser: {browser}/index.html" in p.stderr
