"""A shared, hostile filesystem and careless input: planted files run nothing, a full disk is one line and a
rerun resumes, a refused run leaves nothing behind, and every mistake is one line naming the file or flag,
given before the model loads.  Each test reproduces one case."""
from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys

import h5py
import numpy as np
import pytest

from helpers import identity_sae, invoke, make_store, one_error_line, parse_records, sample_docs, write_jsonl
from ssae_tools.eval import main as eval_main
from ssae_tools.fit import main as fit_main
from ssae_tools.harvest import main as harvest_main
from ssae_tools.retrieve import main as retrieve_main

BIN = os.path.dirname(sys.executable)
HOOK = "blocks.1.hook_resid_post"
FIT = ["--d-sae", "16", "--k", "2", "--batch-size", "64", "--val-tokens", "0", "--warmup-steps", "0"]


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    return make_store(tmp_path / "acts.h5", rng.standard_normal((600, 8)).astype(np.float32), hook=HOOK)


def saved_sae(folder, sae, hook=HOOK, model="synthetic-lm"):
    os.makedirs(folder, exist_ok=True)
    sae.save(str(folder), model=model, hook=hook)
    return str(folder)


class Payload:
    """Unpickling this creates `marker`: proof that a planted file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_limited(args, limit_bytes, **kwargs):
    """Run a tool in a subprocess whose files may not grow past `limit_bytes` (as on a full disk)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([str(a) for a in args], capture_output=True, text=True, preexec_fn=limit, **kwargs)


def same_activations(a, b):
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in ("activations", "token_ids", "doc_index", "position", "docs/id", "docs/text"):
            assert np.array_equal(fa[name][:], fb[name][:]), name


# --------------------------------------------------------------------------- planted files


def test_planted_eval_state_runs_nothing(tmp_path, store, monkeypatch):
    import ssae_common.core.signals as signals
    from ssae_common.core.errors import Interrupted

    class StopAtOnce(signals.StopFlag):
        def check(self, save=None):
            save()
            raise Interrupted("stop")

    sae = saved_sae(tmp_path / "sae", identity_sae(8))
    out = tmp_path / "ev"
    args = [sae, "--activations", store, "--rows", "100", "-o", out]
    monkeypatch.setattr(signals, "StopFlag", StopAtOnce)
    invoke(eval_main, args, code=75)
    monkeypatch.undo()
    state = tmp_path / ".ev.partial.state"
    header = state.read_bytes().split(b"\n", 1)[0]
    assert header.startswith(b"ssae.evalstate/1 ")
    marker = tmp_path / "ran"
    # this run's own first line, then a pickle; then a pickle alone (what the state used to be)
    for planted in (header + b"\n{}\n" + pickle.dumps(Payload(marker)), pickle.dumps(Payload(marker))):
        state.write_bytes(planted)
        invoke(eval_main, [*args, "--force"], code=0)
        assert not marker.exists() and not state.exists()
    whole = json.loads((out / "metrics.json").read_text())
    assert whole["n_tokens"] == 600


def test_planted_links_are_refused_and_their_targets_kept(tmp_path, store):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    sae = saved_sae(tmp_path / "sae", identity_sae(8))
    for name, tool, args in [
            (".ev.partial.lock", eval_main, [sae, "--activations", store, "-o", tmp_path / "ev"]),
            (".ev.partial.state", eval_main, [sae, "--activations", store, "-o", tmp_path / "ev"]),
            (".ft.partial.lock", fit_main, [store, *FIT, "-o", tmp_path / "ft"])]:
        link = tmp_path / name
        link.symlink_to(victim)
        r = invoke(tool, args, code=2)
        assert f"{link}: a symbolic link where ssae keeps its partial output" in r.stderr
        assert victim.read_text() == "precious" and link.is_symlink()
        link.unlink()
    # a dangling link is not followed either (it would create the file it names)
    (tmp_path / ".ev.partial.lock").symlink_to(tmp_path / "created")
    invoke(eval_main, [sae, "--activations", store, "-o", tmp_path / "ev"], code=2)
    assert not (tmp_path / "created").exists()


def test_planted_harvest_partial_link_is_refused(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(5, 20))
    link = tmp_path / ".a.h5.partial"
    link.symlink_to(tmp_path / "elsewhere.h5")
    r = invoke(harvest_main, [docs, "--model", tiny_model, "--hook", HOOK, "-o", tmp_path / "a.h5"], code=2)
    assert f"{link}: a symbolic link" in one_error_line(r.stderr, "harvest")
    assert not (tmp_path / "elsewhere.h5").exists()


# --------------------------------------------------------------------------- a full disk


def test_full_disk_during_harvest_is_one_line_and_the_rerun_resumes(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(120, 60, seed=1))
    args = [docs, "--model", tiny_model, "--hook", HOOK, "--context-size", "32", "--batch-size", "4",
            "--dtype", "float32", "--device", "cpu", "-q"]
    out = tmp_path / "a.h5"
    r = run_limited([os.path.join(BIN, "ssae-harvest"), *args, "-o", out], 3_000_000)
    assert r.returncode == 1, r.stderr
    partial = tmp_path / ".a.h5.partial"
    assert one_error_line(r.stderr, "harvest") == (
        f"ssae-harvest: error: {partial}: no space left on the device (or the file size limit was reached); the "
        "partial output is kept: free space and rerun to resume, or --force to start over")
    assert "Traceback" not in r.stderr and not out.exists()
    with h5py.File(partial, "r") as f:
        assert 0 < f.attrs["n_tokens"]
    r = invoke(harvest_main, [*args, "-o", out], code=0)
    assert "resuming" not in r.stderr  # -q
    invoke(harvest_main, [*args, "-o", tmp_path / "whole.h5"], code=0)
    same_activations(out, tmp_path / "whole.h5")


def test_full_disk_during_retrieve_and_eval_is_one_line(tmp_path, store):
    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), sample_docs(400, 30, seed=2))
    seeds = write_jsonl(str(tmp_path / "seeds.jsonl"), [{"id": "s", "text": "star planet orbit"}])
    out = tmp_path / "picked.jsonl"
    r = run_limited([os.path.join(BIN, "ssae-retrieve"), seeds, "--corpus", corpus, "--top-k", "300", "-o", out],
                    20_000)
    assert r.returncode == 1 and "no space left on the device" in one_error_line(r.stderr, "retrieve"), r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    sae = saved_sae(tmp_path / "sae", identity_sae(8))
    ev = tmp_path / "ev"
    r = run_limited([os.path.join(BIN, "ssae-eval"), sae, "--activations", store, "-o", ev], 20_000)
    assert r.returncode == 1, r.stderr
    assert one_error_line(r.stderr, "eval").startswith(f"ssae-eval: error: {ev}: no space left on the device")
    assert not ev.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".ev.")]
    invoke(eval_main, [sae, "--activations", store, "-o", ev], code=0)


def test_stdin_spool_is_removed_on_a_full_disk(tmp_path, tiny_model):
    work = tmp_path / "work"
    text = "".join(json.dumps(d) + "\n" for d in sample_docs(400, 60))
    r = run_limited([os.path.join(BIN, "ssae-harvest"), "--model", tiny_model, "--hook", HOOK], 10_000,
                    input=text, env={**os.environ, "SSAE_WORKDIR": str(work)})
    assert r.returncode == 1 and "no space left on the device" in one_error_line(r.stderr, "harvest"), r.stderr
    assert os.listdir(work / "tmp") == []


# --------------------------------------------------------------------------- raw exceptions


def test_output_under_a_file_is_named(tmp_path, store):
    (tmp_path / "file").write_text("x")
    r = invoke(fit_main, [store, *FIT, "-o", tmp_path / "file" / "sae"], code=2)
    assert one_error_line(r.stderr, "fit").endswith(f"{tmp_path / 'file'}: cannot create output folder "
                                                    f"({tmp_path / 'file'} is a file)")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder (holding an empty tmp/) this process cannot write into: by its mode for a user; for root,
    whom modes do not stop, a read-only tmpfs mounted there (skipped where mounting is not allowed)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        (ro / "tmp").mkdir()
        ro.chmod(0o555)
        (ro / "tmp").chmod(0o555)
        yield ro
        (ro / "tmp").chmod(0o755)
        ro.chmod(0o755)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ro)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("root, and no read-only mount allowed here: " + mount.stderr.decode().strip())
    try:
        (ro / "tmp").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_read_only_output_folder_and_workdir_are_named(read_only_folder, store, tiny_model, monkeypatch):
    ro = read_only_folder
    r = invoke(fit_main, [store, *FIT, "-o", ro / "sae"], code=2)
    assert one_error_line(r.stderr, "fit").endswith(f"{ro}: output folder is not writable")
    monkeypatch.setenv("SSAE_WORKDIR", str(ro))
    r = invoke(harvest_main, ["--model", tiny_model, "--hook", HOOK], input='{"text": "a b"}\n', code=2)
    assert f"{ro / 'tmp'}: cannot keep a copy of stdin there" in one_error_line(r.stderr, "harvest")


def test_closed_stdout_pipe_stops_quietly(tmp_path):
    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), sample_docs(3000, 20, seed=3))
    seeds = write_jsonl(str(tmp_path / "seeds.jsonl"), [{"id": "s", "text": "star planet"}])
    proc = subprocess.Popen([os.path.join(BIN, "ssae-retrieve"), seeds, "--corpus", corpus, "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(10)) == 10  # `| head -c 10`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Error" not in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- fit: checkpoints and sweeps


def interrupt_after(monkeypatch, checks):
    """Make the next run's stop flag ask for a stop at its `checks`-th check (as a signal would)."""
    import ssae_common.core.signals as signals

    class Flag(signals.StopFlag):
        def check(self, save=None):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls >= checks:
                self.signum = 15
            super().check(save)

    monkeypatch.setattr(signals, "StopFlag", Flag)


def test_planted_checkpoint_runs_nothing(tmp_path, store, monkeypatch):
    import torch

    out = tmp_path / "ft"
    args = [store, *FIT, "--train-tokens", "6400", "--checkpoint-every", "5", "-o", out]
    interrupt_after(monkeypatch, 20)
    invoke(fit_main, args, code=75)
    monkeypatch.undo()
    checkpoint = tmp_path / ".ft.partial" / "checkpoint.pt"
    assert oct(os.stat(checkpoint.parent).st_mode & 0o777) == "0o700"  # nobody else can plant files inside
    marker = tmp_path / "ran"
    torch.save({"step": Payload(marker)}, checkpoint)
    r = invoke(fit_main, args, code=0)
    assert not marker.exists() and f"{checkpoint}: not a checkpoint ssae wrote" in r.stderr
    assert "starting over" in r.stderr and json.loads(r.stdout)["tokens"] == 6400


def test_full_disk_during_fit_is_one_line_and_the_rerun_works(tmp_path, store):
    out = tmp_path / "ft"
    args = [store, *FIT, "--d-sae", "4096", "--train-tokens", "6400", "--checkpoint-every", "5", "-o", out]
    r = run_limited([os.path.join(BIN, "ssae-fit"), *args], 200_000)
    assert r.returncode == 1, r.stderr
    assert one_error_line(r.stderr, "fit").startswith(f"ssae-fit: error: {tmp_path / '.ft.partial'}: no space left "
                                                      "on the device"), r.stderr
    assert not out.exists() and "Traceback" not in r.stderr
    invoke(fit_main, args, code=0)


def sweep_weights(folder):
    from safetensors.numpy import load_file

    return {name: load_file(os.path.join(folder, name, "sae.safetensors")) for name in sorted(os.listdir(folder))}


def test_sweep_under_o_resumes_after_a_signal_between_seeds(tmp_path, store, monkeypatch):
    import signal

    import ssae_common.sae.train as train

    sweep = [store, *FIT, "--train-tokens", "3200", "--tilt", "0,10", "--seed", "0,1"]
    invoke(fit_main, [*sweep, "-o", tmp_path / "whole"], code=0)
    write = train._write
    written = []

    def write_then_signal(*args, **kwargs):
        written.append(write(*args, **kwargs))
        if len(written) == 2:  # the first seed's two SAEs are written: a Ctrl-C before the second seed
            os.kill(os.getpid(), signal.SIGINT)
        return written[-1]

    monkeypatch.setattr(train, "_write", write_then_signal)
    out = tmp_path / "sw"
    r = invoke(fit_main, [*sweep, "-o", out], code=75)
    assert "rerun the same command to resume" in r.stderr
    assert sorted(os.listdir(out)) == ["tilt0-seed0", "tilt10-seed0"]
    monkeypatch.undo()
    r = invoke(fit_main, [*sweep, "-o", out], code=0)
    assert "2 of 4 SAEs already trained" in r.stderr and len(parse_records(r.stdout)) == 4
    whole, resumed = sweep_weights(tmp_path / "whole"), sweep_weights(out)
    assert whole.keys() == resumed.keys() and len(whole) == 4
    for name in whole:
        assert all(np.array_equal(whole[name][k], resumed[name][k]) for k in whole[name]), name
    # the sweep is complete: overwritten only with --force, as one output is
    r = invoke(fit_main, [*sweep, "-o", out], code=2)
    assert one_error_line(r.stderr, "fit").endswith(f"{out / 'tilt0-seed0'}: exists (use --force to overwrite)")


# --------------------------------------------------------------------------- named in one line, before work


def test_bad_sae_config_and_activation_file_are_named(tmp_path, store):
    sae = saved_sae(tmp_path / "sae", identity_sae(8))
    cfg = json.loads(open(os.path.join(sae, "cfg.json")).read())
    cfg["d_sae"] = "16"
    with open(os.path.join(sae, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    r = invoke(eval_main, [sae, "--activations", store, "-o", tmp_path / "ev"], code=2)
    assert one_error_line(r.stderr, "eval").endswith(f"{sae}/cfg.json: d_sae is \"16\", expected a positive integer")
    bare = tmp_path / "bare.h5"
    with h5py.File(store, "r") as f, h5py.File(bare, "w") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
    r = invoke(fit_main, [bare, *FIT, "-o", tmp_path / "ft"], code=2)
    assert one_error_line(r.stderr, "fit").endswith(f"{bare}: no /activations dataset: not a whole "
                                                    "ssae.activations/1 file")


def test_malformed_metrics_file_is_named(tmp_path):
    from ssae_tools.tables import main as tables_main

    bad = tmp_path / "metrics.json"
    bad.write_text('{"schema": "ssae.metrics/1", "n_tokens": 5, "saes": [1, 2]}')
    r = invoke(tables_main, [bad], code=2)
    assert one_error_line(r.stderr, "tables").startswith(f"ssae-tables: error: {bad}: a malformed ssae.metrics/1 "
                                                         "file (")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_input_is_named_before_the_model_loads(tmp_path, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    no_model = tmp_path / "no-model"  # were it loaded first, the error would be about --model
    r = invoke(harvest_main, [empty, "--model", no_model, "-o", tmp_path / "a.h5"], code=2)
    assert one_error_line(r.stderr, "harvest").endswith(f"{empty}: no documents")
    r = invoke(harvest_main, ["--model", no_model, "-o", tmp_path / "a.h5"], input=content, code=2)
    assert one_error_line(r.stderr, "harvest").endswith("<stdin>: no documents")
    sae = saved_sae(tmp_path / "sae", identity_sae(8), model=str(no_model))
    r = invoke(eval_main, [sae, "--docs", empty, "--model", no_model, "--hook", HOOK, "-o", tmp_path / "ev"], code=2)
    assert one_error_line(r.stderr, "eval").endswith(f"{empty}: no documents")
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl", "sae", "ssae-work"]
    assert os.listdir(tmp_path / "ssae-work" / "tmp") == []  # the stdin spool too


@pytest.mark.parametrize("args, message", [
    (["--hook", "blocks.1.hook_resid_pots"], "--hook blocks.1.hook_resid_pots: not a hook of MODEL (did you mean "
                                             "blocks.1.hook_resid_post"),
    (["--hook", "blocks.9.hook_resid_post"], "--hook blocks.9.hook_resid_post: not a hook of MODEL"),
    (["--hook", "resid_post"], "--hook resid_post: not a hook of MODEL"),
    (["--device", "gpu"], "--device gpu: expected auto, cpu or cuda[:N]"),
])
def test_hook_and_device_are_checked_before_the_documents_are_read(tmp_path, tiny_model, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "cut\n')  # read first, this would be the error
    r = invoke(harvest_main, [bad, "--model", tiny_model, "--hook", HOOK, *args, "-o", tmp_path / "a.h5"], code=2)
    assert message.replace("MODEL", tiny_model) in one_error_line(r.stderr, "harvest")


@pytest.mark.parametrize("args, message", [
    (["--stopwords", "xx"], "--stopwords xx: expected en, en_plus or none"),
    (["--stemmer", "xx"], "--stemmer xx: unknown language"),
    (["--method", "dense", "--dense-model", "./no/such"], "--dense-model ./no/such: no such folder"),
    (["--rerank", "tracin", "--sae", "no-such-sae"], "--sae no-such-sae: no such SAE folder"),
])
def test_retrieval_settings_are_checked_before_the_corpus_is_read(tmp_path, args, message):
    seeds = write_jsonl(str(tmp_path / "seeds.jsonl"), [{"id": "s", "text": "star"}])
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "cut\n')  # read first, this would be the error
    r = invoke(retrieve_main, [seeds, "--corpus", corpus, *args], code=2)
    assert message in one_error_line(r.stderr, "retrieve")


def test_environment_values_and_names_are_named_as_typed(store, monkeypatch):
    monkeypatch.setenv("SSAE_FIT_BATCH_SIZE", "x")
    r = invoke(fit_main, [store], code=2)
    assert one_error_line(r.stderr, "fit") == ("ssae-fit: error: SSAE_FIT_BATCH_SIZE: 'x' is not a valid integer, "
                                               "for --batch-size (see --help)")
    monkeypatch.delenv("SSAE_FIT_BATCH_SIZE")
    monkeypatch.setenv("SSAE_FIT_tilt", "3")
    r = invoke(fit_main, [store], code=2)
    assert one_error_line(r.stderr, "fit").endswith("SSAE_FIT_tilt: no ssae tool reads this environment variable "
                                                    "(did you mean SSAE_FIT_TILT?)")


# --------------------------------------------------------------------------- documents


def test_long_document_is_cut_before_tokenising_and_stored_bounded(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    words = " ".join(["star", "planet", "orbit", "the", "galaxy"] * 100_000)  # one 2.6 MB line
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), [{"id": ["a", 1], "text": words}])
    out = tmp_path / "a.h5"
    invoke(harvest_main, [docs, "--model", tiny_model, "--hook", HOOK, "--max-tokens-per-doc", "40",
                          "--context-size", "16", "-o", out], code=0)
    full = AutoTokenizer.from_pretrained(tiny_model)(words[:100_000], add_special_tokens=False)["input_ids"]
    with h5py.File(out, "r") as f:
        stored = f["docs/text"][0].decode()
        assert len(stored) < 10_000 and words.startswith(stored)
        kept = [t for t, p in zip(f["token_ids"][:], f["position"][:]) if p > 0]
        assert kept == full[:40]
        assert f["docs/id"][0].decode() == '["a", 1]'  # JSON, not a Python repr


# --------------------------------------------------------------------------- explain


@pytest.fixture
def explain_setup(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(20, 30))
    invoke(harvest_main, [docs, "--model", tiny_model, "--hook", HOOK, "-o", tmp_path / "acts.h5", "-q"], code=0)
    sae = tmp_path / "sae"
    sae.mkdir()
    identity_sae(16).save(str(sae), model=tiny_model, hook=HOOK)
    return {"acts": str(tmp_path / "acts.h5"), "sae": str(sae), "model": tiny_model}


def test_refused_explain_leaves_nothing_that_blocks_the_corrected_run(tmp_path, explain_setup):
    from ssae_tools.explain import main as explain_main

    args = [explain_setup["sae"], "--activations", explain_setup["acts"], "--explainer", "none", "--latents", "0-3",
            "-o", tmp_path / "ex"]
    r = invoke(explain_main, [*args, "--model", "no-such/model"], code=2)
    assert "--model no-such/model" in one_error_line(r.stderr, "explain")
    assert not (tmp_path / ".ex.partial").exists()
    invoke(explain_main, args, code=0)


def test_explain_refuses_activations_of_another_hook(tmp_path, explain_setup):
    from ssae_tools.explain import main as explain_main

    other = tmp_path / "other"
    other.mkdir()
    identity_sae(16).save(str(other), model=explain_setup["model"], hook="blocks.0.hook_resid_post")
    r = invoke(explain_main, [other, "--activations", explain_setup["acts"], "--explainer", "none",
                              "-o", tmp_path / "ex"], code=2)
    assert f"{other}: SAE was trained on model" in one_error_line(r.stderr, "explain")
    assert f"at hook 'blocks.0.hook_resid_post', but {explain_setup['acts']}" in r.stderr


def test_endpoint_credentials_are_never_stored_or_shown(tmp_path, explain_setup):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ssae_tools.explain import main as explain_main

    seen = []

    class Echo(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # refuses, echoing the request's Authorization header in its body
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.end_headers()
            self.wfile.write(f'{{"error": "bad key", "Authorization": "{self.headers.get("Authorization")}"}}'.encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://alice:s3cr3t@127.0.0.1:{server.server_address[1]}/v1"
        r = invoke(explain_main, [explain_setup["sae"], "--activations", explain_setup["acts"], "--explainer", "openai",
                                  "--explainer-url", url, "--explainer-model", "m", "--latents", "0", "-o",
                                  tmp_path / "ex"])
    finally:
        server.shutdown()
        server.server_close()
    assert r.exit_code == 1 and seen and seen[0].startswith("Basic ")
    line = one_error_line(r.stderr, "explain")
    assert "HTTP 401" in line and "http://***@127.0.0.1" in line
    secret_forms = ("s3cr3t", seen[0].split()[1])
    kept = "".join(open(os.path.join(root, name), errors="replace").read()
                   for root, _, names in os.walk(tmp_path / ".ex.partial") for name in names if name.endswith("json"))
    assert kept and not any(s in r.stderr + r.stdout + kept for s in secret_forms)


def test_planted_link_in_the_dense_cache_is_refused(tmp_path):
    from ssae_common.core.errors import BadInput
    from ssae_common.retrieval import dense as D
    from ssae_common.retrieval import engines as R
    from ssae_common.retrieval.config import DEFAULT_DENSE_MODEL

    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), sample_docs(10, 10))
    store = R.CorpusStore.open_or_build([corpus], quiet=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    backend = D.resolve_dense_backend("auto", DEFAULT_DENSE_MODEL, "cpu")
    lock = D.DenseIndex.cache_path(store, backend=backend) + ".lock"
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    os.symlink(victim, lock)
    with pytest.raises(BadInput, match="a symbolic link where ssae keeps its partial output"):
        D.DenseIndex(store)
    assert victim.read_text() == "precious"
