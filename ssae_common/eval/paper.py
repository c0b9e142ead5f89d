"""The paper scoreboard: each result of Muhamed, Diab and Smith (arXiv 2411.00743) beside what this toolkit
measures, with a verdict computed from paired differences over seeds.

Input: the folder `make -C shell paper` fills (shell/paper.mk), read as
  <root>/<domain>/tail-s<seed>/metrics.json   every GSAE and SSAE of a seed on the held-out text's activations
  <root>/<domain>/eval-s<seed>/metrics.json   the SAEs whose spliced perplexity is compared, on its documents
                                              (every metric is read from here when there is no tail-s)
  <root>/pareto/eval-s<seed>/metrics.json     the k sweep (GSAE-k and its SSAE per k) on the first domain
  <root>/shift/shift.json                     SHIFT over seeded splits (Table 1)
SAEs are found by name (their folder's base name): gsae-<setting>, ssae-<recipe>-<setting>,
ssae-<recipe>-long-<setting>, gsae-k<k>, ssae-k<k>; a setting is t0 (ERM), t<T> (--tilt T) or ess<F>
(--tilt-ess F).

The verdict rule (docs/paper.md): per seed, the paired difference d = (a - b) / |b| between the two SAEs a
claim compares (a - b for fractions), evaluated on the same tokens; over n >= 3 seeds its mean m, sample sd
and standard error se = sd / sqrt(n). With s = -1 for a claim that a is lower, +1 for higher:
reproduced when s * m > 0 and |m| > 2 se, opposite when s * m < 0 and |m| > 2 se, otherwise not
reproduced; not testable here when fewer than 3 seeds have both SAEs, or the run has no such SAEs.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field

from .report import _get

MIN_SEEDS = 3
REPRODUCED, NOT_REPRODUCED, OPPOSITE, NOT_TESTABLE = "reproduced", "not reproduced", "opposite", "not testable here"
TERM_LABELS = {"t0": "ERM", "t500": "tilt 500", "t1e9": "tilt 1e9"}


def setting_label(setting: str) -> str:
    if setting in TERM_LABELS:
        return TERM_LABELS[setting]
    if setting.startswith("ess"):
        return f"tilt-ess {setting[3:]}"
    return f"tilt {setting[1:]}" if setting.startswith("t") else setting


@dataclass
class Verdict:
    verdict: str
    n: int = 0
    mean: float | None = None
    sd: float | None = None
    se: float | None = None
    values: list = field(default_factory=list)
    reason: str = ""


def decide(diffs: list[float], direction: str) -> Verdict:
    """The verdict of paired differences `diffs` (one per seed) for a claim that the difference is
    `direction` ("lower": below 0, "higher": above 0)."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be lower or higher, not {direction!r}")
    values = [float(d) for d in diffs if d is not None and math.isfinite(d)]
    n = len(values)
    if n < MIN_SEEDS:
        return Verdict(NOT_TESTABLE, n, values=values, reason=f"{n} seed(s) with both SAEs; the rule needs {MIN_SEEDS}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    sign = -1.0 if direction == "lower" else 1.0
    if abs(mean) > 2 * se and mean != 0:
        verdict = REPRODUCED if sign * mean > 0 else OPPOSITE
    else:
        verdict = NOT_REPRODUCED
    return Verdict(verdict, n, mean, sd, se, values)


@dataclass
class Metric:
    path: str          # dotted key in a metrics.json SAE entry
    label: str
    relative: bool = True   # (a - b) / |b|; False: a - b (fractions)
    spliced: bool = False   # needs the documents' evaluation (a forward pass), not the activations'
    derive: object = None   # a function of the SAE's metrics entry, in place of path


def mean_represented_bin(sae: dict):
    """The mean log2 frequency bin of the token types an SAE represents: the lower, the earlier its
    cumulative coverage rises (the area above the cumulative curve)."""
    per_bin = _get(sae, "tail_coverage.n_represented_per_bin")
    if not isinstance(per_bin, list) or not sum(per_bin):
        return None
    return sum(b * n for b, n in enumerate(per_bin)) / sum(per_bin)


def top_decile_share(sae: dict):
    """The share of all activations taken by the most active tenth of the latents: the flatter the
    activation count by rank, the lower."""
    counts = sae.get("activation_counts_by_rank")
    if not isinstance(counts, list) or not counts or not sum(counts):
        return None
    top = max(1, len(counts) // 10)
    return sum(sorted(counts, reverse=True)[:top]) / sum(counts)


METRICS = {
    "ppl": Metric("ppl_spliced", "spliced perplexity", spliced=True),
    "rare_mse": Metric("tail_error.mean", "rarest-decile mean error"),
    "rare_max": Metric("tail_error.max", "rarest-decile max error"),
    "represented": Metric("tail_coverage.represented_fraction", "share of token types represented", relative=False),
    "represented_bin": Metric("", "mean log2 frequency bin of the represented types", relative=False,
                              derive=mean_represented_bin),
    "top_decile": Metric("", "share of activations in the most active tenth of latents", relative=False,
                         derive=top_decile_share),
    "entropy": Metric("entropy.mean", "per-token activation entropy"),
    "max_act": Metric("max_activation.mean", "per-token max activation"),
    "dead": Metric("dead_fraction", "share of latents never active", relative=False),
}


def metric_value(sae: dict, metric: Metric):
    v = metric.derive(sae) if metric.derive else _get(sae, metric.path)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def paired_difference(a: float | None, b: float | None, relative: bool) -> float | None:
    if a is None or b is None:
        return None
    if not relative:
        return a - b
    return (a - b) / abs(b) if b != 0 else None


@dataclass
class Comparison:
    a: str           # SAE name (a template with {k} for the Pareto sweep)
    b: str
    metric: str      # key of METRICS
    direction: str   # the claim: a is "lower" or "higher" than b
    source: str = "domain"  # domain: <domain>/eval-s*; pareto: pareto/eval-s* (mean over k per seed)


@dataclass
class Section:
    key: str
    title: str
    claim: str
    comparisons: list[Comparison] = field(default_factory=list)
    figure: str | None = None     # a plots.py function, drawn on the first seed's SAEs of `figure_saes`
    figure_saes: tuple = ()       # name prefixes of the SAEs in the figure
    needs: str | None = None      # "explanations" or "shift": what else the section reads
    source: str = "domain"
    absent: str | None = None     # why there is nothing to compare, when the run's settings leave it out


def _vs(term: str) -> str:
    return setting_label(term)


def sections(terms: list[str], recipes: list[str], recipe: str, long_term: str | None, ks: list[int]) -> list[Section]:
    """The paper's results as sections, for the TERM settings `terms` (e.g. ess0.5 t500 t1e9), the
    retrieval `recipes`, the recipe whose SSAEs are tilted (`recipe`), the longer-budget setting and the
    Pareto k sweep."""
    gsae_terms = [Comparison(f"gsae-{t}", "gsae-t0", "rare_mse", "lower") for t in terms]
    gsae_terms += [Comparison(f"gsae-{t}", "gsae-t0", "rare_max", "lower") for t in terms]
    ssae_terms = [Comparison(f"ssae-{recipe}-{t}", f"ssae-{recipe}-t0", "represented_bin", "lower") for t in terms]
    ssae_terms += [Comparison(f"ssae-{recipe}-{t}", f"ssae-{recipe}-t0", "represented", "higher") for t in terms]
    long_rows = []
    if long_term:
        long_rows = [Comparison(f"ssae-{recipe}-long-{long_term}", f"ssae-{recipe}-long-t0", m, "lower")
                     for m in ("rare_mse", "rare_max")]
        long_rows += [Comparison(f"ssae-{recipe}-long-{long_term}", f"ssae-{recipe}-{long_term}", m, "lower")
                      for m in ("rare_mse", "rare_max")]
    dense_first = [r for r in ("dense_tracin", "dense") if r in recipes and "bm25" in recipes]
    fig1_dense = [Comparison(f"ssae-{r}-t0", "ssae-bm25-t0", "ppl", "lower") for r in dense_first]
    fig1_gsae = [Comparison(f"ssae-{r}-t0", "gsae-t0", "ppl", "lower") for r in recipes]
    return [
        Section("fig1", "Fig. 1: perplexity, SSAEs on retrieved text against the GSAE",
                "SSAEs finetuned on text retrieved for the subdomain lower the spliced perplexity on held-out "
                "subdomain text against the GSAE they start from.", fig1_gsae,
                "pareto_ppl", ("gsae-t0", *(f"ssae-{r}-t0" for r in recipes))),
        Section("fig1-dense", "Fig. 1: perplexity by retrieval method, dense against BM25",
                "Dense retrieval (with TracIn reranking) selects better subdomain text than BM25: its SSAE's "
                "spliced perplexity is lower.", fig1_dense,
                "pareto_ppl", tuple(f"ssae-{r}-t0" for r in ("bm25", *dense_first)),
                absent=None if dense_first else "RECIPES leaves out dense retrieval or BM25"),
        Section("fig2", "Figs. 2 and 11: tail coverage by token frequency",
                "An SSAE represents more of the subdomain's token types, the rare ones included, than the GSAE.",
                [Comparison(f"ssae-{r}-t0", "gsae-t0", "represented", "higher") for r in recipes],
                "tail_coverage", ("gsae-t0", *(f"ssae-{r}-t0" for r in recipes))),
        Section("fig3", "Fig. 3: reconstruction error by token rank, GSAEs trained with TERM and ERM",
                "A GSAE trained from scratch with TERM has lower reconstruction error on the rarest tokens than "
                "one trained with ERM (and so, after finetuning, does an SSAE).",
                gsae_terms + [Comparison(f"ssae-{recipe}-{t}", f"ssae-{recipe}-t0", "rare_mse", "lower")
                              for t in terms],
                "error_by_rank", tuple(f"gsae-{t}" for t in ["t0", *terms])),
        Section("fig3-long", "Fig. 3 at a longer budget: TERM against ERM SSAEs trained longer",
                "The paper trained far longer than a CPU run: with several times the SSAE budget, the TERM SSAE "
                "has lower error on the rarest tokens than the ERM SSAE of the same budget (and than the TERM "
                "SSAE of the shorter one).", long_rows,
                "error_by_rank", tuple(f"ssae-{recipe}-long-{t}" for t in ["t0", long_term]) if long_term else ()),
        Section("fig4", "Fig. 4: diversity of the latents' explanations",
                "Latents of a TERM-trained SAE receive more diverse explanations than those of an ERM-trained one.",
                needs="explanations"),
        Section("fig5-entropy", "Fig. 5: activation entropy, TERM against ERM GSAEs",
                "A TERM-trained GSAE has lower per-token activation entropy than an ERM-trained one (each "
                "token's activation concentrates on fewer latents).",
                [Comparison(f"gsae-{t}", "gsae-t0", "entropy", "lower") for t in terms],
                "entropy_and_max", tuple(f"gsae-{t}" for t in ["t0", *terms])),
        Section("fig5-max", "Fig. 5: max activation, TERM against ERM GSAEs",
                "A TERM-trained GSAE has a higher max activation per token than an ERM-trained one (more "
                "specific latents fire more strongly).",
                [Comparison(f"gsae-{t}", "gsae-t0", "max_act", "higher") for t in terms],
                "entropy_and_max", tuple(f"gsae-{t}" for t in ["t0", *terms])),
        Section("fig6", "Figs. 6 and 14: cumulative coverage by tilt",
                "The higher the tilt, the larger the share of an SSAE's represented token types that sit in the "
                "tail (the cumulative coverage rises earlier) and the more types it represents.",
                ssae_terms, "tail_coverage", tuple(f"ssae-{recipe}-{t}" for t in ["t0", *terms])),
        Section("fig7", "Fig. 7: activation count by feature rank",
                "TERM spreads the activations over more latents than ERM (a flatter activation count by rank): "
                "the most active latents take a smaller share, and fewer latents never fire.",
                [Comparison(f"gsae-{t}", "gsae-t0", "top_decile", "lower") for t in terms]
                + [Comparison(f"gsae-{t}", "gsae-t0", "dead", "lower") for t in terms],
                "activation_counts", tuple(f"gsae-{t}" for t in ["t0", *terms])),
        Section("fig8", "Fig. 8: automated interpretability (F1)",
                "Latents of SSAEs, TERM-trained ones most, are explained with a higher detection F1 than the "
                "GSAE's.", needs="explanations"),
        Section("fig12", "Figs. 12 and 13: L0 against perplexity (Pareto fronts)",
                "At every sparsity the SSAE's spliced perplexity lies below the GSAE's: its Pareto front "
                "dominates.",
                [Comparison("ssae-k{k}", "gsae-k{k}", "ppl", "lower", source="pareto")] if ks else [],
                "pareto_ppl", ("gsae-k", "ssae-k"), source="pareto"),
        Section("table1", "Table 1: SHIFT on Bias in Bios",
                "Ablating the gender latents an SSAE finds raises the profession classifier's worst-group "
                "accuracy more than ablating those the GSAE finds.", needs="shift", source="shift"),
    ]


@dataclass
class Row:
    domain: str
    label: str
    metric: str
    direction: str
    verdict: Verdict


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _by_name(doc: dict | None) -> dict:
    return {s["name"]: s for s in (doc or {}).get("saes", [])}


class Runs:
    """The metrics of a scoreboard folder, by domain and seed."""

    def __init__(self, root: str, domains: list[str], seeds: list[int]):
        self.root, self.domains, self.seeds = root, domains, seeds
        self.evals = {d: {s: _load(os.path.join(root, d, f"eval-s{s}", "metrics.json")) for s in seeds}
                      for d in domains}
        self.tails = {d: {s: _load(os.path.join(root, d, f"tail-s{s}", "metrics.json")) for s in seeds}
                      for d in domains}
        self.pareto = {s: _load(os.path.join(root, "pareto", f"eval-s{s}", "metrics.json")) for s in seeds}
        self.shift = _load(os.path.join(root, "shift", "shift.json"))

    def docs(self, source: str, domain: str, spliced: bool = False) -> dict:
        """{seed: metrics} of a source: the Pareto sweep's, or a domain's activations evaluation (tail-s)
        where the metric needs no forward pass and the run has one, else its documents evaluation (eval-s)."""
        if source == "pareto":
            return self.pareto
        evals, tails = self.evals.get(domain, {}), self.tails.get(domain, {})
        return {s: (evals.get(s) if spliced or tails.get(s) is None else tails[s]) for s in self.seeds}


def _pareto_diff(saes: dict, comparison: Comparison, metric: Metric):
    """The mean over k of the paired difference at each k both SAEs of the sweep have."""
    diffs = []
    for name in saes:
        if not name.startswith(comparison.a.split("{")[0]):
            continue
        k = name[len(comparison.a.split("{")[0]):]
        b = saes.get(comparison.b.format(k=k))
        d = paired_difference(metric_value(saes[name], metric), b and metric_value(b, metric), metric.relative)
        if d is not None:
            diffs.append(d)
    return sum(diffs) / len(diffs) if diffs else None


def evaluate_comparison(runs: Runs, comparison: Comparison, domain: str) -> Row | None:
    """The row of one claim on one domain, or None when no seed has both SAEs (not part of this run)."""
    metric = METRICS[comparison.metric]
    diffs, present = [], False
    for seed, doc in runs.docs(comparison.source, domain, metric.spliced).items():
        saes = _by_name(doc)
        if comparison.source == "pareto":
            d = _pareto_diff(saes, comparison, metric)
        else:
            a, b = saes.get(comparison.a), saes.get(comparison.b)
            d = paired_difference(a and metric_value(a, metric), b and metric_value(b, metric), metric.relative)
        present |= d is not None
        diffs.append(d)
    if not present:
        return None
    label = f"{comparison.a.replace('{k}', '<k>')} vs {comparison.b.replace('{k}', '<k>')}"
    return Row(domain, label, metric.label, comparison.direction, decide(diffs, comparison.direction))


def shift_row(runs: Runs) -> list[Row]:
    """Table 1: the SSAEs' worst-group accuracy after SHIFT (and SHIFT + retraining) against the GSAE's,
    paired per split."""
    rows = []
    for d in (runs.shift or {}).get("differences", []):
        kind_a, _, _ = d["a"].partition(":")
        kind_b, _, sae_b = d["b"].partition(":")
        if kind_a in ("shift", "shift+retrain") and kind_a == kind_b and sae_b.startswith("gsae"):
            rows.append(Row("bios", f"{d['a']} vs {d['b']}", "worst-group accuracy", "higher",
                            decide(d.get("values", []), "higher")))
    return rows


@dataclass
class SectionResult:
    section: Section
    rows: list[Row]
    verdict: Verdict
    headline: Row | None
    figure: str | None = None


def score(runs: Runs, spec: list[Section]) -> list[SectionResult]:
    """Every section's rows and its verdict: the first row's (the paper's own comparison on the first
    domain that has it), or not testable here with the reason."""
    out = []
    for section in spec:
        if section.needs == "explanations":
            out.append(SectionResult(section, [], Verdict(NOT_TESTABLE, reason=(
                "needs explanations from an LLM explainer endpoint; the scoreboard runs the local explainer, "
                "whose explanations are top-token lists, not the paper's LLM explanations")), None))
            continue
        if section.needs == "shift":
            rows = shift_row(runs)
        else:
            domains = runs.domains[:1] if section.source == "pareto" else runs.domains
            rows = [r for c in section.comparisons for d in domains
                    if (r := evaluate_comparison(runs, c, d)) is not None]
        if not rows:
            what = "shift/shift.json" if section.needs == "shift" else "SAEs this claim compares"
            reason = section.absent or f"this run has no {what}"
            out.append(SectionResult(section, [], Verdict(NOT_TESTABLE, reason=reason), None))
            continue
        head = rows[0]
        out.append(SectionResult(section, rows, head.verdict, head))
    return out


def _fmt(v: float | None, pct: bool) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.2f}%" if pct else f"{v:+.4f}"


def row_text(row: Row) -> str:
    v, pct = row.verdict, METRICS_BY_LABEL[row.metric].relative if row.metric in METRICS_BY_LABEL else False
    stats = (f"mean {_fmt(v.mean, pct)} sd {_fmt(v.sd, pct).lstrip('+')} se {_fmt(v.se, pct).lstrip('+')}"
             if v.mean is not None else v.reason)
    return (f"[{row.domain}] {row.label}: {row.metric} ({row.direction} claimed), n={v.n} seeds, {stats}: "
            f"{v.verdict}")


METRICS_BY_LABEL = {m.label: m for m in METRICS.values()}
METRICS_BY_LABEL["worst-group accuracy"] = Metric("", "worst-group accuracy", relative=False)


def verdict_lines(results: list[SectionResult]) -> list[str]:
    """One headline line per section (its verdict and seed count), then its rows, indented."""
    lines = []
    for r in results:
        v = r.verdict
        extra = f"n={v.n} seeds" + (f", {r.headline.label}" if r.headline else "")
        if v.reason and v.mean is None:
            extra += f"; {v.reason}"
        lines.append(f"{r.section.title}: {v.verdict} ({extra})")
        lines += ["    " + row_text(row) for row in r.rows]
    return lines


def draw_figures(runs: Runs, results: list[SectionResult], folder: str) -> None:
    """Each section's figure as <key>.png, from the first seed's metrics (the first domain's, or the
    Pareto sweep's), through the eval report's plotting functions."""
    from . import plots

    for r in results:
        s = r.section
        if not s.figure or not r.rows:
            continue
        domain = runs.domains[0]
        docs = runs.docs(s.source, domain, spliced=s.figure == "pareto_ppl")
        first = next((docs[seed] for seed in runs.seeds if docs.get(seed)), None)
        saes = [x for x in (first or {}).get("saes", []) if any(x["name"].startswith(p) for p in s.figure_saes)]
        if s.source != "pareto":  # the order of figure_saes, exact names
            order = {name: i for i, name in enumerate(s.figure_saes)}
            saes = sorted((x for x in saes if x["name"] in order), key=lambda x: order[x["name"]])
        if not saes:
            continue
        fig = getattr(plots, s.figure)(saes)
        if fig is None:
            continue
        fig.savefig(os.path.join(folder, f"{s.key}.png"))
        r.figure = f"{s.key}.png"


STYLE_EXTRA = """
.reproduced { color: #176317; font-weight: bold; }
.opposite { color: #a31515; font-weight: bold; }
.not-reproduced, .not-testable-here { color: #7a5a00; font-weight: bold; }
section { border-top: 1px solid #ccc; margin-top: 1.5em; }
"""


def write_page(path: str, results: list[SectionResult], runs: Runs, folder: str, provenance: dict) -> None:
    """paper/index.html: per section the claim, the figure (embedded) and the verdict with its rows."""
    from .report import STYLE

    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>ssae: the paper, figure by figure</title>",
             f"<style>{STYLE}{STYLE_EXTRA}</style></head><body>",
             "<h1>The paper, figure by figure</h1>",
             f"<p class='meta'>{e(provenance.get('paper', ''))} | domains {e(', '.join(runs.domains))} | seeds "
             f"{e(', '.join(map(str, runs.seeds)))} | {e(provenance.get('created', ''))}</p>",
             f"<p>{e(RULE)}</p>", "<h2>Verdicts</h2><table><tr><th>result</th><th>verdict</th><th>seeds</th></tr>"]
    for r in results:
        parts.append(f"<tr><td><a href='#{e(r.section.key)}'>{e(r.section.title)}</a></td>"
                     f"<td class='{e(r.verdict.verdict.replace(' ', '-'))}'>{e(r.verdict.verdict)}</td>"
                     f"<td>{r.verdict.n}</td></tr>")
    parts.append("</table>")
    for r in results:
        s, v = r.section, r.verdict
        parts.append(f"<section id='{e(s.key)}'><h2>{e(s.title)}</h2><p><b>The paper:</b> {e(s.claim)}</p>")
        parts.append(f"<p><b>Verdict:</b> <span class='{e(v.verdict.replace(' ', '-'))}'>{e(v.verdict)}</span>"
                     f" (n = {v.n} seeds{'; ' + e(v.reason) if v.reason else ''})</p>")
        if r.rows:
            parts.append("<table><tr><th>domain</th><th>comparison</th><th>metric</th><th>claimed</th>"
                         "<th>seeds</th><th>mean paired diff.</th><th>sd</th><th>se</th><th>per seed</th>"
                         "<th>verdict</th></tr>")
            for row in r.rows:
                rv = row.verdict
                pct = METRICS_BY_LABEL[row.metric].relative
                per_seed = ", ".join(_fmt(x, pct) for x in rv.values)
                parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in (
                    row.domain, row.label, row.metric, row.direction, str(rv.n), _fmt(rv.mean, pct),
                    _fmt(rv.sd, pct).lstrip("+"), _fmt(rv.se, pct).lstrip("+"), per_seed))
                    + f"<td class='{e(rv.verdict.replace(' ', '-'))}'>{e(rv.verdict)}</td></tr>")
            parts.append("</table>")
        if r.figure:
            with open(os.path.join(folder, r.figure), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            caption = f"{s.title}: the first seed's SAEs on {runs.domains[0]} ({r.figure})"
            parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{e(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("<h2>Provenance</h2><pre>" + e(json.dumps(provenance, indent=2, allow_nan=False)) + "</pre>")
    parts.append("</body></html>")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)


RULE = ("Verdict rule: per seed, the paired difference between the two SAEs a claim compares on the same "
        "tokens (relative, (a - b) / |b|, except for fractions, a - b); over the seeds its mean m, sample sd and "
        "standard error se = sd / sqrt(n). Reproduced: m in the claimed direction and |m| > 2 se; opposite: m "
        "against it and |m| > 2 se; not reproduced: |m| <= 2 se; not testable here: fewer than 3 seeds or no "
        "such SAEs in this run. A section's verdict is its first row's: the paper's comparison on the first "
        "domain.")


def scoreboard(root: str, domains: list[str], seeds: list[int], out: str, *, terms: list[str], recipes: list[str],
               recipe: str, long_term: str | None, ks: list[int]) -> list[str]:
    """Score the runs under `root`, write `out`/index.html and the figures, return the verdict lines."""
    from datetime import datetime, timezone

    runs = Runs(root, domains, seeds)
    results = score(runs, sections(terms, recipes, recipe, long_term, ks))
    os.makedirs(out, exist_ok=True)
    draw_figures(runs, results, out)
    provenance = {"paper": "Muhamed, Diab and Smith, arXiv 2411.00743", "root": os.path.abspath(root),
                  "domains": domains, "seeds": seeds, "terms": terms, "recipes": recipes, "tilted_recipe": recipe,
                  "long_term": long_term, "k_sweep": ks,
                  "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    write_page(os.path.join(out, "index.html"), results, runs, out, provenance)
    return verdict_lines(results)


def split_domain(path: str, out: str, *, label: str = "toxic", n_seeds: int = 200, test_every: int = 10) -> dict:
    """A labelled collection (e.g. ../shared/data/toxicity) as a domain for the scoreboard: of the records
    whose `label` field is true, the test set (those of split "test", and every `test_every`-th by a hash
    of the id), the retrieval seeds (the first `n_seeds` others in hash order) and the in-domain training
    text (the rest), as out/{seeds,test,indomain}.jsonl. Deterministic: the same input gives the same
    files."""
    import hashlib

    from ..core.errors import BadInput
    from ..core.records import id_of, iter_raw, text_of

    def rank(doc_id: str) -> int:
        return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")

    test, rest = [], []
    for obj, source in iter_raw(path):
        if not isinstance(obj, dict) or label not in obj:
            raise BadInput(f"{source}: a record without the label field {label!r}")
        if obj[label] is not True:
            continue
        doc = {"id": id_of(obj, source), "text": text_of(obj, source)}
        h = rank(doc["id"])
        (test if obj.get("split") == "test" or h % test_every == 0 else rest).append((h, doc))
    rest.sort(key=lambda x: x[0])
    if len(rest) <= n_seeds or not test:
        raise BadInput(f"{path}: {len(rest)} training and {len(test)} test records labelled {label}: too few")
    parts = {"seeds": rest[:n_seeds], "test": sorted(test, key=lambda x: x[0]), "indomain": rest[n_seeds:]}
    os.makedirs(out, exist_ok=True)
    for name, docs in parts.items():
        tmp = os.path.join(out, f"{name}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for _, doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(out, f"{name}.jsonl"))
    return {name: len(docs) for name, docs in parts.items()}
