"""A static, single-file HTML feature browser: one card per latent (explanation, scores, top tokens, an
activation histogram, highlighted contexts), a search box and pages.  No network access: the data is
embedded as JSON and rendered by a small inline script.  `index.html#q=TEXT` opens with a search."""
from __future__ import annotations

import html
import os

from ..core.records import to_json

PAGE_SIZE = 100


def _window(w: dict, prediction: bool | None = None) -> dict:
    out = {"t": w["tokens"], "a": w["acts"], "m": w.get("mark"), "v": w.get("value"), "doc": w.get("doc_id", "")}
    if "active" in w:
        out["act"] = w["active"]
    if prediction is not None:
        out["pred"] = prediction
    return out


def browser_data(contexts: list[dict], records: list[dict]) -> list[dict]:
    by_latent = {r["latent"]: r for r in records}
    cards = []
    for c in contexts:
        r = by_latent.get(c["latent"], {})
        preds = r.get("predictions") or [None] * len(c["score"])
        cards.append({
            "latent": c["latent"], "status": r.get("status"), "explanation": r.get("explanation"),
            "diversity": r.get("diversity"), "justification": r.get("diversity_justification"),
            "f1": r.get("f1"), "precision": r.get("precision"), "recall": r.get("recall"),
            "note": r.get("note"), "raw": r.get("raw_reply"), "density": c["density"],
            "max": c["max_activation"], "top_tokens": c["top_tokens"], "hist": c["histogram"],
            "explain": [_window(w) for w in c["explain"]],
            "score": [_window(w, p) for w, p in zip(c["score"], preds)],
        })
    return cards


def write_browser(path: str, contexts: list[dict], records: list[dict], run_info: dict | None = None) -> None:
    run_info = run_info or {}
    config = run_info.get("config", {})
    meta = {"sae": config.get("sae", {}).get("path"), "activations": config.get("activations", {}).get("path"),
            "explainer": config.get("explainer"), "explainer_model": config.get("explainer_model"),
            "created": run_info.get("created_by", {}).get("time"), "page_size": PAGE_SIZE}
    payload = to_json({"meta": meta, "latents": browser_data(contexts, records)}, ensure_ascii=False,
                      separators=(",", ":"))
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = f"ssae feature browser: {os.path.basename(str(meta['sae'] or ''))}"
    page = TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{position:sticky;top:0;background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:14px;align-items:center;flex-wrap:wrap;z-index:2}
header h1{font-size:17px;margin:0;font-weight:600}
header input{flex:1;min-width:220px;padding:6px 10px;border-radius:6px;border:0;font-size:14px}
header select,header button{padding:5px 8px;border-radius:6px;border:0;font-size:13px}
#count{font-size:13px;opacity:.85}
main{padding:14px 18px;display:grid;gap:14px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.head{display:flex;gap:12px;align-items:baseline;flex-wrap:wrap}
.head h2{font-size:16px;margin:0}
.badge{font-size:11px;padding:2px 7px;border-radius:9px;background:#e3e7ee}
.badge.ok{background:#d7f2dd}.badge.malformed{background:#ffe2c2}.badge.dead{background:#eee;color:#777}.badge.statistics{background:#dfe9ff}
.stats{font-size:12px;color:#4d5566}
.expl{font-size:15px;margin:8px 0 4px}
.note{font-size:13px;color:#7a4b00}
.div{font-size:13px;color:#333}
.row{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start;margin-top:8px}
.tokens span.chip{display:inline-block;background:#eef1f6;border-radius:5px;padding:1px 6px;margin:2px;font-family:ui-monospace,Menlo,monospace;font-size:12px;white-space:pre}
.ctx{font-family:ui-monospace,Menlo,monospace;font-size:12.5px;line-height:1.7;margin:2px 0;white-space:pre-wrap;word-break:break-word}
.ctx span{border-radius:2px}
.ctx span.peak{outline:1.5px solid #c43d00}
.ctxs h3{font-size:12px;margin:10px 0 2px;color:#4d5566;text-transform:uppercase;letter-spacing:.04em}
.lab{display:inline-block;width:62px;font-size:11px;color:#555}
.hit{color:#1a7f37}.miss{color:#b42318}
svg.hist rect{fill:#e0702b}
nav{display:flex;gap:8px;justify-content:center;padding:8px}
</style></head>
<body>
<header><h1>ssae feature browser</h1>
<input id="search" type="search" placeholder="Search explanations, tokens, latent numbers (e.g. 12, galaxy)" autocomplete="off">
<select id="sort"><option value="latent">by latent</option><option value="f1">by F1</option><option value="density">by density</option><option value="max">by max activation</option></select>
<span id="count"></span></header>
<main id="cards"></main>
<nav><button id="prev">&larr; previous</button><span id="page"></span><button id="next">next &rarr;</button></nav>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const PAGE = DATA.meta.page_size || 100;
let pageNo = 0;
const $ = (id) => document.getElementById(id);
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c])); }
function fmt(x, d) { return (x === null || x === undefined) ? "n/a" : Number(x).toFixed(d); }
function hist(h) {
  const w = 220, ht = 56, n = h.counts.length, top = Math.max(1, ...h.counts);
  let bars = "";
  h.counts.forEach((c, i) => { const bh = Math.round((c / top) * (ht - 4));
    bars += `<rect x="${(i * w / n).toFixed(1)}" y="${ht - bh}" width="${(w / n - 1).toFixed(1)}" height="${bh}"><title>${fmt(h.edges[i],3)}-${fmt(h.edges[i+1],3)}: ${c}</title></rect>`; });
  return `<div><svg class="hist" width="${w}" height="${ht}" role="img" aria-label="activation histogram">${bars}</svg>` +
    `<div class="stats">activation histogram (sample of ${h.sample_size} activating tokens, 0-${fmt(h.edges[n],2)})</div></div>`;
}
function ctx(w, max, label) {
  const spans = w.t.map((t, i) => { const a = w.a[i] || 0, alpha = max > 0 ? Math.min(1, a / max) : 0;
    const style = a > 0 ? ` style="background:rgba(255,120,30,${(0.15 + 0.85 * alpha).toFixed(2)})"` : "";
    return `<span${i === w.m ? ' class="peak"' : ""}${style} title="${esc(fmt(a, 3))}">${esc(t)}</span>`; }).join("");
  return `<div class="ctx">${label || ""}${spans}</div>`;
}
function card(d) {
  const st = d.status || "none";
  let body = "";
  if (d.explanation) body += `<div class="expl">${esc(d.explanation)}</div>`;
  if (d.note) body += `<div class="note">${esc(d.note)}</div>`;
  if (st === "malformed" && d.raw) body += `<div class="note">malformed LM reply: ${esc(d.raw)}</div>`;
  if (d.diversity !== null && d.diversity !== undefined)
    body += `<div class="div">diversity <b>${d.diversity}</b>/100${d.justification ? ": " + esc(d.justification) : ""}</div>`;
  const tokens = (d.top_tokens || []).map((t) => `<span class="chip" title="share ${fmt(t.share * 100, 1)}%, mean ${fmt(t.mean_act, 3)}">${esc(JSON.stringify(t.token).slice(1, -1))}</span>`).join("");
  let ctxs = "";
  if (d.explain.length) ctxs += `<h3>top activations (explanation set)</h3>` + d.explain.map((w) => ctx(w, d.max)).join("");
  if (d.score.length) ctxs += `<h3>held-out windows (scoring set)</h3>` + d.score.map((w) => {
    const truth = w.act ? "active" : "inactive";
    const pred = (w.pred === null || w.pred === undefined) ? "" : (w.pred === w.act ? ' <span class="hit">&#10003;</span>' : ' <span class="miss">&#10007;</span>');
    return ctx(w, d.max, `<span class="lab">${truth}${pred}</span>`); }).join("");
  return `<section class="card" data-latent="${d.latent}"><div class="head"><h2>latent ${d.latent}</h2>` +
    `<span class="badge ${esc(st)}">${esc(st)}</span>` +
    `<span class="stats">F1 ${fmt(d.f1, 2)} &middot; precision ${fmt(d.precision, 2)} &middot; recall ${fmt(d.recall, 2)} &middot; ` +
    `density ${fmt(d.density * 100, 3)}% &middot; max ${fmt(d.max, 3)}</span></div>${body}` +
    `<div class="row"><div class="tokens">${tokens}</div>${hist(d.hist)}</div><div class="ctxs">${ctxs}</div></section>`;
}
function matches(d, q) {
  if (!q) return true;
  if (/^\d+$/.test(q)) return String(d.latent) === q || String(d.latent).startsWith(q);
  const hay = [d.explanation, d.justification, d.note, ...(d.top_tokens || []).map((t) => t.token)].join(" ").toLowerCase();
  return q.split(/\s+/).every((w) => hay.includes(w));
}
function render() {
  const q = $("search").value.trim().toLowerCase(), key = $("sort").value;
  let list = DATA.latents.filter((d) => matches(d, q));
  if (key !== "latent") list = list.slice().sort((a, b) => (b[key] ?? -1) - (a[key] ?? -1));
  const pages = Math.max(1, Math.ceil(list.length / PAGE));
  pageNo = Math.min(pageNo, pages - 1);
  $("cards").innerHTML = list.slice(pageNo * PAGE, (pageNo + 1) * PAGE).map(card).join("");
  $("count").textContent = `${list.length} of ${DATA.latents.length} latents`;
  $("page").textContent = `page ${pageNo + 1} of ${pages}`;
  $("prev").disabled = pageNo === 0; $("next").disabled = pageNo >= pages - 1;
}
$("search").addEventListener("input", () => { pageNo = 0; render(); });
$("sort").addEventListener("change", () => { pageNo = 0; render(); });
$("prev").addEventListener("click", () => { pageNo--; render(); window.scrollTo(0, 0); });
$("next").addEventListener("click", () => { pageNo++; render(); window.scrollTo(0, 0); });
const m = location.hash.match(/q=([^&]*)/);
if (m) $("search").value = decodeURIComponent(m[1]);
render();
</script></body></html>
"""
