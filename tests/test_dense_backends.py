"""Dense encoder runtimes: which one auto picks, the refusals, separate embedding caches, and that the
reduced-precision runtimes reproduce float32 sentence-transformers on the bundled MiniLM."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from helpers import sample_docs, write_jsonl
from ssae_common.core.errors import BadInput
from ssae_common.retrieval import dense as D
from ssae_common.retrieval import engines as R
from ssae_common.retrieval.config import DEFAULT_DENSE_MODEL
from ssae_common.retrieval.encoders import mean_pooling_layout

MODEL = DEFAULT_DENSE_MODEL
TEXTS = ["Gravitational waves from merging neutron stars.", "A recipe for bread with sourdough starter.",
         "Spiral galaxy rotation curves and dark matter halos in the local universe, measured by radio surveys.",
         "x"]
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")


def test_auto_picks_by_device_and_cpu(monkeypatch):
    assert D.resolve_dense_backend("auto", MODEL, "cuda") == "torch-fp16"
    monkeypatch.setattr(D, "native_bf16", lambda: True)
    assert D.resolve_dense_backend("auto", MODEL, "cpu") == "torch-bf16"
    monkeypatch.setattr(D, "native_bf16", lambda: False)
    monkeypatch.setattr("ssae_common.retrieval.encoders.onnx_available", lambda: True)
    assert D.resolve_dense_backend("auto", MODEL, "cpu") == "onnx"  # int8 moved the rankings: asked for only
    monkeypatch.setattr("ssae_common.retrieval.encoders.onnx_available", lambda: False)
    assert D.resolve_dense_backend("auto", MODEL, "cpu") == "torch"


def test_explicit_backends_and_refusals(monkeypatch):
    assert D.resolve_dense_backend("torch", MODEL, "cpu") == "torch"
    assert D.resolve_dense_backend("torch-bf16", MODEL, "cpu") == "torch-bf16"
    with pytest.raises(BadInput, match="dense_backend 'torch-fp16': float16 is for CUDA"):
        D.resolve_dense_backend("torch-fp16", MODEL, "cpu")
    with pytest.raises(BadInput, match="dense_backend 'onnx': runs on CPU only"):
        D.resolve_dense_backend("onnx", MODEL, "cuda")
    with pytest.raises(BadInput, match="--dense-backend fast: expected one of auto, torch"):
        D.resolve_dense_backend("fast", MODEL, "cpu")
    monkeypatch.setattr("ssae_common.retrieval.encoders.onnx_available", lambda: False)
    with pytest.raises(BadInput, match="onnxruntime is not installed"):
        D.resolve_dense_backend("onnx-int8", MODEL, "cpu")


def test_mean_pooling_layout_of_the_bundled_model(tmp_path):
    assert mean_pooling_layout(D.resolve_dense_model(MODEL)) == {"max_length": 256, "normalize": True}
    assert mean_pooling_layout(str(tmp_path)) is None  # no modules.json


def test_each_runtime_has_its_own_embedding_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSAE_WORKDIR", str(tmp_path / "w"))
    store = R.CorpusStore.open_or_build([write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(4, 8, seed=1))])
    paths = {b: D.DenseIndex.cache_path(store, MODEL, None, b) for b in ("torch", "torch-bf16", "onnx-int8")}
    assert len(set(paths.values())) == 3
    assert paths["torch"] == D.DenseIndex.cache_path(store, MODEL)  # float32 keeps the earlier key


def test_provenance_records_the_runtime_auto_picked(tmp_path, monkeypatch):
    from ssae_common.core.runtime import RunContext
    from ssae_common.retrieval.config import RetrieveConfig
    from ssae_common.retrieval.stage import rank_documents

    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(12, 8, seed=1))
    seeds = write_jsonl(str(tmp_path / "s.jsonl"), sample_docs(2, 8, seed=2))
    config = RetrieveConfig(corpus=(corpus,), method="dense", top_k=3)
    monkeypatch.setattr(D, "native_bf16", lambda: True)
    bf16 = rank_documents(config, [seeds], context=RunContext(device_spec="cpu")).provenance
    assert bf16["config"]["dense_backend"] == "torch-bf16"
    float32 = RetrieveConfig(corpus=(corpus,), method="dense", top_k=3, dense_backend="torch")
    plain = rank_documents(float32, [seeds], context=RunContext(device_spec="cpu")).provenance
    assert plain["config"]["dense_backend"] == "torch" and plain["config_hash"] != bf16["config_hash"]
    bm25 = rank_documents(RetrieveConfig(corpus=(corpus,), top_k=3), [seeds], context=RunContext(device_spec="cpu"))
    assert bm25.provenance["config"]["dense_backend"] is None


def _unit_float32(backend: str) -> np.ndarray:
    emb = D.load_encoder(MODEL, "cpu", backend).encode(TEXTS, batch_size=2, normalize_embeddings=True,
                                                       convert_to_tensor=backend.startswith("torch"))
    return np.asarray(emb.float().numpy() if hasattr(emb, "float") else emb, dtype=np.float32)


def test_bf16_matches_float32():
    ref, got = _unit_float32("torch"), _unit_float32("torch-bf16")
    assert np.min(np.sum(ref * got, axis=1)) > 0.99


@needs_onnx
def test_onnx_export_matches_sentence_transformers():
    ref = _unit_float32("torch")
    fp32, int8 = _unit_float32("onnx"), _unit_float32("onnx-int8")
    np.testing.assert_allclose(fp32, ref, atol=1e-4)  # same model, another runtime; batched by length
    assert np.min(np.sum(int8 * ref, axis=1)) > 0.95
    assert np.allclose(np.linalg.norm(int8, axis=1), 1, atol=1e-5)
