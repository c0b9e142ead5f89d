"""The ssae.shift/1 report: its rows, their mean and sd over seeded splits, paired differences and the
table printed on stderr (what ssae-tables reads: light, numpy only)."""
from __future__ import annotations

import logging

import numpy as np


log = logging.getLogger("ssae")


SCHEMA = "ssae.shift/1"


def row(method: str, sae_name: str | None, metrics: dict, ablated_latents=None, ablated_neurons=None) -> dict:
    out = {"method": method, "sae": sae_name, **metrics, "ablated_latents": ablated_latents or []}
    if ablated_neurons is not None:
        out["ablated_neurons"] = ablated_neurons
    return out


METRICS = ("profession_accuracy", "gender_accuracy", "worst_group_accuracy")


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate_rows(splits: list[list[dict]]) -> list[dict]:
    """One row per method with the mean over splits of every number and its sd beside it (`NAME_sd`);
    `ablated_count` is the mean number of latents (or neurons) ablated."""
    methods = [r["method"] for r in splits[0]]
    for rows in splits[1:]:
        if [r["method"] for r in rows] != methods:
            raise ValueError("splits with different rows cannot be aggregated")
    out = []
    for k, method in enumerate(methods):
        rows = [split[k] for split in splits]
        agg = {"method": method, "sae": rows[0]["sae"], "splits": len(rows), "n": rows[0]["n"]}
        for name in METRICS:
            agg[name], agg[name + "_sd"] = mean_sd(r[name] for r in rows)
        cells = list(rows[0]["group_accuracy"])
        pairs = {c: mean_sd(r["group_accuracy"][c] for r in rows) for c in cells}
        agg["group_accuracy"] = {c: m for c, (m, _) in pairs.items()}
        agg["group_accuracy_sd"] = {c: sd for c, (_, sd) in pairs.items()}
        agg["ablated_count"], agg["ablated_count_sd"] = mean_sd(
            len(r.get("ablated_neurons") or r.get("ablated_latents") or []) for r in rows)
        out.append(agg)
    return out


def paired_differences(splits: list[list[dict]], metric: str = "worst_group_accuracy") -> list[dict]:
    """Per-split differences of `metric` (mean, sd and the values): every SAE's shift and shift+retrain
    row against the original probe, and every other SAE against the first SAE, row kind by row kind."""
    def value(rows, method):
        return next(r[metric] for r in rows if r["method"] == method)

    saes = list(dict.fromkeys(r["sae"] for r in splits[0] if r["sae"]))
    pairs = [(f"{kind}:{sae}", "original") for sae in saes for kind in ("shift", "shift+retrain")]
    pairs += [(f"{kind}:{sae}", f"{kind}:{saes[0]}") for sae in saes[1:] for kind in ("shift", "shift+retrain")]
    out = []
    for a, b in pairs:
        values = [value(rows, a) - value(rows, b) for rows in splits]
        mean, sd = mean_sd(values)
        out.append({"a": a, "b": b, "metric": metric, "mean": mean, "sd": sd, "values": values})
    return out


def ablated_summary(split_details: list[list[dict]], tokenizer_free_top: int = 6) -> dict[str, list[dict]]:
    """Per SAE, every latent ablated in some split: in how many splits, and its top tokens (from the
    first split that ablated it)."""
    out: dict[str, dict[int, dict]] = {}
    for details in split_details:
        for d in details:
            latents = out.setdefault(d["name"], {})
            tokens = {t["latent"]: t["top_tokens"] for t in d["top_latents"]}
            for j in d["ablated_latents"]:
                entry = latents.setdefault(j, {"latent": j, "splits": 0,
                                                "top_tokens": [t["token"] for t in tokens.get(j, [])][:tokenizer_free_top]})
                entry["splits"] += 1
    return {name: sorted(v.values(), key=lambda e: (-e["splits"], e["latent"])) for name, v in out.items()}


def gender_left_summary(split_details: list[list[dict]]) -> dict[str, dict]:
    """Per SAE, the mean and sd over splits of the gender probe's test accuracy on the activations and
    with every latent ablated (`gender_test_accuracy` of each split's SAE details)."""
    out: dict[str, dict] = {}
    for name in [d["name"] for d in split_details[0]]:
        values = [next(d for d in details if d["name"] == name)["gender_test_accuracy"] for details in split_details]
        out[name] = {}
        for key in ("activations", "every_latent_ablated"):
            mean, sd = mean_sd(v[key] for v in values)
            out[name][key], out[name][key + "_sd"] = mean, sd
    return out


def _pct(row: dict, name: str, key: str | None = None) -> str:
    value = row[name] if key is None else row[name][key]
    sd = row.get(name + "_sd")
    if sd is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f}±{100 * (sd if key is None else sd[key]):.1f}"


def format_table(report: dict) -> str:
    """The rows as text; with several splits every number is mean±sd over them, followed by the
    original probe's check, the paired differences and the ablated latents."""
    rows = report["rows"]
    cells = list(rows[0]["group_accuracy"]) if rows else []
    header = ["method", "prof", "gender", "worst"] + cells + ["n", "ablated"]
    lines = [header]
    for r in rows:
        if "ablated_count" in r:
            ablated = f"{r['ablated_count']:.1f}" if r["splits"] > 1 else f"{r['ablated_count']:.0f}"
        else:
            ablated = str(len(r.get("ablated_neurons") or r.get("ablated_latents") or []))
        lines.append([r["method"], _pct(r, "profession_accuracy"), _pct(r, "gender_accuracy"),
                      _pct(r, "worst_group_accuracy")]
                     + [_pct(r, "group_accuracy", c) for c in cells] + [str(r["n"]), ablated])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    if "splits" in report:
        professions = report.get("professions", {})
        title = f"SHIFT, {','.join(professions.get('A', []))} vs {','.join(professions.get('B', []))}: " \
                f"mean±sd over {len(report['splits'])} split(s), probe {report.get('probe')}"
        mask = report.get("mask")
        text.append(title + (f"; {mask['replacements']} words masked" if mask else ""))
    text += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
             for line in lines]
    original = next((r for r in rows if r["method"] == "original"), None)
    if original is not None and "splits" in report:
        text.append(f"check: the original probe's gender accuracy on the balanced test set "
                    f"{_pct(original, 'gender_accuracy')}, worst group {_pct(original, 'worst_group_accuracy')} "
                    "(a confound shows as gender accuracy well above 50 and a low worst group)")
    for d in report.get("differences", []):
        text.append(f"difference in worst group, {d['a']} - {d['b']}: {100 * d['mean']:+.1f} ± {100 * d['sd']:.1f} "
                    "(mean ± sd over splits)")
    for name, left in report.get("gender_left", {}).items():
        text.append(f"gender left in {name}: a gender probe reaches {_pct(left, 'activations')} on the test set's "
                    f"activations and {_pct(left, 'every_latent_ablated')} with every latent ablated (the error "
                    "term: what no choice of latents removes)")
    for name, latents in report.get("ablated", {}).items():
        shown = "; ".join(f"{e['latent']} [{e['splits']}x] {' '.join(repr(t) for t in e['top_tokens'])}"
                          for e in latents[:12])
        text.append(f"ablated in {name} ({len(latents)} latents over all splits): {shown or 'none'}")
    return "\n".join(text)
