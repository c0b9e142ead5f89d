"""ssae-fit under torchrun (gloo, 2 CPU processes) matches one process with the same global batch.

Run as a script under torchrun, this file is also the driver of the resume scenario (see `driver`).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ssae_common.core.errors import Interrupted  # noqa: E402
from ssae_common.core.outputs import partial_path  # noqa: E402
from ssae_common.sae.config import FitConfig  # noqa: E402
from ssae_common.sae.train import train_sae  # noqa: E402
from ssae_common.sae.trainer import CHECKPOINT  # noqa: E402
from helpers import make_store, sparse_data  # noqa: E402

# a batch of 130 rows splits 65/65; 45 steps cover a bit more than one epoch of the training rows
# d_sae 64 with k 2 and a short dead window leaves latents dead, so AuxK (global-batch statistics) runs
CFG = dict(architecture="topk", d_sae=64, k=2, l1=0.0, lr=2e-3, batch_size=130, train_tokens=130 * 45,
           warmup_steps=5, log_every=7, val_every=20, checkpoint_every=25, shuffle_rows=700, val_tokens=300,
           aux_k=4, dead_tokens=260)
CLI = ["--architecture", "topk", "--k", "2", "--d-sae", "64", "--lr", "2e-3", "--batch-size", "130",
       "--train-tokens", str(130 * 45), "--warmup-steps", "5", "--log-every", "7", "--val-every", "20",
       "--val-tokens", "300", "--shuffle-rows", "700", "--aux-k", "4", "--dead-tokens", "260", "--seed", "3",
       "--device", "cpu"]
ERM = FitConfig(**CFG, tilt=0.0, seed=3).resolve(16, 5000)  # the library run: d_in 16, 5000 rows
FIT_KW = dict(resolved={}, config_digest="ddp-test", extra_cfg={}, quiet=True)
ATOL = 2e-5  # float32 sums in a different order (two half-batch matmuls vs one), 45 Adam steps


def torchrun(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def weights(folder):
    return load_file(os.path.join(folder, "sae.safetensors"))


def log_lines(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "train_log.jsonl"))]


def assert_close(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    for name in a:
        diff = float((a[name] - b[name]).abs().max())
        assert diff <= atol, f"{name}: max |diff| {diff:.3g}"


def assert_logs_close(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 5
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-3, abs=1e-5), (ra["step"], key)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ddp") / "acts.h5", sparse_data(n=5000))


@pytest.mark.integration
def test_torchrun_cli_term_matches_one_process(store, tmp_path):
    """The CLI under torchrun with TERM (t = 500, tilted over the global batch): one record on stdout
    (rank 0's), the same weights and log as one process with the same global batch."""
    from click.testing import CliRunner
    from ssae_tools.fit import main as fit_main

    single = tmp_path / "single"
    r = CliRunner().invoke(fit_main, [store, *CLI, "--tilt", "500", "-o", str(single), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr

    ddp = tmp_path / "ddp"
    done = torchrun("-m", "ssae_tools.fit", store, *CLI, "--tilt", "500", "-o", str(ddp), "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1 and records[0]["path"] == str(ddp) and records[0]["kind"] == "sae"
    assert not os.path.exists(partial_path(str(ddp)))

    assert_close(weights(single), weights(ddp))
    log_single, log_ddp = log_lines(single), log_lines(ddp)
    assert_logs_close(log_single, log_ddp)
    # TERM really concentrates on a few of the 130 tokens, the objective is above the mean loss, and
    # AuxK ran on dead latents
    assert max(r["tilt_ess_fraction"] for r in log_ddp) < 0.2
    assert all(r["loss"] > r["erm_loss"] for r in log_ddp)
    assert any(r["aux_loss"] > 0 for r in log_ddp) and any(r["dead_fraction"] > 0 for r in log_ddp)
    cfg = json.load(open(ddp / "cfg.json"))
    assert cfg["training"]["ranks"] == 2 and cfg["tilt"] == 500


@pytest.mark.integration
def test_torchrun_erm_interrupted_on_one_rank_resumes_and_matches(store, tmp_path):
    """ERM under torchrun: a stop requested on rank 1 only stops both ranks at the same step with a
    checkpoint; rerunning resumes and ends bit-identical to an uninterrupted torchrun run, which is
    within tolerance of one process."""
    single = tmp_path / "single"
    train_sae([store], ERM, str(single), **FIT_KW)

    done = torchrun(os.path.abspath(__file__), store, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interrupted at step 11" in done.stderr and "resumed" in done.stderr

    straight, resumed = tmp_path / "ddp_straight", tmp_path / "ddp_resumed"
    a, b = weights(straight), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert_logs_close(log_lines(straight), log_lines(resumed))
    assert_close(weights(single), a)
    assert_logs_close(log_lines(single), log_lines(straight))
    assert any(r["aux_loss"] > 0 for r in log_lines(straight))


class StopOnRank:
    """A StopFlag stand-in: a stop requested on one rank only, at its `after`-th step boundary."""

    def __init__(self, rank, after):
        self.rank, self.after, self.seen = rank, after, 0

    @property
    def requested(self):  # read once per step boundary
        self.seen += 1
        return int(os.environ["RANK"]) == self.rank and self.seen >= self.after

    def check(self, save=None):
        save()
        raise Interrupted("test stop")


def driver(store, folder):
    """Under torchrun: an uninterrupted fit, then one stopped by rank 1 at step 11 (between checkpoints),
    then its resumption."""
    train_sae([store], ERM, os.path.join(folder, "ddp_straight"), **FIT_KW)
    out = os.path.join(folder, "ddp_resumed")
    try:
        train_sae([store], ERM, out, stop=StopOnRank(1, 11), **FIT_KW)
        raise SystemExit("not interrupted")
    except Interrupted:
        assert os.path.exists(os.path.join(partial_path(out), CHECKPOINT)) and not os.path.exists(out)
        print(f"rank {os.environ['RANK']}: interrupted at step 11", file=sys.stderr)
    train_sae([store], ERM, out, **FIT_KW)
    print(f"rank {os.environ['RANK']}: resumed", file=sys.stderr)


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2])
