"""Interrupted fits resume and end with the same weights as uninterrupted ones."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ssae_common.core.errors import Interrupted
from ssae_common.core.outputs import partial_path
from ssae_common.sae.config import FitConfig
from ssae_common.sae.train import train_sae
from ssae_common.sae.trainer import CHECKPOINT
from helpers import StopAfter, make_store, sparse_data


def weights(folder):
    return load_file(os.path.join(folder, "sae.safetensors"))


def log_lines(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "train_log.jsonl"))]


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_resume_after_injected_stop_gives_identical_weights(tmp_path, architecture):
    store = make_store(tmp_path / "acts.h5", sparse_data(n=5000))
    cfg = FitConfig(architecture=architecture, d_sae=32, k=4 if architecture == "topk" else None,
                    l1=0.0 if architecture == "topk" else 0.01, tilt=50.0, lr=2e-3, batch_size=128,
                    train_tokens=128 * 90, warmup_steps=10, log_every=7, val_every=20, checkpoint_every=25,
                    shuffle_rows=700, val_tokens=300, aux_k=4 if architecture == "topk" else 0,
                    dead_tokens=600).resolve(16, 5000)
    kw = dict(resolved={}, config_digest="same", extra_cfg={}, quiet=True)
    train_sae([store], cfg, str(tmp_path / "straight"), **kw)

    out = str(tmp_path / "resumed")
    with pytest.raises(Interrupted):
        train_sae([store], cfg, out, stop=StopAfter(33), **kw)  # between checkpoints, mid-window
    assert not os.path.exists(out) and os.path.exists(os.path.join(partial_path(out), CHECKPOINT))
    with pytest.raises(Interrupted):
        train_sae([store], cfg, out, stop=StopAfter(30), **kw)  # a second interruption
    train_sae([store], cfg, out, **kw)
    assert not os.path.exists(partial_path(out))
    a, b = weights(tmp_path / "straight"), weights(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert log_lines(tmp_path / "straight") == log_lines(out)


def test_sigterm_checkpoints_exits_75_and_rerun_matches(tmp_path):
    store = make_store(tmp_path / "acts.h5", sparse_data(n=8000))
    args = [sys.executable, "-m", "ssae_tools.fit", store, "--k", "4", "--d-sae", "32", "--tilt", "500",
            "--batch-size", "64", "--train-tokens", str(64 * 800), "--log-every", "5", "--val-every", "500",
            "--val-tokens", "256", "--checkpoint-every", "100000", "--shuffle-rows", "1000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    assert subprocess.run([*args, "-o", str(straight), "-q"], env=env, capture_output=True).returncode == 0

    out = tmp_path / "resumed"
    proc = subprocess.Popen([*args, "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = os.path.join(partial_path(str(out)), "train_log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr.decode()
    assert b"checkpoint saved" in stderr and stdout == b""
    assert not out.exists() and os.path.exists(os.path.join(partial_path(str(out)), CHECKPOINT))
    other = subprocess.run([*args, "--tilt", "0", "-o", str(out)], env=env, capture_output=True, text=True)
    assert other.returncode == 2 and "an interrupted fit with a different configuration is there" in other.stderr
    assert os.path.exists(os.path.join(partial_path(str(out)), CHECKPOINT))
    done = subprocess.run([*args, "-o", str(out), "--force"], env=env, capture_output=True)  # as make reruns it
    assert done.returncode == 0, done.stderr.decode()
    assert b"resuming" in done.stderr and json.loads(done.stdout)["path"] == str(out)
    a, b = weights(straight), weights(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert log_lines(straight) == log_lines(out)
