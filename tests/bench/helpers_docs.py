"""Benchmark documents: the physics test set when ../shared/data is there, else Wikipedia summaries."""
from __future__ import annotations

import gzip
import itertools
import json

from common import shared, wiki_summaries


def write_docs(path: str, n: int) -> str:
    source = shared("physics", "astro_ph_extra.jsonl.gz")
    if source:
        with gzip.open(source, "rt") as f:
            docs = [json.loads(line) for line in itertools.islice(f, n)]
    else:
        docs = wiki_summaries(n)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
    return path
