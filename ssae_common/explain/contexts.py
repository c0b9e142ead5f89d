"""Latent contexts from an activation store: streamed through an SAE with memory bounded by the number
of latents (never by the store's length).

Pass 1 streams the store once in chunks and keeps, per latent,
  * the top candidates (value, row, doc) by activation,
  * a uniform reservoir sample of activating positions (the smallest of seeded random keys),
  * exact counts and sums of activations.
Top windows are then chosen greedily without overlap (the explanation set); held-out activating windows
are picked at evenly spaced quantiles of the reservoir (excluding rows near the top windows); held-out
non-activating windows come from a seeded pool of random rows whose whole window has zero activation.
Pass 2 reads only the rows of the chosen windows and computes the per-token activations of each window
for its latent.  Token text comes from the stored document text (tokenised again with offsets, checked
against the stored token ids), falling back to decoding the ids.
"""
from __future__ import annotations

import logging

import numpy as np

from ..core.errors import BadInput
from .config import ContextConfig

log = logging.getLogger("ssae")


class LatentReader:
    """Activations of selected latents for rows of model activations."""

    def __init__(self, sae, latents: list[int], device: str = "cpu"):
        import torch

        self.sae = sae.to(device).eval()
        self.device = device
        self.latents = torch.as_tensor(latents, dtype=torch.long, device=device)
        with torch.no_grad():
            everything = len(latents) == sae.d_sae and latents == list(range(sae.d_sae))
            self.W = sae.W_enc if everything else sae.W_enc[:, self.latents].contiguous()
            self.b = sae.b_enc if everything else sae.b_enc[self.latents].contiguous()

    def columns(self, x: np.ndarray) -> np.ndarray:
        """[rows, d_in] -> [rows, n_latents] activations of the selected latents."""
        import torch

        with torch.no_grad():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            if self.sae.arch.per_latent:
                f = self.sae.arch.activation(self.sae, (xt * self.sae.act_scale - self.sae.b_dec) @ self.W + self.b,
                                             self.latents)
            else:  # topk needs every pre-activation to know which survive
                f = self.sae.encode(xt)[:, self.latents]
            return f.float().cpu().numpy()

    def pairs(self, x: np.ndarray, row_local: np.ndarray, col: np.ndarray, batch: int = 32768) -> np.ndarray:
        """Activation of latent column col[i] at row x[row_local[i]], for each pair i."""
        import torch

        out = np.empty(len(row_local), dtype=np.float32)
        with torch.no_grad():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            if not self.sae.arch.per_latent:
                uniq, inverse = np.unique(row_local, return_inverse=True)
                f = self.sae.encode(xt[torch.from_numpy(uniq).to(self.device)])[:, self.latents]
                return f[torch.from_numpy(inverse).to(self.device), torch.from_numpy(col.astype(np.int64)).to(self.device)].float().cpu().numpy()
            centred = xt * self.sae.act_scale - self.sae.b_dec
            Wt = self.W.T
            for s in range(0, len(row_local), batch):
                r = torch.from_numpy(row_local[s:s + batch].astype(np.int64)).to(self.device)
                c = torch.from_numpy(col[s:s + batch].astype(np.int64)).to(self.device)
                pre = (centred[r] * Wt[c]).sum(1) + self.b[c]
                out[s:s + batch] = self.sae.arch.activation(self.sae, pre, self.latents[c]).float().cpu().numpy()
        return out


def _largest(vals: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries of each row of vals [L, n] (unordered)."""
    if vals.shape[1] <= k:
        return np.broadcast_to(np.arange(vals.shape[1]), vals.shape).copy()
    return np.argpartition(-vals, k - 1, axis=1)[:, :k]


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0xBF58476D1CE4E5B9),
        np.uint64(0x94D049BB133111EB))


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed uint64 of a uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX[2]
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX[3]
    return x ^ (x >> np.uint64(31))


def random_keys(seed: int, rows: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """A uniform float32 in [0, 1) for each (row, latent) pair, determined by (seed, row, latent) alone."""
    with np.errstate(over="ignore"):
        mixed_seed = _splitmix(np.array([seed % (1 << 64)], dtype=np.uint64))[0]
        x = _splitmix(rows.astype(np.uint64) * _MIX[0] ^ latents.astype(np.uint64) * _MIX[1] ^ mixed_seed)
    return (x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)


def _best_per_latent(lat: np.ndarray, key: np.ndarray, k: int, n_latents: int, payloads):
    """From entries (latent lat[i], key[i]), the k largest keys of each latent as [n_latents, k] arrays
    (padded with -inf keys), with payload arrays gathered alike (padded with their fill values)."""
    order = np.lexsort((-key, lat))
    lat_sorted = lat[order]
    first = np.searchsorted(lat_sorted, np.arange(n_latents))
    rank = np.arange(len(order)) - first[lat_sorted]
    keep = rank < k
    chosen, lat_kept, rank_kept = order[keep], lat_sorted[keep], rank[keep]
    out_key = np.full((n_latents, k), -np.inf, dtype=np.float32)
    out_key[lat_kept, rank_kept] = key[chosen]
    outs = []
    for values, fill in payloads:
        arr = np.full((n_latents, k), fill, dtype=np.asarray(values).dtype)
        arr[lat_kept, rank_kept] = values[chosen]
        outs.append(arr)
    return out_key, outs


class _Keeper:
    """Per-latent best-k entries (by `key`, largest first) with attached payload arrays, merged chunk by chunk."""

    def __init__(self, n_latents: int, k: int, payload: dict[str, np.dtype]):
        self.k = k
        self.key = np.full((n_latents, 0), -np.inf, dtype=np.float32)
        self.payload = {name: np.zeros((n_latents, 0), dtype=dt) for name, dt in payload.items()}

    def add(self, key: np.ndarray, payload: dict[str, np.ndarray]) -> None:
        """key [L, n]; payload arrays [L, n] (already gathered)."""
        key = np.concatenate([self.key, key], axis=1)
        payload = {n: np.concatenate([self.payload[n], v], axis=1) for n, v in payload.items()}
        idx = _largest(key, self.k)
        self.key = np.take_along_axis(key, idx, 1)
        self.payload = {n: np.take_along_axis(v, idx, 1) for n, v in payload.items()}


class _Taken:
    """Rows already used by windows, by document, to keep new windows from overlapping them."""

    def __init__(self, gap: int):
        self.gap, self.rows = gap, {}

    def overlaps(self, row: int, doc: int) -> bool:
        return any(abs(r - row) <= self.gap for r in self.rows.get(doc, ()))

    def add(self, row: int, doc: int) -> None:
        self.rows.setdefault(doc, []).append(row)


class TokenText:
    """Token strings for windows: from the document text with offsets when its tokenisation matches the
    stored ids, else from the ids themselves."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._id_cache: dict[int, str] = {}
        self.fallbacks = 0

    def of_id(self, token_id: int) -> str:
        s = self._id_cache.get(token_id)
        if s is None:
            t = self.tok.convert_ids_to_tokens(int(token_id))
            try:
                s = self.tok.convert_tokens_to_string([t]) if t is not None else ""
            except Exception:
                s = self.tok.decode([int(token_id)])
            self._id_cache[token_id] = s
        return s

    def doc_pieces(self, text: str) -> tuple[list[int], list[str]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        pieces, prev = [], 0
        for i, (a, b) in enumerate(offsets):
            start = prev if i else a
            pieces.append(text[start:b] if b >= start else text[a:b])
            prev = max(prev, b)
        return ids, pieces


def extract_contexts(store, sae, latents: list[int], cfg: ContextConfig, tokenizer, *, seed: int = 0,
                     device: str = "cpu", stop=None, progress=None) -> list[dict]:
    """Contexts of each latent in `latents` (see the module docstring); `seed` draws the reservoir samples
    and the non-activating windows.  `stop` is a signals.StopFlag."""
    cfg.check()
    if sae.d_in != store.d_model:
        raise BadInput(f"{store.path}: activations have width {store.d_model}, the SAE expects d_in {sae.d_in}")
    if not store.has_text:
        raise BadInput(f"{store.path}: no document text stored (harvested with --no-store-text); "
                       "ssae-explain needs it for contexts")
    if store.n_tokens == 0:
        raise BadInput(f"{store.path}: no tokens")
    reader = LatentReader(sae, latents, device)
    L = len(latents)
    n_cand = max(4 * cfg.n_explain, cfg.n_explain + 16)
    rows_per_chunk = cfg.chunk_rows or int(max(256, min(16384, (1 << 24) // max(L, 1))))

    top = _Keeper(L, n_cand, {"row": np.int64, "doc": np.int32})
    res = _Keeper(L, cfg.reservoir, {"row": np.int64, "doc": np.int32, "val": np.float32, "tok": np.int32})
    n_active = np.zeros(L, dtype=np.int64)
    act_sum = np.zeros(L, dtype=np.float64)
    doc_start = np.full(store.n_docs, -1, dtype=np.int64)
    doc_stop = np.full(store.n_docs, -1, dtype=np.int64)
    last_doc = -1

    for start, x in store.iter_chunks(rows=rows_per_chunk):
        n = len(x)
        A = reader.columns(x)  # [n, L]
        di = store.doc_index(start, start + n).astype(np.int64)
        tids = store.token_ids(start, start + n)
        if di[0] < last_doc or (n > 1 and np.any(np.diff(di) < 0)):
            raise BadInput(f"{store.path}: /doc_index is not in document order (rows of a document must be contiguous)")
        last_doc = int(di[-1])
        uniq, first = np.unique(di, return_index=True)
        last = n - 1 - np.unique(di[::-1], return_index=True)[1]
        doc_start[uniq] = np.where(doc_start[uniq] < 0, start + first, doc_start[uniq])
        doc_stop[uniq] = start + last + 1

        pos, lat = np.nonzero(A > 0)  # activations are sparse: work on the active entries only
        vals = A[pos, lat]
        n_active += np.bincount(lat, minlength=L)
        act_sum += np.bincount(lat, weights=vals, minlength=L)
        del A

        key, (rows_, docs_) = _best_per_latent(lat, vals, n_cand, L, [(start + pos, -1), (di[pos], -1)])
        top.add(key, {"row": rows_, "doc": docs_.astype(np.int32)})

        # reservoir: the activating entries with the largest seeded random keys are a uniform sample; each
        # key is a function of (seed, row, latent) alone, so the sample does not depend on how the rows are
        # chunked or on which other latents are explained
        keys = random_keys(seed, start + pos, np.asarray(latents, dtype=np.int64)[lat])
        key, (rows_, docs_, vals_, toks_) = _best_per_latent(
            lat, keys, cfg.reservoir, L, [(start + pos, -1), (di[pos], -1), (vals, 0.0), (tids[pos], -1)])
        res.add(key, {"row": rows_, "doc": docs_.astype(np.int32), "val": vals_.astype(np.float32),
                      "tok": toks_.astype(np.int32)})
        del lat, pos, vals, keys
        if progress is not None:
            progress.update(n)
        if stop is not None:
            stop.check()

    windows, plans = _choose_windows(cfg, latents, top, res, doc_start, doc_stop, n_active, act_sum)
    _fill_activating(store, reader, windows)
    _random_windows(store, reader, cfg, seed, plans, doc_start, doc_stop)
    _fill_text(store, TokenText(tokenizer), [w for p in plans for w in p["explain"] + p["score"]], doc_start)
    if stop is not None:
        stop.check()
    text = TokenText(tokenizer)
    return [_finish(cfg, p, text, store.n_tokens) for p in plans]


def _window_rows(row: int, doc: int, cfg: ContextConfig, doc_start, doc_stop) -> tuple[int, int]:
    return max(row - cfg.window_left, int(doc_start[doc])), min(row + cfg.window_right + 1, int(doc_stop[doc]))


def _choose_windows(cfg, latents, top, res, doc_start, doc_stop, n_active, act_sum):
    gap = cfg.window_left + cfg.window_right
    windows, plans = [], []
    for j, latent in enumerate(latents):
        order = np.argsort(-top.key[j], kind="stable")
        taken = _Taken(gap)
        explain = []
        for i in order:
            v = float(top.key[j, i])
            if not v > 0 or len(explain) == cfg.n_explain:
                break
            r, d = int(top.payload["row"][j, i]), int(top.payload["doc"][j, i])
            if taken.overlaps(r, d):
                continue
            taken.add(r, d)
            explain.append({"row": r, "doc": d, "value": v, "col": j})

        valid = np.isfinite(res.key[j])  # sampled activating entries (padding has key -inf)
        s_vals = res.payload["val"][j][valid]
        s_rows = res.payload["row"][j][valid]
        s_docs = res.payload["doc"][j][valid]
        s_toks = res.payload["tok"][j][valid]
        by_value = np.argsort(s_vals, kind="stable")
        candidates = []
        for i in by_value:
            r, d = int(s_rows[i]), int(s_docs[i])
            if not taken.overlaps(r, d):
                taken.add(r, d)
                candidates.append({"row": r, "doc": d, "value": float(s_vals[i]), "col": j, "active": True})
        score = []
        if candidates and cfg.n_score:
            m = len(candidates)
            picks = sorted({min(m - 1, int((q + 0.5) * m / cfg.n_score)) for q in range(cfg.n_score)})
            score = [candidates[p] for p in picks]
        if len(score) < cfg.n_score and len(explain) > 1:
            # too few distinct activating windows for both sets: hold out every other top window
            moved = explain[1::2][:cfg.n_score - len(score)]
            explain = [w for w in explain if w not in moved]
            score = score + [{**w, "active": True} for w in moved]
        for w in explain + score:
            w["start"], w["stop"] = _window_rows(w["row"], w["doc"], cfg, doc_start, doc_stop)
            windows.append(w)
        plans.append({"latent": int(latent), "col": j, "n_active": int(n_active[j]),
                      "act_sum": float(act_sum[j]), "explain": explain, "score": score,
                      "sample_vals": s_vals, "sample_toks": s_toks})
    return windows, plans


def _fill_activating(store, reader: LatentReader, windows: list[dict], block: int = 1 << 16) -> None:
    """Per-token activations (and token ids) of every window, reading only the store blocks that hold them."""
    if not windows:
        return
    lengths = np.array([w["stop"] - w["start"] for w in windows], dtype=np.int64)
    owner = np.repeat(np.arange(len(windows)), lengths)
    rows = np.concatenate([np.arange(w["start"], w["stop"]) for w in windows])
    cols = np.repeat(np.array([w["col"] for w in windows], dtype=np.int64), lengths)
    order = np.argsort(rows, kind="stable")
    rows, cols, owner = rows[order], cols[order], owner[order]
    vals = np.empty(len(rows), dtype=np.float32)
    toks = np.empty(len(rows), dtype=np.int32)
    bounds = np.searchsorted(rows, np.arange(0, store.n_tokens + block, block))
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        first, last = int(rows[lo]), int(rows[hi - 1]) + 1
        x = store.rows(first, last)
        vals[lo:hi] = reader.pairs(x, rows[lo:hi] - first, cols[lo:hi])
        toks[lo:hi] = store.token_ids(first, last)[rows[lo:hi] - first]
    back = np.argsort(order, kind="stable")  # original (window-major) order
    vals, toks = vals[back], toks[back]
    offset = 0
    for w, n in zip(windows, lengths):
        w["acts"] = vals[offset:offset + n].tolist()
        w["ids"] = toks[offset:offset + n].tolist()
        w["mark"] = w["row"] - w["start"]
        offset += n


def _random_windows(store, reader: LatentReader, cfg: ContextConfig, seed: int, plans, doc_start,
                    doc_stop) -> None:
    """Held-out non-activating windows: from a seeded pool of random rows, those whose whole window is zero
    for the latent."""
    if cfg.n_score == 0:
        return
    rng = np.random.default_rng([seed, 1])
    pool_size = int(min(store.n_tokens, max(16 * cfg.n_score, 128)))
    centre = np.sort(rng.choice(store.n_tokens, size=pool_size, replace=False))
    docs = store.f["doc_index"][centre].astype(np.int64)
    spans = [_window_rows(int(r), int(d), cfg, doc_start, doc_stop) for r, d in zip(centre, docs)]
    needed = np.unique(np.concatenate([np.arange(a, b) for a, b in spans]))
    x = store.take(needed)
    values = reader.columns(x)  # [U, L]
    ids = store.f["token_ids"][needed]
    where = {int(r): i for i, r in enumerate(needed)}
    window_idx = [np.array([where[r] for r in range(a, b)]) for a, b in spans]
    window_max = np.stack([values[w].max(0) for w in window_idx])  # [pool, L]
    for p in plans:
        j = p["col"]
        order = np.random.default_rng([seed, 2, p["latent"]]).permutation(pool_size)
        got = []
        for i in order:
            if window_max[i, j] == 0:
                (a, b), w = spans[i], window_idx[i]
                got.append({"row": int(centre[i]), "doc": int(docs[i]), "value": 0.0, "col": j, "active": False,
                            "start": a, "stop": b, "acts": values[w, j].tolist(), "ids": ids[w].tolist(),
                            "mark": None})
                if len(got) == cfg.n_score:
                    break
        p["score"] = p["score"] + got
        p["n_random_short"] = cfg.n_score - len(got)


def _fill_text(store, text: TokenText, windows: list[dict], doc_start, block: int = 512) -> None:
    docs = sorted({w["doc"] for w in windows})
    by_doc: dict[int, list[dict]] = {}
    for w in windows:
        by_doc.setdefault(w["doc"], []).append(w)
    for s in range(0, len(docs), block):
        chunk = np.array(docs[s:s + block])
        texts = store.f["docs"]["text"][chunk]
        ids = store.f["docs"]["id"][chunk]
        for d, raw_text, raw_id in zip(chunk, texts, ids):
            doc_text = raw_text.decode() if isinstance(raw_text, bytes) else str(raw_text)
            doc_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            tok_ids, pieces = text.doc_pieces(doc_text)
            for w in by_doc[int(d)]:
                i0 = w["start"] - int(doc_start[d])
                i1 = i0 + len(w["ids"])
                w["doc_id"] = doc_id
                if i1 <= len(tok_ids) and tok_ids[i0:i1] == w["ids"]:
                    w["tokens"] = pieces[i0:i1]
                else:
                    text.fallbacks += 1
                    w["tokens"] = [text.of_id(t) for t in w["ids"]]
    if text.fallbacks:
        log.info("%d window(s) did not match their document's tokenisation; token text decoded from ids",
                 text.fallbacks)


def _context_out(w: dict) -> dict:
    out = {"doc": w["doc"], "doc_id": w.get("doc_id", ""), "row": w["row"], "start": w["start"],
           "tokens": w["tokens"], "token_ids": w["ids"], "acts": [round(a, 5) for a in w["acts"]],
           "mark": w["mark"], "value": round(w["value"], 5)}
    if "active" in w:
        out["active"] = w["active"]
    return out


def _finish(cfg: ContextConfig, p: dict, text: TokenText, n_tokens: int) -> dict:
    vals, toks = p["sample_vals"], p["sample_toks"]
    max_act = max([w["value"] for w in p["explain"]], default=0.0)
    counts, edges = np.histogram(vals, bins=cfg.hist_bins, range=(0.0, max_act if max_act > 0 else 1.0))
    top_tokens = []
    if len(toks):
        uniq, inverse, count = np.unique(toks, return_inverse=True, return_counts=True)
        mean = np.bincount(inverse, weights=vals) / count
        for i in np.lexsort((uniq, -count))[:cfg.n_top_tokens]:
            top_tokens.append({"token": text.of_id(int(uniq[i])), "id": int(uniq[i]),
                               "share": round(float(count[i]) / len(toks), 4), "mean_act": round(float(mean[i]), 5)})
    n = p["n_active"]
    return {
        "latent": p["latent"],
        "n_active": n,
        "density": n / n_tokens,
        "max_activation": round(max_act, 5),
        "mean_activation": round(p["act_sum"] / n, 5) if n else 0.0,
        "histogram": {"edges": [round(float(e), 5) for e in edges], "counts": counts.tolist(), "sample_size": int(len(vals))},
        "top_tokens": top_tokens,
        "explain": [_context_out(w) for w in p["explain"]],
        "score": [_context_out(w) for w in p["score"]],
        "n_random_short": p.get("n_random_short", 0),
    }
