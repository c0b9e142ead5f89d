"""ssae-retrieve: BM25 engines agree, dense search is exact, fusion, exclusion, caching, bad input."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from helpers import invoke, parse_records, sample_docs, write_jsonl
from ssae_common.core.config import ConfigError
from ssae_common.core.runtime import RunContext
from ssae_common.retrieval import RetrieveConfig, rank_documents, retrieve
from ssae_common.retrieval import dense as D
from ssae_common.retrieval import engines as R
from ssae_common.retrieval.config import DEFAULT_DENSE_MODEL
from ssae_tools.retrieve import main

TOPICS = [
    "The galaxy cluster shows strong gravitational lensing of background quasars.",
    "Dark matter halos govern the rotation curves of spiral galaxies.",
    "The central bank raised interest rates to curb inflation in the bond market.",
    "Shares of the oil company fell after the government announced a sale.",
    "The nurse checked the patient's blood pressure before surgery.",
    "Surgeons performed a heart transplant at the city hospital.",
    "The film's soundtrack and acting were praised by critics.",
    "A terrible movie with a confusing plot and wooden dialogue.",
    "The football team won the championship after extra time.",
    "Neutron star mergers emit gravitational waves detected by LIGO.",
    "Exoplanet transits reveal the atmospheres of hot Jupiters.",
    "The recipe calls for flour, butter, sugar and two eggs.",
    "Quantum spin of the particle was measured in a magnetic field.",
    "Stock markets rallied as bank earnings beat expectations.",
    "The supernova remnant expands into the interstellar medium.",
    "Farmers expect a good harvest of wheat and corn this year.",
]


def run(*args, input=None):
    return invoke(main, args, input=input, catch_exceptions=True)


@pytest.fixture
def corpus(tmp_path):
    docs = [{"id": f"t{i}", "text": t, "source": "topics"} for i, t in enumerate(TOPICS)]
    docs += [{"id": f"r{i}", **{k: v for k, v in d.items() if k != "id"}, "source": "random"}
             for i, d in enumerate(sample_docs(16, 25, seed=3))]
    return write_jsonl(str(tmp_path / "corpus.jsonl"), docs)


@pytest.fixture
def seeds(tmp_path):
    return write_jsonl(str(tmp_path / "seeds.jsonl"), [
        {"id": "s1", "text": "Gravitational waves from merging neutron stars and black holes."},
        {"id": "s2", "text": "Spiral galaxy rotation and dark matter; gravitational lensing by clusters."},
    ])


def _store(path):
    return R.CorpusStore.open_or_build([path])


# ---------------------------------------------------------------- BM25


@pytest.mark.parametrize("stopwords,stemmer", [("en", "english"), (None, None)])
def test_bm25s_and_rank_bm25_agree_exactly(tmp_path, stopwords, stemmer):
    path = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(300, 30, seed=7))
    store = _store(path)
    params = R.BM25Params(k1=1.2, b=0.6, tokenization=R.Tokenization(stopwords, stemmer))
    fast, ref = R.BM25Index(store, params, "bm25s"), R.BM25Index(store, params, "rank-bm25")
    # "the"/"a" occur in more than half the documents: their idf is clipped to 0 by both engines
    queries = ["star galaxy orbit the the", "nurse doctor hospital care a", "cat dog dog market", "zzz unknownword"]
    for q in queries:
        toks = fast.tokenize(q)
        np.testing.assert_allclose(fast.scores(toks), ref.scores(toks), rtol=1e-12, atol=1e-12)
    for a, b in zip(fast.rank(queries, 100), ref.rank(queries, 100)):
        assert a.positions.tolist() == b.positions.tolist()
    assert len(fast.rank(["zzz unknownword"], 10)[0].positions) == 0  # no shared term: nothing retrieved


@pytest.mark.parametrize("block_entries", [7, 1 << 23])
def test_streamed_bm25s_index_is_bm25s_own_index(tmp_path, block_entries):
    """The bounded-memory build writes the arrays bm25s's in-memory index() writes, bit for bit, however
    small its blocks (7 postings: many column blocks and spill chunks)."""
    import bm25s

    docs = sample_docs(200, 30, seed=3) + [{"id": "stop", "text": "the a of"}]  # a document of no terms
    store = _store(write_jsonl(str(tmp_path / "c.jsonl"), docs))
    params = R.BM25Params(k1=1.2, b=0.6)
    tokenize, vocab = params.tokenization.build(), {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in tokenize(text)] for text in store.iter_texts()]
    reference = bm25s.BM25(k1=1.2, b=0.6, method="robertson", dtype="float64")
    reference.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=False)
    reference.save(str(tmp_path / "ref"), show_progress=False)
    R.write_bm25s_index(store, params, str(tmp_path), quiet=True, block_entries=block_entries)
    for name in ("data", "indices", "indptr"):
        want = np.load(tmp_path / "ref" / f"{name}.csc.index.npy")
        got = np.load(tmp_path / f"{name}.csc.index.npy")
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert not (tmp_path / "postings.tmp").exists()
    want_vocab = json.loads((tmp_path / "ref" / "vocab.index.json").read_text())
    want_vocab.pop("")  # bm25s's placeholder for empty queries; queries here are never empty
    assert json.loads((tmp_path / "vocab.index.json").read_text()) == want_vocab
    assert json.loads((tmp_path / "params.index.json").read_text()) == \
        json.loads((tmp_path / "ref" / "params.index.json").read_text())


def test_bm25_corpus_of_stopwords_only_retrieves_nothing(tmp_path, seeds):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), [{"id": "a", "text": "the of and"}, {"id": "b", "text": "a"}])
    result = run(seeds, "--corpus", corpus, "--top-k", 5)
    assert result.exit_code == 0, result.stderr
    assert parse_records(result.stdout) == []


def test_bm25_matches_okapi_formula(tmp_path):
    docs = [{"id": "a", "text": "apple banana apple"}, {"id": "b", "text": "banana cherry"},
            {"id": "c", "text": "cherry date elder fig"}]
    store = _store(write_jsonl(str(tmp_path / "c.jsonl"), docs))
    params = R.BM25Params(k1=1.5, b=0.75, tokenization=R.Tokenization(None, None))
    got = R.BM25Index(store, params, "bm25s").scores(["apple"])
    n, df, avgdl = 3, 1, 3.0
    idf = np.log((n - df + 0.5) / (df + 0.5))
    want = idf * 2 * 2.5 / (2 + 1.5 * (1 - 0.75 + 0.75 * 3 / avgdl))
    np.testing.assert_allclose(got, [want, 0, 0])


def test_top_k_breaks_ties_by_position():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0 + 1e-14])
    assert R.top_k(scores, 3).tolist() == [1, 2, 4]
    assert R.top_k(scores, 10).tolist() == [1, 2, 4, 3, 0]


def test_cli_engines_give_the_same_output(corpus, seeds):
    a = run(seeds, "--corpus", corpus, "--top-k", 10)
    b = run(seeds, "--corpus", corpus, "--top-k", 10, "--engine", "rank-bm25")
    assert a.exit_code == 0, a.stderr
    assert b.exit_code == 0, b.stderr
    ra, rb = parse_records(a.stdout), parse_records(b.stdout)
    assert [r["id"] for r in ra] == [r["id"] for r in rb]
    assert [r["score"] for r in ra] == pytest.approx([r["score"] for r in rb], rel=1e-9)
    top = ra[0]
    assert top["schema"] == "ssae.doc/1" and top["method"] == "bm25" and top["rank"] == 1
    assert top["id"] in ("t9", "t1", "t0") and top["source"] == "topics" and top["seed_ids"]
    assert [r["rank"] for r in ra] == list(range(1, len(ra) + 1))


def test_bm25_index_is_cached_and_reused(corpus, seeds):
    first = run(seeds, "--corpus", corpus, "--top-k", 5)
    second = run(seeds, "--corpus", corpus, "--top-k", 5)
    assert "built the bm25s index" in first.stderr
    assert "reusing the bm25s index" in second.stderr and "built the bm25s index" not in second.stderr
    assert first.stdout == second.stdout
    other = run(seeds, "--corpus", corpus, "--top-k", 5, "--k1", 1.2)  # other parameters: another index
    assert "built the bm25s index" in other.stderr
    assert len(os.listdir(os.path.join(R.index_dir()))) == 3  # corpus store + two bm25 indexes


# ---------------------------------------------------------------- dense


def test_blocked_top_k_equals_brute_force():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((1000, 8))
    corpus = (corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).astype(np.float16)
    corpus[500] = corpus[10]  # an exact tie: the earlier position goes first
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    queries[0] = corpus[10].astype(np.float32)
    got = D.blocked_top_k(queries, corpus, 50, block_rows=64)
    sims = queries @ corpus.astype(np.float32).T
    for qi, r in enumerate(got):
        want = np.lexsort((np.arange(1000), -sims[qi]))[:50]
        assert r.positions.tolist() == want.tolist()
        np.testing.assert_allclose(r.scores, sims[qi][want], rtol=1e-6)
    assert got[0].positions[:2].tolist() == [10, 500]


def test_dense_matches_numpy_cosine_and_caches(corpus):
    store = _store(corpus)
    index = D.DenseIndex(store, batch_size=16, backend="torch")
    assert index.encoded_now == len(store)
    assert index.embeddings.dtype == np.float16 and index.embeddings.shape == (len(store), 384)
    model = index.encoder  # the same model; encoded here without the index's normalisation and float16
    texts = list(store.iter_texts())
    docs = model.encode(texts)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    query = "Gravitational waves from merging neutron stars and black holes."
    q = model.encode([query])[0]
    q /= np.linalg.norm(q)
    cos = docs @ q
    np.testing.assert_allclose(np.asarray(index.embeddings, dtype=np.float32), docs, atol=2e-3)
    got = index.rank([query], 10)[0]
    assert got.positions.tolist() == np.argsort(-cos, kind="stable")[:10].tolist()
    np.testing.assert_allclose(got.scores, cos[got.positions], atol=5e-3)
    assert store.ids[got.positions[0]] == "t9"
    again = D.DenseIndex(store, backend="torch")  # second run: embeddings reused, nothing encoded
    assert again.encoded_now == 0 and again._encoder is None


def test_dense_max_length_cuts_texts_and_has_its_own_cache(corpus):
    store = _store(corpus)
    full = D.DenseIndex(store, batch_size=16, backend="torch")
    short = D.DenseIndex(store, batch_size=16, max_length=8, backend="torch")
    assert short.path != full.path and short.encoded_now == len(store)
    assert short.encoder.max_seq_length == 8
    texts = list(store.iter_texts())
    long_doc = max(range(len(texts)), key=lambda i: len(texts[i]))
    full_model = D.load_encoder(DEFAULT_DENSE_MODEL, "cpu")  # a long text embeds differently when cut to 8 tokens
    full_model.max_seq_length = 8
    cut = full_model.encode([texts[long_doc]], normalize_embeddings=True)[0]
    np.testing.assert_allclose(np.asarray(short.embeddings[long_doc], dtype=np.float32), cut, atol=2e-3)
    assert float(np.asarray(full.embeddings[long_doc], dtype=np.float32) @ cut) < 0.99


def test_dense_embedding_resumes_after_interruption(tmp_path, monkeypatch):
    store = _store(write_jsonl(str(tmp_path / "small.jsonl"), sample_docs(24, 12, seed=2)))
    calls = []
    real = D.DenseIndex.encode

    def stop_at_third_chunk(self, texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(D.DenseIndex, "encode", stop_at_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        D.DenseIndex(store, chunk_docs=8)
    monkeypatch.setattr(D.DenseIndex, "encode", real)
    resumed = D.DenseIndex(store, chunk_docs=8)
    assert resumed.encoded_now == len(store) - 16  # the two finished chunks were kept
    assert not os.path.exists(resumed.path + ".partial.npy")
    want = real(resumed, list(store.iter_texts()))
    np.testing.assert_allclose(np.asarray(resumed.embeddings, dtype=np.float32), want, atol=2e-3)


def test_cli_dense_and_hybrid(corpus, seeds):
    dense = run(seeds, "--corpus", corpus, "--method", "dense", "--top-k", 5)
    assert dense.exit_code == 0, dense.stderr
    rd = parse_records(dense.stdout)
    assert len(rd) == 5 and {r["method"] for r in rd} == {"dense"}
    assert {"t9", "t1"} <= {r["id"] for r in rd[:4]}
    again = run(seeds, "--corpus", corpus, "--method", "dense", "--top-k", 5)
    assert "reusing dense embeddings" in again.stderr and again.stdout == dense.stdout
    hybrid = run(seeds, "--corpus", corpus, "--method", "hybrid", "--top-k", 5)
    assert hybrid.exit_code == 0, hybrid.stderr
    rh = parse_records(hybrid.stdout)
    assert {r["method"] for r in rh} == {"hybrid"} and rh[0]["score"] >= rh[-1]["score"]


# ---------------------------------------------------------------- fusion


def test_rrf_and_seed_combination():
    a = R.Ranking(np.array([3, 1, 2]), np.array([9.0, 5.0, 1.0]))
    b = R.Ranking(np.array([1, 4]), np.array([2.0, 1.0]))
    fused = R.rrf_fuse([a, b], k=60)
    assert fused.positions.tolist() == [1, 3, 4, 2]
    assert fused.scores[0] == pytest.approx(1 / 62 + 1 / 61)
    combined = R.combine_seeds([a, b], "max")
    assert combined.ranking.positions.tolist() == [3, 1, 2, 4]  # 9, 5, 1, 1 (tie: position order)
    assert combined.seeds_of[1] == [1, 0]  # rank 1 for seed 1 before rank 2 for seed 0
    assert R.combine_seeds([a, b], "sum").ranking.scores.tolist() == [9.0, 7.0, 1.0, 1.0]
    assert R.combine_seeds([a, b], "rrf").ranking.positions.tolist() == [1, 3, 4, 2]


# ---------------------------------------------------------------- selection


def test_exclusion_dedupe_and_seeds(tmp_path):
    docs = [{"id": "a", "text": "galaxy galaxy star"}, {"id": "b", "text": "Galaxy,  galaxy STAR!"},
            {"id": "c", "text": "galaxy orbit"}, {"id": "d", "text": "star planet galaxy"},
            {"id": "e", "text": "galaxy light"}, {"id": "seed-copy", "text": "galaxy star seed text"},
            {"id": "f", "text": "cat dog"}]
    docs += [{"id": f"filler{i}", "text": f"cat dog house tree river number{i}"} for i in range(20)]
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    seeds = write_jsonl(str(tmp_path / "s.jsonl"), [{"id": "seed", "text": "Galaxy star seed text"}])
    test_set = tmp_path / "test.jsonl.gz"
    with gzip.open(test_set, "wt") as f:
        f.write(json.dumps({"id": "c", "text": "whatever"}) + "\n")
        f.write(json.dumps({"id": "zz", "text": "STAR  planet, galaxy"}) + "\n")  # d's text, normalised
    args = [seeds, "--corpus", corpus, "--top-k", 10, "--stopwords", "none"]
    res = run(*args, "--exclude", test_set)
    assert res.exit_code == 0, res.stderr
    ids = [r["id"] for r in parse_records(res.stdout)]
    assert "c" not in ids and "d" not in ids and "seed-copy" not in ids and "f" not in ids
    assert ("a" in ids) != ("b" in ids)  # same normalised text: one kept
    assert "1 duplicate" in res.stderr and "3 excluded" in res.stderr
    with_seeds = run(*args, "--include-seeds")
    assert "seed-copy" in [r["id"] for r in parse_records(with_seeds.stdout)]


def test_budget_tokens_and_out_file(corpus, seeds, tiny_model, tmp_path):
    out = tmp_path / "got.jsonl"
    res = run(seeds, "--corpus", corpus, "--budget-tokens", 20, "--model", tiny_model, "-o", out)
    assert res.exit_code == 0, res.stderr
    recs = parse_records(out.read_text())
    [artifact] = parse_records(res.stdout)  # one record for the file written, so the pipe to ssae-harvest works
    assert artifact == {"schema": "ssae.artifact/1", "kind": "docs", "path": str(out), "n_docs": len(recs)}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    counts = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in recs]
    assert sum(counts[:-1]) < 20 <= sum(counts)  # stops at the document that reaches the budget
    prov = json.loads((tmp_path / "got.jsonl.provenance.json").read_text())
    assert prov["config"]["budget_tokens"] == 20 and prov["created_by"]["tool"] == "ssae-retrieve"
    again = run(seeds, "--corpus", corpus, "--top-k", 3, "-o", out)
    assert again.exit_code == 2 and "exists (use --force" in again.stderr
    assert parse_records(out.read_text()) == recs


def test_budget_tokens_count_each_document_up_to_the_harvest_cap(corpus, seeds, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    res = run(seeds, "--corpus", corpus, "--budget-tokens", 20, "--max-tokens-per-doc", 3, "--model", tiny_model)
    assert res.exit_code == 0, res.stderr
    counts = [min(3, len(tok(r["text"], add_special_tokens=False)["input_ids"])) for r in parse_records(res.stdout)]
    assert counts == [3] * 7 and sum(counts[:-1]) < 20 <= sum(counts)  # 7 documents of 3 counted tokens
    uncapped = run(seeds, "--corpus", corpus, "--budget-tokens", 20, "--max-tokens-per-doc", 0, "--model", tiny_model)
    assert len(parse_records(uncapped.stdout)) < 7  # whole documents fill the budget sooner


def test_deterministic_and_seeds_from_stdin(corpus, seeds):
    text = open(seeds).read()
    a = run("--corpus", corpus, "--method", "bm25", "--top-k", 8, "--combine", "sum", input=text)
    b = run("-", "--corpus", corpus, "--method", "bm25", "--top-k", 8, "--combine", "sum", input=text)
    assert a.exit_code == 0, a.stderr
    assert a.stdout == b.stdout and len(parse_records(a.stdout)) == 8


# ---------------------------------------------------------------- bad input


def _one_line_error(res, *fragments):
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, res.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    assert res.stdout == ""


def test_bad_inputs(tmp_path, corpus, seeds):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_error(run(empty, "--corpus", corpus), "empty.jsonl", "no seed documents")
    _one_line_error(run(tmp_path / "missing.jsonl", "--corpus", corpus), "missing.jsonl: no such file")
    _one_line_error(run(seeds, "--corpus", corpus, "--engine", "lucene"), "--engine lucene", "bm25s, rank-bm25")
    _one_line_error(run(seeds, "--corpus", corpus, "--method", "sparse"), "--method sparse")
    no_text = write_jsonl(str(tmp_path / "notext.jsonl"), [{"id": "x", "body": "galaxy"}])
    _one_line_error(run(seeds, "--corpus", no_text), "notext.jsonl:1", "'text'")
    _one_line_error(run(seeds, "--corpus", corpus, "--text-field", "body"), "seeds.jsonl:1", "'body'")
    _one_line_error(run(seeds), "no corpus")
    _one_line_error(run(seeds, "--corpus", corpus, "--rerank", "tracin"), "--sae")
    _one_line_error(run(seeds, "--corpus", corpus, "--top-k", 0), "--top-k 0")
    _one_line_error(run(seeds, "--corpus", corpus, "--exclude", tmp_path / "nope.jsonl"), "nope.jsonl: no such file")
    assert not os.path.exists(os.path.join(R.index_dir(), "corpus-x"))


# ---------------------------------------------------------------- Python API


def test_retrieve_from_python(corpus, seeds, tmp_path):
    """The stage without click: the same records the tool prints, and -o's file and provenance."""
    config = RetrieveConfig(corpus=(corpus,), top_k=6, stemmer="none")
    result = rank_documents(config, [seeds], context=RunContext(device_spec="cpu", tool="python"))
    recs = result.records
    assert [r["rank"] for r in recs] == list(range(1, 7))
    assert recs[0]["id"] in ("t9", "t1", "t0") and recs[0]["method"] == "bm25" and recs[0]["seed_ids"]
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    assert result.provenance["config"]["top_k"] == 6 and result.provenance["created_by"]["tool"] == "python"
    cli = run(seeds, "--corpus", corpus, "--top-k", 6, "--stemmer", "none")
    assert parse_records(cli.stdout) == recs

    out = str(tmp_path / "docs.jsonl")
    written = retrieve(config, [seeds], out=out, context=RunContext())
    assert written == {"schema": "ssae.artifact/1", "kind": "docs", "path": out, "n_docs": 6}
    assert parse_records(open(out).read()) == recs
    assert json.loads(open(out + ".provenance.json").read())["n_docs"] == 6
    with pytest.raises(Exception, match="exists"):
        retrieve(config, [seeds], out=out, context=RunContext())
    # without out: written under $SSAE_WORKDIR, named by the seeds and the configuration, and reused
    default = retrieve(config, [seeds])
    assert parse_records(open(default["path"]).read()) == recs and default["path"].startswith(str(tmp_path))
    mtime = os.path.getmtime(default["path"])
    assert retrieve(config, [seeds]) == default and os.path.getmtime(default["path"]) == mtime
    other = write_jsonl(str(tmp_path / "other.jsonl"), [{"id": "s1", "text": "an unrelated query"}])
    assert retrieve(config, [other])["path"] != default["path"]
    assert RetrieveConfig(corpus=(corpus,)).resolve().top_k == 1000  # the derived default
    assert RetrieveConfig(corpus=(corpus,), budget_tokens=50).resolve().top_k is None


def test_config_errors_name_fields_from_python_and_flags_from_the_cli(corpus, seeds):
    with pytest.raises(ConfigError) as e:
        retrieve(RetrieveConfig(corpus=(corpus,), rrf_k=0), [seeds])
    assert e.value.field_name == "rrf_k" and str(e.value).startswith("rrf_k 0:")
    with pytest.raises(ConfigError) as e:
        RetrieveConfig(corpus=(corpus,), method="sparse").check()
    assert e.value.field_name == "method" and "bm25, dense, hybrid" in str(e.value)
    with pytest.raises(ConfigError, match="^corpus"):
        RetrieveConfig().check()
    with pytest.raises(ConfigError, match="^sae"):
        RetrieveConfig(corpus=(corpus,), sae=("x",)).check()  # an SAE without rerank tracin
    _one_line_error(run(seeds, "--corpus", corpus, "--rrf-k", 0), "--rrf-k 0: must be at least 1")
    _one_line_error(run(seeds, "--corpus", corpus, "--b", 1.5), "--b 1.5: must be at most 1")
    _one_line_error(run(seeds, "--corpus", "-"), "--corpus -:")
    _one_line_error(run(seeds, "--corpus", corpus, "--sae", "x"), "--sae x: only used with --rerank tracin")


@pytest.mark.integration
def test_pool_subset_engines_agree(shared_data, tmp_path):
    """Real text: the first 3,000 pool documents, 5 astro-ph seeds, identical top-100 in both engines."""
    pool = os.path.join(shared_data, "general", "pool.jsonl.gz")
    subset = tmp_path / "pool3k.jsonl"
    with gzip.open(pool, "rt") as f, open(subset, "w") as out:
        for i, line in zip(range(3000), f):
            out.write(line)
    seeds = [json.loads(line) for _, line in zip(range(5), open(os.path.join(shared_data, "physics", "astro_ph_seeds.jsonl")))]
    store = _store(str(subset))
    params = R.BM25Params()
    fast, ref = R.BM25Index(store, params, "bm25s"), R.BM25Index(store, params, "rank-bm25")
    texts = [s["text"] for s in seeds]
    for a, b in zip(fast.rank(texts, 100), ref.rank(texts, 100)):
        assert a.positions.tolist() == b.positions.tolist()
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9)
