"""bench-scale at its tiny size: every curve measured at three sizes, each with a finite exponent."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration  # 18 tool runs (the dense ones with the bundled MiniLM)
def test_bench_scale_runs_dry_at_tiny_size(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bench", "bench_scale.py"), "--sizes", "tiny",
                           "--parts", "bm25,dense,harvest,fit", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["curves"]) == {"retrieve bm25 vs documents", "retrieve dense vs documents", "harvest vs tokens",
                                     "fit vs training tokens", "fit vs d_sae"}
    for curve in result["curves"].values():
        assert len(curve["points"]) == 3
        assert all(sec > 0 and mib > 0 for _, sec, mib in curve["points"])
        assert math.isfinite(curve["time_exponent"]) and math.isfinite(curve["memory_exponent"])
    assert "exponent: time ~ size^" in proc.stdout
