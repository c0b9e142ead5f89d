"""The SLURM scripts under small fake sbatch/srun/scontrol shims that set the SLURM variables."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import sample_docs, write_jsonl
from ssae_common.activations import ActivationStore

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


def history(tmp_path):
    path = tmp_path / "slurm" / "history"
    return path.read_text().splitlines() if path.exists() else []


def test_scripts_pass_shellcheck():
    scripts = sorted(glob.glob(os.path.join(SLURM, "*"))) + [os.path.join(ROOT, "shell", "demo.sh")]
    scripts += sorted(glob.glob(os.path.join(ROOT, "shell", "examples", "*.sh")))
    p = subprocess.run([os.path.join(BIN, "shellcheck"), "-x", *scripts], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_harvest_array_then_merge_equals_an_unsharded_run(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(24, 30))
    env = dict(DOCS=docs, OUT=tmp_path / "run", MODEL=tiny_model, HOOK="blocks.1.hook_resid_post",
               HARVEST_ARGS="--dtype float32 --context-size 12")
    r = sbatch(tmp_path, "--array=0-3", os.path.join(SLURM, "harvest_array.sbatch"), **env)
    assert r.returncode == 0, r.stderr + "".join(open(p).read() for p in glob.glob(str(tmp_path / "slurm/*.log")))
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
