"""bench-scale at its tiny size: every curve measured at three sizes, each with a finite exponent, and the
memory-capped runs finish; the cap itself kills a process that goes over it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "bench"))
from common import MemoryCap, run_capped  # noqa: E402


def test_memory_cap_bounds_a_child_and_reports_its_peak():
    probe = MemoryCap(64 << 20)
    kind = probe.kind
    probe.close()
    if kind == "rlimit-as":
        pytest.skip("no writable memory cgroup here")
    under = run_capped([sys.executable, "-c", "b = b'x' * (60 << 20)"], 300 << 20)
    assert under["returncode"] == 0 and under["oom_kills"] == 0, under
    assert 60 <= under["cgroup_peak_mib"] <= 300 and under["mechanism"] == kind
    over = run_capped([sys.executable, "-c", "b = b'x' * (400 << 20)"], 200 << 20)
    assert over["returncode"] == -9 and over["oom_kills"] == 1, over
    assert over["cgroup_peak_mib"] <= 200


@pytest.mark.integration  # 20 tool runs (the dense ones with the bundled MiniLM)
def test_bench_scale_runs_dry_at_tiny_size(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bench", "bench_scale.py"), "--sizes", "tiny",
                           "--parts", "bm25,dense,harvest,fit,capped", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["curves"]) == {"retrieve bm25 vs documents", "retrieve dense vs documents", "harvest vs tokens",
                                     "fit vs training tokens", "fit vs d_sae"}
    for curve in result["curves"].values():
        assert len(curve["points"]) == 3
        assert all(sec > 0 and mib > 0 for _, sec, mib in curve["points"])
        assert math.isfinite(curve["time_exponent"]) and math.isfinite(curve["memory_exponent"])
    runs = result["capped"]
    assert [r["run"].split(",")[0] for r in runs] == ["ssae-retrieve --method bm25", "ssae-fit"]
    assert all(r["returncode"] == 0 and r["oom_kills"] == 0 and r["input_mib"] > 0 for r in runs)
    assert runs[1]["input_mib"] >= 16  # the replicated activation file reached its size
    assert "| curve | time ~ size^b | peak RSS ~ size^b |" in proc.stdout and "| capped run |" in proc.stdout
