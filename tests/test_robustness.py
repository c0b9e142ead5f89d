"""Robustness, case by case: every mistake is named (exit 2, one line, the flag or file the user typed),
every input byte is handled, one process writes an output, the stdin pipe resumes, outputs are readable by
colleagues, and there is feedback before long waits.  Each test reproduces one case."""
from __future__ import annotations

import glob
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import (identity_sae, invoke, make_store, one_error_line, parse_records, random_sae, sample_docs,
                     write_jsonl)
from ssae_common.core.errors import BadInput
from ssae_tools.eval import main as eval_main
from ssae_tools.explain import main as explain_main
from ssae_tools.fit import main as fit_main
from ssae_tools.harvest import main as harvest_main
from ssae_tools.retrieve import main as retrieve_main

BIN = os.path.dirname(sys.executable)
HOOK = "blocks.1.hook_resid_post"
TOOLS = ("retrieve", "harvest", "fit", "eval", "explain", "shift")


@pytest.fixture
def docs(tmp_path):
    return write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(20, 30))


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    return make_store(tmp_path / "acts.h5", rng.standard_normal((600, 8)).astype(np.float32), hook=HOOK)


def saved_sae(folder, sae, model="synthetic-lm", hook=HOOK):
    os.makedirs(folder, exist_ok=True)
    sae.save(str(folder), model=model, hook=hook)
    return str(folder)


FIT = ["--d-sae", "16", "--k", "2", "--batch-size", "64", "--val-tokens", "0", "--warmup-steps", "0"]

# --------------------------------------------------------------------------- exit codes and messages


def test_missing_input_file_exits_2_naming_it(tmp_path, tiny_model):
    missing = tmp_path / "nope.jsonl"
    r = invoke(harvest_main, [missing, "--model", tiny_model, "--layer", "1"], code=2)
    assert one_error_line(r.stderr, "harvest").endswith(f"{missing}: no such file")


def test_corrupt_weights_exit_2_naming_the_file(tmp_path, store):
    sae = saved_sae(tmp_path / "sae", identity_sae(8, signed=False))
    with open(os.path.join(sae, "sae.safetensors"), "wb") as f:
        f.write(os.urandom(100))
    r = invoke(eval_main, [sae, "--activations", store, "-o", tmp_path / "ev"], code=2)
    assert f"{sae}/sae.safetensors: not a readable safetensors file" in one_error_line(r.stderr, "eval")
    r = invoke(fit_main, [store, "--init", sae, *FIT, "-o", tmp_path / "ft"], code=2)
    assert f"{sae}/sae.safetensors: not a readable safetensors file" in one_error_line(r.stderr, "fit")


@pytest.mark.parametrize("args, fragment", [
    (["--bogus"], "no such option '--bogus'"),
    (["--batch-size", "x"], "invalid value for '--batch-size'"),
])
def test_usage_errors_take_one_line(args, fragment):
    r = invoke(harvest_main, args, code=2)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("ssae-harvest: error: ") and fragment in r.stderr
    assert r.stderr.strip().endswith("(see --help)")


@pytest.mark.parametrize("tool", TOOLS)
def test_help_lists_variables_and_exit_codes_and_is_proofread(tool):
    import importlib

    text = invoke(importlib.import_module(f"ssae_tools.{tool}").main, ["--help"], code=0).stdout
    assert f"SSAE_{tool.upper()}_<OPTION>" in text and "SSAE_DEVICE" in text and "SSAE_WORKDIR" in text
    assert "Exit codes: 0 success; 1 runtime failure; 2 usage or bad input; 75 interrupted" in text
    assert "%%" not in text


def test_messages_are_proofread(tmp_path, monkeypatch):
    from ssae_common.core import records

    monkeypatch.setattr(records, "stdin_is_terminal", lambda: True)
    with pytest.raises(BadInput, match="give an activations path"):
        records.resolve_artifacts([], "activations")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": }\n')
    with pytest.raises(BadInput) as e:
        list(records.iter_docs([str(bad)]))
    assert str(e.value) == f"{bad}:1: malformed JSON (Expecting value, column 10)"


def test_model_errors_name_the_flag_typed(tmp_path):
    from ssae_common.explain.explainers import make_backend

    missing = str(tmp_path / "no" / "model")
    for prefix in ("--explainer", "--scorer"):
        with pytest.raises(BadInput, match=f"^{prefix}-model {missing}: no such folder"):
            make_backend("local", model=missing, url=None, api_key=None, device="cpu", timeout=1,
                         option_prefix=prefix)


# --------------------------------------------------------------------------- config keys and variables


@pytest.mark.parametrize("name, text, fragment", [
    ("c.json", '{"d_sea": 3}', "c.json: d_sea: not an option of any ssae tool (did you mean d_sae?)"),
    ("c.toml", "[fit]\ntlit = 5\n", "c.toml: [fit] tlit: not an option of ssae-fit (did you mean tilt?)"),
    ("c.toml", "[fitt]\ntilt = 5\n", "c.toml: unknown table [fitt] (did you mean fit?)"),
])
def test_unknown_config_keys_are_refused_naming_the_closest(tmp_path, store, name, text, fragment):
    cfg = tmp_path / name
    cfg.write_text(text)
    r = invoke(fit_main, [store, "--config", cfg, *FIT], code=2)
    assert fragment in one_error_line(r.stderr, "fit")
    assert not os.path.exists(os.environ["SSAE_WORKDIR"])


def test_one_config_file_serves_every_tool_and_takes_flag_names(tmp_path, store):
    from ssae_tools.base import _config_keys

    # a top-level key of another tool (d_sae: fit) is fine for harvest; keys are the flags as typed
    cfg = tmp_path / "c.toml"
    cfg.write_text('device = "cuda:7"\nd_sae = 16\ncontext_size = 12\n[fit]\nk = 2\n')
    r = invoke(fit_main, [store, "--config", cfg, "--batch-size", "64", "-o", tmp_path / "s"], code=2)
    assert "--device cuda:7" in r.stderr  # the key `device` reached the option --device
    assert _config_keys(explain_main.params)["model"] == "tokenizer_model"


def test_environment_variables_are_scoped_per_tool(tmp_path, tiny_model, docs, monkeypatch):
    monkeypatch.setenv("SSAE_BATCH_SIZE", "7")
    r = invoke(harvest_main, [docs, "--model", tiny_model, "--layer", "1"], code=2)
    assert "SSAE_BATCH_SIZE: only the options every tool shares take SSAE_<OPTION>; this one is set per tool: " \
           "use SSAE_HARVEST_BATCH_SIZE" in one_error_line(r.stderr, "harvest")
    monkeypatch.delenv("SSAE_BATCH_SIZE")
    monkeypatch.setenv("SSAE_FIT_BATCH_SIZE", "7")  # fit's: harvest keeps its own default
    monkeypatch.setenv("SSAE_HARVEST_CONTEXT_SIZE", "12")
    monkeypatch.setenv("SSAE_MODEL", tiny_model)  # shared
    out = tmp_path / "a.h5"
    invoke(harvest_main, [docs, "--layer", "1", "-o", out], code=0)
    from ssae_common.data.activations import ActivationStore

    with ActivationStore(str(out)) as s:
        config = s.attrs["config"]
    assert config["batch_size"] == 16 and config["context_size"] == 12
    # variables are named by the flag typed: explain's --model (field tokenizer_model) is SSAE_MODEL too
    model = next(p for p in explain_main.params if p.name == "tokenizer_model")
    assert model.envvar[:2] == ["SSAE_EXPLAIN_MODEL", "SSAE_MODEL"]


@pytest.mark.parametrize("var, fragment", [
    ("SSAE_DEVCE", "SSAE_DEVCE: no ssae tool reads this environment variable (did you mean SSAE_DEVICE?)"),
    ("SSAE_FIT_TILT_", "(did you mean SSAE_FIT_TILT?)"),
])
def test_environment_typos_are_refused_naming_the_closest(store, monkeypatch, var, fragment):
    monkeypatch.setenv(var, "1")
    r = invoke(fit_main, [store, *FIT], code=2)
    assert fragment in one_error_line(r.stderr, "fit")


def test_unrelated_ssae_variables_are_left_alone():
    from ssae_tools.base import check_environment

    check_environment("fit", {"SSAE_WORKDIR": "w", "SSAE_MY_OWN_SCRIPT_SETTING": "x", "SSAE_FIT_K": "4"})


def test_the_toolkits_own_variables_are_accepted():
    """Every SSAE_* name the Makefiles, scripts, benchmarks and docs use (bench-peers exports
    SSAE_PEERS_PYTHON) passes the typo check, so exporting it never makes a tool exit 2."""
    import re

    from ssae_tools.base import check_environment

    root = Path(__file__).resolve().parent.parent
    files = [p for d in ("shell", "tests/bench", "docs") for p in (root / d).rglob("*") if p.is_file()]
    names = {m for p in files + [root / "README.md"] for m in re.findall(r"\bSSAE_[A-Z0-9_]*[A-Z0-9]\b", p.read_text(errors="ignore"))}
    assert "SSAE_PEERS_PYTHON" in names
    for name in sorted(names):
        check_environment("fit", {name: "1"})


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_outputs_honour_the_umask(tmp_path, mask, file_mode, dir_mode):
    import tempfile

    from ssae_common.core.outputs import atomic_dir, atomic_file

    old = os.umask(mask)
    try:
        with atomic_file(str(tmp_path / "f.json")) as tmp:
            open(tmp, "w").write("{}")
        with atomic_dir(str(tmp_path / "d")) as tmp:
            fd, inner = tempfile.mkstemp(dir=tmp)  # private, as safetensors' writer leaves its file
            os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == file_mode
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == dir_mode
    assert stat.S_IMODE(os.stat(os.path.join(tmp_path / "d", os.path.basename(inner))).st_mode) == file_mode


def test_fit_output_is_readable_by_others(tmp_path, store):
    old = os.umask(0o022)
    try:
        invoke(fit_main, [store, *FIT, "-o", tmp_path / "sae"], code=0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "sae").st_mode) == 0o755
    for name in os.listdir(tmp_path / "sae"):
        assert stat.S_IMODE(os.stat(tmp_path / "sae" / name).st_mode) == 0o644, name


# --------------------------------------------------------------------------- one writer per output

HOLD = """
import sys, time
from ssae_common.core.outputs import exclusive
with exclusive(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold_lock(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_pid(tmp_path, store):
    out = tmp_path / "sae"
    holder = hold_lock(out)
    try:
        r = invoke(fit_main, [store, *FIT, "-o", out], code=2)
    finally:
        holder.kill()
        holder.wait()
    assert one_error_line(r.stderr, "fit").startswith(f"ssae-fit: error: another process is writing {out} "
                                                      f"(pid {holder.pid})")
    assert not out.exists() and not (tmp_path / ".sae.partial").exists()
    # the holder was killed (SIGKILL: no cleanup, its lock file stays): the lock is taken over
    assert (tmp_path / ".sae.partial.lock").exists()
    invoke(fit_main, [store, *FIT, "-o", out], code=0)
    assert not (tmp_path / ".sae.partial.lock").exists()


def test_two_fits_started_together_train_once(tmp_path, store):
    out = tmp_path / "sae"
    args = [os.path.join(BIN, "ssae-fit"), store, *FIT, "--train-tokens", "60000", "--checkpoint-every", "50",
            "-o", str(out)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in results)
    assert codes == [0, 2], results
    loser = next(err for _, err, rc in results if rc == 2)
    assert f"another process is writing {out}" in loser
    steps = [json.loads(line)["step"] for line in open(out / "train_log.jsonl")]
    assert steps == sorted(set(steps))  # one writer's log, not two interleaved


# --------------------------------------------------------------------------- the stdin pipe


def test_identical_stdin_pipes_reuse_one_output(tiny_model, docs):
    text = open(docs).read()
    args = ["--model", tiny_model, "--layer", "1", "--max-tokens", "300"]
    first = parse_records(invoke(harvest_main, args, input=text, code=0).stdout)[0]["path"]
    second = invoke(harvest_main, args, input=text, code=0)
    assert parse_records(second.stdout)[0]["path"] == first and "reusing" in second.stderr
    other = parse_records(invoke(harvest_main, args, input=text.replace("the", "a"), code=0).stdout)[0]["path"]
    assert other != first
    assert os.listdir(os.path.join(os.environ["SSAE_WORKDIR"], "tmp")) == []  # spools removed


def test_interrupted_stdin_pipe_resumes(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(80, 40, seed=1))
    args = ["--model", tiny_model, "--layer", "1", "--context-size", "16", "--batch-size", "2"]
    whole = parse_records(invoke(harvest_main, [docs, *args, "-o", tmp_path / "whole.h5"], code=0).stdout)[0]
    with open(docs) as stdin:
        proc = subprocess.Popen([os.path.join(BIN, "ssae-harvest"), *args], stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        pattern = os.path.join(os.environ["SSAE_WORKDIR"], "activations", ".*.h5.partial")
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not glob.glob(pattern):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    r = invoke(harvest_main, args, input=open(docs).read(), code=0)
    assert "resuming" in r.stderr
    assert glob.glob(pattern) == []  # the partial was resumed, not orphaned
    from ssae_common.data.activations import ActivationStore

    with ActivationStore(whole["path"]) as a, ActivationStore(parse_records(r.stdout)[0]["path"]) as b:
        np.testing.assert_array_equal(a.rows(0, a.n_tokens), b.rows(0, b.n_tokens))


def test_spools_of_killed_runs_are_cleaned(tmp_path, monkeypatch):
    import io

    from ssae_common.core import records

    folder = tmp_path / "tmp"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / f"stdin.{dead.pid}.abc123.jsonl").write_text("{}")
    (folder / f"stdin.{os.getpid()}.live12.jsonl").write_text("{}")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"text": "x"}\n')))
    path = records.spool_stdin(str(folder))
    assert sorted(os.listdir(folder)) == sorted([f"stdin.{os.getpid()}.live12.jsonl", os.path.basename(path)])


# --------------------------------------------------------------------------- text hygiene


def bad_text_docs(tmp_path):
    recs = sample_docs(5, 20)
    recs[1]["text"] = "the star\u0000 and the galaxy"
    recs[3]["text"] = "the planet \ud800 orbit"
    path = tmp_path / "dirty.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")  # ensure_ascii: the lone surrogate is written as \\ud800
    return str(path)


def test_nul_and_lone_surrogates_are_repaired_and_counted(tmp_path, caplog):
    from ssae_common.core.records import _Repairs, iter_docs

    path = bad_text_docs(tmp_path)
    _Repairs.reported.discard(path)
    with caplog.at_level(logging.WARNING, logger="ssae"):
        texts = [rec["text"] for rec, _ in iter_docs([path])]
        texts_again = [rec["text"] for rec, _ in iter_docs([path])]
    assert texts[1] == "the star\ufffd and the galaxy" and texts[3] == "the planet \ufffd orbit"
    assert texts_again == texts
    warnings = [r.getMessage() for r in caplog.records if "U+FFFD" in r.getMessage()]
    assert warnings == [f"{path}: 2 record(s) held NUL or lone surrogate characters, replaced by U+FFFD "
                        f"(first at {path}:2)"]


def test_harvest_takes_dirty_text(tmp_path, tiny_model):
    path = bad_text_docs(tmp_path)
    out = tmp_path / "a.h5"
    r = invoke(harvest_main, [path, "--model", tiny_model, "--layer", "1", "-o", out], code=0)
    assert "replaced by U+FFFD" in r.stderr
    from ssae_common.data.activations import ActivationStore

    with ActivationStore(str(out)) as s:
        assert s.n_docs == 5 and "\ufffd" in s.doc_text(1)


@pytest.mark.parametrize("content, where", [
    (b'{"text": "the star"}\n{"text": "bad \xff byte"}\n', "bad.jsonl:2: not UTF-8 text"),
    (b'{"text": "the star"}\n{"text": "cut\n', "bad.jsonl:2: malformed JSON"),
    (b'{"text": "the star"}\n{"title": "no text"}\n', "bad.jsonl:2: record has no 'text' field"),
])
def test_bad_input_is_refused_before_the_model_loads(tmp_path, content, where):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    # the model does not exist: had it been loaded first, the error would be about --model
    r = invoke(harvest_main, [bad, "--model", tmp_path / "no-model", "-o", tmp_path / "a.h5"], code=2)
    assert where in one_error_line(r.stderr, "harvest") and "loading model" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing left to block the corrected rerun


def test_retrieve_takes_dirty_corpus_text(tmp_path):
    corpus = bad_text_docs(tmp_path)
    seeds = write_jsonl(str(tmp_path / "seeds.jsonl"), [{"id": "s", "text": "star galaxy planet"}])
    r = invoke(retrieve_main, [seeds, "--corpus", corpus, "--method", "bm25", "--top-k", "3"], code=0)
    recs = parse_records(r.stdout)
    assert recs and all("\ud800" not in rec["text"] and "\x00" not in rec["text"] for rec in recs)


# --------------------------------------------------------------------------- silent mismatches


def test_init_from_another_hook_is_refused_unless_allowed(tmp_path, store):
    parent = saved_sae(tmp_path / "parent", random_sae(8, 16, architecture="topk", k=2),
                       hook="blocks.0.hook_resid_post")
    r = invoke(fit_main, [store, "--init", parent, "--batch-size", "64", "--val-tokens", "0",
                          "-o", tmp_path / "child"], code=2)
    line = one_error_line(r.stderr, "fit")
    assert f"--init {parent}: the parent was trained on hook 'blocks.0.hook_resid_post'" in line
    assert "--allow-init-mismatch" in line and not (tmp_path / "child").exists()
    r = invoke(fit_main, [store, "--init", parent, "--allow-init-mismatch", "--batch-size", "64", "--val-tokens",
                          "0", "-o", tmp_path / "child"], code=0)
    assert "allowed by --allow-init-mismatch" in r.stderr


def test_eval_refuses_non_finite_activations(tmp_path):
    acts = np.ones((300, 8), np.float32)
    acts[200, 3] = np.nan
    store = make_store(tmp_path / "nan.h5", acts, hook=HOOK)
    sae = saved_sae(tmp_path / "sae", identity_sae(8, signed=False))
    r = invoke(eval_main, [sae, "--activations", store, "-o", tmp_path / "ev"], code=2)
    assert one_error_line(r.stderr, "eval").endswith(f"{store}: NaN or inf in the activations, rows 200-200")
    assert not (tmp_path / "ev").exists() and not glob.glob(str(tmp_path / ".ev*"))


def test_empty_seed_texts_are_named(tmp_path):
    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), sample_docs(20, 20))
    seeds = write_jsonl(str(tmp_path / "seeds.jsonl"), [{"id": "s1", "text": ""}, {"id": "s2", "text": "  "}])
    r = invoke(retrieve_main, [seeds, "--corpus", corpus, "--method", "bm25"], code=2)
    assert f"{seeds}: every seed has empty text ({seeds}:1 (id s1), {seeds}:2 (id s2))" in r.stderr
    assert "--depth" not in r.stderr
    seeds = write_jsonl(str(tmp_path / "some.jsonl"), [{"id": "s1", "text": ""}, {"id": "s2", "text": "star"}])
    r = invoke(retrieve_main, [seeds, "--corpus", corpus, "--method", "bm25", "--top-k", "2"], code=0)
    assert "1 seed(s) with empty text skipped" in r.stderr


def test_auto_ablation_choosing_nothing_says_why():
    from types import SimpleNamespace

    from ssae_common.shift.attribution import why_none_chosen

    cfg = SimpleNamespace(auto_min_drop=0.01)
    assert "no latent in the --slice has a non-zero attribution" in why_none_chosen([], [], cfg)
    assert "does not separate the genders" in why_none_chosen([1], [{"gender_auc": 0.5}], cfg)
    assert "by --auto-min-drop 0.01 or more" in why_none_chosen([1, 2], [{"gender_auc": 0.9}], cfg)


# --------------------------------------------------------------------------- feedback


def test_existing_output_is_refused_before_the_model_loads(tmp_path, docs):
    out = tmp_path / "a.h5"
    out.write_bytes(b"")
    r = invoke(harvest_main, [docs, "--model", tmp_path / "no-model", "-o", out], code=2)
    assert one_error_line(r.stderr, "harvest").endswith(f"{out}: exists (use --force to overwrite)")


def test_progress_starts_with_a_line_and_rates_count_this_run_only(caplog, monkeypatch):
    from ssae_common.core import progress as P

    clock = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="ssae"):
        p = P.Progress("fit", total=2000, unit="tokens", interval=1.0)
        assert caplog.records[-1].getMessage() == "fit: started (2000 tokens in all)"
        p.done = 1000  # resumed: half done by an earlier run
        clock[0] += 10
        p.update(100)
    assert caplog.records[-1].getMessage() == "fit: 1100/2000 tokens (10.0 tokens/s)"


def test_explain_default_is_sized_to_the_lm_and_estimates_time(tmp_path, tiny_model):
    from ssae_tools.harvest import main as harvest

    acts = tmp_path / "acts.h5"
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(20, 30))
    invoke(harvest, [docs, "--model", tiny_model, "--layer", "1", "--dtype", "float32", "-o", acts], code=0)
    sae = saved_sae(tmp_path / "sae", random_sae(16, 64, seed=1), model=tiny_model)
    args = [sae, "--activations", acts, "--explainer-model", tiny_model, "--no-score", "--max-new-tokens", "2",
            "--retries", "0", "--n-explain", "2"]
    r = invoke(explain_main, [*args, "-o", tmp_path / "ex"], code=0)
    rec = parse_records(r.stdout)[0]
    assert rec["n_latents"] == 50
    assert "explaining the first 50 of 64 latents (--latents all" in r.stderr
    assert "the first latent took" in r.stderr


@pytest.mark.parametrize("reply", ["Explanation: Diversity: 100\nDiversity: 100",
                                   "Explanation: 100\nDiversity: 100"])
def test_field_labels_are_not_explanations(reply):
    from ssae_common.explain.explainers import parse_explanation

    assert parse_explanation(reply)["explanation"] is None
