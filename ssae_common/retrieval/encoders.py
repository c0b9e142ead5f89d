"""Sentence encoders for dense retrieval: sentence-transformers on torch, or the same model exported here
to ONNX and run by ONNX Runtime (optionally with int8 weights).

The ONNX path covers the common sentence-transformers layout, a Hugging Face transformer followed by mean
pooling and (optionally) unit normalisation, as the bundled all-MiniLM-L6-v2 is.  The export is made from
the local model folder with torch.onnx (nothing is downloaded) and cached under the model cache
(`$SSAE_CACHE/models/onnx-<key>/`, key: the model files' hashes and the export settings), atomically and
under a lock; a cached export is an ONNX protobuf (data, no code) and is checked to load before use.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from typing import Sequence

import numpy as np

log = logging.getLogger("ssae")

OPSET = 17
EXPORT_VERSION = 1  # bump when the export changes, so older cached exports are not reused


def onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def mean_pooling_layout(path: str) -> dict | None:
    """{'max_length', 'normalize'} when the sentence-transformers folder is transformer + mean pooling
    (+ normalisation), the layout the ONNX encoder reproduces; None otherwise."""
    try:
        with open(os.path.join(path, "modules.json")) as f:
            modules = json.load(f)
        types = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if types[:2] != ["Transformer", "Pooling"] or types[2:] not in ([], ["Normalize"]):
            return None
        with open(os.path.join(path, modules[1]["path"], "config.json")) as f:
            pooling = json.load(f)
        modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
        if modes != ["pooling_mode_mean_tokens"]:
            return None
        max_length = None
        bert_config = os.path.join(path, "sentence_bert_config.json")
        if os.path.exists(bert_config):
            with open(bert_config) as f:
                max_length = json.load(f).get("max_seq_length")
        return {"max_length": max_length, "normalize": types[2:] == ["Normalize"]}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _export_key(path: str) -> str:
    from ..core.outputs import sha256_file
    from ..core.provenance import config_hash

    files = sorted(f for f in os.listdir(path) if f.endswith((".json", ".safetensors", ".txt", ".bin")))
    return config_hash({f: sha256_file(os.path.join(path, f)) for f in files}, OPSET, EXPORT_VERSION)


def _export(path: str, folder: str) -> None:
    """model.onnx (float32, dynamic batch and length) and model-int8.onnx (dynamic int8 weights of the
    matrix products) of the transformer in `path`, written into `folder`."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    names = list(tokenizer.model_input_names)

    class LastHidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).last_hidden_state

    sample = tokenizer(["an example", "a second, longer example"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "length"} for n in [*names, "last_hidden_state"]}
    with torch.no_grad():
        torch.onnx.export(LastHidden(model), tuple(sample[n] for n in names), os.path.join(folder, "model.onnx"),
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    # per-channel scales: one scale per weight matrix bent the bundled MiniLM's embeddings (cosine to
    # float32 down to 0.87); per output channel they stay above 0.98
    quantize_dynamic(os.path.join(folder, "model.onnx"), os.path.join(folder, "model-int8.onnx"),
                     weight_type=QuantType.QInt8, per_channel=True)
    with open(os.path.join(folder, "inputs.json"), "w") as f:
        json.dump(names, f)


def onnx_export(path: str) -> str:
    """The cached ONNX export folder of the sentence-transformers model in `path`, made on first use."""
    from ..core.outputs import atomic_dir
    from ..data.models import cache_dir

    folder = os.path.join(cache_dir(), f"onnx-{_export_key(path)}")
    done = os.path.join(folder, "inputs.json")
    if os.path.exists(done) and not os.path.islink(folder):
        return folder
    os.makedirs(cache_dir(), exist_ok=True)
    fd = os.open(folder + ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done) or os.path.islink(folder):
            log.info("exporting %s to ONNX in %s (once)", path, folder)
            with atomic_dir(folder, force=True) as tmp:
                _export(path, tmp)
    return folder


class OnnxSentenceEncoder:
    """The transformer + mean pooling (+ unit norm) of a sentence-transformers folder on ONNX Runtime.
    Speaks the part of SentenceTransformer's interface dense retrieval uses: encode(), max_seq_length,
    get_embedding_dimension()."""

    def __init__(self, path: str, int8: bool, threads: int, layout: dict):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = onnx_export(path)
        with open(os.path.join(folder, "inputs.json")) as f:
            self.input_names = json.load(f)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_seq_length = layout["max_length"] or self.tokenizer.model_max_length
        self.normalize = layout["normalize"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # threads that sleep between operators: on a shared machine spinning takes CPU from other jobs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model_file = os.path.join(folder, "model-int8.onnx" if int8 else "model.onnx")
        self.session = ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize_embeddings: bool = False,
               **_ignored) -> np.ndarray:
        """[n, dim] float32 embeddings; texts are batched by length (less padding), returned in order."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_seq_length, return_tensors="np")
            hidden = self.session.run(None, {n: enc[n].astype(np.int64) for n in self.input_names})[0]
            mask = enc["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            if self.normalize or normalize_embeddings:
                pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out[idx] = pooled
        return out
