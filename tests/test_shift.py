"""ssae-shift on a synthetic templated Bias in Bios set where pronouns carry the spurious gender signal,
with a hand-built SAE whose planted gender latents remove it."""
import csv
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from helpers import invoke, parse_records, synthetic_bios, write_jsonl
from ssae_common.core.config import ConfigError
from ssae_common.core.errors import BadInput
from ssae_common.core.runtime import RunContext
from ssae_common.shift import ShiftConfig, shift
from ssae_common.shift import attribution as A, bios as B, probe as P, report as R
from ssae_common.data.models import document_activations, load_model
from ssae_common.sae.autoencoder import SAE
from ssae_tools.shift import main

HOOK = "blocks.0.hook_resid_post"
GENDER_LATENTS = [0, 1]
D_SAE = 16


def planted_sae(lm, records) -> SAE:
    """Latents 0/1: +/- the within-profession female-minus-male direction of the pooled activations
    (together they remove that direction from every token); 2/3: +/- the profession direction; the
    rest random. Decoder bias: the mean token activation, so the pairs split each token's projection."""
    acts, _ = document_activations(lm, [r["text"] for r in records], HOOK)
    x = P.pooled(acts)
    female = np.array([r["gender"] == "female" for r in records])
    nurse = np.array([r["profession"] == "nurse" for r in records])

    def diff(a, b):
        return x[a].mean(0) - x[b].mean(0)

    gender_dir = np.mean([diff(female & p, ~female & p) for p in (nurse, ~nurse)], axis=0)
    gender_dir /= np.linalg.norm(gender_dir)
    prof_dir = np.mean([diff(~nurse & g, nurse & g) for g in (female, ~female)], axis=0)
    prof_dir -= (prof_dir @ gender_dir) * gender_dir
    prof_dir /= np.linalg.norm(prof_dir)
    rng = np.random.default_rng(0)
    dec = rng.normal(size=(D_SAE, x.shape[1]))
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    dec[0], dec[1], dec[2], dec[3] = gender_dir, -gender_dir, prof_dir, -prof_dir
    sae = SAE(x.shape[1], D_SAE)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(dec))
        sae.W_enc.copy_(torch.tensor(dec.T))
        sae.b_dec.copy_(torch.cat(acts).mean(0))
    return sae


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shift")
    records = synthetic_bios()
    data = write_jsonl(str(folder / "bios.jsonl"), records)
    lm = load_model(tiny_model)
    sae = planted_sae(lm, records)
    sae_dir = folder / "planted"
    sae_dir.mkdir()
    sae.save(str(sae_dir), model=tiny_model, hook=HOOK)
    return {"data": data, "sae": str(sae_dir), "records": records, "lm": lm, "model": tiny_model,
            "folder": folder}


def run(args):
    return invoke(main, args)


def by_method(report_or_rows):
    rows = report_or_rows["rows"] if isinstance(report_or_rows, dict) else report_or_rows
    return {r["method"]: r for r in rows}


def test_auto_finds_planted_gender_latents_and_raises_worst_group(setup, tmp_path):
    out = tmp_path / "shift.json"
    result = run(["--data", setup["data"], "--professions", "nurse", "physician,surgeon", "--sae", setup["sae"],
                  "--ablate", "auto", "--top", "8", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    (record,) = parse_records(result.stdout)
    assert record["schema"] == "ssae.artifact/1" and record["kind"] == "shift"
    assert record["path"] == str(out)
    report = json.loads(out.read_text())
    assert report["schema"] == "ssae.shift/1"
    assert report["created_by"]["tool"] == "ssae-shift" and report["seed"] == 0
    assert report["cells"]["pairing"] == {"nurse": "female", "physician,surgeon": "male"}
    assert report["cells"]["test_per_cell"] == 32 and report["cells"]["val_per_cell"] == 16
    # five seeded splits by default, the table their mean
    assert [b["seed"] for b in report["splits"]] == [0, 1, 2, 3, 4]
    assert report["rows"][0]["splits"] == 5 and "worst_group_accuracy_sd" in report["rows"][0]
    assert len({tuple(b["rows"][0]["group_accuracy"].values()) for b in report["splits"]}) > 1
    rows = by_method(report["splits"][0]["rows"])
    assert list(rows) == ["original", "oracle", "neuron_skyline", "shift:planted", "shift+retrain:planted"]
    for r in rows.values():
        assert r["n"] == 128
        assert set(r["group_accuracy"]) == {"nurse/female", "nurse/male", "physician,surgeon/female",
                                            "physician,surgeon/male"}
        assert r["worst_group_accuracy"] == min(r["group_accuracy"].values())
    original, shift, retrain = rows["original"], rows["shift:planted"], rows["shift+retrain:planted"]
    # the probe leans on gender: it fails the anti-stereotypical cells
    assert original["worst_group_accuracy"] < 0.3 and original["gender_accuracy"] > 0.85
    assert sorted(shift["ablated_latents"]) == GENDER_LATENTS
    assert shift["worst_group_accuracy"] > original["worst_group_accuracy"] + 0.3
    assert shift["gender_accuracy"] < 0.7
    assert retrain["worst_group_accuracy"] > original["worst_group_accuracy"] + 0.3
    mean = by_method(report)
    assert mean["shift:planted"]["worst_group_accuracy"] > mean["original"]["worst_group_accuracy"] + 0.1
    assert report["ablated"]["planted"][0]["latent"] in GENDER_LATENTS
    assert report["ablated"]["planted"][0]["splits"] == 5
    difference = next(d for d in report["differences"] if d["a"] == "shift:planted")
    assert difference["b"] == "original" and len(difference["values"]) == 5
    detail = report["splits"][0]["saes"][0]
    assert detail["clean_logit_max_abs_diff"] < 1e-9
    assert detail["selection_trace"][-1]["gender_auc"] < 0.6
    top = {t["latent"]: t for t in detail["top_latents"]}
    assert top[0]["top_tokens"] and top[0]["ablated"] and not top[2]["ablated"]
    # the table on stderr
    assert "shift+retrain:planted" in result.stderr and "worst" in result.stderr and "±" in result.stderr
    assert "check: the original probe's gender accuracy" in result.stderr
    # the gender probe's test accuracy on the activations and with every latent ablated, per split and mean
    left = report["gender_left"]["planted"]
    assert set(detail["gender_test_accuracy"]) == {"activations", "every_latent_ablated"}
    assert left["activations"] > 0.9 and 0 <= left["every_latent_ablated"] <= 1
    assert left["activations"] == pytest.approx(np.mean([b["saes"][0]["gender_test_accuracy"]["activations"]
                                                         for b in report["splits"]]))
    assert "gender left in planted: a gender probe reaches" in result.stderr


def test_explicit_list_mean_ablation_and_explanations(setup, tmp_path):
    out = tmp_path / "shift.json"
    expl = write_jsonl(str(tmp_path / "explanations.jsonl"),
                       [{"schema": "ssae.explanation/1", "latent": 0, "explanation": "female pronouns"}])
    result = run(["--data", setup["data"], "--professions", "nurse", "physician,surgeon",
                  "--sae", f"g={setup['sae']}", "--ablate", "g=0,1", "--ablation", "mean", "--explanations",
                  f"g={expl}", "--show", "3", "--seeds", "1", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert len(report["splits"]) == 1 and report["rows"][0]["worst_group_accuracy_sd"] == 0
    rows = by_method(report["splits"][0]["rows"])
    assert rows["shift:g"]["ablated_latents"] == [0, 1]
    assert rows["shift:g"]["worst_group_accuracy"] > rows["original"]["worst_group_accuracy"] + 0.3
    # with a list, the skyline ablates as many neurons as latents, chosen by attribution
    assert len(rows["neuron_skyline"]["ablated_neurons"]) == 2
    top = {t["latent"]: t for t in report["splits"][0]["saes"][0]["top_latents"]}
    assert top[0]["explanation"] == "female pronouns" and top[1]["explanation"] is None
    # an existing output is kept without --force
    again = run(["--data", setup["data"], "--professions", "nurse", "physician,surgeon", "--sae", setup["sae"],
                 "-o", str(out)])
    assert again.exit_code == 2 and "exists (use --force" in again.stderr


def test_clean_splice_is_exact_and_attribution_matches_real_ablation(setup):
    records, lm = setup["records"], setup["lm"]
    sae = SAE.load(setup["sae"])
    bios = [B.Bio(r["id"], r["text"], r["profession"], r["gender"], "t") for r in records]
    cells = B.build_cells(bios, ["nurse"], ["physician", "surgeon"], {"nurse": 1, "physician": 1, "surgeon": 1})
    acts, tokens = document_activations(lm, [b.text for b in bios], HOOK)
    x = P.pooled(acts)
    train = cells.train_ambiguous
    probe = P.LinearProbe.fit(x[train], cells.label[train])
    signs = np.where(cells.label == 1, 1.0, -1.0)
    stats = A.latent_stats(sae, acts, tokens, train)
    for ablate_to, mask in ((np.zeros(D_SAE), np.ones(D_SAE, bool)),
                            (stats.train_mean, A.slice_mask(stats.frequency, (1, 2)))):
        scores, max_diff = A.attribute_latents(sae, probe, acts, train, signs, ablate_to, mask)
        assert max_diff < 1e-9  # nothing ablated: the spliced path gives the original logits
        base = signs[train] * probe.logit(x[train])
        for j in range(D_SAE):
            ablated = A.ablate_latents(x[train], stats.pooled[train], [j], sae, ablate_to)
            exact = float((signs[train] * probe.logit(ablated) - base).mean())
            expected = exact if mask[j] else 0.0
            assert scores[j] == pytest.approx(expected, abs=1e-5)
        assert np.abs(scores).max() > 0.1
    # the slice keeps the most often active half
    mask = A.slice_mask(stats.frequency, (1, 2))
    assert mask.sum() == D_SAE // 2 and stats.frequency[mask].min() >= stats.frequency[~mask].max()


def test_token_level_ablation_equals_pooled_formula(setup):
    sae = SAE.load(setup["sae"])
    acts, tokens = document_activations(setup["lm"], [r["text"] for r in setup["records"][:5]], HOOK)
    stats = A.latent_stats(sae, acts, tokens, [0, 1])
    with torch.no_grad():
        for i, a in enumerate(acts):
            f = sae.encode(a)
            err = a - sae.decode(f)
            f_abl = f.clone()
            f_abl[:, GENDER_LATENTS] = torch.tensor(stats.train_mean[GENDER_LATENTS], dtype=f.dtype)
            token_level = (sae.decode(f_abl) + err).mean(0).double().numpy()
            pooled = A.ablate_latents(a.mean(0, keepdim=True).double().numpy(), stats.pooled[i:i + 1],
                                      GENDER_LATENTS, sae, stats.train_mean)[0]
            np.testing.assert_allclose(token_level, pooled, atol=1e-5)


def test_slice_restricts_candidates(setup, tmp_path):
    out = tmp_path / "shift.json"
    result = run(["--data", setup["data"], "--professions", "nurse", "physician,surgeon", "--sae", setup["sae"],
                  "--slice", "1/2", "--seeds", "1", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    detail = json.loads(out.read_text())["splits"][0]["saes"][0]
    assert detail["latents_considered"] == D_SAE // 2
    considered = {t["latent"] for t in detail["top_latents"] if t["attribution"] != 0}
    assert len(considered) <= D_SAE // 2


def test_labhc_schema_and_csv(tmp_path):
    index = {name: i for i, name in enumerate(B.BIOS_PROFESSIONS)}
    assert index["nurse"] == 13 and index["professor"] == 21
    hf = [{"hard_text": r["text"], "profession": index[r["profession"]], "gender": int(r["gender"] == "female")}
          for r in synthetic_bios(per_cell=4)]
    path = write_jsonl(str(tmp_path / "hf.jsonl"), hf)
    bios, seen = B.load_bios([path], {"nurse", "surgeon"})
    assert seen == {"nurse": 16, "physician": 8, "surgeon": 8}
    assert len(bios) == 24 and {b.gender for b in bios} == {"male", "female"}
    assert bios[0].text == hf[0]["hard_text"] and bios[0].profession == "nurse"
    csv_path = tmp_path / "bios.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "profession", "gender"])
        writer.writeheader()
        for r in synthetic_bios(per_cell=4):
            writer.writerow({k: r[k] for k in ("text", "profession", "gender")})
    bios, _ = B.load_bios([str(csv_path)], {"nurse", "physician"})
    assert len(bios) == 24
    cells = B.build_cells(bios, ["nurse"], ["physician"], {"nurse": 16, "physician": 8}, seed=1)
    assert cells.counts["test_per_cell"] == 1 and len(cells.test) == 4
    assert not set(cells.test) & set(cells.val) and not set(cells.test) & set(cells.train_ambiguous)
    assert B.parse_side("13,physician") == ["nurse", "physician"]


@pytest.mark.parametrize("case,message", [
    ("no_profession", "--professions: no documents with profession 'professor'"),
    ("empty_cell", "cell physician,surgeon/female is empty"),
    ("no_gender", ":3: record has no 'gender' field"),
    ("bad_gender", ":1: field 'gender' is 'x'"),
])
def test_bad_inputs_exit_2(setup, tmp_path, case, message):
    records = [dict(r) for r in setup["records"]]
    professions = ["nurse", "physician,surgeon"]
    if case == "no_profession":
        professions = ["professor", "nurse"]
    elif case == "empty_cell":
        records = [r for r in records if r["profession"] == "nurse" or r["gender"] == "male"]
    elif case == "no_gender":
        del records[2]["gender"]
    elif case == "bad_gender":
        records[0]["gender"] = "x"
    data = write_jsonl(str(tmp_path / "bios.jsonl"), records)
    out = tmp_path / "shift.json"
    result = run(["--data", data, "--professions", *professions, "--sae", setup["sae"], "-o", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssae-shift: error: ") and message in lines[0], result.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["bios.jsonl"]


def test_bad_options_exit_2(setup, tmp_path):
    base = ["--data", setup["data"], "--professions", "nurse", "physician,surgeon", "--sae", setup["sae"],
            "-o", str(tmp_path / "s.json")]
    result = run(base + ["--ablate", "3,99"])
    assert result.exit_code == 2 and "latent 99 is out of range" in result.stderr
    result = run(base + ["--slice", "1/2", "--ablate", "0,1,2,3,4,5,6,7,8,9"])
    assert result.exit_code == 2 and "is not in the --slice 1/2" in result.stderr
    result = run(base[:-2] + ["--sae", str(tmp_path), "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "no SAE files found" in result.stderr
    assert not (tmp_path / "s.json").exists()


def test_python_api_writes_and_reuses_the_report(setup, tmp_path):
    config = ShiftConfig(data=(setup["data"],), professions=("nurse", "physician,surgeon"), ablate=("1,0,1",),
                         show=3, seeds=2)
    context = RunContext(device_spec="cpu", seed=0)
    record = shift(config, [setup["sae"]], context=context)
    assert record["schema"] == "ssae.artifact/1" and record["kind"] == "shift" and record["rows"] == 5
    report = json.loads(open(record["path"]).read())
    assert report["created_by"]["tool"] == "python" and report["config"]["tool"] == "python"
    # a latent list is sorted and deduplicated
    assert by_method(report["splits"][1]["rows"])["shift:planted"]["ablated_latents"] == GENDER_LATENTS
    assert record["worst_group_accuracy"] == {r["method"]: r["worst_group_accuracy"] for r in report["rows"]}
    mtime = os.path.getmtime(record["path"])
    assert shift(config, [setup["sae"]], context=context) == record  # the default output is reused
    assert os.path.getmtime(record["path"]) == mtime


def test_config_errors_name_fields_in_python_and_flags_on_the_command_line(setup, tmp_path):
    base = dict(data=(setup["data"],), professions=("nurse", "physician,surgeon"))
    for change, field in (({"probe_c": 0.0}, "probe_c"), ({"test_fraction": 0.5, "val_fraction": 0.5}, "val_fraction"),
                          ({"slice": "3/2"}, "slice"), ({"data": ()}, "data")):
        with pytest.raises(ConfigError) as e:
            ShiftConfig(**{**base, **change}).check()
        assert e.value.field_name == field
    # a backwards range is refused, not read as no latents
    with pytest.raises(ConfigError) as e:
        shift(ShiftConfig(**base, ablate=("5-3",)), [setup["sae"]], out=str(tmp_path / "s.json"), context=RunContext(device_spec="cpu"))
    assert e.value.field_name == "ablate" and "'5-3' is not a latent index or a range" in str(e.value)
    args = ["--data", setup["data"], "--professions", "nurse", "physician,surgeon", "--sae", setup["sae"],
            "-o", str(tmp_path / "s.json")]
    result = run(args + ["--probe-c", "0"])
    assert result.exit_code == 2 and "ssae-shift: error: --probe-c 0.0: must be greater than 0" in result.stderr
    result = run(args + ["--ablate", "5-3"])
    assert result.exit_code == 2 and "ssae-shift: error: --ablate 5-3: '5-3' is not a latent index" in result.stderr
    result = run(args + ["--ablate", "nope=1"])
    assert result.exit_code == 2 and "--ablate nope=1: no SAE named 'nope'" in result.stderr
    assert not (tmp_path / "s.json").exists()


def test_masking_replaces_whole_profession_words_in_any_case():
    pattern = B.mask_pattern(B.PROFESSION_WORDS)
    cases = {
        "Dr. Smith, MD, is a surgeon.": ("professional Smith, professional, is a professional.", 3),
        "NURSE PRACTITIONER and registered nurse (RN), BSN": (
            "professional professional and registered professional (professional), professional", 5),
        "Dr.Deepak did surgery.Dr Raj; M.D. she": (
            "professional.Deepak did professional.professional Raj; professional she", 4),
        # not inside other words; DO (the verb) kept, D.O. masked
        "Nursery Mdina mRNA surgeons-in-chief Doctors. He is a DO, she a D.O. in nursing.": (
            "Nursery Mdina mRNA professional-in-chief professional. He is a DO, she a professional in professional.",
            4),
        "Her physicians' neurosurgical team; his NPs and LPN": (
            "Her professional' professional team; his professional and professional", 4),
        "Prof. Jones, a professor, is professional.": ("professional Jones, a professional, is professional.", 2),
    }
    for text, (expected, n) in cases.items():
        assert B.mask_text(text, pattern) == (expected, n)
    # gender words stay
    assert B.mask_text("She and he, Mrs. and Mr., her husband", pattern) == ("She and he, Mrs. and Mr., her husband", 0)


def test_masking_specialty_words():
    pattern = B.mask_pattern(B.SPECIALTY_WORDS)
    cases = {
        "She is an Orthopaedic specialist in knee and hip replacement, operating at Spine Center.": (
            "She is an professional specialist in professional and professional professional, professional at "
            "professional Center.", 6),
        "Internal Medicine, OB/GYN, neurology; he treats tumors and sports injuries.": (
            "professional professional, professional, professional; he treats professional and professional "
            "professional.", 7),
        # whole words only: Handel, Eyes, Generally, Orally stay
        "Handel Eyes Generally Orally": ("Handel Eyes Generally Orally", 0),
    }
    for text, (expected, n) in cases.items():
        assert B.mask_text(text, pattern) == (expected, n)
    # the two lists together, as --mask-professions --mask-specialties gives them
    both = B.mask_pattern(B.PROFESSION_WORDS + B.SPECIALTY_WORDS)
    assert B.mask_text("Dr. Lee, a plastic surgeon; her husband", both) == (
        "professional Lee, a professional professional; her husband", 3)


def test_mask_words_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# custom\nnurse\n\nsurgeons?\n")
    words = B.read_mask_words(str(path))
    assert words == ["nurse", "surgeons?"]
    assert B.mask_text("A Nurse, not nurses; Surgeons.", B.mask_pattern(words)) == (
        "A professional, not nurses; professional.", 2)
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError) as e:
        B.read_mask_words(str(path))
    assert e.value.field_name == "mask_words"
    path.write_text("ok\n(unclosed\n")
    with pytest.raises(BadInput) as e:
        B.read_mask_words(str(path))
    assert str(e.value).startswith(f"{path}:2: '(unclosed' is not a regular expression")


def test_mask_option_changes_the_text_the_model_reads(setup, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("nurse\nphysician\nsurgeon\n")
    out = tmp_path / "shift.json"
    result = run(["--data", setup["data"], "--professions", "nurse", "physician,surgeon", "--sae", setup["sae"],
                  "--mask-words", str(words), "--seeds", "1", "--ablate", "0,1", "--probe", "marks", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["probe"] == "marks" and report["config"]["probe"] == "marks"
    # the only profession cue of the synthetic bios is gone: profession is at chance for the oracle
    assert report["mask"]["replacements"] == len(setup["records"])
    assert by_method(report)["oracle"]["profession_accuracy"] < 0.7
    result = run(["--data", setup["data"], "--professions", "nurse", "physician,surgeon", "--sae", setup["sae"],
                  "--mask-words", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "--mask-words" in result.stderr and "no such file" in result.stderr
    # --mask-specialties adds its list to the file's (the synthetic bios have no specialty words: no more replaced)
    result = run(["--data", setup["data"], "--professions", "nurse", "physician,surgeon", "--sae", setup["sae"],
                  "--mask-words", str(words), "--mask-specialties", "--seeds", "1", "--ablate", "0,1", "--force",
                  "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["mask"]["words"] == ["nurse", "physician", "surgeon"] + list(B.SPECIALTY_WORDS)
    assert report["config"]["mask_specialties"] is True


def test_seeded_splits_are_disjoint_balanced_and_reproducible():
    records = synthetic_bios(per_cell=10)
    bios = [B.Bio(r["id"], r["text"], r["profession"], r["gender"], "t") for r in records]
    seen = {"nurse": 40, "physician": 20, "surgeon": 20}

    def split(seed):
        return B.build_cells(bios, ["nurse"], ["physician", "surgeon"], seen, seed=seed)

    for seed in range(3):
        cells = split(seed)
        sets = [set(cells.train_ambiguous), set(cells.val), set(cells.test)]
        assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
        assert not set(cells.train_balanced) & (sets[1] | sets[2])
        for idx, per_cell in ((cells.test, 8), (cells.val, 4), (cells.train_balanced, 8)):
            cell_counts = Counter((int(cells.label[i]), int(cells.gender[i])) for i in idx)
            assert sorted(cell_counts.values()) == [per_cell] * 4
        ambiguous = Counter((int(cells.label[i]), int(cells.gender[i])) for i in cells.train_ambiguous)
        assert ambiguous == {(0, 1): 8, (1, 0): 8}  # nurses female, physicians/surgeons male
        again = split(seed)
        assert (again.train_ambiguous, again.val, again.test) == (cells.train_ambiguous, cells.val, cells.test)
    assert split(0).test != split(1).test


def test_mean_sd_aggregation_and_paired_differences():
    def rows(orig, shift_g, shift_s):
        def r(method, sae, worst):
            return {"method": method, "sae": sae, "profession_accuracy": worst + 0.1, "gender_accuracy": 0.5,
                    "worst_group_accuracy": worst, "group_accuracy": {"a": worst, "b": 1.0}, "n": 8,
                    "ablated_latents": [1, 2] if sae else []}
        return [r("original", None, orig), r("shift:g", "g", shift_g), r("shift+retrain:g", "g", shift_g),
                r("shift:s", "s", shift_s), r("shift+retrain:s", "s", shift_s)]

    splits = [rows(0.2, 0.5, 0.6), rows(0.4, 0.7, 0.9), rows(0.3, 0.6, 0.6)]
    agg = by_method(R.aggregate_rows(splits))
    assert agg["original"]["worst_group_accuracy"] == pytest.approx(0.3)
    assert agg["original"]["worst_group_accuracy_sd"] == pytest.approx(0.1)  # sample sd (n - 1)
    assert agg["shift:s"]["group_accuracy"]["a"] == pytest.approx(0.7)
    assert agg["shift:s"]["group_accuracy_sd"]["a"] == pytest.approx(np.std([0.6, 0.9, 0.6], ddof=1))
    assert agg["shift:s"]["group_accuracy_sd"]["b"] == 0 and agg["shift:g"]["ablated_count"] == 2
    assert agg["original"]["splits"] == 3
    diffs = {(d["a"], d["b"]): d for d in R.paired_differences(splits)}
    d = diffs["shift:s", "shift:g"]
    assert d["values"] == pytest.approx([0.1, 0.2, 0.0])
    assert d["mean"] == pytest.approx(0.1) and d["sd"] == pytest.approx(0.1)
    assert diffs["shift+retrain:g", "original"]["mean"] == pytest.approx(0.3)
    assert diffs["shift+retrain:g", "original"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert R.mean_sd([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        R.aggregate_rows([splits[0], splits[0][:2]])


def test_marks_probe_is_seeded_and_learns_the_training_labels():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    x = rng.normal(size=(80, 20)) + (2 * y[:, None] - 1)  # the classes apart along the diagonal
    a = P.LinearProbe.fit(x, y, seed=3, kind="marks")
    b = P.LinearProbe.fit(x, y, seed=3, kind="marks")
    assert np.array_equal(a.weight, b.weight) and a.bias == b.bias
    assert a.accuracy(x, y) > 0.9
    assert not np.array_equal(P.LinearProbe.fit(x, y, seed=4, kind="marks").weight, a.weight)
