"""The text tables of ssae-eval metrics.json and ssae-shift JSON files, and the composition of harvested
activation files (.h5), one after another (the paper's tables); the command `ssae-tables FILE...`
prints them."""
from __future__ import annotations

import json
import os

from ..core.errors import BadInput
from .metrics import SCHEMA as METRICS_SCHEMA
from .report import text_table
from ..shift.report import SCHEMA as SHIFT_SCHEMA, format_table


def table_of(path: str) -> str:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot read JSON ({e})") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema not in (METRICS_SCHEMA, SHIFT_SCHEMA):
        raise BadInput(f"{path}: not ssae-eval metrics or ssae-shift output (schema {schema!r})")
    try:
        return _table(path, doc, schema)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise BadInput(f"{path}: a malformed {schema} file ({type(e).__name__}: {e})") from None


def _table(path: str, doc: dict, schema: str) -> str:
    if schema == METRICS_SCHEMA:
        inputs = ", ".join(os.path.basename(p) for p in doc.get("dataset", {}).get("paths", []))
        clean = doc["saes"][0].get("ppl_clean") if doc["saes"] else None
        title = f"{path}: {doc['n_tokens']} tokens of {inputs or 'activations'}"
        if clean is not None:
            title += f"; clean-model perplexity {clean:.3f}"
        return title + "\n" + text_table(doc["saes"])
    return f"{path}: accuracies in %\n" + format_table(doc)


def tables(paths: list[str]) -> str:
    """The tables of every file, separated by a blank line; consecutive .h5 files share one composition
    table."""
    from ..data.composition import composition_table

    parts, h5 = [], []
    for path in paths + [None]:
        if path is not None and path.endswith(".h5"):
            h5.append(path)
            continue
        if h5:
            parts.append(composition_table(h5).rstrip("\n"))
            h5 = []
        if path is not None:
            parts.append(table_of(path))
    return "\n\n".join(parts)
