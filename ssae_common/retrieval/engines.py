"""Retrieval of subdomain documents from a large corpus, given seed documents: the corpus store, BM25
(bm25s, with rank-bm25 as the reference engine), ranking, reciprocal-rank fusion (hybrid = BM25 + dense;
the dense engine is dense.py), exclusion and selection.

Everything derived from a corpus is cached under `$SSAE_WORKDIR/index/`, keyed by the corpus's hash:
- `corpus-<key>/`: the corpus as `ssae.doc/1` lines plus byte offsets (random access to the records
  picked, so a streamed `hf:` corpus is read once) and a hash of each document's normalised text;
- `bm25-<key>/`: the bm25s index (key adds tokenisation and BM25 parameters);
- `dense-<key>.npy`: the dense embeddings (dense.py).

BM25 is Okapi BM25 with idf = max(0, log((N - df + 0.5) / (df + 0.5))): bm25s `method="robertson"`
(which clips the idf at 0) and rank-bm25 `BM25Okapi(epsilon=0)` (whose floor for negative idf is then
0) compute the same function; bm25s leaves out the constant factor (k1 + 1), which is put back so both
engines give the same scores. Rankings sort by score (rounded to 1e-9 relative, so float noise
between engines cannot reorder ties) and then by corpus position.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..core.config import ConfigError
from ..core.errors import BadInput
from ..core.outputs import atomic_dir
from ..core.progress import Progress
from ..core.provenance import config_hash, input_fingerprint
from ..core.records import iter_docs
from .config import COMBINERS, ENGINES, RRF_K

log = logging.getLogger("ssae")

TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
CACHED_WORDS = 1 << 20  # distinct words whose stems tokenisation remembers
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def check_choice(option: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise BadInput(f"{option} {value}: expected one of {', '.join(choices)}")
    return value


def index_dir() -> str:
    from ..core.outputs import workdir

    return os.path.join(workdir(), "index")


# ----------------------------------------------------------------------------------------------
# text normalisation, tokenisation


def normalise_text(text: str) -> str:
    """Case, accents-as-composed, punctuation and whitespace folded: what exclusion and dedupe compare."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_key(text: str) -> int:
    """64-bit hash of the normalised text."""
    digest = hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class Tokenization:
    """Lowercase, words of 2+ word characters, optional stopword removal and Snowball stemming.

    The same function feeds both BM25 engines, so their results are comparable."""

    stopwords: str | None = "en"
    stemmer: str | None = "english"

    def describe(self) -> dict:
        return {"pattern": TOKEN_RE.pattern, "lowercase": True, "stopwords": self.stopwords, "stemmer": self.stemmer}

    def build(self):
        stop = frozenset()
        if self.stopwords:
            from bm25s import stopwords as sw

            table = {"en": "STOPWORDS_EN", "en_plus": "STOPWORDS_EN_PLUS"}
            name = table.get(self.stopwords)
            if name is None:
                raise ConfigError("stopwords", self.stopwords, "expected en, en_plus or none")
            stop = frozenset(getattr(sw, name))
        stem = None
        if self.stemmer:
            import Stemmer

            try:
                stem = Stemmer.Stemmer(self.stemmer).stemWords
            except KeyError:
                raise ConfigError("stemmer", self.stemmer, f"unknown language "
                                                           f"(e.g. {', '.join(Stemmer.algorithms()[:6])})") from None

        if not stem:
            def tokenize(text: str) -> list[str]:
                return [w for w in TOKEN_RE.findall(text.lower()) if w not in stop]

            return tokenize
        # each word's stem (None for a stopword) remembered: a corpus repeats its words, and looking one up
        # costs a third of stemming it; bounded, since a large corpus has millions of distinct words
        cache: dict[str, str | None] = {}

        def term(word: str) -> str | None:
            found = None if word in stop else stem([word])[0]
            if len(cache) < CACHED_WORDS:
                cache[word] = found
            return found

        def tokenize(text: str) -> list[str]:
            found = (cache[w] if w in cache else term(w) for w in TOKEN_RE.findall(text.lower()))
            return [t for t in found if t is not None]

        return tokenize


# ----------------------------------------------------------------------------------------------
# corpus store


def corpus_fingerprint(inputs: Sequence[str], text_field: str) -> dict:
    return {"inputs": [{"path": p, "sha256": input_fingerprint(p)} for p in inputs], "text_field": text_field}


class CorpusStore:
    """A corpus as `ssae.doc/1` lines with offsets: streamed through once when built, then read by
    position. `ids`, `text_keys` are arrays over the corpus order."""

    def __init__(self, folder: str):
        self.folder = folder
        self.offsets = np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r")
        self.text_keys = np.load(os.path.join(folder, "text_keys.npy"), mmap_mode="r")
        with open(os.path.join(folder, "ids.json"), encoding="utf-8") as f:
            self.ids: list[str] = json.load(f)
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        self.key = self.meta["key"]
        self._file = open(os.path.join(folder, "docs.jsonl"), "rb")

    def __len__(self) -> int:
        return len(self.ids)

    def close(self) -> None:
        self._file.close()

    def record(self, i: int) -> dict:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        self._file.seek(start)
        return json.loads(self._file.read(stop - start))

    def iter_texts(self, start: int = 0) -> Iterator[str]:
        """Texts in corpus order from position `start` (a sequential read)."""
        with open(os.path.join(self.folder, "docs.jsonl"), "rb") as f:
            f.seek(int(self.offsets[start]))
            for line in f:
                yield json.loads(line)["text"]

    @classmethod
    def open_or_build(cls, inputs: Sequence[str], text_field: str = "text", quiet: bool = False) -> "CorpusStore":
        fingerprint = corpus_fingerprint(inputs, text_field)
        key = config_hash(fingerprint)
        folder = os.path.join(index_dir(), f"corpus-{key}")
        if os.path.exists(os.path.join(folder, "meta.json")):
            log.info("reusing corpus store %s", folder)
            return cls(folder)
        os.makedirs(index_dir(), exist_ok=True)
        log.info("reading the corpus into %s", folder)
        with atomic_dir(folder, force=True) as tmp:
            # 16 bytes a document in memory (packed arrays); the ids are written as they come
            offsets, keys, n = array("q", [0]), array("Q"), 0
            with open(os.path.join(tmp, "docs.jsonl"), "wb") as out, \
                    open(os.path.join(tmp, "ids.json"), "w", encoding="utf-8") as ids, \
                    Progress("corpus", unit="docs", quiet=quiet) as progress:
                ids.write("[")
                for rec, source in iter_docs(inputs, text_field):
                    rec.setdefault("source", os.path.basename(source.name))
                    line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
                    out.write(line)
                    offsets.append(offsets[-1] + len(line))
                    keys.append(text_key(rec["text"]))
                    ids.write(("," if n else "") + json.dumps(rec["id"], ensure_ascii=False))
                    n += 1
                    progress.update(1)
                ids.write("]")
            if not n:
                raise BadInput(f"{', '.join(inputs)}: the corpus has no documents")
            np.save(os.path.join(tmp, "offsets.npy"), np.frombuffer(offsets, dtype=np.int64))
            np.save(os.path.join(tmp, "text_keys.npy"), np.frombuffer(keys, dtype=np.uint64))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"key": key, "n_docs": n, **fingerprint}, f, indent=1)
        return cls(folder)


# ----------------------------------------------------------------------------------------------
# ranking helpers


def _rank_key(scores: np.ndarray) -> np.ndarray:
    """Scores rounded to 9 significant digits: equal-in-exact-arithmetic scores computed in a
    different order (bm25s vs rank-bm25) tie, and the tie goes to the earlier document."""
    scores = np.asarray(scores, dtype=np.float64)
    scale = np.max(np.abs(scores)) if scores.size else 0.0
    if not np.isfinite(scale) or scale == 0:
        return scores
    quantum = 10.0 ** (np.floor(np.log10(scale)) - 8)
    return np.round(scores / quantum) * quantum


def top_k(scores: np.ndarray, k: int, index: np.ndarray | None = None) -> np.ndarray:
    """Positions of the k best scores, best first; ties broken by `index` (default: position)."""
    n = scores.shape[0]
    if index is None:
        index = np.arange(n)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    key = _rank_key(scores)
    if k < n:
        threshold = np.partition(key, n - k)[n - k]
        cand = np.flatnonzero(key >= threshold)
    else:
        cand = np.arange(n)
    order = np.lexsort((index[cand], -key[cand]))
    return cand[order[:k]]


@dataclass
class Ranking:
    """One query's ranked list: corpus positions (best first) and their scores."""

    positions: np.ndarray
    scores: np.ndarray


# ----------------------------------------------------------------------------------------------
# BM25


@dataclass(frozen=True)
class BM25Params:
    k1: float = 1.5
    b: float = 0.75
    tokenization: Tokenization = field(default_factory=Tokenization)

    def describe(self) -> dict:
        return {"variant": "okapi, idf clipped at 0", "k1": self.k1, "b": self.b,
                "tokenization": self.tokenization.describe()}


def _postings(store: CorpusStore, tokenize, spill: str, quiet: bool, buffer_entries: int = 1 << 20):
    """First pass of the index build: tokenise the corpus, in order, into a spill file of (term id, term
    count) int32 pairs, one per distinct term of each document. Returns the vocabulary (term -> id, in
    order of first appearance), the document frequencies, each document's length in tokens and its number
    of distinct terms. Memory: the vocabulary and four numbers a document, not the corpus's tokens."""
    vocab: dict[str, int] = {}
    n = len(store)
    doc_len = np.zeros(n, dtype=np.int64)
    n_terms = np.zeros(n, dtype=np.int64)
    df = np.zeros(0, dtype=np.int64)
    pending: list[np.ndarray] = []

    def flush(out) -> None:
        nonlocal df, pending
        if pending:
            pairs = np.concatenate(pending)
            pairs.tofile(out)
            counts = np.bincount(pairs[:, 0], minlength=len(vocab))
            df = np.concatenate([df, np.zeros(len(counts) - len(df), dtype=np.int64)]) + counts
            pending = []

    with open(spill, "wb") as out, Progress("bm25 tokenise", total=n, unit="docs", quiet=quiet) as progress:
        held = 0
        for i, text in enumerate(store.iter_texts()):
            ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in tokenize(text)), dtype=np.int32)
            terms, counts = np.unique(ids, return_counts=True)
            doc_len[i], n_terms[i] = len(ids), len(terms)
            pending.append(np.stack([terms, counts.astype(np.int32)], axis=1))
            held += len(terms)
            if held >= buffer_entries:
                flush(out)
                held = 0
            progress.update(1)
        flush(out)
    df = np.concatenate([df, np.zeros(len(vocab) - len(df), dtype=np.int64)])
    return vocab, df, doc_len, n_terms


def write_bm25s_index(store: CorpusStore, params: "BM25Params", folder: str, quiet: bool = False,
                      block_entries: int = 1 << 23) -> None:
    """Write into `folder` the files bm25s.BM25.save writes (its CSC score matrix in float64, vocabulary
    and parameters; method robertson) for the corpus of `store`, in memory bounded by the vocabulary, a few
    numbers a document and `block_entries` postings, whatever the corpus's size: bm25s's own index()
    holds every document's tokens and several copies of the matrix at once.

    Two passes: the corpus is tokenised once into a spill file of postings (document order); then the
    matrix is written column block by column block (each at most `block_entries` entries, one read of
    the spill each), every column's documents in ascending order, as bm25s stores them. The scores are
    the same floating-point operations as bm25s's, so the arrays are identical to its index()'s."""
    import math

    import bm25s

    spill = os.path.join(folder, "postings.tmp")
    vocab, df, doc_len, n_terms = _postings(store, params.tokenization.build(), spill, quiet)
    n_docs, k1, b = len(store), params.k1, params.b
    avg_len = doc_len.mean()
    idf = np.zeros(len(vocab), dtype=np.float64)
    for term, count in enumerate(df.tolist()):  # math.log, per term, as bm25s does
        if count:
            idf[term] = math.log(max(1.0, (n_docs - count + 0.5) / (count + 0.5)))
    indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
    nnz = int(indptr[-1])
    first = np.concatenate([[0], np.cumsum(n_terms)])  # each document's first posting in the spill
    # column blocks of at most block_entries postings (a single larger column is a block of its own)
    starts = [0]
    for term in range(1, len(vocab)):
        if indptr[term + 1] - indptr[starts[-1]] > block_entries:
            starts.append(term)
    bounds = list(zip(starts, starts[1:] + [len(vocab)]))
    doc_chunks = np.searchsorted(first, np.arange(0, nnz, block_entries), side="right") - 1
    doc_chunks = sorted(set(doc_chunks.tolist()) | {0, n_docs})
    # plain reads and sequential writes, not memory maps: the pages mapped would count as the process's
    with open(spill, "rb") as postings, open(os.path.join(folder, "data.csc.index.npy"), "wb") as data, \
            open(os.path.join(folder, "indices.csc.index.npy"), "wb") as indices, \
            Progress("bm25 index", total=len(bounds), unit="blocks", quiet=quiet) as progress:
        for f, dtype in ((data, np.float64), (indices, np.int32)):
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                     "fortran_order": False, "shape": (nnz,)})
        for c0, c1 in bounds:
            base = int(indptr[c0])
            fill = indptr[c0:c1] - base  # next free slot of each column in this block
            block_data = np.empty(int(indptr[c1]) - base, dtype=np.float64)
            block_docs = np.empty(len(block_data), dtype=np.int32)
            postings.seek(0)
            for d0, d1 in zip(doc_chunks, doc_chunks[1:]):
                pairs = np.fromfile(postings, dtype=np.int32, count=2 * int(first[d1] - first[d0])).reshape(-1, 2)
                docs = np.repeat(np.arange(d0, d1, dtype=np.int64), n_terms[d0:d1])
                keep = (pairs[:, 0] >= c0) & (pairs[:, 0] < c1)
                terms, tf, docs = pairs[keep, 0], pairs[keep, 1].astype(np.float64), docs[keep]
                if not len(terms):
                    continue
                scores = idf[terms] * (tf / (k1 * ((1 - b) + b * doc_len[docs].astype(np.float64) / avg_len) + tf))
                order = np.argsort(terms, kind="stable")  # by column, documents ascending within each
                terms, scores, docs = terms[order], scores[order], docs[order]
                head = np.flatnonzero(np.concatenate([[True], terms[1:] != terms[:-1]]))
                counts = np.diff(np.concatenate([head, [len(terms)]]))
                slot = fill[terms - c0] + (np.arange(len(terms)) - np.repeat(head, counts))
                block_data[slot], block_docs[slot] = scores, docs
                fill[terms[head] - c0] += counts
            data.write(block_data.tobytes())
            indices.write(block_docs.tobytes())
            progress.update(1)
    os.remove(spill)
    np.save(os.path.join(folder, "indptr.csc.index.npy"), indptr)
    with open(os.path.join(folder, "vocab.index.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    defaults = bm25s.BM25(k1=k1, b=b, method="robertson", dtype="float64")
    with open(os.path.join(folder, "params.index.json"), "w") as f:
        json.dump({"k1": k1, "b": b, "delta": defaults.delta, "method": "robertson", "idf_method": "robertson",
                   "dtype": "float64", "int_dtype": defaults.int_dtype, "num_docs": n_docs,
                   "version": bm25s.__version__, "backend": defaults.backend}, f, indent=4)


class BM25Index:
    """Okapi BM25 over a CorpusStore with either engine; `scores(tokens)` gives all N scores."""

    def __init__(self, store: CorpusStore, params: BM25Params, engine: str = "bm25s", quiet: bool = False):
        check_choice("--engine", engine, ENGINES)
        self.store, self.params, self.engine = store, params, engine
        self.tokenize = params.tokenization.build()
        if engine == "bm25s":
            self._open_bm25s(quiet)
        else:
            self._build_rank_bm25(quiet)

    @property
    def cache_key(self) -> str:
        return config_hash(self.store.key, self.params.describe(), "bm25s-robertson")

    def _open_bm25s(self, quiet: bool) -> None:
        import bm25s

        folder = os.path.join(index_dir(), f"bm25-{self.cache_key}")
        self.built = False
        if not os.path.exists(os.path.join(folder, "params.index.json")):
            t0 = time.perf_counter()
            with atomic_dir(folder, force=True) as tmp:
                write_bm25s_index(self.store, self.params, tmp, quiet)
            self.built = True
            log.info("built the bm25s index %s in %.1f s", folder, time.perf_counter() - t0)
        else:
            log.info("reusing the bm25s index %s", folder)
        self.folder = folder
        self._bm25s = bm25s.BM25.load(folder, mmap=True, show_progress=False)

    def _build_rank_bm25(self, quiet: bool) -> None:
        from rank_bm25 import BM25Okapi

        t0 = time.perf_counter()
        docs = []
        with Progress("rank-bm25 tokenise", total=len(self.store), unit="docs", quiet=quiet) as progress:
            for text in self.store.iter_texts():
                docs.append(self.tokenize(text))
                progress.update(1)
        self._rank = BM25Okapi(docs, k1=self.params.k1, b=self.params.b, epsilon=0.0)
        self.built = True
        log.info("built the rank-bm25 index in memory in %.1f s", time.perf_counter() - t0)

    def scores(self, query_tokens: list[str]) -> np.ndarray:
        n = len(self.store)
        if self.engine == "rank-bm25":
            return np.asarray(self._rank.get_scores(query_tokens), dtype=np.float64)
        vocab = self._bm25s.vocab_dict
        ids = [vocab[t] for t in query_tokens if t in vocab]
        if not ids:
            return np.zeros(n)
        return np.asarray(self._bm25s.get_scores_from_ids(ids), dtype=np.float64) * (self.params.k1 + 1)

    def rank(self, queries: Sequence[str], depth: int, quiet: bool = True) -> list[Ranking]:
        out = []
        with Progress(f"bm25 ({self.engine}) queries", total=len(queries), unit="queries", quiet=quiet) as progress:
            for text in queries:
                s = self.scores(self.tokenize(text))
                pos = top_k(s, depth)
                keep = s[pos] > 0  # a document sharing no term with the query is not retrieved
                out.append(Ranking(pos[keep], s[pos][keep]))
                progress.update(1)
        return out


# ----------------------------------------------------------------------------------------------
# fusion over methods and seeds


def rrf_fuse(rankings: Sequence[Ranking], k: int = RRF_K) -> Ranking:
    """Reciprocal-rank fusion: score(d) = sum over lists of 1 / (k + rank of d), rank from 1."""
    acc: dict[int, float] = {}
    for r in rankings:
        for rank, pos in enumerate(r.positions.tolist(), 1):
            acc[pos] = acc.get(pos, 0.0) + 1.0 / (k + rank)
    return _ranking_from(acc)


def _ranking_from(acc: dict[int, float]) -> Ranking:
    if not acc:
        return Ranking(np.zeros(0, dtype=np.int64), np.zeros(0))
    pos = np.fromiter(acc.keys(), dtype=np.int64, count=len(acc))
    val = np.fromiter(acc.values(), dtype=np.float64, count=len(acc))
    order = top_k(val, len(val), index=pos)
    return Ranking(pos[order], val[order])


@dataclass
class Combined:
    ranking: Ranking
    seeds_of: dict[int, list[int]]  # corpus position -> seed indices that retrieved it, best rank first


def combine_seeds(per_seed: Sequence[Ranking], how: str = "rrf", k: int = RRF_K) -> Combined:
    """One ranking from one ranked list per seed: `rrf` sums 1/(k + rank), `max` takes the best score,
    `sum` adds the scores (a document missing from a seed's list adds nothing for it)."""
    check_choice("--combine", how, COMBINERS)
    acc: dict[int, float] = {}
    hits: dict[int, list[tuple[int, int]]] = {}
    for s, r in enumerate(per_seed):
        for rank, (pos, score) in enumerate(zip(r.positions.tolist(), r.scores.tolist()), 1):
            value = 1.0 / (k + rank) if how == "rrf" else score
            if how == "max":
                acc[pos] = max(acc.get(pos, -np.inf), value)
            else:
                acc[pos] = acc.get(pos, 0.0) + value
            hits.setdefault(pos, []).append((rank, s))
    return Combined(_ranking_from(acc), {p: [s for _, s in sorted(h)] for p, h in hits.items()})


# ----------------------------------------------------------------------------------------------
# exclusion and selection


@dataclass
class Exclusions:
    ids: set[str] = field(default_factory=set)
    keys: set[int] = field(default_factory=set)

    def add(self, doc_id: str, text: str) -> None:
        self.ids.add(str(doc_id))
        self.keys.add(text_key(text))

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_files(cls, paths: Iterable[str], text_field: str = "text") -> "Exclusions":
        """Documents to keep out, by id and by normalised text. Plain-text files: one document a line."""
        ex = cls()
        for path in paths:
            for rec, _ in iter_docs([path], text_field):
                ex.add(rec["id"], rec["text"])
        return ex


def select(store: CorpusStore, order: Sequence[int], exclusions: Exclusions, top_k_docs: int | None,
           budget_tokens: int | None = None, count_tokens=None) -> tuple[list[int], dict]:
    """Walk `order` (corpus positions, best first) keeping documents not excluded and not duplicates
    (same id or same normalised text as one kept), until `top_k_docs` documents or `budget_tokens`."""
    kept: list[int] = []
    seen_ids: set[str] = set()
    seen_keys: set[int] = set()
    stats = {"excluded": 0, "duplicates": 0, "tokens": 0}
    for pos in order:
        if top_k_docs is not None and len(kept) >= top_k_docs:
            break
        if budget_tokens is not None and stats["tokens"] >= budget_tokens:
            break
        doc_id, key = store.ids[pos], int(store.text_keys[pos])
        if doc_id in exclusions.ids or key in exclusions.keys:
            stats["excluded"] += 1
            continue
        if doc_id in seen_ids or key in seen_keys:
            stats["duplicates"] += 1
            continue
        seen_ids.add(doc_id)
        seen_keys.add(key)
        kept.append(int(pos))
        if budget_tokens is not None:
            stats["tokens"] += count_tokens(store.record(pos)["text"])
    return kept, stats
