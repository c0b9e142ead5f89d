"""GPU defaults (TF32 switch, autocast default) and `make -C shell bench-gpu`'s CPU dry run."""
import json
import os
import re
import sys

import pytest
import torch

from ssae_common.core.errors import BadInput
from ssae_common.core.runtime import cuda_defaults

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "bench"))


@pytest.fixture
def restore_precision():
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


def test_tf32_is_the_cuda_default_and_ssae_tf32_0_turns_it_off(monkeypatch, restore_precision):
    cuda_defaults()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    monkeypatch.setenv("SSAE_TF32", "0")
    cuda_defaults()
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    monkeypatch.setenv("SSAE_TF32", "off")
    with pytest.raises(BadInput, match="SSAE_TF32=off"):
        cuda_defaults()


def test_autocast_is_on_by_default_and_cuda_only(tmp_path):
    import json

    from helpers import make_store, sparse_data
    from ssae_common.core.runtime import RunContext
    from ssae_common.sae import FitConfig, fit

    assert FitConfig().autocast is True
    store = make_store(tmp_path / "acts.h5", sparse_data(n=512))
    record = fit(FitConfig(d_sae=16, k=2, batch_size=64, val_tokens=0), [str(store)], out=str(tmp_path / "sae"),
                 context=RunContext(device_spec="cpu", quiet=True))
    cfg = json.load(open(tmp_path / "sae" / "cfg.json"))
    assert record["kind"] == "sae" and cfg["config"]["autocast"] is False  # what ran on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_gpu_without_cuda_says_so():
    import bench_gpu

    with pytest.raises(SystemExit, match="no CUDA device.*--dry"):
        bench_gpu.main([])


def test_bench_gpu_dry_run_prints_the_table_and_writes_json(tmp_path, capsys):
    import bench_gpu

    out = tmp_path / "gpu.json"
    result = bench_gpu.main(["--dry", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("bench "))
    assert lines[header].split() == ["bench", "setting", "tokens/s", "TFLOP/s", "peak", "share", "of", "peak"]
    body = lines[header + 1:]
    assert [line.split()[0] for line in body] == ["fit", "fit", "fit", "harvest", "eval", "eval"]
    assert [re.split(r"\s{2,}", line)[1].split(", ")[-2:] for line in body[:3]] == [
        ["autocast bf16", "dense decoder"], ["autocast bf16", "sparse decoder"], ["--no-autocast", "dense decoder"]]
    assert all(line.endswith("%") for line in body)
    saved = json.loads(out.read_text())
    assert saved["dry"] is True and set(saved["peaks_flops"]) == {"bf16", "tf32", "fp32"}
    assert all(v > 0 for v in saved["peaks_flops"].values())
    assert len(saved["rows"]) == len(result["rows"]) == 6 and saved["weights"] == "random"
    for row in saved["rows"]:
        # a rate from two run lengths is NaN when the machine's noise made the longer run no slower
        assert row["peak"] in saved["peaks_flops"] and not row["flops"] <= 0 and not row["share"] <= 0


def test_bench_gpu_random_weights_needs_only_the_config_and_tokenizer(tmp_path, capsys):
    import bench_gpu
    from helpers import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "model"), n_layers=4, d_model=32)
    weights = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    assert weights
    for name in weights:  # what shell/offline_pack.py carries: no weights
        os.remove(os.path.join(folder, name))
    result = bench_gpu.main(["--dry", "--model", folder, "--random-weights", "--hook", "blocks.2.hook_resid_post"])
    assert result["weights"] == "random" and result["model"] == folder and result["hook"] == "blocks.2.hook_resid_post"
    assert [r["bench"] for r in result["rows"]] == ["fit", "fit", "fit", "harvest", "eval", "eval"]
    with pytest.raises(SystemExit, match="--random-weights needs --model FOLDER holding a config.json"):
        bench_gpu.main(["--dry", "--model", str(tmp_path), "--random-weights"])
