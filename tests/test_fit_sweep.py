"""ssae-fit sweeps: lists for --tilt, --tilt-ess, --k and --seed train every combination in one call, each
SAE identical to the one a single run with its options trains; resume; prefetch; bad lists."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import StopAfter, invoke, make_store, parse_records, sparse_data
from ssae_common.core.errors import Interrupted
from ssae_common.core.outputs import partial_path
from ssae_common.data.activations import ActivationStore
from ssae_common.data.batches import ActivationStream
from ssae_common.sae.config import FitConfig
from ssae_common.sae.train import Run, train_sae, train_saes
from ssae_common.sae.trainer import CHECKPOINT, Batches
from ssae_tools.fit import main as fit_main

FAST = ["--architecture", "topk", "--d-sae", "32", "--k", "4", "--lr", "2e-3", "--batch-size", "128", "--train-tokens",
        str(128 * 30), "--log-every", "7", "--val-every", "20", "--val-tokens", "256", "--warmup-steps", "3",
        "--shuffle-rows", "700", "--checkpoint-every", "9", "--aux-k", "4", "--dead-tokens", "512", "-q"]


@pytest.fixture
def store(tmp_path):
    g = np.random.default_rng(1)
    return make_store(tmp_path / "acts.h5", sparse_data(n=4000), token_ids=g.integers(0, 30, 4000))


def run(args, code=0):
    return invoke(fit_main, args, code=code)


def saved(folder):
    """Everything a fit writes that does not depend on when or where it ran."""
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    cfg["training"].pop("seconds_last_run")
    cfg.pop("created_by")  # the time and command line
    log = open(os.path.join(folder, "train_log.jsonl")).read()
    return load_file(os.path.join(folder, "sae.safetensors")), cfg, log


def assert_same_sae(a, b):
    wa, ca, la = saved(a)
    wb, cb, lb = saved(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), (a, b, name)
    assert ca == cb and la == lb


def test_every_sae_of_a_sweep_is_the_single_run_with_its_options(store, tmp_path):
    r = run([store, *FAST, "--tilt", "0,500", "--k", "4,8", "--seed", "0,1", "-o", tmp_path / "sweep"])
    records = parse_records(r.stdout)
    names = [f"tilt{t}-k{k}-seed{s}" for t in (0, 500) for k in (4, 8) for s in (0, 1)]
    assert [rec["path"] for rec in records] == [str(tmp_path / "sweep" / n) for n in names]
    assert sorted(os.listdir(tmp_path / "sweep")) == sorted(names)  # no partial, lock or temp left
    for rec, (t, k, s) in zip(records, [(t, k, s) for t in (0, 500) for k in (4, 8) for s in (0, 1)]):
        single = tmp_path / f"single-{t}-{k}-{s}"
        (one,) = parse_records(run([store, *FAST, "--tilt", t, "--k", k, "--seed", s, "-o", single]).stdout)
        assert_same_sae(rec["path"], single)
        assert {**one, "path": rec["path"]} == rec
        assert rec["tilt"] == t and rec["k"] == k


def test_sweep_of_finetuned_ssaes_with_token_groups_and_tilt_ess(store, tmp_path):
    """--init: each SAE starts from its own copy of the one parent; --tilt-groups token: the shared batches
    carry token ids; a {placeholder} template names the folders."""
    parent = tmp_path / "gsae"
    run([store, *FAST, "--k", "4", "-o", parent])
    args = [store, *FAST, "--init", parent, "--tilt-groups", "token", "--lr", "1e-3"]
    r = run([*args, "--tilt-ess", "0.5,0.1", "-o", str(tmp_path / "ssae-ess{tilt_ess}-k{k}")])
    paths = [rec["path"] for rec in parse_records(r.stdout)]
    assert paths == [str(tmp_path / "ssae-ess0.5-k4"), str(tmp_path / "ssae-ess0.1-k4")]
    for f, path in zip(("0.5", "0.1"), paths):
        run([*args, "--tilt-ess", f, "-o", tmp_path / f"single{f}"])
        assert_same_sae(path, tmp_path / f"single{f}")


def test_default_outputs_are_where_single_runs_put_them(store, tmp_path):
    r = run([store, *FAST, "--k", "4", "--tilt", "0,500"])
    paths = [rec["path"] for rec in parse_records(r.stdout)]
    assert len(set(paths)) == 2 and all(p.startswith(os.environ["SSAE_WORKDIR"]) for p in paths)
    again = invoke(fit_main, [store, *FAST[:-1], "--k", "4", "--tilt", "500"], code=0)  # not quiet: the log
    assert "reusing" in again.stderr and parse_records(again.stdout)[0]["path"] == paths[1]
    both = run([store, *FAST, "--k", "4", "--tilt", "0,500"])
    assert [rec["path"] for rec in parse_records(both.stdout)] == paths


def test_prefetch_does_not_change_the_batches_or_the_sae(store, tmp_path):
    st = ActivationStore(store)
    stream = ActivationStream([st], 128, 3, shuffle_rows=700, val_rows=256, tokens=True)
    with Batches(stream, (0, 128), torch.device("cpu"), True, 70) as ahead:
        for step in (*range(70), 5):  # past the end of an epoch, then back (no longer the one prefetched)
            rows, ids = ahead.get(step)
            want, want_ids = stream.batch_with_tokens(step)
            assert np.array_equal(rows.numpy(), want) and np.array_equal(ids.numpy(), want_ids)
    stream.close()
    st.close()
    run([store, *FAST, "--k", "4", "--tilt", "500", "-o", tmp_path / "on"])
    run([store, *FAST, "--k", "4", "--tilt", "500", "--no-prefetch", "-o", tmp_path / "off"])
    assert_same_sae(tmp_path / "on", tmp_path / "off")  # cfg.json too: how batches are built is not in the hash
    assert "prefetch" not in json.load(open(tmp_path / "on" / "cfg.json"))["config"]


def test_interrupted_sweep_resumes_every_sae_exactly(store, tmp_path):
    base = FitConfig(architecture="topk", d_sae=32, k=4, lr=2e-3, batch_size=128, train_tokens=128 * 60,
                     warmup_steps=5, log_every=7, val_every=20, checkpoint_every=25, shuffle_rows=700, val_tokens=300,
                     aux_k=4, dead_tokens=600)
    cfgs = [base.__class__(**{**base.__dict__, **change}).resolve(16, 4000)
            for change in ({}, {"tilt": 50.0}, {"k": 6, "tilt_ess": 0.2})]

    def runs(folder):
        return [Run(cfg, str(tmp_path / folder / str(i)), {}, f"cfg{i}", {}) for i, cfg in enumerate(cfgs)]

    kw = dict(quiet=True)
    for r in runs("straight"):
        train_sae([store], r.cfg, r.out, resolved=r.resolved, config_digest=r.digest, extra_cfg={}, **kw)
    first = runs("resumed")[0]  # one SAE of the sweep is ahead of the others: it waits for them
    with pytest.raises(Interrupted):
        train_sae([store], first.cfg, first.out, resolved={}, config_digest=first.digest, extra_cfg={},
                  stop=StopAfter(30), **kw)
    with pytest.raises(Interrupted):
        train_saes([store], runs("resumed"), stop=StopAfter(20), **kw)  # between checkpoints
    for r in runs("resumed"):
        assert not os.path.exists(r.out) and os.path.exists(os.path.join(partial_path(r.out), CHECKPOINT))
    steps = [torch.load(os.path.join(partial_path(r.out), CHECKPOINT), weights_only=False)["step"]
             for r in runs("resumed")]
    assert steps == [30, 20, 20]  # the stop saves every SAE where it is (the first waited at 30)
    assert train_saes([store], runs("resumed"), **kw) == [r.out for r in runs("resumed")]
    for a, b in zip(runs("straight"), runs("resumed")):
        wa, wb = load_file(os.path.join(a.out, "sae.safetensors")), load_file(os.path.join(b.out, "sae.safetensors"))
        assert all(torch.equal(wa[n], wb[n]) for n in wa)
        assert open(os.path.join(a.out, "train_log.jsonl")).read() == open(os.path.join(b.out, "train_log.jsonl")).read()


def test_sigterm_saves_every_sae_of_the_sweep_and_rerun_matches(store, tmp_path):
    args = [sys.executable, "-m", "ssae_tools.fit", store, "--k", "4", "--d-sae", "32", "--tilt", "0,500",
            "--batch-size", "64", "--train-tokens", str(64 * 600), "--log-every", "5", "--val-every", "500",
            "--val-tokens", "256", "--checkpoint-every", "100000", "--shuffle-rows", "1000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    assert subprocess.run([*args, "-o", str(tmp_path / "straight"), "-q"], env=env, capture_output=True).returncode == 0
    out = tmp_path / "resumed"
    proc = subprocess.Popen([*args, "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = os.path.join(partial_path(str(out / "tilt500")), "train_log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75 and stdout == b"", stderr.decode()
    for name in ("tilt0", "tilt500"):
        assert not (out / name).exists() and os.path.exists(os.path.join(partial_path(str(out / name)), CHECKPOINT))
    done = subprocess.run([*args, "-o", str(out), "--force"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("resuming") == 2
    assert [json.loads(line)["path"] for line in done.stdout.splitlines()] == [str(out / "tilt0"), str(out / "tilt500")]
    for name in ("tilt0", "tilt500"):
        assert_same_sae(tmp_path / "straight" / name, out / name)


@pytest.mark.parametrize("args,flag", [
    (["--tilt", "0,,500"], "--tilt"),
    (["--tilt", "0,500,0.0"], "--tilt"),
    (["--k", "4,x"], "--k"),
    (["--seed", "1,1"], "--seed"),
    (["--tilt-ess", "0.5,"], "--tilt-ess"),
    (["--batch-size", "64,128"], "--batch-size"),
    (["--lr", "1e-3,2e-3"], "--lr"),
    (["--tilt", "0,500", "--tilt-ess", "0.5"], "--tilt-ess"),  # a combination that is not a valid fit
    (["--tilt-ess", "0.5,2"], "--tilt-ess"),
])
def test_bad_lists_exit_2_naming_the_flag(store, tmp_path, args, flag):
    r = run([store, *FAST, *args, "-o", tmp_path / "out"], code=2)
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("ssae-fit: error:") and flag in line, line
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(os.environ["SSAE_WORKDIR"])


def test_a_template_must_tell_the_saes_apart(store, tmp_path):
    r = run([store, *FAST, "--tilt", "0,500", "--k", "4,8", "-o", str(tmp_path / "t{tilt}")], code=2)
    assert "names the same folder for several SAEs" in r.stderr and not list(tmp_path.glob("t*"))
    r = run([store, *FAST, "--tilt", "0,500", "-o", str(tmp_path / "t{tlit}")], code=2)
    assert "-o" in r.stderr and "placeholders" in r.stderr


def test_a_sweep_under_torchrun_is_refused(store, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run([store, *FAST, "--tilt", "0,500", "-o", tmp_path / "out"], code=2)
    assert "torchrun" in r.stderr and not os.path.exists(tmp_path / "out")
