"""The SLURM scripts under small fake sbatch/srun/scontrol shims that set the SLURM variables."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import sample_docs, write_jsonl
from ssae_common.data.activations import ActivationStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "shell", "slurm")
SHIMS = os.path.join(ROOT, "tests", "fake_slurm")
BIN = os.path.dirname(sys.executable)


def slurm_env(tmp_path, **extra):
    env = dict(os.environ, PATH=f"{SHIMS}:{BIN}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path / "slurm"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sbatch(tmp_path, *args, **env):
    return subprocess.run(["sbatch", "--parsable", *args], env=slurm_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=900)


def slurm_logs(tmp_path):
    return "".join(open(p).read() for p in glob.glob(str(tmp_path / "slurm/*.log")))


def history(tmp_path):
    path = tmp_path / "slurm" / "history"
    return path.read_text().splitlines() if path.exists() else []


def test_scripts_pass_shellcheck():
    scripts = sorted(glob.glob(os.path.join(SLURM, "*"))) + sorted(glob.glob(os.path.join(ROOT, "shell", "*.sh")))
    scripts += sorted(glob.glob(os.path.join(ROOT, "shell", "examples", "*.sh")))
    p = subprocess.run([os.path.join(BIN, "shellcheck"), "-x", *scripts], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_harvest_array_then_merge_equals_an_unsharded_run(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(24, 30))
    env = dict(DOCS=docs, OUT=tmp_path / "run", MODEL=tiny_model, HOOK="blocks.1.hook_resid_post",
               HARVEST_ARGS="--dtype float32 --context-size 12")
    r = sbatch(tmp_path, "--array=0-3", os.path.join(SLURM, "harvest_array.sbatch"), **env)
    assert r.returncode == 0, r.stderr + slurm_logs(tmp_path)
    assert len(glob.glob(str(tmp_path / "run/shards/shard_*.h5"))) == 4
    r = sbatch(tmp_path, os.path.join(SLURM, "merge.sbatch"), **env)
    assert r.returncode == 0, open(glob.glob(str(tmp_path / "slurm/*.log"))[-1]).read()
    whole = tmp_path / "whole.h5"
    p = subprocess.run([os.path.join(BIN, "ssae-harvest"), docs, "--model", tiny_model, "--layer", "1", "--dtype",
                        "float32", "--context-size", "12", "-o", str(whole)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with ActivationStore(str(whole)) as a, ActivationStore(str(tmp_path / "run" / "acts.h5")) as b:
        assert a.n_tokens == b.n_tokens and a.n_docs == b.n_docs == 24
        np.testing.assert_array_equal(a.token_ids(), b.token_ids())
        np.testing.assert_array_equal(a.doc_index(), b.doc_index())
        assert [a.doc_id(i) for i in range(24)] == [b.doc_id(i) for i in range(24)]
        np.testing.assert_allclose(a.rows(0, a.n_tokens), b.rows(0, b.n_tokens), rtol=1e-5, atol=1e-5)


def fit_uninterrupted(tmp_path, args):
    """OUT folder with acts.h5 for fit.sbatch, and the same fit run once without interruption."""
    from helpers import make_store, sparse_data

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make_store(run_dir / "acts.h5", sparse_data(n=4000))
    whole = tmp_path / "whole"
    p = subprocess.run([os.path.join(BIN, "ssae-fit"), str(run_dir / "acts.h5"), *args.split(), "-o", str(whole)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return run_dir, whole


def test_fit_is_signalled_checkpoints_requeues_and_resumes(tmp_path):
    from safetensors.numpy import load_file

    args = ("--architecture topk --k 4 --d-sae 32 --batch-size 128 --train-tokens 256000 --checkpoint-every 50 "
            "--val-tokens 256 --seed 3")
    run_dir, whole = fit_uninterrupted(tmp_path, args)
    r = sbatch(tmp_path, os.path.join(SLURM, "fit.sbatch"), OUT=run_dir, FIT_ARGS=args,
               FAKE_SLURM_SIGNAL_WHEN=run_dir / ".sae.partial" / "partial.json")
    logs = slurm_logs(tmp_path)
    assert r.returncode == 0, logs
    runs = history(tmp_path)
    assert any(line.startswith("requeue") for line in runs), runs
    assert [line.split()[-1] for line in runs if not line.startswith("requeue")] == ["exit0", "exit0"], runs
    assert "checkpointed; requeueing" in logs and "resuming" in logs
    a, b = load_file(str(whole / "sae.safetensors")), load_file(str(run_dir / "sae" / "sae.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.integration
def test_fit_under_torchrun_is_signalled_and_requeued(tmp_path):
    """NPROC_PER_NODE=2: torchrun (gloo on CPU) exits 1 when its workers stop with 75, so the script
    requeues on signal plus checkpoint; the requeued run resumes and matches one process."""
    from safetensors.numpy import load_file

    args = ("--architecture topk --k 4 --d-sae 32 --batch-size 128 --train-tokens 25600 --checkpoint-every 20 "
            "--val-tokens 256 --seed 3 --device cpu")
    run_dir, whole = fit_uninterrupted(tmp_path, args)
    r = sbatch(tmp_path, os.path.join(SLURM, "fit.sbatch"), OUT=run_dir, FIT_ARGS=args, NPROC_PER_NODE=2,
               OMP_NUM_THREADS=1, FAKE_SLURM_SIGNAL_WHEN=run_dir / ".sae.partial" / "checkpoint.pt")
    logs = slurm_logs(tmp_path)
    assert r.returncode == 0, logs
    runs = history(tmp_path)
    assert sum(line.startswith("requeue") for line in runs) == 1, runs
    assert "checkpointed; requeueing" in logs and "resuming" in logs
    assert logs.count("training data-parallel over 2 ranks (gloo)") == 2  # the first run and the requeued one
    training = json.load(open(run_dir / "sae" / "cfg.json"))["training"]
    assert training["tokens"] == 25600 and training["ranks"] == 2
    a, b = load_file(str(whole / "sae.safetensors")), load_file(str(run_dir / "sae" / "sae.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-4)


def test_eval_script_runs_on_a_fitted_sae(tmp_path):
    from helpers import make_store, sparse_data

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make_store(run_dir / "acts.h5", sparse_data(n=2000))
    p = subprocess.run([os.path.join(BIN, "ssae-fit"), str(run_dir / "acts.h5"), "--k", "4", "--d-sae", "32",
                        "--batch-size", "128", "--train-tokens", "12800", "-o", str(run_dir / "sae")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    r = sbatch(tmp_path, os.path.join(SLURM, "eval.sbatch"), OUT=run_dir, ACTS=run_dir / "acts.h5")
    assert r.returncode == 0, slurm_logs(tmp_path)
    metrics = __import__("json").load(open(run_dir / "eval" / "metrics.json"))
    assert metrics["schema"] == "ssae.metrics/1" and len(metrics["saes"]) == 1
