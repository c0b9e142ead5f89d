"""The comparison table (text for stderr, HTML) and the self-contained HTML report (images embedded as
base64 data URIs, no external files or scripts)."""
from __future__ import annotations

import base64
import html
import json
import os

COLUMNS = [
    # (key or dotted path, header, format)
    ("l0", "L0", "{:.1f}"),
    ("mse", "MSE", "{:.4g}"),
    ("fvu", "FVU", "{:.4f}"),
    ("cosine", "cos", "{:.4f}"),
    ("dead_fraction", "dead", "{:.3f}"),
    ("dense_fraction", "dense", "{:.3f}"),
    ("ce_spliced", "CE spliced", "{:.4f}"),
    ("ce_delta", "dCE", "{:.4f}"),
    ("ce_recovered", "CE rec.", "{:.4f}"),
    ("ppl_spliced", "ppl spliced", "{:.3f}"),
    ("rel_ppl_vs_baseline", "ppl/base", "{:.4f}"),
    ("tail_error.mean", "rare MSE", "{:.4g}"),
    ("tail_error.max", "rare max", "{:.4g}"),
    ("tail_coverage.represented_fraction", "types repr.", "{:.4f}"),
    ("entropy.mean", "entropy", "{:.3f}"),
    ("max_activation.mean", "max act", "{:.3g}"),
    ("activation_count_log_ratio.fraction_below_zero", "lr<0", "{:.3f}"),
]


def _get(entry: dict, path: str):
    for part in path.split("."):
        if not isinstance(entry, dict) or part not in entry:
            return None
        entry = entry[part]
    return entry


def comparison_rows(saes: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows, keeping only columns some SAE has."""
    cols = [c for c in COLUMNS if any(_get(s, c[0]) is not None for s in saes)]
    header = ["SAE"] + [h for _, h, _ in cols]
    rows = []
    for s in saes:
        row = [s["name"] + (" *" if s.get("is_baseline") else "")]
        for key, _, fmt in cols:
            v = _get(s, key)
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    return header, rows


def text_table(saes: list[dict]) -> str:
    header, rows = comparison_rows(saes)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    if any(s.get("is_baseline") for s in saes):
        lines.append("* baseline")
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
figure { margin: 1.5em 0; }
img { max-width: 100%; border: 1px solid #eee; }
dt { font-weight: bold; margin-top: 0.4em; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
.meta { color: #666; font-size: 0.85em; }
"""

DEFINITIONS = [
    ("mse", "sum over tokens and dimensions of (x - x_hat)^2, divided by tokens x d_in."),
    ("fvu", "sum of squared errors over the sum of squared deviations of x from its per-dimension mean on the eval set."),
    ("cosine", "mean over tokens of cos(x, x_hat)."),
    ("l0", "mean number of latents with f > 0 per token."),
    ("dead / dense", "fraction of latents never active on the eval set / active on more than 10% of its tokens."),
    ("CE", "mean next-token cross-entropy (nats) over every predicted token: clean model, hook output replaced by "
           "the reconstruction (spliced), hook output zeroed (zero ablation). dCE = spliced - clean."),
    ("CE rec.", "(CE zero ablation - CE spliced) / (CE zero ablation - CE clean)."),
    ("ppl", "exp(CE); ppl/base = spliced perplexity over the baseline SAE's spliced perplexity."),
    ("types repr.", "fraction of token types seen in the eval set for which some latent puts >= 50% of its "
                    "activation mass on that type (tail coverage, per frequency bin in the plots)."),
    ("rare MSE / rare max", "the rarest 10% of the token types seen in the eval set, by count: mean / max "
                            "over those types of the type's mean MSE (per token and dimension); types tied at "
                            "the boundary count enter as the expectation over a random choice among them. The "
                            "paper's Fig. 3 numbers; all types: tail_error in metrics.json."),
    ("entropy", "mean over tokens (with some latent active) of -sum_i p_i ln p_i, p_i = f_i / sum_j f_j."),
    ("max act", "mean over tokens of the largest latent activation."),
    ("lr<0", "fraction of latents with ln((count + 1) / (baseline count + 1)) < 0 on the eval set (aligned "
             "latents of an SAE finetuned from the baseline): latents that fire less than in the baseline."),
]


def _tilt_label(s: dict) -> str:
    """How an SAE was tilted, from its cfg.json fields: ERM, tilt T or tilt-ess F, and by token type."""
    if s.get("tilt_ess") is not None:
        label = f"tilt-ess {s['tilt_ess']}"
    elif s.get("tilt"):
        label = f"tilt {s['tilt']}"
    else:
        label = "ERM"
    return label + (" over token types" if s.get("tilt_groups") == "token" else "")


def _training_label(s: dict) -> str:
    """What the SAE was trained on, by source, from the harvest's composition (when it was recorded)."""
    parts = []
    for item in s.get("training_data") or []:
        comp = item.get("composition")
        if comp:
            sources = ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(comp["sources"].items())[:4])
            parts.append(f"{os.path.basename(item['path'])}: {sources}; largest document "
                         f"{100 * comp['max_doc_share']:.2f}%")
    return "; trained on " + " | ".join(parts) if parts else ""


def write_report(path: str, doc: dict, folder: str, plots: list[tuple[str, str]]) -> None:
    """Write the HTML report for the metrics document `doc`, embedding the PNGs in `folder`."""
    saes = doc["saes"]
    header, rows = comparison_rows(saes)
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>ssae-eval report</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>SAE evaluation</h1>"]
    ds = doc["dataset"]
    parts.append(f"<p class='meta'>dataset: {e(ds.get('kind', ''))} {e(', '.join(ds.get('paths', [])))} | "
                 f"{doc['n_tokens']:,} tokens | model {e(str(ds.get('model')))} | hook {e(str(ds.get('hook')))} | "
                 f"created {e(doc['created_by'].get('time', ''))} by {e(doc['created_by'].get('tool', ''))}</p>")
    parts.append("<h2>Comparison</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    parts.append("</table>")
    if any(s.get("is_baseline") for s in saes):
        parts.append("<p class='meta'>* baseline</p>")
    parts.append("<h2>SAEs</h2><ul>")
    for s in saes:
        parts.append(f"<li><b>{e(s['name'])}</b>: {e(s['path'])} ({e(str(s.get('architecture')))}, "
                     f"d_sae {s.get('d_sae')}, {e(_tilt_label(s))}){e(_training_label(s))}</li>")
    parts.append("</ul><h2>Figures</h2>")
    for filename, title in plots:
        with open(os.path.join(folder, filename), "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        parts.append(f"<figure><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(title)} ({e(filename)})</figcaption></figure>")
    parts.append("<h2>Definitions</h2><dl>")
    for term, text in DEFINITIONS:
        parts.append(f"<dt>{e(term)}</dt><dd>{e(text)}</dd>")
    parts.append("</dl><h2>Configuration</h2><pre>" + e(json.dumps(doc.get("config", {}), indent=2)) + "</pre>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
