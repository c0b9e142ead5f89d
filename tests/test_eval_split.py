"""The shared-prefix eval (eval/splice.py, data/models.Suffix): the layers above a residual hook rerun from a
replaced residual give the full pass's logits, and ssae-eval's numbers equal the whole-forward-pass path's."""
import json
import os

import pytest
import torch

from helpers import identity_sae, invoke, make_tiny_model, random_sae, sample_docs, write_jsonl
from ssae_common.data.models import LoadedModel, load_model, model_identity
from ssae_tools.eval import main as eval_main


@pytest.fixture(scope="module")
def lm3(tmp_path_factory):
    """A 3-layer tiny Llama: hooks below, between and after the blocks."""
    return load_model(make_tiny_model(str(tmp_path_factory.mktemp("tiny3")), n_layers=3, seed=1))


def padded_batch(lm):
    texts = ["the star of a galaxy is light and the orbit of a planet", "the cat",
             "quantum spin waves in a field of particles were measured by the doctor"]
    return lm.padded([lm.with_bos(lm.tokenize(t)) for t in texts])


def check_suffix_matches_full_pass(lm, hook):
    tokens = padded_batch(lm)
    real = tokens != lm.pad_token_id
    real[:, 0] = True
    logits, acts, suffix = lm.split_run(tokens, hook)
    assert suffix is not None
    torch.testing.assert_close(suffix(acts), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(suffix(acts, real), logits[real], rtol=1e-5, atol=1e-5)
    # a replaced residual gives what a whole pass with the hook output replaced gives
    noise = torch.randn(acts.shape, generator=torch.Generator().manual_seed(0))

    def add_noise(x, hook):
        return x + noise

    replaced = lm.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, add_noise)])
    torch.testing.assert_close(suffix(acts + noise), replaced, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre",
                                  "blocks.2.hook_resid_post"])
def test_suffix_equals_the_full_pass_on_the_tiny_model(lm3, hook):
    check_suffix_matches_full_pass(lm3, hook)


def test_hooks_inside_a_block_do_not_split(lm3):
    assert lm3.resume_layer("blocks.0.hook_mlp_out") is None
    assert lm3.resume_layer("blocks.1.hook_resid_post") == 2 and lm3.resume_layer("blocks.1.hook_resid_pre") == 1
    logits, acts, suffix = lm3.split_run(padded_batch(lm3), "blocks.1.hook_mlp_out")
    assert suffix is None and acts.shape[:2] == logits.shape[:2]


@pytest.mark.integration
def test_suffix_equals_the_full_pass_on_smollm2(shared_data):
    from ssae_common.data.config import DEFAULT_HOOK

    check_suffix_matches_full_pass(load_model("smollm2"), DEFAULT_HOOK)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_metrics_equal_the_whole_pass_path(tiny_model, tmp_path, monkeypatch, hook):
    """metrics.json from the shared-prefix eval against the same eval with every pass a whole forward pass
    (what ssae-eval did before, and still does for hooks inside a block)."""
    model = model_identity(tiny_model)
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(30, 60, seed=5))
    saes = []
    for name, sae in (("ident", identity_sae(16)), ("rand", random_sae(16, 48, 0, enc_bias=-0.01)),
                      ("rand2", random_sae(16, 40, 1, dec_scale=0.5))):
        os.makedirs(tmp_path / name)
        sae.save(str(tmp_path / name), model=model, hook=hook)
        saes.append(str(tmp_path / name))

    def metrics(out):
        invoke(eval_main, [*saes, "--docs", docs, "--model", tiny_model, "--context-size", "24", "--batch-size", "3",
                           "--device", "cpu", "-q", "-o", str(out)])
        return json.loads((out / "metrics.json").read_text())

    split = metrics(tmp_path / "split")
    monkeypatch.setattr(LoadedModel, "resume_layer", lambda self, hook: None)
    whole = metrics(tmp_path / "whole")
    assert split["n_tokens"] == whole["n_tokens"] > 200
    for a, b in zip(split["saes"], whole["saes"]):
        for key in ("ce_clean", "ce_zero_ablation", "ce_spliced", "ce_recovered", "fvu", "mse", "l0"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["name"], key)
    assert split["saes"][1]["ce_spliced"] != pytest.approx(split["saes"][1]["ce_clean"], abs=1e-3)


def test_a_suffix_that_does_not_reproduce_the_logits_falls_back(tiny_model, tmp_path, monkeypatch):
    """A model whose logits are more than blocks + final norm + unembedding (soft-capping, say) is caught by
    the first batch's check, and every pass is then a whole forward pass: the same numbers as that path."""
    from ssae_common.data.models import Suffix

    model = model_identity(tiny_model)
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), sample_docs(10, 40, seed=2))
    os.makedirs(tmp_path / "rand")
    random_sae(16, 48, 0).save(str(tmp_path / "rand"), model=model, hook="blocks.0.hook_resid_post")

    def metrics(out):
        r = invoke(eval_main, [str(tmp_path / "rand"), "--docs", docs, "--model", tiny_model, "--context-size", "24",
                               "--device", "cpu", "-o", str(out)])
        return json.loads((out / "metrics.json").read_text())["saes"][0], r.stderr

    whole, log = metrics(tmp_path / "ok")
    assert "does not reproduce" not in log
    real_call = Suffix.__call__
    monkeypatch.setattr(Suffix, "__call__", lambda self, resid, rows=None: real_call(self, resid, rows) * 1.01)
    off, log = metrics(tmp_path / "off")
    assert "does not reproduce" in log
    for key in ("ce_clean", "ce_zero_ablation", "ce_spliced"):
        assert off[key] == pytest.approx(whole[key], rel=1e-5)
