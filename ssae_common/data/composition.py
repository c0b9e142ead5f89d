"""What went into an activation file: its stored tokens by document source, and its largest documents.

Counted while harvesting (rows arrive document by document), carried in the checkpoint so that a
resumed harvest counts what an uninterrupted one does, stored as JSON in the root attribute
`composition`, and summed over shards by a merge.  The attribute holds raw counts:

    {"n_tokens", "n_docs", "doc_cap", "docs_cut",
     "sources": {source: {"tokens", "docs"}}, "top_docs": [{"id", "source", "tokens"}, ...]}

and the shares are derived from them: share(source) = tokens(source) / n_tokens, and
max_doc_share = tokens(largest document) / n_tokens.  A document's source is its `source` field,
else "unknown".
"""
from __future__ import annotations

TOP_DOCS = 10
UNKNOWN = "unknown"


def source_of(doc: dict) -> str:
    source = doc.get("source")
    return str(source) if source not in (None, "") else UNKNOWN


class Composition:
    """Running counts of a harvest: add() every stored run of rows, in file order."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.sources: dict[str, list[int]] = {k: list(v) for k, v in state.get("sources", {}).items()}  # [tokens, docs]
        self.top: list[list] = [list(t) for t in state.get("top", [])]  # [tokens, id, source], largest first
        self.current: list | None = list(state["current"]) if state.get("current") else None  # [row, id, source, tokens]
        self.docs_cut = int(state.get("docs_cut", 0))

    def add(self, row: int, doc_id: str, source: str, n_tokens: int, cut: bool = False) -> None:
        """`n_tokens` rows of document `row` (numbered in file order); `cut`: the document was longer than
        the per-document cap."""
        if self.current is None or self.current[0] != row:
            self._close_current()
            self.current = [row, doc_id, source, 0]
            self.sources.setdefault(source, [0, 0])[1] += 1
            self.docs_cut += int(cut)
        self.current[3] += n_tokens
        self.sources[source][0] += n_tokens

    def _close_current(self) -> None:
        if self.current is not None:
            _, doc_id, source, tokens = self.current
            self.top = _largest(self.top + [[tokens, doc_id, source]])
            self.current = None

    def state(self) -> dict:
        """A copy for the checkpoint (it is written while the harvest goes on)."""
        return {"sources": {k: list(v) for k, v in self.sources.items()}, "top": [list(t) for t in self.top],
                "current": list(self.current) if self.current else None, "docs_cut": self.docs_cut}

    def finish(self, doc_cap: int | None) -> dict:
        """The stored form (see the module docstring)."""
        self._close_current()
        return {"n_tokens": sum(t for t, _ in self.sources.values()),
                "n_docs": sum(d for _, d in self.sources.values()),
                "doc_cap": doc_cap, "docs_cut": self.docs_cut,
                "sources": {k: {"tokens": t, "docs": d} for k, (t, d) in _by_tokens(self.sources)},
                "top_docs": [{"id": i, "source": s, "tokens": t} for t, i, s in self.top]}


def _largest(top: list[list]) -> list[list]:
    return sorted(top, key=lambda t: -t[0])[:TOP_DOCS]  # stable: ties keep file order


def _by_tokens(sources: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
    return sorted(sources.items(), key=lambda kv: (-kv[1][0], kv[0]))


def merge_compositions(parts: list[dict]) -> dict:
    """The composition of files merged from `parts` (shards of one harvest)."""
    sources: dict[str, list[int]] = {}
    top: list[list] = []
    for part in parts:
        for source, counts in part["sources"].items():
            acc = sources.setdefault(source, [0, 0])
            acc[0] += counts["tokens"]
            acc[1] += counts["docs"]
        top = _largest(top + [[d["tokens"], d["id"], d["source"]] for d in part["top_docs"]])
    caps = [p["doc_cap"] for p in parts if p.get("doc_cap")]
    return {"n_tokens": sum(p["n_tokens"] for p in parts), "n_docs": sum(p["n_docs"] for p in parts),
            "doc_cap": max(caps) if caps else None, "docs_cut": sum(p.get("docs_cut", 0) for p in parts),
            "sources": {k: {"tokens": t, "docs": d} for k, (t, d) in _by_tokens(sources)},
            "top_docs": [{"id": i, "source": s, "tokens": t} for t, i, s in top]}


def composition_summary(comp: dict) -> dict:
    """The shares an artifact record carries: by source, and of the largest document."""
    n = max(1, comp["n_tokens"])
    top = comp["top_docs"]
    return {"sources": {k: round(v["tokens"] / n, 4) for k, v in comp["sources"].items()},
            "max_doc_share": round(top[0]["tokens"] / n, 4) if top else 0.0,
            "n_docs": comp["n_docs"], "doc_cap": comp["doc_cap"], "docs_cut": comp["docs_cut"]}


def describe(comp: dict, sources: int = 6, docs: int = 3) -> list[str]:
    """A few lines for stderr."""
    n = max(1, comp["n_tokens"])
    cap = f"each cut at {comp['doc_cap']} tokens, {comp['docs_cut']} cut" if comp["doc_cap"] else "no per-document cap"
    by_source = ", ".join(f"{k} {100 * v['tokens'] / n:.1f}% ({v['docs']} docs)"
                          for k, v in list(comp["sources"].items())[:sources])
    more = len(comp["sources"]) - sources
    largest = ", ".join(f"{d['id']} ({d['source']}) {100 * d['tokens'] / n:.2f}%" for d in comp["top_docs"][:docs])
    return [f"composition: {comp['n_tokens']} tokens from {comp['n_docs']} documents ({cap})",
            f"  by source: {by_source}" + (f", and {more} more" if more > 0 else ""),
            f"  largest documents: {largest}"]


def composition_table(paths: list[str], sources: int = 4) -> str:
    """A text table of the composition of activation files (one row each, named by the file's stem):
    tokens, documents, the per-document cap, the largest document's share and the main sources."""
    import json
    import os

    from .activations import ActivationStore

    rows = [f"{'set':<16}{'tokens':>9}{'docs':>7}{'cap':>6}{'max doc':>9}  sources (share of tokens)"]
    for path in paths:
        with ActivationStore(path) as store:
            value = store.f.attrs.get("composition")
        name = os.path.splitext(os.path.basename(path))[0]
        if not value:
            rows.append(f"{name:<16}(no composition recorded)")
            continue
        comp = json.loads(value)
        summary = composition_summary(comp)
        main = ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(summary["sources"].items())[:sources])
        rows.append(f"{name:<16}{comp['n_tokens']:>9}{comp['n_docs']:>7}{comp['doc_cap'] or '-':>6}"
                    f"{100 * summary['max_doc_share']:>8.2f}%  {main}")
    return "subdomain sets: stored tokens by source, and the largest document's share\n" + "\n".join(rows) + "\n"


def training_composition(sae_cfg: dict) -> list[dict]:
    """The composition of the activation files an SAE was trained on (the `inputs` its cfg.json records),
    as composition summaries; an input no longer on disk, or harvested before compositions were recorded,
    has `composition: null`."""
    import json
    import os

    from .activations import ActivationStore

    out = []
    for entry in sae_cfg.get("inputs") or []:
        path = entry.get("path") if isinstance(entry, dict) else None
        if not path:
            continue
        summary = None
        if os.path.isfile(path):
            try:
                with ActivationStore(path) as store:
                    value = store.f.attrs.get("composition")
                summary = composition_summary(json.loads(value)) if value else None
            except Exception:  # an unreadable input only loses its summary; eval itself does not need it
                summary = None
        out.append({"path": path, "composition": summary})
    return out
