"""The paper's SAE metrics, accumulated batch by batch (never the full tokens x latents matrix).

One `SaeMetrics` per SAE takes (x, x_hat, f, token_ids) for each batch of evaluated tokens and keeps:

- float64 sums for MSE, cosine, L0, and a per-dimension running mean / M2 (Chan's merge) for FVU;
- per-latent activation counts and activation mass [d_sae];
- per-token-type counts, summed and maximum reconstruction error [types seen], from which the error
  of the rarest decile of token types (`tail_error`: the paper's Fig. 3 numbers) is read;
- fixed-bin histograms of per-token entropy over latents and of per-token max activation;
- the activation mass of each (latent, token type) pair that occurred, as sorted int64 keys
  (latent << 32 | token) with float64 values, consolidated every `pending_limit` new entries.
  Distinct pairs are at most min(d_sae * types seen, tokens * L0); beyond `max_pairs` the pairs with
  the smallest share of their latent's mass so far are dropped (tail coverage is then a lower bound
  and reported with "exact": false).

Memory: O(d_sae + vocab + 16 bytes * min(pairs, max_pairs)), independent of the number of tokens.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("ssae")
SCHEMA = "ssae.metrics/1"
TOKEN_BITS = 32
ENTROPY_BINS = 100
MAX_ACT_EDGES = np.concatenate([[0.0], np.logspace(-4, 5, 91)])  # first bin [0, 1e-4) holds "nothing active"
COSINE_EDGES = np.linspace(-1.0, 1.0, 101)
LOG_RATIO_EDGES = np.linspace(-8.0, 8.0, 81)


@dataclass
class MetricConfig:
    dense_threshold: float = 0.1      # a latent is dense when active on more than this fraction of tokens
    coverage_share: float = 0.5       # a latent represents token type v when v has >= this share of its mass
    max_pairs: int = 8_000_000        # bound on stored (latent, token type) pairs (16 bytes each)
    pending_limit: int = 2_000_000    # new pair entries buffered before consolidation
    cosine_pairs: int = 2_000_000     # decoder cosine: all pairs up to this many, else a random sample of it
    tail_fraction: float = 0.1        # tail_error: the rarest this fraction of the token types seen


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    if n <= len(a):
        return a
    out = np.zeros(max(n, 2 * len(a)), dtype=a.dtype)
    out[:len(a)] = a
    return out


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin, with values outside the edges clipped into the first/last bin."""
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1).astype(np.int64)


def hist_quantiles(counts: np.ndarray, edges: np.ndarray, qs=(0.1, 0.5, 0.9)) -> dict:
    """Quantiles read off a histogram (linear within a bin)."""
    total = counts.sum()
    out = {}
    if total == 0:
        return {f"q{int(q * 100)}": None for q in qs}
    cum = np.cumsum(counts)
    for q in qs:
        target = q * total
        b = int(np.searchsorted(cum, target, side="left"))
        b = min(b, len(counts) - 1)
        before = cum[b - 1] if b else 0
        frac = (target - before) / counts[b] if counts[b] else 0.0
        out[f"q{int(q * 100)}"] = float(edges[b] + frac * (edges[b + 1] - edges[b]))
    return out


def log2_bins(values: np.ndarray) -> np.ndarray:
    """Bin index floor(log2(v)) for v >= 1: bin b holds [2^b, 2^(b+1))."""
    return np.floor(np.log2(np.maximum(values, 1))).astype(np.int64)


class SaeMetrics:
    """Streaming accumulators of one SAE's activation-based metrics."""

    def __init__(self, d_in: int, d_sae: int, cfg: MetricConfig | None = None, vocab_size: int = 0):
        self.cfg = cfg or MetricConfig()
        self.d_in, self.d_sae = d_in, d_sae
        self.n = 0
        self.sq_err = 0.0
        self.cos_sum = 0.0
        self.l0_sum = 0.0
        self.mean = np.zeros(d_in)      # per-dimension running mean of x
        self.m2 = np.zeros(d_in)        # per-dimension sum of squared deviations
        self.counts = np.zeros(d_sae, dtype=np.int64)
        self.mass = np.zeros(d_sae)
        self.entropy_edges = np.linspace(0.0, math.log(max(d_sae, 2)), ENTROPY_BINS + 1)
        self.entropy_hist = np.zeros(ENTROPY_BINS, dtype=np.int64)
        self.entropy_sum = 0.0
        self.entropy_sq = 0.0
        self.n_none_active = 0
        self.max_act_hist = np.zeros(len(MAX_ACT_EDGES) - 1, dtype=np.int64)
        self.max_act_sum = 0.0
        self.max_act_sq = 0.0
        self.max_act_max = 0.0
        self.type_count = np.zeros(max(vocab_size, 1), dtype=np.int64)
        self.type_err_sum = np.zeros(max(vocab_size, 1))
        self.type_err_max = np.zeros(max(vocab_size, 1))
        self.pair_keys = np.zeros(0, dtype=np.int64)
        self.pair_mass = np.zeros(0)
        self._pending_keys: list[np.ndarray] = []
        self._pending_mass: list[np.ndarray] = []
        self._pending = 0
        self.pairs_exact = True

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, token_ids: np.ndarray) -> None:
        """Add a batch: x, x_hat [n, d_in], f [n, d_sae] (float), token_ids [n]."""
        n = x.shape[0]
        if n == 0:
            return
        x, x_hat, f = x.float(), x_hat.float(), f.float()
        err = ((x - x_hat) ** 2).sum(1)
        cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=1e-8)
        active = f > 0
        l0 = active.sum(1)
        fsum = f.sum(1)
        p = f / fsum.clamp_min(1e-30)[:, None]
        entropy = -torch.special.xlogy(p, p).sum(1)
        fmax = f.max(1).values
        rows, latents = active.nonzero(as_tuple=True)
        values = f[rows, latents]

        # per-dimension mean/M2 merge (Chan et al.) for the FVU denominator
        xd = x.double()
        b_mean = xd.mean(0)
        b_m2 = ((xd - b_mean) ** 2).sum(0)
        b_mean, b_m2 = b_mean.cpu().numpy(), b_m2.cpu().numpy()
        total = self.n + n
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + b_m2 + delta ** 2 * (self.n * n / total)
        self.n = total

        err_np = err.double().cpu().numpy()
        self.sq_err += float(err_np.sum())
        self.cos_sum += float(cos.double().sum())
        self.l0_sum += float(l0.sum())
        self.counts += active.sum(0).cpu().numpy().astype(np.int64)
        self.mass += f.double().sum(0).cpu().numpy()

        some = (fsum > 0).cpu().numpy()
        ent = entropy.double().cpu().numpy()[some]
        self.n_none_active += int(n - some.sum())
        self.entropy_hist += histogram(ent, self.entropy_edges)
        self.entropy_sum += float(ent.sum())
        self.entropy_sq += float((ent ** 2).sum())
        fmax_np = fmax.double().cpu().numpy()
        self.max_act_hist += histogram(fmax_np, MAX_ACT_EDGES)
        self.max_act_sum += float(fmax_np.sum())
        self.max_act_sq += float((fmax_np ** 2).sum())
        self.max_act_max = max(self.max_act_max, float(fmax_np.max()))

        tok = np.asarray(token_ids, dtype=np.int64)
        top = int(tok.max()) + 1
        self.type_count = _grow(self.type_count, top)
        self.type_err_sum = _grow(self.type_err_sum, top)
        self.type_err_max = _grow(self.type_err_max, top)
        np.add.at(self.type_count, tok, 1)
        per_elem = err_np / self.d_in
        np.add.at(self.type_err_sum, tok, per_elem)
        np.maximum.at(self.type_err_max, tok, per_elem)

        if len(values):
            keys = (latents.cpu().numpy().astype(np.int64) << TOKEN_BITS) | tok[rows.cpu().numpy()]
            self._pending_keys.append(keys)
            self._pending_mass.append(values.double().cpu().numpy())
            self._pending += len(keys)
            if self._pending >= self.cfg.pending_limit:
                self._consolidate()

    def _consolidate(self) -> None:
        if not self._pending_keys:
            return
        keys = np.concatenate([self.pair_keys, *self._pending_keys])
        mass = np.concatenate([self.pair_mass, *self._pending_mass])
        self._pending_keys, self._pending_mass, self._pending = [], [], 0
        uniq, inverse = np.unique(keys, return_inverse=True)
        self.pair_keys = uniq
        self.pair_mass = np.bincount(inverse, weights=mass, minlength=len(uniq))
        if len(uniq) > self.cfg.max_pairs:
            share = self.pair_mass / np.maximum(self.mass[uniq >> TOKEN_BITS], 1e-30)
            keep = np.sort(np.argpartition(-share, self.cfg.max_pairs // 2)[:self.cfg.max_pairs // 2])
            self.pair_keys, self.pair_mass = self.pair_keys[keep], self.pair_mass[keep]
            self.pairs_exact = False

    # ---- results -------------------------------------------------------------------------------
    def result(self) -> dict:
        self._consolidate()
        n = max(self.n, 1)
        sst = float(self.m2.sum())
        freq = self.counts / n
        out = {
            "n_tokens": int(self.n),
            "mse": self.sq_err / (n * self.d_in),
            "fvu": self.sq_err / sst if sst > 0 else None,
            "cosine": self.cos_sum / n,
            "l0": self.l0_sum / n,
            "dead_fraction": float((self.counts == 0).mean()),
            "dense_fraction": float((freq > self.cfg.dense_threshold).mean()),
            "n_dead": int((self.counts == 0).sum()),
            "n_dense": int((freq > self.cfg.dense_threshold).sum()),
            "entropy": self._entropy_summary(),
            "max_activation": self._max_act_summary(),
            "activation_counts_by_rank": np.sort(self.counts)[::-1].tolist(),
            "tail_coverage": self.tail_coverage(),
            "error_by_frequency_rank": self.error_by_rank(),
            "tail_error": self.tail_error(),
        }
        return out

    def _entropy_summary(self) -> dict:
        m = int(self.entropy_hist.sum())
        mean = self.entropy_sum / m if m else None
        std = math.sqrt(max(self.entropy_sq / m - mean ** 2, 0.0)) if m else None
        return {"unit": "nats", "mean": mean, "std": std, "n_tokens_none_active": self.n_none_active,
                **hist_quantiles(self.entropy_hist, self.entropy_edges),
                "histogram": {"edges": self.entropy_edges.tolist(), "counts": self.entropy_hist.tolist()}}

    def _max_act_summary(self) -> dict:
        n = max(self.n, 1)
        mean = self.max_act_sum / n
        return {"mean": mean, "std": math.sqrt(max(self.max_act_sq / n - mean ** 2, 0.0)), "max": self.max_act_max,
                **hist_quantiles(self.max_act_hist, MAX_ACT_EDGES),
                "histogram": {"edges": MAX_ACT_EDGES.tolist(), "counts": self.max_act_hist.tolist()}}

    def represented_types(self) -> np.ndarray:
        """Token types v for which some latent puts >= coverage_share of its mass on v."""
        self._consolidate()
        if not len(self.pair_keys):
            return np.zeros(0, dtype=np.int64)
        latent = self.pair_keys >> TOKEN_BITS
        share = self.pair_mass / np.maximum(self.mass[latent], 1e-30)
        hit = share >= self.cfg.coverage_share - 1e-12
        return np.unique(self.pair_keys[hit] & ((1 << TOKEN_BITS) - 1))

    def tail_coverage(self) -> dict:
        seen = np.nonzero(self.type_count)[0]
        covered = np.zeros(len(self.type_count), dtype=bool)
        rep = self.represented_types()
        covered[rep] = True
        bins = log2_bins(self.type_count[seen])
        n_bins = int(bins.max()) + 1 if len(bins) else 0
        n_types = np.bincount(bins, minlength=n_bins)
        n_cov = np.bincount(bins, weights=covered[seen].astype(float), minlength=n_bins).astype(np.int64)
        total_cov = int(n_cov.sum())
        return {
            "share_threshold": self.cfg.coverage_share,
            "exact": self.pairs_exact,
            "n_types": int(len(seen)),
            "n_types_represented": total_cov,
            "represented_fraction": total_cov / len(seen) if len(seen) else None,
            "bin_lower": [int(2 ** b) for b in range(n_bins)],
            "bin_upper": [int(2 ** (b + 1)) for b in range(n_bins)],
            "n_types_per_bin": n_types.tolist(),
            "n_represented_per_bin": n_cov.tolist(),
            "fraction_per_bin": [(c / t if t else None) for c, t in zip(n_cov.tolist(), n_types.tolist())],
            "cumulative": (np.cumsum(n_cov) / total_cov).tolist() if total_cov else [0.0] * n_bins,
            "n_pairs": int(len(self.pair_keys)),
        }

    def tail_error(self) -> dict:
        """Reconstruction error of the rarest token types, next to that of all types.  A type's error is
        its mean MSE (per token, per dimension) on the eval set; the tail is the n = ceil(tail_fraction x
        types seen) rarest types by eval-set count.  `mean`/`max`: the mean/max over the tail's types of
        their error; `all_types_mean`/`all_types_max` the same over every type seen.

        Types tied at the tail's boundary count (on a small eval set most types occur once) are not cut by
        an arbitrary order (token ids are not neutral: BPE gives frequent pieces small ids): mean and max
        are their expectations when the tail's remaining k places go to k of the m tied types chosen
        uniformly at random.  E[mean] uses the tied types' mean error; for the max, with the tied errors
        sorted v_1 <= ... <= v_m, P(the largest chosen is v_j) = C(j-1, k-1) / C(m, k)."""
        fraction = getattr(self.cfg, "tail_fraction", 0.1)  # states pickled before the field existed
        seen = np.nonzero(self.type_count)[0]
        if not len(seen):
            return {"fraction": fraction, "n_types": 0, "mean": None, "max": None}
        counts = self.type_count[seen]
        per_type = self.type_err_sum[seen] / counts
        n = max(1, math.ceil(fraction * len(seen)))
        boundary = int(np.sort(counts)[n - 1])
        below, tied = per_type[counts < boundary], np.sort(per_type[counts == boundary])
        k, m = n - len(below), len(tied)
        mean = (below.sum() + k * tied.mean()) / n
        j = np.arange(k, m + 1)  # the largest chosen tied type is the j-th smallest, j >= k
        log_p = np.array([_log_comb(i - 1, k - 1) for i in j]) - _log_comb(m, k)
        top = np.maximum(tied[j - 1], below.max() if len(below) else -np.inf)
        return {"fraction": fraction, "n_types": int(n), "n_types_seen": int(len(seen)), "max_count": boundary,
                "n_tied": int(m), "n_tokens": float(counts[counts < boundary].sum() + k * boundary),
                "mean": float(mean), "max": float((np.exp(log_p) * top).sum()),
                "all_types_mean": float(per_type.mean()), "all_types_max": float(per_type.max())}

    def error_by_rank(self) -> dict:
        seen = np.nonzero(self.type_count)[0]
        order = seen[np.argsort(-self.type_count[seen], kind="stable")]
        ranks = np.arange(1, len(order) + 1)
        bins = log2_bins(ranks)
        n_bins = int(bins.max()) + 1 if len(bins) else 0
        tokens = np.bincount(bins, weights=self.type_count[order], minlength=n_bins)
        err_sum = np.bincount(bins, weights=self.type_err_sum[order], minlength=n_bins)
        err_max = np.zeros(n_bins)
        np.maximum.at(err_max, bins, self.type_err_max[order])
        return {
            "rank_lower": [int(2 ** b) for b in range(n_bins)],
            "rank_upper": [int(min(2 ** (b + 1) - 1, len(order))) for b in range(n_bins)],
            "n_tokens_per_bin": tokens.astype(np.int64).tolist(),
            "mean": (err_sum / np.maximum(tokens, 1)).tolist(),
            "max": err_max.tolist(),
        }


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def log_ratio_counts(counts: np.ndarray, baseline_counts: np.ndarray) -> dict:
    """Per-latent ln((c + 1) / (c_baseline + 1)) of activation counts, for latents aligned by index."""
    lr = np.log((np.asarray(counts, float) + 1) / (np.asarray(baseline_counts, float) + 1))
    return {"pseudo_count": 1, "mean": float(lr.mean()), "median": float(np.median(lr)), "std": float(lr.std()),
            "fraction_more_active": float((lr > math.log(2)).mean()),
            "fraction_less_active": float((lr < -math.log(2)).mean()),
            "fraction_below_zero": float((lr < 0).mean()),
            "histogram": {"edges": LOG_RATIO_EDGES.tolist(), "counts": histogram(lr, LOG_RATIO_EDGES).tolist()}}


@torch.no_grad()
def decoder_cosine(W_dec: torch.Tensor, max_pairs: int = 2_000_000, seed: int = 0, block: int = 1024) -> dict:
    """Cosine similarity between the decoder rows of distinct latents: all pairs when there are at most
    `max_pairs`, otherwise all pairs among a random subset of m latents (seeded) with m(m-1)/2 <= max_pairs.
    `nearest_neighbour_*`: each (subset) latent's largest cosine with any other latent."""
    W = W_dec.detach().float().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = W.shape[0]
    sampled = d * (d - 1) // 2 > max_pairs
    if sampled:
        m = max(2, int((1 + math.sqrt(1 + 8 * max_pairs)) // 2))
        rows = np.sort(np.random.default_rng(seed).choice(d, size=m, replace=False))
    else:
        rows = np.arange(d)
    sub = W[torch.from_numpy(rows)]
    counts = np.zeros(len(COSINE_EDGES) - 1, dtype=np.int64)
    s = sq = 0.0
    top = -1.0
    n_pairs = 0
    nn_max = np.full(len(rows), -1.0)
    with_nn = len(rows) * d <= 50_000_000
    for i0 in range(0, len(rows), block):
        i1 = min(i0 + block, len(rows))
        sims = (sub[i0:i1] @ sub.T).double().numpy()
        v = sims[np.arange(i1 - i0)[:, None] + i0 < np.arange(len(rows))[None, :]]  # pairs i < j
        counts += histogram(v, COSINE_EDGES)
        s += float(v.sum())
        sq += float((v ** 2).sum())
        if len(v):
            top = max(top, float(v.max()))
        n_pairs += len(v)
        if with_nn and d > 1:
            full = (sub[i0:i1] @ W.T).double().numpy()
            full[np.arange(i1 - i0), rows[i0:i1]] = -np.inf
            nn_max[i0:i1] = full.max(1)
    mean = s / n_pairs if n_pairs else None
    out = {"n_pairs": n_pairs, "sampled": bool(sampled), "n_latents_sampled": int(len(rows)), "mean": mean,
           "std": math.sqrt(max(sq / n_pairs - mean ** 2, 0.0)) if n_pairs else None,
           "max": top if n_pairs else None, **hist_quantiles(counts, COSINE_EDGES, (0.5, 0.99)),
           "histogram": {"edges": COSINE_EDGES.tolist(), "counts": counts.tolist()}}
    if with_nn and d > 1:
        out["nearest_neighbour_mean"] = float(nn_max.mean())
        out["fraction_nearest_above_0.9"] = float((nn_max > 0.9).mean())
    return out


@torch.no_grad()
def aligned_decoder_cosine(W_dec: torch.Tensor, W_base: torch.Tensor) -> dict:
    """Cosine between decoder row i of an SAE and row i of its (same-width) baseline."""
    a = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    b = torch.nn.functional.normalize(W_base.detach().float().cpu(), dim=1)
    v = (a * b).sum(1).double().numpy()
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()),
            "fraction_below_0.9": float((v < 0.9).mean()),
            "histogram": {"edges": COSINE_EDGES.tolist(), "counts": histogram(v, COSINE_EDGES).tolist()}}


class LMScores:
    """Summed next-token cross-entropy (nats) of the clean, zero-ablated and spliced runs."""

    def __init__(self, names: list[str]):
        self.n = 0
        self.clean = 0.0
        self.zero = 0.0
        self.spliced = {name: 0.0 for name in names}

    def result(self, name: str) -> dict:
        n = max(self.n, 1)
        clean, zero, spliced = self.clean / n, self.zero / n, self.spliced[name] / n
        denom = zero - clean
        return {"n_predictions": self.n, "ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
                "ce_delta": spliced - clean,
                "ce_recovered": (zero - spliced) / denom if abs(denom) > 1e-12 else None,
                "ppl_clean": math.exp(clean), "ppl_spliced": math.exp(min(spliced, 700.0)),
                "ppl_zero_ablation": math.exp(min(zero, 700.0))}


# ---- a whole evaluation: state (checkpointable), the activation-file pass, the final summary ----------
STATE_SCHEMA = "ssae.evalstate/1"


class EvalState:
    """Everything accumulated so far; saved at an interruption and resumed by a rerun.

    The saved file cannot run code: a first line `ssae.evalstate/1 <key>` (read and compared before
    anything else is parsed, so another run's file is never decoded), a line of JSON naming the SAEs and
    their settings, then an .npz (loaded without pickle) holding every number."""

    def __init__(self, key: str, dims: dict[str, tuple[int, int]], cfg: MetricConfig, with_lm: bool,
                 vocab_size: int = 0):
        self.key = key
        self.acc = {name: SaeMetrics(d_in, d_sae, cfg, vocab_size) for name, (d_in, d_sae) in dims.items()}
        self.lm = LMScores(list(dims)) if with_lm else None
        self.done = 0          # windows (--docs) or rows (--activations) consumed
        self.n_tokens = 0      # evaluated tokens
        self.n_short_docs = 0

    def _parts(self) -> dict:
        """name -> object whose numeric attributes are saved ("" is the state itself)."""
        parts = {"": self, **{f"acc{i}": acc for i, acc in enumerate(self.acc.values())}}
        if self.lm is not None:
            parts["lm"] = self.lm
        return parts

    def save(self, path: str) -> None:
        import dataclasses
        import io
        import json

        from ..core.outputs import write_private_file

        arrays = {}
        for prefix, obj in self._parts().items():
            if isinstance(obj, SaeMetrics):
                obj._consolidate()
            for name, value in vars(obj).items():
                if isinstance(value, (bool, int, float, np.ndarray, np.generic)):
                    arrays[f"{prefix}.{name}"] = np.asarray(value)
        if self.lm is not None:
            arrays["lm.spliced"] = np.asarray([self.lm.spliced[n] for n in self.acc], dtype=np.float64)
        header = {"names": list(self.acc), "with_lm": self.lm is not None,
                  "metric_config": [dataclasses.asdict(acc.cfg) for acc in self.acc.values()]}
        body = io.BytesIO()
        np.savez(body, **arrays)
        write_private_file(path, f"{STATE_SCHEMA} {self.key}\n{json.dumps(header)}\n".encode() + body.getvalue())

    @staticmethod
    def load(path: str, key: str) -> "EvalState | None":
        """The checkpoint at `path` when it belongs to the same inputs and configuration (its first line
        says so); None for anything else, which is never decoded further."""
        import json

        from ..core.outputs import open_partial

        f = open_partial(path)
        if f is None:
            return None
        with f:
            if f.readline(len(STATE_SCHEMA) + len(key) + 2) != f"{STATE_SCHEMA} {key}\n".encode():
                return None
            try:
                header = json.loads(f.readline(1 << 24))
                saved = np.load(f, allow_pickle=False)
                arrays = {name: saved[name] for name in saved.files}
                names, cfgs = list(header["names"]), header["metric_config"]
                state = EvalState(key, {n: (int(arrays[f"acc{i}.d_in"]), int(arrays[f"acc{i}.d_sae"]))
                                        for i, n in enumerate(names)},
                                  MetricConfig(), with_lm=bool(header["with_lm"]))
                for i, acc in enumerate(state.acc.values()):
                    acc.cfg = MetricConfig(**cfgs[i])
            except (ValueError, KeyError, TypeError, OSError, EOFError) as e:
                log.warning("%s: unreadable evaluation state (%s): starting over", path, e)
                return None
        for prefix, obj in state._parts().items():
            for name, value in list(vars(obj).items()):
                saved_value = arrays.get(f"{prefix}.{name}")
                if saved_value is None:
                    continue
                if isinstance(value, np.ndarray):
                    setattr(obj, name, saved_value)
                elif isinstance(value, (bool, int, float)):
                    setattr(obj, name, saved_value.item())  # int, float or bool, as saved
        if state.lm is not None:
            state.lm.spliced = {n: float(v) for n, v in zip(state.acc, arrays["lm.spliced"])}
        return state


@torch.no_grad()
def evaluate_store(store, saes: list, state: EvalState, rows: int = 4096, max_tokens: int | None = None,
                   device: str = "cpu", stop=None, quiet: bool = False, save=None) -> None:
    """Activation metrics of each (name, SAE) over an ActivationStore, chunk by chunk, resuming after
    `state.done` rows."""
    from ..core.progress import Progress
    from ..data.batches import check_finite

    stop_row = store.n_tokens if max_tokens is None else min(store.n_tokens, max_tokens)
    with Progress("eval", total=stop_row, unit="tokens", quiet=quiet) as progress:
        progress.done = state.done
        for start, chunk in store.iter_chunks(rows, state.done, stop_row):
            check_finite(store.path, start, chunk)  # refused as ssae-fit refuses it, not null metrics
            x = torch.from_numpy(chunk).to(device)
            token_ids = store.token_ids(start, start + len(chunk))
            for name, sae in saes:
                x_hat, f = sae(x)
                state.acc[name].update(x, x_hat, f, token_ids)
            state.done = start + len(chunk)
            state.n_tokens = state.done
            progress.update(len(chunk))
            if stop is not None:
                stop.check(save)


def _parent_matches(parent, baseline_path: str, baseline_sha: str | None) -> bool | None:
    """Whether an SAE's cfg `parent` ({path, sha256} or a path) names the baseline, i.e. its latents
    are aligned with the baseline's by index. None when the SAE records no parent."""
    import os

    from ..core.outputs import sha256_file

    if not parent:
        return None
    path = parent.get("path") if isinstance(parent, dict) else parent
    sha = parent.get("sha256") if isinstance(parent, dict) else None
    if sha:
        weights = os.path.join(baseline_path, "sae.safetensors")
        known = {baseline_sha, sha256_file(weights) if os.path.exists(weights) else None}
        return sha in known
    if isinstance(path, str):
        return os.path.realpath(path) == os.path.realpath(baseline_path)
    return None


def summarise(state: EvalState, saes: list, infos: list[dict], baseline: str | None, cosine_pairs: int,
              seed: int = 0) -> list[dict]:
    """One `ssae.metrics/1` entry per SAE: `infos[i]` (name, path, cfg fields) plus every metric."""
    results = {}
    for (name, sae), info in zip(saes, infos):
        entry = {**info, **state.acc[name].result()}
        if state.lm is not None:
            entry.update(state.lm.result(name))
        entry["decoder_cosine"] = decoder_cosine(sae.W_dec, cosine_pairs, seed)
        results[name] = entry
    if baseline is not None:
        base_sae = dict(saes)[baseline]
        base = results[baseline]
        for (name, sae), info in zip(saes, infos):
            entry = results[name]
            if "ppl_spliced" in base:
                entry["rel_ppl_vs_baseline"] = entry["ppl_spliced"] / base["ppl_spliced"]
                entry["rel_ce_delta_vs_baseline"] = entry["ce_spliced"] - base["ce_spliced"]
            if name != baseline and sae.d_sae == base_sae.d_sae:
                aligned = _parent_matches(info.get("parent"), base["path"], base.get("sha256"))
                entry["aligned_with_baseline"] = aligned
                if aligned is not True:
                    log.warning("%s: not finetuned from the baseline as far as its cfg.json says; the per-latent "
                                "count log-ratios assume latent i of both SAEs is the same feature", name)
                entry["activation_count_log_ratio"] = log_ratio_counts(state.acc[name].counts,
                                                                      state.acc[baseline].counts)
                if sae.d_in == base_sae.d_in:
                    entry["decoder_cosine_vs_baseline"] = aligned_decoder_cosine(sae.W_dec, base_sae.W_dec)
    return [results[name] for name, _ in saes]
