"""PNG figures of `ssae.metrics/1` results (matplotlib, Agg; no pyplot global state).

Every function takes the list of per-SAE metric dicts and returns a Figure, or None when the metrics
needed are absent (e.g. perplexity without --docs).
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg", force=False)
from matplotlib.figure import Figure  # noqa: E402

import numpy as np  # noqa: E402


def _fig(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, (axes if ncols > 1 else [axes])


def _label(sae: dict) -> str:
    return sae["name"] + (" (baseline)" if sae.get("is_baseline") else "")


def _pareto(saes: list[dict], key: str, ylabel: str, title: str, ref: float | None = None):
    points = [(s["l0"], s[key], _label(s)) for s in saes if s.get(key) is not None]
    if not points:
        return None
    fig, (ax,) = _fig()
    for l0, y, name in points:
        ax.scatter([l0], [y], s=40, zorder=3)
        ax.annotate(name, (l0, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted(points)
    best, xs, ys = np.inf, [], []
    for l0, y, _ in front:
        if y < best:
            best = y
            xs.append(l0)
            ys.append(y)
    ax.plot(xs, ys, "--", color="grey", lw=1, label="Pareto front")
    if ref is not None:
        ax.axhline(ref, color="k", lw=0.8, ls=":")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def pareto_ppl(saes):
    fig = _pareto(saes, "ppl_spliced", "spliced-in perplexity", "L0 vs spliced-in perplexity")
    if fig is not None:
        clean = next((s["ppl_clean"] for s in saes if "ppl_clean" in s), None)
        if clean is not None:
            ax = fig.axes[0]
            ax.axhline(clean, color="k", lw=0.8, ls=":", label=f"clean model ({clean:.2f})")
            ax.legend(fontsize=8)
    return fig


def pareto_rel_ppl(saes):
    return _pareto(saes, "rel_ppl_vs_baseline", "spliced perplexity / baseline's", "L0 vs perplexity relative to baseline",
                   ref=1.0)


def pareto_fvu(saes):
    return _pareto(saes, "fvu", "fraction of variance unexplained", "L0 vs FVU")


def tail_coverage(saes):
    fig, (a, b) = _fig(2)
    for s in saes:
        tc = s["tail_coverage"]
        if not tc["bin_lower"]:
            continue
        x = tc["bin_lower"]
        frac = [np.nan if v is None else v for v in tc["fraction_per_bin"]]
        a.plot(x, frac, marker="o", ms=3, label=_label(s))
        b.plot(x, tc["cumulative"], marker="o", ms=3, label=_label(s))
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token-type frequency in the eval set (bin lower edge)")
        ax.legend(fontsize=8)
    a.set_ylabel("fraction of token types represented")
    a.set_title("Token types represented by >= 1 latent")
    b.set_ylabel("cumulative share of represented types")
    b.set_title("Cumulative (normalised) coverage, rare to frequent")
    return fig


def _hist_lines(ax, saes, key, log_x=False):
    lo, hi = np.inf, -np.inf
    for s in saes:
        h = s[key]["histogram"]
        edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"], float)
        if counts.sum() == 0:
            continue
        if log_x:
            edges = edges.copy()
            edges[0] = edges[1] / 10  # the zero bin, drawn one decade down
        used = np.nonzero(counts)[0]
        lo, hi = min(lo, edges[used[0]]), max(hi, edges[used[-1] + 1])
        ax.stairs(counts / counts.sum(), edges, label=_label(s))
    if log_x:
        ax.set_xscale("log")
    if np.isfinite(lo):
        ax.set_xlim(lo / 2 if log_x else lo - 0.05 * (hi - lo), hi * 2 if log_x else hi + 0.05 * (hi - lo))
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=8)


def entropy_and_max(saes):
    fig, (a, b) = _fig(2)
    _hist_lines(a, saes, "entropy")
    a.set_xlabel("entropy of latent activations per token (nats)")
    a.set_title("Per-token activation entropy")
    _hist_lines(b, saes, "max_activation", log_x=True)
    b.set_xlabel("max latent activation per token")
    b.set_title("Per-token max activation")
    return fig


def activation_counts(saes):
    fig, (ax,) = _fig()
    for s in saes:
        c = np.asarray(s["activation_counts_by_rank"], float)
        ax.plot(np.arange(1, len(c) + 1), np.where(c > 0, c, np.nan), label=_label(s))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latent rank")
    ax.set_ylabel("activation count on the eval set")
    ax.set_title("Latent activation counts by rank")
    ax.legend(fontsize=8)
    return fig


def log_ratio(saes):
    have = [s for s in saes if "activation_count_log_ratio" in s]
    if not have:
        return None
    fig, (ax,) = _fig()
    for s in have:
        h = s["activation_count_log_ratio"]["histogram"]
        ax.stairs(h["counts"], h["edges"], label=_label(s))
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("ln((count + 1) / (baseline count + 1)) per latent")
    ax.set_ylabel("latents")
    ax.set_title("Activation counts against the baseline (aligned latents)")
    ax.legend(fontsize=8)
    return fig


def error_by_rank(saes):
    fig, (a, b) = _fig(2)
    for s in saes:
        e = s["error_by_frequency_rank"]
        if not e["rank_lower"]:
            continue
        a.plot(e["rank_lower"], e["mean"], marker="o", ms=3, label=_label(s))
        b.plot(e["rank_lower"], e["max"], marker="o", ms=3, label=_label(s))
    for ax, what in ((a, "mean"), (b, "max")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token-type frequency rank (bin lower edge; 1 = most frequent)")
        ax.set_ylabel(f"{what} per-token squared error / d_in")
        ax.set_title(f"Reconstruction error by frequency rank ({what})")
        ax.legend(fontsize=8)
    return fig


def decoder_cosine(saes):
    fig, (ax,) = _fig()
    for s in saes:
        h = s["decoder_cosine"]["histogram"]
        counts = np.asarray(h["counts"], float)
        if counts.sum():
            ax.stairs(counts / counts.sum(), h["edges"], label=_label(s))
    ax.set_yscale("log")
    ax.set_xlabel("cosine similarity between decoder directions")
    ax.set_ylabel("fraction of latent pairs")
    ax.set_title("Pairwise decoder cosine similarity")
    ax.legend(fontsize=8)
    return fig


PLOTS = [
    ("pareto_ppl.png", "L0 vs spliced-in perplexity", pareto_ppl),
    ("pareto_rel_ppl.png", "L0 vs perplexity relative to the baseline", pareto_rel_ppl),
    ("pareto_fvu.png", "L0 vs fraction of variance unexplained", pareto_fvu),
    ("tail_coverage.png", "Tail coverage of token types", tail_coverage),
    ("entropy_max_activation.png", "Per-token activation entropy and max activation", entropy_and_max),
    ("activation_counts.png", "Latent activation counts by rank", activation_counts),
    ("activation_log_ratio.png", "Per-latent activation-count log-ratio against the baseline", log_ratio),
    ("error_by_rank.png", "Reconstruction error by token frequency rank", error_by_rank),
    ("decoder_cosine.png", "Pairwise decoder cosine similarities", decoder_cosine),
]


def make_plots(saes: list[dict], folder: str) -> list[tuple[str, str]]:
    """Write every applicable figure into `folder`; returns [(file name, title)]."""
    written = []
    for filename, title, draw in PLOTS:
        fig = draw(saes)
        if fig is None:
            continue
        fig.savefig(os.path.join(folder, filename))
        written.append((filename, title))
    return written
