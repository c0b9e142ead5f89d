"""Activation files (`ssae.activations/1`, HDF5), written in batches and read in chunks.

Layout (docs/formats.md): /activations [N, d] (float16, float32, or bfloat16 stored as uint16), /token_ids,
/doc_index, /position [N] int32, /docs/id and /docs/text [D].  /docs/input_index [D] (int64, the
document's index in the input stream) lets shards be merged back into input order.

A file being written lives at a `.partial` name beside its target with `complete = False`; the
attributes `n_tokens`, `n_docs` and `resume` are updated after every batch; a resume copies the
checkpointed rows into a fresh file (dropping anything later) and continues exactly from there.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

import h5py
import numpy as np

from .composition import composition_summary
from .config import DTYPES
from ..core.config import ConfigError
from ..core.errors import BadInput
from ..core.records import artifact_record

SCHEMA = "ssae.activations/1"
STR = h5py.string_dtype(encoding="utf-8")


def encode(acts, dtype: str) -> np.ndarray:
    """A float tensor or array -> the stored representation of `dtype`."""
    import torch

    if isinstance(acts, np.ndarray):
        acts = torch.from_numpy(acts)
    acts = acts.detach().cpu()
    if dtype == "bfloat16":
        return acts.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return acts.to(getattr(torch, dtype)).numpy()


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows -> float32."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def chunk_rows(d: int, target_bytes: int = 1 << 20) -> int:
    return max(64, min(16384, target_bytes // max(1, d * 4)))


def _copy_checkpointed(path: str, block_rows: int = 65536) -> None:
    """Rewrite a partial file as just its checkpointed rows and documents. After a kill, HDF5 metadata
    and string heaps written past the last flush can be torn, and writing on top of them fails."""
    from ..core.outputs import bytes_free, no_space, refuse_link

    fresh = path + ".rebuild"
    refuse_link(fresh)
    if os.path.exists(fresh):
        os.remove(fresh)
    if bytes_free(path) < os.path.getsize(path) + (1 << 20):
        raise no_space(path)
    try:
        _copy_rows(path, fresh, block_rows)
    except BaseException:
        if os.path.exists(fresh):
            os.remove(fresh)
        raise
    os.replace(fresh, path)


def _copy_rows(path: str, fresh: str, block_rows: int) -> None:
    with h5py.File(path, "r") as old, h5py.File(fresh, "x") as new:
        n, d = int(old.attrs["n_tokens"]), int(old.attrs["n_docs"])
        for key, value in old.attrs.items():
            new.attrs[key] = value
        for name, rows in [(name, n) for name in ("activations", "token_ids", "doc_index", "position")] + \
                [(f"docs/{name}", d) for name in old["docs"]]:
            src = old[name]
            dst = new.create_dataset(name, shape=(rows, *src.shape[1:]), maxshape=(None, *src.shape[1:]),
                                     dtype=src.dtype, chunks=src.chunks)
            for i in range(0, rows, block_rows):
                dst[i:min(rows, i + block_rows)] = src[i:min(rows, i + block_rows)]


class ActivationWriter:
    """Create or resume a partial activation file and append rows batch by batch."""

    def __init__(self, path: str, *, d_model: int, dtype: str, attrs: dict, resume: bool, create: str = "w"):
        """`create` is h5py's mode for a new file: "x" for a fixed name in a shared folder (fails rather than
        write through whatever was planted there), "w" for a fresh temporary name."""
        if dtype not in DTYPES:
            raise ConfigError("dtype", dtype, f"expected one of {', '.join(DTYPES)}")
        self.path, self.dtype = path, dtype
        if resume:
            _copy_checkpointed(path)
            self.f = h5py.File(path, "r+")
            return
        self.f = h5py.File(path, create)
        rows = chunk_rows(d_model)
        store = "uint16" if dtype == "bfloat16" else dtype
        self.f.create_dataset("activations", shape=(0, d_model), maxshape=(None, d_model), dtype=store,
                              chunks=(rows, d_model))
        for name in ("token_ids", "doc_index", "position"):
            self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype="int32", chunks=(rows * 4,))
        docs = self.f.create_group("docs")
        docs.create_dataset("id", shape=(0,), maxshape=(None,), dtype=STR, chunks=(1024,))
        docs.create_dataset("input_index", shape=(0,), maxshape=(None,), dtype="int64", chunks=(1024,))
        if attrs.get("store_text", True):
            docs.create_dataset("text", shape=(0,), maxshape=(None,), dtype=STR, chunks=(256,))
        a = self.f.attrs
        a["schema"] = SCHEMA
        a["dtype"] = dtype
        a["d_model"] = d_model
        a["n_tokens"] = 0
        a["n_docs"] = 0
        a["complete"] = False
        a["resume"] = json.dumps({"next_input_doc": 0, "next_window": 0})
        for key, value in attrs.items():
            a[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        self.f.flush()

    @property
    def n_tokens(self) -> int:
        return int(self.f.attrs["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.f.attrs["n_docs"])

    @property
    def resume_state(self) -> dict:
        return json.loads(self.f.attrs["resume"])

    def reserve(self, n_rows: int, text_bytes: int) -> None:
        """Refuse (one line, exit 1) a batch that may not fit on the disk or under the file size limit,
        before HDF5 writes any of it: a write that fails half-way tears the file, whereas refused here the
        last checkpoint stays whole and a rerun resumes from it."""
        from ..core.outputs import bytes_free, no_space

        ds = self.f["activations"]
        # each dataset may start a new chunk, HDF5 may rewrite its metadata; twice the data for slack
        chunks = sum(int(np.prod(d.chunks)) * d.dtype.itemsize for d in self._datasets())
        need = 2 * (n_rows * (ds.shape[1] * ds.dtype.itemsize + 12) + text_bytes) + chunks + (256 << 10)
        if bytes_free(self.path) < need:
            raise no_space(self.path)

    def _datasets(self) -> list:
        return [self.f[n] for n in ("activations", "token_ids", "doc_index", "position")] + list(self.f["docs"].values())

    def add_docs(self, ids: list[str], texts: list[str], input_indices: list[int]) -> None:
        docs = self.f["docs"]
        n0, n1 = self.n_docs, self.n_docs + len(ids)
        docs["id"].resize(n1, axis=0)
        docs["id"][n0:n1] = ids
        docs["input_index"].resize(n1, axis=0)
        docs["input_index"][n0:n1] = input_indices
        if "text" in docs:
            docs["text"].resize(n1, axis=0)
            docs["text"][n0:n1] = texts

    def add_rows(self, acts, token_ids: np.ndarray, doc_index: np.ndarray, position: np.ndarray) -> None:
        n0, n1 = self.n_tokens, self.n_tokens + len(token_ids)
        ds = self.f["activations"]
        ds.resize(n1, axis=0)
        ds[n0:n1] = acts if isinstance(acts, np.ndarray) and acts.dtype == ds.dtype else encode(acts, self.dtype)
        for name, values in (("token_ids", token_ids), ("doc_index", doc_index), ("position", position)):
            self.f[name].resize(n1, axis=0)
            self.f[name][n0:n1] = values

    def checkpoint(self, n_docs: int, next_input_doc: int, next_window: int, **extra) -> None:
        """Record that all rows and documents written so far are valid."""
        a = self.f.attrs
        a["n_tokens"] = int(self.f["activations"].shape[0])
        a["n_docs"] = int(n_docs)
        a["resume"] = json.dumps({"next_input_doc": next_input_doc, "next_window": next_window, **extra})
        self.f.flush()

    def finish(self, **attrs) -> None:
        for key, value in attrs.items():
            self.f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        self.f.attrs["complete"] = True
        self.f.flush()
        self.close()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


class ActivationStore:
    """Read access to a complete activation file; rows come back as float32 numpy arrays."""

    def __init__(self, path: str, allow_incomplete: bool = False):
        self.path = path
        if not os.path.exists(path):
            raise BadInput(f"{path}: no such activation file")
        try:
            self.f = h5py.File(path, "r")
        except OSError as e:
            raise BadInput(f"{path}: not a readable HDF5 file ({e})") from None
        a = self.f.attrs
        if a.get("schema") != SCHEMA:
            self.f.close()
            raise BadInput(f"{path}: not an {SCHEMA} file (schema {a.get('schema')!r})")
        if not bool(a.get("complete", False)) and not allow_incomplete:
            self.f.close()
            raise BadInput(f"{path}: incomplete activation file (harvest was interrupted; rerun it to finish)")
        missing = [name for name in ("activations", "token_ids", "doc_index", "position", "docs/id")
                   if name not in self.f]
        if missing:
            self.f.close()
            raise BadInput(f"{path}: no /{missing[0]} dataset: not a whole {SCHEMA} file")
        try:
            self.dtype = str(a["dtype"])
            self.n_tokens = int(a["n_tokens"])
            self.n_docs = int(a["n_docs"])
            self.d_model = int(a["d_model"])
            self.model = str(a.get("model", ""))
            self.hook = str(a.get("hook", ""))
            self.context_size = int(a.get("context_size", 0))
            self.bos_dropped = bool(a.get("bos_dropped", True))
            # None in files harvested before these were recorded (BOS was then prepended when the tokenizer had one)
            self.prepend_bos = bool(a["prepend_bos"]) if "prepend_bos" in a else None
            self.hook_module = str(a["hook_module"]) if "hook_module" in a else None
            self.model_dtype = str(a["model_dtype"]) if "model_dtype" in a else None
        except (KeyError, ValueError, TypeError) as e:
            self.f.close()
            raise BadInput(f"{path}: a bad or missing attribute ({type(e).__name__}: {e})") from None
        self._acts = self.f["activations"]

    @property
    def attrs(self) -> dict:
        out = {}
        for k, v in self.f.attrs.items():
            v = v.item() if hasattr(v, "item") else v
            if k in ("config", "created_by", "resume") and isinstance(v, str):
                v = json.loads(v)
            out[k] = v
        return out

    @property
    def has_text(self) -> bool:
        return "text" in self.f["docs"]

    @property
    def chunk_rows(self) -> int:
        return int(self._acts.chunks[0]) if self._acts.chunks else 4096

    def rows(self, start: int, stop: int) -> np.ndarray:
        return decode(self._acts[start:stop], self.dtype)

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows at arbitrary (sorted, unique) indices."""
        return decode(self._acts[np.asarray(index)], self.dtype)

    def iter_chunks(self, rows: int | None = None, start: int = 0, stop: int | None = None
                    ) -> Iterator[tuple[int, np.ndarray]]:
        rows = rows or self.chunk_rows * 4
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        for s in range(start, stop, rows):
            yield s, self.rows(s, min(s + rows, stop))

    def token_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.f["token_ids"][start:stop]

    def doc_index(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.f["doc_index"][start:stop]

    def position(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.f["position"][start:stop]

    def doc_id(self, i: int) -> str:
        return self.f["docs"]["id"][i].decode()

    def doc_text(self, i: int) -> str:
        if not self.has_text:
            raise BadInput(f"{self.path}: no document text stored (harvested with --no-store-text)")
        return self.f["docs"]["text"][i].decode()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def activation_artifact(path: str) -> dict:
    """The `ssae.artifact/1` record of an activation file, its summary read from the file."""
    with ActivationStore(path) as s:
        composition = s.f.attrs.get("composition")  # absent in files written before it was counted
        return artifact_record("activations", path, n_tokens=s.n_tokens, n_docs=s.n_docs, model=s.model,
                               hook=s.hook, d_model=s.d_model, dtype=s.dtype,
                               **({"composition": composition_summary(json.loads(composition))} if composition else {}))


def open_stores(paths: list[str]) -> list[ActivationStore]:
    """Several activation files that act as one dataset: same model, hook and width."""
    stores = [ActivationStore(p) for p in paths]
    first = stores[0]
    for s in stores[1:]:
        for attr in ("model", "hook", "d_model"):
            if getattr(s, attr) != getattr(first, attr):
                raise BadInput(f"{s.path}: {attr} {getattr(s, attr)!r} differs from {first.path} ({getattr(first, attr)!r})")
    return stores


def merge_shards(paths: list[str], out_tmp: str, attrs: dict) -> tuple[int, int]:
    """Merge `--shard i/n` outputs into input order (what one unsharded run stores), copying document
    by document through a bounded buffer.  Writes `out_tmp`; returns (n_tokens, n_docs)."""
    import heapq

    stores = open_stores(paths)
    first = stores[0]
    for s in stores:
        if s.dtype != first.dtype:
            raise BadInput(f"{s.path}: dtype {s.dtype} differs from {first.path} ({first.dtype})")
    base = {k: v for k, v in first.attrs.items() if k not in ("n_tokens", "n_docs", "complete", "resume", "schema")}
    base.update(attrs)
    writer = ActivationWriter(out_tmp, d_model=first.d_model, dtype=first.dtype, resume=False,
                              attrs={**base, "store_text": all(s.has_text for s in stores)})
    try:
        # per store: doc start offsets from doc_index (rows are grouped by doc, in doc order)
        starts = []
        for s in stores:
            bounds = np.searchsorted(s.doc_index(), np.arange(s.n_docs + 1))
            starts.append(bounds)
        heap = [(int(s.f["docs/input_index"][0]), k, 0) for k, s in enumerate(stores) if s.n_docs]
        heapq.heapify(heap)
        seen: set[int] = set()
        buf_rows, buf_tok, buf_doc, buf_pos, buf_ids, buf_text, buf_in = [], [], [], [], [], [], []
        n_docs = 0
        limit = max(1, (64 << 20) // (first.d_model * 4))

        def flush():
            nonlocal buf_rows, buf_tok, buf_doc, buf_pos, buf_ids, buf_text, buf_in
            if buf_ids:
                writer.add_docs(buf_ids, buf_text, buf_in)
            if buf_rows:
                writer.add_rows(np.concatenate(buf_rows), np.concatenate(buf_tok), np.concatenate(buf_doc),
                                np.concatenate(buf_pos))
            writer.checkpoint(n_docs, 0, 0)
            buf_rows, buf_tok, buf_doc, buf_pos, buf_ids, buf_text, buf_in = [], [], [], [], [], [], []

        while heap:
            input_index, k, d = heapq.heappop(heap)
            if input_index in seen:
                raise BadInput(f"{stores[k].path}: document {input_index} of the input is in two shards")
            seen.add(input_index)
            s = stores[k]
            lo, hi = int(starts[k][d]), int(starts[k][d + 1])
            buf_rows.append(s.f["activations"][lo:hi])
            buf_tok.append(s.token_ids(lo, hi))
            buf_doc.append(np.full(hi - lo, n_docs, dtype=np.int32))
            buf_pos.append(s.position(lo, hi))
            buf_ids.append(s.doc_id(d))
            buf_text.append(s.doc_text(d) if s.has_text else "")
            buf_in.append(input_index)
            n_docs += 1
            if sum(len(r) for r in buf_rows) >= limit:
                flush()
            if d + 1 < s.n_docs:
                heapq.heappush(heap, (int(s.f["docs/input_index"][d + 1]), k, d + 1))
        flush()
        n_tokens = writer.n_tokens
        writer.finish(shard="merged", merged_from=[os.path.abspath(p) for p in paths])
        return n_tokens, n_docs
    except BaseException:
        writer.close()
        raise
    finally:
        for s in stores:
            s.close()


def store_fingerprint(path: str) -> str:
    """A cheap identity for a (possibly huge) activation file: size, row count, the harvest's recorded
    configuration and provenance, and the bytes at both ends.  Not a full sha256 (that would read the
    whole file)."""
    h = hashlib.sha256()
    with ActivationStore(path) as s:  # first, so a missing or foreign file is a clear BadInput
        size = os.path.getsize(path)
        a = s.attrs
        h.update(json.dumps([size, s.n_tokens, a.get("config"), a.get("created_by")], sort_keys=True,
                            default=str).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()
