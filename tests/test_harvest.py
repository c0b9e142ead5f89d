import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from helpers import WORDS, invoke, parse_records, sample_docs, write_jsonl
from ssae_common.core.config import ConfigError
from ssae_common.core.runtime import RunContext
from ssae_common.data import HarvestConfig
from ssae_common.data.activations import ActivationStore, activation_artifact
from ssae_common.data.harvester import spread_cap
from ssae_common.data.models import load_model
from ssae_tools.harvest import main as harvest
from ssae_tools.retrieve import main as retrieve
from ssae_tools.tables import main as tables

BIN = os.path.join(os.path.dirname(sys.executable), "ssae-harvest")


def run(args, input=None):
    return invoke(harvest, args, input=input)


@pytest.fixture
def docs(tmp_path):
    return write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(30, 40))


def test_harvest_writes_the_design_layout(tmp_path, tiny_model, docs):
    out = tmp_path / "acts.h5"
    r = run([docs, "--model", tiny_model, "--layer", "1", "--context-size", "16", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    records = parse_records(r.stdout)
    assert len(records) == 1
    rec = records[0]
    assert rec["schema"] == "ssae.artifact/1" and rec["kind"] == "activations"
    assert rec["path"] == str(out) and rec["hook"] == "blocks.1.hook_resid_post"
    with h5py.File(out) as f:
        a = f.attrs
        for key in ("schema", "model", "hook", "d_model", "context_size", "dtype", "bos_dropped", "n_tokens",
                    "n_docs", "complete", "config", "created_by"):
            assert key in a, key
        assert a["complete"] and a["schema"] == "ssae.activations/1" and a["d_model"] == 16
        n = int(a["n_tokens"])
        assert f["activations"].shape == (n, 16) and f["activations"].dtype == np.float16
        assert f["activations"].chunks is not None and f["activations"].maxshape == (None, 16)
        for name in ("token_ids", "doc_index", "position"):
            assert f[name].shape == (n,) and f[name].dtype == np.int32
        assert f["docs/id"].shape == (30,) and f["docs/text"][0].decode().startswith(json.loads(
            open(docs).readline())["text"][:10])
        assert json.loads(a["created_by"])["tool"] == "ssae-harvest"
        assert json.loads(a["config"])["context_size"] == 16
        assert 1 not in set(f["token_ids"][:].tolist())  # BOS dropped
        assert f["position"][:].min() == 1


def test_activations_match_a_direct_forward_pass(tmp_path, tiny_model, docs):
    out = tmp_path / "acts.h5"
    r = run([docs, "--model", tiny_model, "--hook", "blocks.0.hook_resid_post", "--context-size", "8",
             "--batch-size", "5", "--dtype", "float32", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    lm = load_model(tiny_model)
    first = json.loads(open(docs).readline())["text"]
    tokens = lm.tokenize(first)[:7]  # the first window: BOS + 7 tokens
    direct = lm.activations(torch.tensor([[1] + tokens]), "blocks.0.hook_resid_post")[0, 1:]
    with ActivationStore(str(out)) as s:
        np.testing.assert_allclose(s.rows(0, 7), direct.numpy(), rtol=1e-5, atol=1e-5)
        assert s.token_ids(0, 7).tolist() == tokens
        # padding in a batch never changes real positions: batch size 1 gives the same rows
        out1 = tmp_path / "acts1.h5"
        assert run([docs, "--model", tiny_model, "--hook", "blocks.0.hook_resid_post", "--context-size", "8",
                    "--batch-size", "1", "--dtype", "float32", "-o", str(out1)]).exit_code == 0
        with ActivationStore(str(out1)) as s1:
            np.testing.assert_allclose(s.rows(0, s.n_tokens), s1.rows(0, s1.n_tokens), rtol=1e-5, atol=1e-5)


def test_max_tokens_keep_bos_bfloat16_and_short_docs(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "d.jsonl"),
                       [{"id": "empty", "text": ""}] + sample_docs(10, 40) + [{"id": "blank", "text": "   "}])
    out = tmp_path / "a.h5"
    r = run([docs, "--model", tiny_model, "--layer", "0", "--keep-bos", "--max-tokens", "100", "--dtype",
             "bfloat16", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    with ActivationStore(str(out)) as s:
        assert s.n_tokens == 100 and s.f["activations"].dtype == np.uint16
        assert s.token_ids(0, 1)[0] == 1 and s.position(0, 1)[0] == 0  # BOS kept
        assert np.isfinite(s.rows(0, 100)).all()
    r = run([docs, "--model", tiny_model, "--layer", "0", "-o", str(tmp_path / "b.h5")])
    assert "2 document(s) shorter than 1 token(s) were skipped" in r.stderr


def test_shards_partition_the_documents(tmp_path, tiny_model, docs):
    ids = []
    for i in range(3):
        out = tmp_path / f"s{i}.h5"
        assert run([docs, "--model", tiny_model, "--layer", "0", "--shard", f"{i}/3", "-o", str(out)]).exit_code == 0
        with ActivationStore(str(out)) as s:
            ids += [s.doc_id(j) for j in range(s.n_docs)]
            assert s.f["docs/input_index"][:].tolist() == list(range(i, 30, 3))
    assert sorted(ids) == sorted(f"d{i}" for i in range(30))


def test_env_and_config_file_set_options(tmp_path, tiny_model, docs, monkeypatch):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'model = "{tiny_model}"\n[harvest]\ncontext-size = 12\nlayer = 0\n')
    monkeypatch.setenv("SSAE_HARVEST_DTYPE", "float32")
    out = tmp_path / "a.h5"
    r = run([docs, "--config", str(cfg), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    with ActivationStore(str(out)) as s:
        assert s.context_size == 12 and s.dtype == "float32" and s.hook == "blocks.0.hook_resid_post"


def test_default_output_is_reused(tmp_path, tiny_model, docs):
    args = [docs, "--model", tiny_model, "--layer", "0"]
    first = parse_records(run(args).stdout)[0]
    assert first["path"].startswith(os.environ["SSAE_WORKDIR"])
    r = run(args)
    assert r.exit_code == 0 and "reusing" in r.stderr
    assert parse_records(r.stdout)[0]["path"] == first["path"]


def test_stdin_pipe_from_a_real_shell(tmp_path, tiny_model, docs):
    out = tmp_path / "a.h5"
    p = subprocess.run(f"cat {docs} | {BIN} --model {tiny_model} --layer 0 -o {out}", shell=True,
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["kind"] == "activations"
    assert out.exists()


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "text": "the star"}\n{"id": "b", "text": "the\n', r"docs.jsonl:2: malformed JSON"),
    ('{"id": "a", "text": "the star"}\n{"id": "b"}\n', r"docs.jsonl:2: record has no 'text' field"),
    ('', r"docs.jsonl: no documents"),
])
def test_bad_documents_exit_2_and_leave_nothing(tmp_path, tiny_model, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    out = tmp_path / "out" / "a.h5"
    r = run([str(path), "--model", tiny_model, "--layer", "0", "-o", str(out)])
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("ssae-harvest: error: ")
    assert message.replace("\\", "") in r.stderr or __import__("re").search(message, r.stderr)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_unknown_hook_lists_close_names_and_the_valid_hooks(tmp_path, tiny_model, docs):
    r = run([docs, "--model", tiny_model, "--hook", "blocks.1.hook_resid_pst", "-o", str(tmp_path / "a.h5")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--hook blocks.1.hook_resid_pst: not a hook of" in r.stderr
    assert "did you mean blocks.1.hook_resid_post" in r.stderr
    assert ("valid: blocks.L.{hook_resid_pre, hook_resid_mid, hook_resid_post, hook_mlp_out, attn.hook_z} "
            "for L in 0..1") in r.stderr
    assert not (tmp_path / "a.h5").exists()
    # hooks TransformerLens has but SAE libraries do not train on, and layers the model lacks: refused
    # from config.json, before the model loads
    for hook in ("blocks.1.ln1.hook_normalized", "blocks.2.hook_resid_post", "hook_embed"):
        r = run([docs, "--model", tiny_model, "--hook", hook, "-o", str(tmp_path / "a.h5")])
        assert r.exit_code == 2 and f"--hook {hook}: not a hook of" in r.stderr and "loading model" not in r.stderr


def test_existing_output_needs_force_and_unwritable_folder(tmp_path, tiny_model, docs):
    out = tmp_path / "a.h5"
    out.write_text("precious")
    r = run([docs, "--model", tiny_model, "--layer", "0", "-o", str(out)])
    assert r.exit_code == 2 and "a.h5: exists (use --force to overwrite)" in r.stderr
    assert out.read_text() == "precious"
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run([docs, "--model", tiny_model, "--layer", "0", "-o", str(blocker / "a.h5")])
    assert r.exit_code == 2 and "cannot create output folder" in r.stderr


def test_no_input_on_a_terminal_is_a_usage_error(monkeypatch, tiny_model):
    monkeypatch.setattr("ssae_common.core.records.stdin_is_terminal", lambda: True)
    monkeypatch.setattr("ssae_common.data.stage.stdin_is_terminal", lambda: True)
    r = run(["--model", tiny_model, "--layer", "0"])
    assert r.exit_code == 2 and "no input" in r.stderr


def _read_all(path):
    with ActivationStore(str(path)) as s:
        return (s.rows(0, s.n_tokens), s.token_ids(), s.doc_index(), s.position(),
                [s.doc_id(i) for i in range(s.n_docs)])


def _checkpointed_tokens(partial):
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f.attrs["n_tokens"])
    except Exception:  # not created yet, or being written
        return 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_harvest_resumes_to_the_same_file(tmp_path, tiny_model, sig):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(300, 40, seed=1))
    base = [docs, "--model", tiny_model, "--layer", "1", "--context-size", "16", "--batch-size", "4"]
    whole = tmp_path / "whole.h5"
    assert run(base + ["-o", str(whole)]).exit_code == 0

    out = tmp_path / "resumed.h5"
    partial = tmp_path / ".resumed.h5.partial"
    proc = subprocess.Popen([BIN, *base, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _checkpointed_tokens(partial) < 200:
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 75, stderr
        assert "checkpoint saved" in stderr
    assert stdout == "" and not out.exists() and partial.exists()
    assert 0 < _checkpointed_tokens(partial) < 8000
    with pytest.raises(Exception, match="incomplete activation file"):
        ActivationStore(str(partial))

    other = run(base + ["--max-tokens", "5000", "-o", str(out)])  # another configuration: refused, kept
    assert other.exit_code == 2 and other.stderr.strip().endswith(
        f"{partial}: an interrupted harvest with a different configuration is there (use --force to start over)")
    assert partial.exists()
    rerun = ["--force"] if sig == signal.SIGTERM else []  # --force (as make passes it) resumes too
    r = run(base + ["-o", str(out), *rerun])
    assert r.exit_code == 0, r.stderr
    assert "resuming" in r.stderr
    assert not partial.exists()
    a, b = _read_all(whole), _read_all(out)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.integration
def test_real_bundled_model_few_thousand_tokens(tmp_path, shared_data):
    docs = os.path.join(shared_data, "physics", "astro_ph_seeds.jsonl")
    out = tmp_path / "acts.h5"
    r = run([docs, "--hook", "blocks.6.hook_resid_post", "--max-tokens", "3000", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    rec = parse_records(r.stdout)
    assert len(rec) == 1 and rec[0]["n_tokens"] == 3000 and rec[0]["d_model"] == 576
    with ActivationStore(str(out)) as s:
        assert s.model == "smollm2" and s.n_tokens == 3000
        x = s.rows(0, 3000)
        assert np.isfinite(x).all() and x.std() > 0


def test_merged_shards_equal_an_unsharded_run(tmp_path, tiny_model, docs):
    base = [docs, "--model", tiny_model, "--layer", "1", "--context-size", "12", "--dtype", "float32"]
    assert run(base + ["-o", str(tmp_path / "whole.h5")]).exit_code == 0
    shards = []
    for i in range(3):
        shards.append(str(tmp_path / f"s{i}.h5"))
        assert run(base + ["--shard", f"{i}/3", "-o", shards[-1]]).exit_code == 0
    records = "".join(json.dumps({"schema": "ssae.artifact/1", "kind": "activations", "path": p}) + "\n"
                      for p in reversed(shards))
    r = run(["--merge", "-o", str(tmp_path / "merged.h5")], input=records)
    assert r.exit_code == 0, r.stderr
    assert parse_records(r.stdout)[0]["n_docs"] == 30
    whole, merged = _read_all(tmp_path / "whole.h5"), _read_all(tmp_path / "merged.h5")
    np.testing.assert_allclose(whole[0], merged[0], rtol=1e-5, atol=1e-5)  # batch shapes differ per shard
    for x, y in zip(whole[1:], merged[1:]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with ActivationStore(str(tmp_path / "merged.h5")) as s:
        assert s.doc_text(0) == json.loads(open(docs).readline())["text"]
    # the merged composition is counted over all shards: what the unsharded run counted
    assert parse_records(r.stdout)[0]["composition"] == activation_artifact(str(tmp_path / "whole.h5"))["composition"]


def test_two_writers_of_one_output_are_refused(tmp_path, tiny_model, docs):
    from ssae_common.core.outputs import exclusive

    out = tmp_path / "a.h5"
    with exclusive(str(out)):
        r = run([docs, "--model", tiny_model, "--layer", "0", "-o", str(out)])
    assert r.exit_code == 2 and f"another process is writing {out} (pid {os.getpid()})" in r.stderr
    assert run([docs, "--model", tiny_model, "--layer", "0", "-o", str(out)]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "docs.jsonl"]


def test_harvest_from_python_without_click(tmp_path, tiny_model, docs):
    from ssae_common.data import harvest as harvest_stage

    config = HarvestConfig(model=tiny_model, layer=1, context_size=16)
    out = str(tmp_path / "acts.h5")
    record = harvest_stage(config, [docs], out=out, context=RunContext(device_spec="cpu"))
    assert record["schema"] == "ssae.artifact/1" and record["kind"] == "activations" and record["path"] == out
    assert record["hook"] == "blocks.1.hook_resid_post" and record["d_model"] == 16
    with ActivationStore(out) as s:
        assert s.n_tokens == record["n_tokens"] > 0 and s.n_docs == record["n_docs"] == 30
        assert s.attrs["created_by"]["tool"] == "python"
        assert s.attrs["config"]["shard"] == "0/1"
    # the default output is named by the inputs and configuration, and reused
    first = harvest_stage(config, [docs], context=RunContext(device_spec="cpu"))
    assert first["path"].startswith(os.environ["SSAE_WORKDIR"])
    assert harvest_stage(config, [docs], context=RunContext(device_spec="cpu")) == first


def test_config_errors_name_the_field_in_python_and_the_flag_on_the_command_line(tmp_path, tiny_model, docs):
    with pytest.raises(ConfigError, match=r"^context_size 1: must be at least 2$"):
        HarvestConfig(context_size=1).check()
    with pytest.raises(ConfigError, match=r"^layer 1: give a hook or a layer, not both$"):
        HarvestConfig(hook="blocks.0.hook_resid_post", layer=1).resolve()
    with pytest.raises(ConfigError, match=r"^shard '3/2': need 0 <= i < n$"):
        HarvestConfig(shard="3/2").check()
    for args, message in [(["--context-size", "1"], "--context-size 1: must be at least 2"),
                          (["--hook", "blocks.0.hook_resid_post", "--layer", "1"],
                           "--layer 1: give a hook or a layer, not both"),
                          (["--shard", "1/x"], "--shard 1/x: expected i/n, e.g. 0/4")]:
        r = run([docs, "--model", tiny_model, *args, "-o", str(tmp_path / "a.h5")])
        assert r.exit_code == 2 and r.stderr.strip() == f"ssae-harvest: error: {message}", r.stderr
    assert not (tmp_path / "a.h5").exists()


def test_resolve_names_the_hook_and_the_shard(monkeypatch):
    assert HarvestConfig().resolve().hook == "blocks.6.hook_resid_post"
    resolved = HarvestConfig(layer=2, shard="01/3").resolve()
    assert (resolved.hook, resolved.layer, resolved.shard, resolved.shard_index) == (
        "blocks.2.hook_resid_post", None, "1/3", (1, 3))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    assert HarvestConfig().resolve().shard == "2/4"
    assert HarvestConfig().shard_index == (0, 1)  # only resolve() reads the SLURM variables


# ---------------------------------------------------------------- what goes in: caps, spread, composition


def counted_doc(doc_id: str, n_words: int, source: str | None = None, offset: int = 0) -> dict:
    """A document of exactly `n_words` tokens for the tiny model's word-level tokenizer."""
    doc = {"id": doc_id, "text": " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))}
    return {**doc, "source": source} if source else doc


def _rows_per_doc(path) -> list[int]:
    with h5py.File(path) as f:
        return np.bincount(f["doc_index"][:]).tolist()


def test_per_document_cap_and_exact_composition(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), [
        counted_doc("a", 50, "arxiv"), counted_doc("b", 10, "news", offset=7), counted_doc("c", 30)])
    base = [docs, "--model", tiny_model, "--layer", "0", "--context-size", "16"]
    r = run(base + ["--max-tokens-per-doc", "20", "-o", str(tmp_path / "capped.h5")])
    assert r.exit_code == 0, r.stderr
    rec = parse_records(r.stdout)[0]
    assert rec["n_tokens"] == 50 and _rows_per_doc(tmp_path / "capped.h5") == [20, 10, 20]
    assert rec["composition"] == {"sources": {"arxiv": 0.4, "unknown": 0.4, "news": 0.2}, "max_doc_share": 0.4,
                                  "n_docs": 3, "doc_cap": 20, "docs_cut": 2}
    first_doc = load_model(tiny_model).tokenize(json.loads(open(docs).readline())["text"])
    with h5py.File(tmp_path / "capped.h5") as f:
        stored = json.loads(f.attrs["composition"])
        assert f["token_ids"][:20].tolist() == first_doc[:20]  # a document contributes its first tokens
    assert stored["sources"] == {"arxiv": {"tokens": 20, "docs": 1}, "unknown": {"tokens": 20, "docs": 1},
                                 "news": {"tokens": 10, "docs": 1}}
    assert stored["top_docs"] == [{"id": "a", "source": "arxiv", "tokens": 20},
                                  {"id": "c", "source": "unknown", "tokens": 20},
                                  {"id": "b", "source": "news", "tokens": 10}]
    assert "composition: 50 tokens from 3 documents (each cut at 20 tokens, 2 cut)" in r.stderr
    assert "by source: arxiv 40.0% (1 docs), unknown 40.0% (1 docs), news 20.0% (1 docs)" in r.stderr
    table = invoke(tables, [tmp_path / "capped.h5"], code=0).stdout.splitlines()  # ssae-tables FILE.h5
    assert table[-1].split() == ["capped", "50", "3", "20", "40.00%", "arxiv", "40.0%,", "unknown", "40.0%,",
                                 "news", "20.0%"]

    whole = run(base + ["--max-tokens-per-doc", "0", "-q", "-o", str(tmp_path / "whole.h5")])
    assert whole.exit_code == 0 and "composition" not in whole.stderr  # -q: no summary
    comp = parse_records(whole.stdout)[0]["composition"]
    assert _rows_per_doc(tmp_path / "whole.h5") == [50, 10, 30]
    assert comp == {"sources": {"arxiv": round(50 / 90, 4), "unknown": round(30 / 90, 4), "news": round(10 / 90, 4)},
                    "max_doc_share": round(50 / 90, 4), "n_docs": 3, "doc_cap": None, "docs_cut": 0}


def test_spread_cuts_every_document_at_one_length_that_fits_the_budget(tmp_path, tiny_model):
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), [counted_doc(f"d{i}", n, offset=i)
                                                       for i, n in enumerate([100, 10, 40, 60])])
    base = [docs, "--model", tiny_model, "--layer", "0", "--context-size", "16", "--max-tokens", "100"]
    first_only = run(base + ["-o", str(tmp_path / "first.h5")])
    assert first_only.exit_code == 0 and _rows_per_doc(tmp_path / "first.h5") == [100]  # rank order: one document
    spread = run(base + ["--spread", "-o", str(tmp_path / "spread.h5")])
    assert spread.exit_code == 0, spread.stderr
    assert _rows_per_doc(tmp_path / "spread.h5") == [30, 10, 30, 30]  # 30 + 10 + 30 + 30 = 100
    assert parse_records(spread.stdout)[0]["composition"]["doc_cap"] == 30
    assert "spread: 4 documents of 210 tokens in all; each cut at 30 tokens" in spread.stderr
    # stdin is spooled to be read twice, also with -o
    piped = run(["--model", tiny_model, "--layer", "0", "--context-size", "16", "--max-tokens", "100", "--spread",
                 "-o", str(tmp_path / "piped.h5")], input=open(docs).read())
    assert piped.exit_code == 0 and _rows_per_doc(tmp_path / "piped.h5") == [30, 10, 30, 30]
    roomy = run([docs, "--model", tiny_model, "--layer", "0", "--context-size", "16", "--max-tokens", "1000",
                 "--spread", "-o", str(tmp_path / "roomy.h5")])
    assert "all fit within the budget" in roomy.stderr and _rows_per_doc(tmp_path / "roomy.h5") == [100, 10, 40, 60]
    r = run([docs, "--model", tiny_model, "--spread", "-o", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "--spread: needs a token budget to spread" in r.stderr


def test_spread_cap_is_the_largest_that_fits():
    def stored(lengths, c, window, bos):
        return sum(min(n, c) + (-(-min(n, c) // window) if bos else 0) for n in lengths)

    lengths = [100, 10, 40, 60, 7]
    for budget in (5, 60, 99, 150, 216):
        for bos in (False, True):
            c = spread_cap(lengths, budget, 0, 15, bos)
            if stored(lengths, 1, 15, bos) <= budget:
                assert stored(lengths, c, 15, bos) <= budget < stored(lengths, c + 1, 15, bos)
            else:
                assert c == 1
    assert spread_cap(lengths, 10_000, 0, 15, False) == 0  # everything fits: no cap
    assert spread_cap(lengths, 10_000, 50, 15, False) == 50  # the configured cap stands
    assert spread_cap(lengths, 100, 50, 15, False) == 27  # 27 + 10 + 27 + 27 + 7 = 98; 28 gives 101


def _retrieved(tmp_path):
    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), sample_docs(40, 30, seed=5))
    seeds = write_jsonl(str(tmp_path / "seeds.jsonl"), [{"id": "s", "text": "star galaxy planet orbit"}])
    r = invoke(retrieve, [seeds, "--corpus", corpus, "--top-k", "12", "-o", tmp_path / "docs.jsonl"])
    assert r.exit_code == 0, r.stderr
    return parse_records(r.stdout), [d["id"] for d in parse_records((tmp_path / "docs.jsonl").read_text())]


def test_retrieve_record_pipes_into_harvest(tmp_path, tiny_model):
    [record], ids = _retrieved(tmp_path)
    assert record["kind"] == "docs" and record["n_docs"] == len(ids) == 12
    base = ["--model", tiny_model, "--layer", "0", "--context-size", "16"]
    r = run(base + ["-o", str(tmp_path / "piped.h5")], input=json.dumps(record) + "\n")
    assert r.exit_code == 0, r.stderr
    with ActivationStore(str(tmp_path / "piped.h5")) as s:
        assert [s.doc_id(i) for i in range(s.n_docs)] == ids
    # a file holding the record works as a path argument; the default output is named by the documents
    # it points to, so changed documents are harvested again
    pointer = write_jsonl(str(tmp_path / "pointer.jsonl"), [record])
    first = parse_records(run([pointer] + base).stdout)[0]
    assert first["n_docs"] == 12 and first["n_tokens"] == parse_records(r.stdout)[0]["n_tokens"]
    assert parse_records(run([pointer] + base).stdout)[0]["path"] == first["path"]
    with open(record["path"], "a") as f:
        f.write(json.dumps({"id": "new", "text": "the star"}) + "\n")
    again = parse_records(run([pointer] + base).stdout)[0]
    assert again["path"] != first["path"] and again["n_docs"] == 13


def test_retrieve_to_harvest_in_a_real_shell_pipe(tmp_path, tiny_model):
    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), sample_docs(40, 30, seed=5))
    seeds = write_jsonl(str(tmp_path / "seeds.jsonl"), [{"id": "s", "text": "star galaxy planet orbit"}])
    retrieve_bin = os.path.join(os.path.dirname(sys.executable), "ssae-retrieve")
    p = subprocess.run(f"{retrieve_bin} {seeds} --corpus {corpus} --top-k 12 -o {tmp_path / 'docs.jsonl'} -q"
                       f" | {BIN} --model {tiny_model} --layer 0", shell=True, capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr
    [rec] = parse_records(p.stdout)
    assert rec["kind"] == "activations" and rec["n_docs"] == 12


def test_a_reinstalled_gguf_links_its_earlier_conversion(tmp_path, monkeypatch):
    """The same GGUF bytes with a new mtime (a reinstalled wheel) reuse the cached conversion (a link),
    instead of de-quantising into another 0.5 GB folder; other bytes of the same size convert anew."""
    from ssae_common.core.outputs import sha256_file
    from ssae_common.data import models

    def convert(*args, **kwargs):
        raise RuntimeError("would convert")

    monkeypatch.setenv("SSAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", convert)
    gguf = tmp_path / "M.gguf"
    gguf.write_bytes(b"gguf bytes")
    os.utime(gguf, (2, 2))
    earlier = tmp_path / "cache" / "models" / "M-10-1"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    (earlier / "source.txt").write_text(f"/old/venv/M.gguf\nsha256 {sha256_file(str(gguf))}\n")
    got = models.convert_gguf(str(gguf))
    assert got == str(tmp_path / "cache" / "models" / "M-10-2") and os.path.realpath(got) == str(earlier)
    assert models.convert_gguf(str(gguf)) == got
    gguf.write_bytes(b"GGUF BYTES")
    os.utime(gguf, (3, 3))
    with pytest.raises(RuntimeError, match="would convert"):
        models.convert_gguf(str(gguf))
