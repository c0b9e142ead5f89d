"""bench-peers' logic that needs no peers environment: the evaluator's inference rules, FVU at equal L0, the
JumpReLU sweep's runs and the trainer specs it refuses before any work."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "bench"))
import bench_peers  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "bench", "bench_peers.py")


def test_fvu_at_l0_is_linear_in_log_l0_between_the_bracketing_runs():
    points = [(64.0, 0.10), (16.0, 0.30), (8.0, 0.50)]
    # 32 is halfway between 16 and 64 in log L0
    assert bench_peers.fvu_at_l0(points, 32.0) == pytest.approx(0.20)
    assert bench_peers.fvu_at_l0(points, 16.0) == pytest.approx(0.30)
    share = math.log(10 / 8) / math.log(16 / 8)
    assert bench_peers.fvu_at_l0(points, 10.0) == pytest.approx(0.50 - share * 0.20)


def test_fvu_at_l0_does_not_extrapolate():
    assert bench_peers.fvu_at_l0([(40.0, 0.2), (90.0, 0.1)], 32.0) is None
    assert bench_peers.fvu_at_l0([(40.0, 0.2)], 40.0) == 0.2
    assert bench_peers.fvu_at_l0([], 32.0) is None


def test_evaluate_uses_the_threshold_per_latent_and_topk_without_one():
    d_in, d_sae = 4, 3
    w = {"W_enc": np.eye(d_in, d_sae, dtype=np.float32), "b_enc": np.zeros(d_sae, np.float32),
         "W_dec": np.eye(d_sae, d_in, dtype=np.float32), "b_dec": np.zeros(d_in, np.float32), "scale": np.float32(1)}
    x = torch.tensor([[1.0, 0.5, 0.2, 0.0], [0.1, 2.0, 0.3, 0.0]])
    thresholded = bench_peers.evaluate({**w, "threshold": np.array([0.5, 0.5, 0.25], np.float32)}, x, k=1)
    # kept: 1.0 (not 0.5: the threshold is strict), then 2.0 and 0.3: L0 1.5, and every latent fires
    assert thresholded["l0"] == pytest.approx(1.5)
    assert thresholded["dead"] == 0.0
    top1 = bench_peers.evaluate(w, x, k=1)
    assert top1["l0"] == 1.0
    assert top1["dead"] == pytest.approx(1 / 3)
    assert thresholded["fvu"] < top1["fvu"]


def test_sweep_runs_group_each_library_s_values_and_keep_a_knob_given_in_the_spec():
    groups = bench_peers.sweep_runs(["ssae", "saelens@ssae", "dictionary_learning", "ssae+l0=0.01"],
                                    {"ssae": ["0.001", "0.003"], "saelens": ["1"]})
    assert groups == [["ssae+l0=0.001", "saelens@ssae+sparsity=1", "dictionary_learning", "ssae+l0=0.01"],
                      ["ssae+l0=0.003"]]
    assert bench_peers.knob_of("saelens@ssae+sparsity=1") == "l0_coefficient 1"
    assert bench_peers.knob_of("dictionary_learning") == "target_l0 default"
    assert bench_peers.for_architecture(["ssae+l0=0.001", "ssae+l0=0.003", "saelens+sparsity=2"],
                                        "batchtopk") == ["ssae", "saelens"]


@pytest.mark.parametrize("args, message", [
    (["--trainers", "ssae,nobody"], "--trainers: 'nobody': expected one of ssae, saelens, sparsify, "
                                    "dictionary_learning"),
    (["--trainers", "saelens@own"], "--trainers: 'saelens@own': a peer takes @ssae (ssae's recipe) and nothing else"),
    (["--trainers", "ssae+no_such_field=1"], "--trainers: 'ssae+no_such_field=1': 'no_such_field=1' is not KEY=VALUE"),
    (["--trainers", "sparsify+sparsity=3"], "'sparsity=3' is not KEY=VALUE with KEY one of (none"),
    (["--architectures", "topk,gated"], "--architectures: 'gated': expected some of topk, batchtopk, jumprelu"),
    (["--jumprelu-sweep", "saelens=1:-2"], "--jumprelu-sweep: 'saelens=1:-2': '-2' is not a positive number"),
    (["--jumprelu-sweep", "sparsify=1"], "--jumprelu-sweep: 'sparsify=1': expected NAME=V[:V...]"),
])
def test_bad_arguments_exit_with_one_line_before_any_work(args, message, monkeypatch):
    def no_work(*_):
        raise AssertionError("reached the rows")
    monkeypatch.setattr(bench_peers, "load_rows", no_work)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    with pytest.raises(SystemExit) as exit:
        bench_peers.main()
    assert message in str(exit.value.code)
    assert "\n" not in str(exit.value.code)


def test_batch_topk_evaluation_keeps_k_per_row_on_average_over_the_chunk():
    d_in, d_sae = 3, 3
    w = {"W_enc": np.eye(d_in, d_sae, dtype=np.float32), "b_enc": np.zeros(d_sae, np.float32),
         "W_dec": np.eye(d_sae, d_in, dtype=np.float32), "b_dec": np.zeros(d_in, np.float32), "scale": np.float32(1),
         "threshold": np.full(d_sae, 10.0, np.float32)}
    x = torch.tensor([[3.0, 2.0, 1.0], [0.5, 0.2, 0.1]])
    # the 2 largest of the chunk are both in row 1 (the threshold, 10, is not used)
    out = bench_peers.evaluate(w, x, k=1, chunk=2, batch_topk=True)
    assert out["l0"] == 1.0
    assert out["dead"] == pytest.approx(1 / 3)
    assert bench_peers.evaluate(w, x, k=1)["l0"] == 0.0


def test_the_recipe_column_reads_an_ablation_s_own_schedule():
    from ssae_common.sae.config import FitConfig

    cfg = FitConfig(architecture="topk", d_sae=64, k=4, batch_size=32, train_tokens=32 * 200).resolve(d_in=8,
                                                                                                     n_rows=6400)
    assert "constant" in bench_peers.schedule_of("ssae", 200, cfg)
    decayed = bench_peers.schedule_of("ssae+decay_fraction=0.2+aux_k=64", 200, cfg)
    assert "decay to 0 over the last 20%" in decayed and "constant" not in decayed and decayed.endswith("; aux_k=64")
    assert "Adam 0.001, warm-up 5," in bench_peers.schedule_of("ssae+lr=1e-3+warmup_steps=5", 200, cfg)
    # a peer's words keep the schedule it runs: ssae's, computed before any spec is read
    peer = bench_peers.schedule_of("sparsify@ssae+lr=1e-3", 200, cfg)
    assert peer.startswith(f"Adam {cfg.lr:.3g}, warm-up 20, constant") and peer.endswith("; lr=1e-3")
