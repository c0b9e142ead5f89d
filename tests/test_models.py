"""Model families through the whole toolkit: a tiny random model of each family (saved as a local folder with
its family's special tokens) goes through ssae-harvest at three hooks of a middle layer, ssae-fit from
scratch and --init, ssae-eval --docs (the spliced run equals a whole pass; which path each family takes is
asserted), ssae-explain contexts, ssae-shift on a few bios and ssae-retrieve --rerank tracin --sae.

FAMILY_FACTS is what the tests establish per family; docs/models.md holds it as a table, checked here."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import (FAMILIES, identity_sae, invoke, make_family_model, parse_records, sample_docs, synthetic_bios,
                     write_jsonl)
from ssae_common.data.activations import ActivationStore
from ssae_common.data.models import load_model, model_identity
from ssae_common.eval.splice import DocsEvalConfig, replaced_pass, scored_positions, window_batches
from ssae_common.sae.autoencoder import SAE
from ssae_tools.eval import main as eval_main
from ssae_tools.explain import main as explain_main
from ssae_tools.fit import main as fit_main
from ssae_tools.harvest import main as harvest_main
from ssae_tools.retrieve import main as retrieve_main
from ssae_tools.shift import main as shift_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = 1  # the middle of three
WHOLE_PASS = "every spliced pass runs the whole model"

# family -> (Hugging Face architecture, BOS each window starts with, whether hook_resid_mid exists,
#            whether eval at hook_resid_pre/post reruns only the layers above the hook)
FAMILY_FACTS = {
    "gpt2": ("GPT2LMHeadModel", "<|endoftext|>", True, True),
    "gpt_neox": ("GPTNeoXForCausalLM", "<|endoftext|>", False, True),
    "gemma2": ("Gemma2ForCausalLM", "<bos>", True, True),
    "gemma3": ("Gemma3ForCausalLM", "<bos>", True, True),
    "llama3": ("LlamaForCausalLM", "<|begin_of_text|>", True, True),
    "qwen2": ("Qwen2ForCausalLM", "<|endoftext|> (EOS: no BOS token)", True, True),
    "qwen3": ("Qwen3ForCausalLM", "<|endoftext|> (EOS: no BOS token)", True, True),
    "mistral": ("MistralForCausalLM", "<s>", True, True),
    "phi3": ("Phi3ForCausalLM", "<s>", True, True),
    "olmo2": ("Olmo2ForCausalLM", "<|endoftext|> (EOS: no BOS token)", True, True),
}
TOOLS = ("harvest", "fit", "fit --init", "eval --docs", "explain", "shift", "retrieve --rerank tracin")


def models_table() -> str:
    """The family matrix of docs/models.md, from FAMILY_FACTS."""
    hooks = "hook_resid_pre, hook_resid_mid, hook_resid_post, hook_mlp_out, attn.hook_z"
    lines = ["| family | architecture | " + " | ".join(TOOLS) + " | eval shares the prefix | hooks | BOS |",
             "|" + " --- |" * (len(TOOLS) + 5)]
    for family, (arch, bos, mid, shared) in FAMILY_FACTS.items():
        family_hooks = hooks if mid else hooks.replace(" hook_resid_mid,", "")
        inside = "resid_mid, mlp_out, hook_z" if mid else "mlp_out, hook_z"
        prefix = f"yes at resid_pre/post; whole pass at {inside}" if shared else "no: whole pass"
        token, _, note = bos.partition(" ")
        bos_cell = f"`{token}` {note}".strip().replace("|", "\\|")  # a pipe inside a table cell is escaped
        lines.append(f"| {family} | {arch} | " + " | ".join("yes" for _ in TOOLS)
                     + f" | {prefix} | blocks.L.{{{family_hooks}}} | {bos_cell} |")
    return "\n".join(lines)


def run(command, args, code=0):
    return invoke(command, args, code=code)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-data")
    docs = write_jsonl(str(folder / "docs.jsonl"), sample_docs(10, 30, seed=2))
    bios = write_jsonl(str(folder / "bios.jsonl"), synthetic_bios(per_cell=5, seed=1))
    seeds = write_jsonl(str(folder / "seeds.jsonl"), [{"id": "s0", "text": "the star of a galaxy and its planet"}])
    return {"docs": docs, "bios": bios, "seeds": seeds}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, data):
    """One family's model, its harvest at blocks.1.hook_resid_post and an SAE fitted on it (shared by the
    family's tests)."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    model = make_family_model(str(folder / "model"), name)
    hook = f"blocks.{LAYER}.hook_resid_post"
    acts = str(folder / "post.h5")
    run(harvest_main, [data["docs"], "--model", model, "--hook", hook, "--context-size", 16, "--dtype", "float32",
                       "-o", acts])
    sae = str(folder / "sae")
    run(fit_main, [acts, "--d-sae", 64, "--k", 8, "--train-tokens", 1024, "--batch-size", 64, "-o", sae])
    return {"name": name, "folder": folder, "model": model, "hook": hook, "acts": acts, "sae": sae,
            "lm": load_model(model)}


def spliced_both_ways(lm, sae, hook: str, docs: str):
    """[n_scored, vocab] logits with `sae`'s reconstruction spliced in at `hook`, through the shared prefix and
    through a whole forward pass, over the first batch of windows of `docs`."""
    from ssae_common.core.records import iter_docs

    cfg = DocsEvalConfig(hook=hook, context_size=16, batch_size=4)
    wb = next(window_batches(lm, iter_docs([docs], "text"), cfg))
    pred = scored_positions(wb.real)
    logits, acts, suffix = lm.split_run(wb.tokens, hook)
    x_hat, _ = sae(acts[wb.splice_pos].float())
    shared = replaced_pass(lm, wb.tokens, hook, acts, suffix, wb.splice_pos, pred)(x_hat)
    whole = replaced_pass(lm, wb.tokens, hook, acts, None, wb.splice_pos, pred)(x_hat)
    return suffix is not None and suffix.matches(acts, logits, pred), shared, whole


def assert_relative_close(a, b, rtol=1e-5):
    assert float((a - b).abs().max()) <= rtol * float(b.abs().max())


def test_family_through_every_tool(family, data, tmp_path):
    name, model, lm = family["name"], family["model"], family["lm"]
    arch, bos, has_mid, shares = FAMILY_FACTS[name]
    assert type(lm.bridge.original_model).__name__ == arch
    assert lm.prepends_bos and lm.tokenizer.convert_ids_to_tokens(lm.bos_token_id) == bos.split(" ")[0]
    assert (f"blocks.{LAYER}.hook_resid_mid" in lm.hook_names()) == has_mid

    # harvest at the other hooks of the layer: pre, and mid where the family has one (refused where not)
    store = ActivationStore(family["acts"])
    assert store.hook_module == f"blocks.{LAYER}.hook_out" and store.prepend_bos and store.model_dtype == "float32"
    store.close()
    run(harvest_main, [data["docs"], "--model", model, "--hook", f"blocks.{LAYER}.hook_resid_pre",
                       "--context-size", 16, "-o", tmp_path / "pre.h5"])
    mid = run(harvest_main, [data["docs"], "--model", model, "--hook", f"blocks.{LAYER}.hook_resid_mid",
                             "--context-size", 16, "-o", tmp_path / "mid.h5"], code=0 if has_mid else 2)
    if not has_mid:
        assert "not a hook of" in mid.stderr and "loading model" not in mid.stderr

    # fit --init from the family's SAE
    run(fit_main, [family["acts"], "--init", family["sae"], "--train-tokens", 512, "--batch-size", 64,
                   "-o", tmp_path / "ssae"])
    cfg = json.loads((tmp_path / "ssae" / "cfg.json").read_text())
    assert cfg["model"] == model_identity(model) and cfg["prepend_bos"] is True
    assert cfg["hook_module"] == f"blocks.{LAYER}.hook_out"

    # eval --docs: the path the family takes, and spliced logits equal to a whole pass
    result = run(eval_main, [tmp_path / "ssae", "--docs", data["docs"], "--context-size", 16, "--batch-size", 4,
                             "-o", tmp_path / "eval"])
    assert (WHOLE_PASS not in result.stderr) == shares
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["config"]["bos"] is True and metrics["config"]["model_dtype"] == "float32"
    sae = SAE.load(str(tmp_path / "ssae"))
    matches, shared, whole = spliced_both_ways(lm, sae, family["hook"], data["docs"])
    assert matches == shares
    assert_relative_close(shared, whole)

    # explain contexts
    run(explain_main, [tmp_path / "ssae", "--activations", family["acts"], "--explainer", "none", "--latents", "0-3",
                       "-o", tmp_path / "explain"])
    assert len((tmp_path / "explain" / "explanations.jsonl").read_text().splitlines()) == 4

    # shift on a few bios
    result = run(shift_main, ["--data", data["bios"], "--professions", "nurse", "physician,surgeon", "--sae",
                              tmp_path / "ssae", "--ablate", "0-3", "--seeds", 1, "-o", tmp_path / "shift.json"])
    report = json.loads((tmp_path / "shift.json").read_text())
    assert report["config"]["model"] == model_identity(model) and report["rows"]

    # retrieve --rerank tracin --sae
    result = run(retrieve_main, [data["seeds"], "--corpus", data["docs"], "--top-k", 3, "--rerank", "tracin",
                                 "--sae", tmp_path / "ssae", "--rerank-pool", 2])
    assert [r["method"] for r in parse_records(result.stdout)] == ["bm25+tracin"] * 3


def test_docs_models_md_holds_the_tested_matrix():
    with open(os.path.join(ROOT, "docs", "models.md")) as f:
        text = f.read()
    assert models_table() in text, "docs/models.md is out of date: paste test_models.models_table() into it"
    assert set(FAMILY_FACTS) == set(FAMILIES)


# ---------------------------------------------------------------------- hooks, SAEs of other libraries

@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return make_family_model(str(tmp_path_factory.mktemp("gemma2-model")), "gemma2", seed=3)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return make_family_model(str(tmp_path_factory.mktemp("llama3-model")), "llama3", seed=4)


def test_gemma_scope_params_npz_through_harvest_fit_init_and_eval(gemma2, data, tmp_path):
    """Gemma Scope's layout at blocks.L.hook_resid_post: harvest, fit --init params.npz --tilt-ess 0.5, eval
    --docs with no --model or --hook; the eval shares the prefix (soft-capping included) exactly."""
    hook = f"blocks.{LAYER}.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    d, d_sae = 32, 128
    w_enc = torch.randn(d, d_sae, generator=g) / d ** 0.5
    params = {"W_enc": w_enc, "W_dec": w_enc.T.contiguous(), "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d),
              "threshold": torch.full((d_sae,), 0.05)}
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in params.items()})
    acts = tmp_path / "acts.h5"
    run(harvest_main, [data["docs"], "--model", gemma2, "--hook", hook, "--context-size", 16, "-o", acts])
    run(fit_main, [acts, "--init", tmp_path / "params.npz", "--tilt-ess", 0.5, "--train-tokens", 512,
                   "--batch-size", 64, "-o", tmp_path / "ssae"])
    cfg = json.loads((tmp_path / "ssae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["tilt_ess"] == 0.5 and cfg["hook"] == hook
    result = run(eval_main, [tmp_path / "ssae", "--docs", data["docs"], "--context-size", 16, "-o", tmp_path / "ev"])
    assert WHOLE_PASS not in result.stderr and "--model" not in result.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["dataset"]["model"] == model_identity(gemma2) and metrics["dataset"]["hook"] == hook
    lm = load_model(gemma2)
    assert lm.bridge.original_model.config.final_logit_softcapping == 30.0
    matches, shared, whole = spliced_both_ways(lm, SAE.load(str(tmp_path / "ssae")), hook, data["docs"])
    assert matches
    assert_relative_close(shared, whole, 1e-5)


@pytest.mark.parametrize("which", ["llama3", "gemma2"])
def test_attn_hook_z_harvests_fits_and_evaluates(which, request, data, tmp_path):
    """attn.hook_z is [tokens, heads, d_head]: stored with the heads concatenated (Gemma 2's 4 x 16 is wider
    than its d_model 32), and spliced back reshaped, so an exact reconstruction leaves the loss unchanged."""
    model = request.getfixturevalue(which)
    hook = f"blocks.{LAYER}.attn.hook_z"
    width = {"llama3": 32, "gemma2": 64}[which]
    acts = tmp_path / "z.h5"
    run(harvest_main, [data["docs"], "--model", model, "--hook", hook, "--context-size", 16, "-o", acts])
    with ActivationStore(str(acts)) as store:
        assert store.d_model == width and store.hook_module == f"blocks.{LAYER}.attn.o.hook_in"
        assert json.loads(store.f.attrs["hook_shape"]) == [4, width // 4]
    run(fit_main, [acts, "--d-sae", 64, "--k", 8, "--train-tokens", 1024, "--batch-size", 64, "-o", tmp_path / "sae"])
    exact = tmp_path / "identity"
    exact.mkdir()
    identity_sae(width).save(str(exact), model=model_identity(model), hook=hook)
    result = run(eval_main, [tmp_path / "sae", exact, "--docs", data["docs"], "--context-size", 16,
                             "-o", tmp_path / "ev"])
    assert WHOLE_PASS in result.stderr  # inside a block: whole passes
    saes = {s["name"]: s for s in json.loads((tmp_path / "ev" / "metrics.json").read_text())["saes"]}
    assert saes["identity"]["ce_spliced"] == pytest.approx(saes["identity"]["ce_clean"], rel=1e-6)
    assert saes["identity"]["ce_spliced"] != pytest.approx(saes["identity"]["ce_zero_ablation"], rel=1e-3)
    assert saes["sae"]["d_in"] == width


def test_hook_resid_mid_is_refused_where_attention_and_mlp_run_in_parallel(data, tmp_path):
    model = make_family_model(str(tmp_path / "neox"), "gpt_neox")
    r = run(harvest_main, [data["docs"], "--model", model, "--hook", "blocks.1.hook_resid_mid",
                           "-o", tmp_path / "a.h5"], code=2)
    assert r.stderr.strip().endswith("valid: blocks.L.{hook_resid_pre, hook_resid_post, hook_mlp_out, attn.hook_z} "
                                     "for L in 0..2")
    assert "loading model" not in r.stderr and not (tmp_path / "a.h5").exists()


# ------------------------------------------------------------------------------- names, BOS, dtype

def test_alias_table_maps_sae_library_names_to_hugging_face_ids():
    from ssae_common.data.models import same_model
    from ssae_common.eval.config import EvalConfig

    assert model_identity("gpt2-small") == "gpt2"
    assert model_identity("gemma-2-2b") == "google/gemma-2-2b"
    assert model_identity("pythia-70m-deduped") == "EleutherAI/pythia-70m-deduped"
    assert model_identity("google/gemma-2-2b") == "google/gemma-2-2b"
    assert same_model("gpt2-small", "gpt2") and not same_model("gpt2-small", "google/gemma-2-2b")
    # an imported SAE names its model the SAELens way: eval loads the Hugging Face id without --model
    resolved = EvalConfig(docs=("d.jsonl",)).resolve([{"model": "gemma-2-2b", "hook": "blocks.3.hook_resid_post"}])
    assert resolved.model == "google/gemma-2-2b" and resolved.hook == "blocks.3.hook_resid_post"


def saelens_sae(folder, d: int, model: str, hook: str, prepend_bos: bool):
    """A SAELens-layout SAE (cfg.json with metadata, sae_weights.safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir()
    sae = identity_sae(d)
    save_file({k: getattr(sae, k).detach().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d, "d_sae": 2 * d, "apply_b_dec_to_input": True,
        "metadata": {"model_name": model, "hook_name": hook, "prepend_bos": prepend_bos}}))
    return folder


def test_a_true_model_mismatch_exits_2_unless_allowed(llama3, data, tmp_path):
    hook = f"blocks.{LAYER}.hook_resid_post"
    sae = saelens_sae(tmp_path / "other", 32, "gemma-2-2b", hook, True)
    args = [sae, "--docs", data["docs"], "--model", llama3, "--context-size", 16]
    r = run(eval_main, [*args, "-o", tmp_path / "ev"], code=2)
    assert "trained on model 'gemma-2-2b'" in r.stderr and "--allow-model-mismatch" in r.stderr
    r = run(eval_main, [*args, "--allow-model-mismatch", "-o", tmp_path / "ev"])
    assert "--allow-model-mismatch" in r.stderr and (tmp_path / "ev" / "metrics.json").exists()


def test_bos_is_recorded_and_honoured(llama3, data, tmp_path):
    """--no-bos harvests windows of text alone; the SAE records it; eval cuts windows that way (a SAELens
    SAE's prepend_bos too), and explain refuses activations taken with the other rule."""
    hook = f"blocks.{LAYER}.hook_resid_post"
    run(harvest_main, [data["docs"], "--model", llama3, "--hook", hook, "--no-bos", "--context-size", 16,
                       "-o", tmp_path / "nobos.h5"])
    run(harvest_main, [data["docs"], "--model", llama3, "--hook", hook, "--context-size", 16,
                       "-o", tmp_path / "bos.h5"])
    with ActivationStore(str(tmp_path / "nobos.h5")) as nobos, ActivationStore(str(tmp_path / "bos.h5")) as bos:
        assert nobos.prepend_bos is False and bos.prepend_bos is True
        assert nobos.position(0, 3).tolist() == [0, 1, 2] and bos.position(0, 3).tolist() == [1, 2, 3]
        assert not np.allclose(nobos.rows(0, 3), bos.rows(0, 3), atol=1e-3)  # the first tokens see no BOS
    run(fit_main, [tmp_path / "nobos.h5", "--d-sae", 64, "--k", 8, "--train-tokens", 512, "--batch-size", 64,
                   "-o", tmp_path / "sae"])
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["prepend_bos"] is False
    run(eval_main, [tmp_path / "sae", "--docs", data["docs"], "--context-size", 16, "-o", tmp_path / "ev"])
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["config"]["bos"] is False
    r = run(explain_main, [tmp_path / "sae", "--activations", tmp_path / "bos.h5", "--explainer", "none",
                           "-o", tmp_path / "ex"], code=2)
    assert "harvested with BOS, but the SAE" in r.stderr and "--no-bos" in r.stderr
    saelens = saelens_sae(tmp_path / "saelens", 32, llama3, hook, False)
    run(eval_main, [saelens, "--docs", data["docs"], "--context-size", 16, "-o", tmp_path / "ev2"])
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["config"]["bos"] is False


def test_model_dtype_bfloat16_on_cpu_is_recorded_and_within_bf16_rounding(llama3, data, tmp_path):
    hook = f"blocks.{LAYER}.hook_resid_post"
    stores = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.h5"
        rec = parse_records(run(harvest_main, [data["docs"], "--model", llama3, "--hook", hook, "--model-dtype",
                                               dtype, "--dtype", "float32", "--context-size", 16, "-o", out]).stdout)[0]
        assert rec["path"] == str(out)
        with ActivationStore(str(out)) as store:
            assert store.model_dtype == dtype and store.attrs["config"]["model_dtype"] == dtype
            stores[dtype] = store.rows(0, store.n_tokens)
    full, half = stores["float32"], stores["bfloat16"]
    rel = np.linalg.norm(half - full, axis=1) / np.linalg.norm(full, axis=1)
    # a few bf16 roundings (2^-8 relative each) through three small layers
    assert 0 < rel.mean() < 4 * 2.0 ** -8
    r = run(harvest_main, [data["docs"], "--model", llama3, "--model-dtype", "float64", "-o", tmp_path / "x.h5"],
            code=2)
    assert "--model-dtype" in r.stderr


def bf16_vs_fp32(docs: str, folder, model: str = "smollm2", hook: str = "blocks.6.hook_resid_post",
                 max_tokens: int = 2048) -> dict:
    """Harvest the same tokens with the model in float32 and in bfloat16 (stored as float32) -> relative
    differences: per element |bf16 - fp32| / |fp32| (elements above 1e-2 of the row's scale), and per token
    ||bf16 - fp32|| / ||fp32||."""
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = os.path.join(folder, f"{dtype}.h5")
        run(harvest_main, [docs, "--model", model, "--hook", hook, "--model-dtype", dtype, "--dtype", "float32",
                           "--max-tokens", max_tokens, "--device", "cpu", "-o", out])
        with ActivationStore(out) as store:
            rows[dtype] = store.rows(0, store.n_tokens).astype(np.float64)
    full, half = rows["float32"], rows["bfloat16"]
    scale = np.abs(full).max(axis=1, keepdims=True)
    big = np.abs(full) > 1e-2 * scale
    element = (np.abs(half - full) / np.abs(full))[big]
    token = np.linalg.norm(half - full, axis=1) / np.linalg.norm(full, axis=1)
    return {"tokens": len(full), "element_mean": float(element.mean()), "element_median": float(np.median(element)),
            "element_max": float(element.max()), "token_mean": float(token.mean()), "token_max": float(token.max())}


@pytest.mark.integration
def test_bfloat16_harvest_of_smollm2_is_within_a_few_bf16_roundings(shared_data, tmp_path):
    import gzip

    with gzip.open(os.path.join(shared_data, "general", "pool.jsonl.gz"), "rt") as f:
        docs = [json.loads(line) for _, line in zip(range(40), f)]
    path = write_jsonl(str(tmp_path / "docs.jsonl"), docs)
    stats = bf16_vs_fp32(path, str(tmp_path))
    print(json.dumps(stats))
    assert stats["tokens"] == 2048
    # seven layers computed in bf16: a few roundings (2^-8 relative each) compound, not one
    assert stats["element_median"] < 4 * 2.0 ** -8 and stats["token_mean"] < 4 * 2.0 ** -8


def test_two_names_of_one_residual_point_agree(llama3, data, tmp_path):
    """blocks.0.hook_resid_post and blocks.1.hook_resid_pre hold the same values: an SAE of one is
    evaluated at the other; a different point is refused."""
    rows = {}
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"):
        out = tmp_path / f"{hook}.h5"
        run(harvest_main, [data["docs"], "--model", llama3, "--hook", hook, "--dtype", "float32",
                           "--context-size", 16, "-o", out])
        with ActivationStore(str(out)) as store:
            rows[hook] = (store.rows(0, store.n_tokens), store.hook_module)
    assert np.array_equal(rows["blocks.0.hook_resid_post"][0], rows["blocks.1.hook_resid_pre"][0])
    assert [m for _, m in rows.values()] == ["blocks.0.hook_out", "blocks.1.hook_in"]
    sae = tmp_path / "sae"
    sae.mkdir()
    identity_sae(32).save(str(sae), model=model_identity(llama3), hook="blocks.0.hook_resid_post")
    args = [sae, "--docs", data["docs"], "--context-size", 16]
    run(eval_main, [*args, "--hook", "blocks.1.hook_resid_pre", "-o", tmp_path / "ev"])
    r = run(eval_main, [*args, "--hook", "blocks.1.hook_resid_post", "-o", tmp_path / "ev2"], code=2)
    assert "at hook 'blocks.0.hook_resid_post'" in r.stderr
