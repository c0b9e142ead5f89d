"""The paper scoreboard (ssae_common/eval/paper.py, shell/paper_page.py, `make -C shell paper-quick`): the
verdict rule, the page writer on synthetic metrics, and the whole pipeline on a tiny model."""
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest

from ssae_common.eval import paper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("diffs, direction, verdict", [
    ([-0.10, -0.12, -0.11], "lower", paper.REPRODUCED),
    ([-0.10, -0.12, -0.11], "higher", paper.OPPOSITE),
    ([0.05, 0.06, 0.055, 0.052], "higher", paper.REPRODUCED),
    ([-0.1, 0.1, -0.02], "lower", paper.NOT_REPRODUCED),   # the mean is within 2 standard errors of 0
    ([0.0, 0.0, 0.0], "lower", paper.NOT_REPRODUCED),
    ([-0.1, -0.2], "lower", paper.NOT_TESTABLE),           # fewer than 3 seeds
    ([-0.1, None, float("nan"), -0.2], "lower", paper.NOT_TESTABLE),
])
def test_verdict_rule(diffs, direction, verdict):
    v = paper.decide(diffs, direction)
    assert v.verdict == verdict
    if v.n >= 3:
        assert math.isclose(v.mean, sum(diffs) / len(diffs))
        assert math.isclose(v.se, v.sd / math.sqrt(v.n))


def test_verdict_rule_boundary_is_two_standard_errors():
    # mean 1 over 4 seeds: sd 1.155, 2 se = 1.155 > 1: not reproduced; half the spread, 2 se = 0.577: reproduced
    assert paper.decide([0.0, 0.0, 2.0, 2.0], "higher").verdict == paper.NOT_REPRODUCED
    assert paper.decide([0.5, 0.5, 1.5, 1.5], "higher").verdict == paper.REPRODUCED
    with pytest.raises(ValueError):
        paper.decide([1, 2, 3], "sideways")


def _sae(name, rare, entropy=2.0, ppl=10.0, dead=0.1, covered=0.3):
    return {"name": name, "l0": 4.0, "ppl_spliced": ppl, "dead_fraction": dead,
            "tail_error": {"mean": rare, "max": 2 * rare},
            "tail_coverage": {"represented_fraction": covered, "cumulative": [covered, 1.0],
                              "n_represented_per_bin": [1, 3],
                              "bin_lower": [1, 2], "fraction_per_bin": [covered, None]},
            "entropy": {"mean": entropy, "histogram": {"edges": [0, 1, 2, 3], "counts": [1, 2, 1]}},
            "max_activation": {"mean": 1.0, "histogram": {"edges": [0, 1e-4, 1, 10], "counts": [0, 2, 1]}},
            "activation_counts_by_rank": [5, 3, 0],
            "error_by_frequency_rank": {"rank_lower": [1, 2], "mean": [rare / 2, rare], "max": [rare, 2 * rare]}}


def test_derived_metrics_of_coverage_and_activation_spread():
    sae = {"tail_coverage": {"n_represented_per_bin": [0, 2, 2]},
           "activation_counts_by_rank": [90] + [1] * 10 + [0] * 9}
    assert paper.mean_represented_bin(sae) == 1.5  # two types in bin 1, two in bin 2
    assert paper.top_decile_share(sae) == (90 + 1) / 100  # the top 2 of 20 latents
    assert paper.mean_represented_bin({"tail_coverage": {"n_represented_per_bin": [0, 0]}}) is None
    assert paper.top_decile_share({"activation_counts_by_rank": [0, 0]}) is None


def _board(root, seeds=(0, 1, 2), name="gsae-t500"):
    """Synthetic metrics: the TERM GSAE's rare error clearly below ERM's on every seed, the SSAE's perplexity
    above the GSAE's, a name that needs escaping."""
    for s in seeds:
        saes = [_sae("gsae-t0", 1.0 + 0.01 * s), _sae(name, 0.8 + 0.012 * s, entropy=2.0 + 0.1 * s),
                _sae("ssae-bm25-t0", 1.0, ppl=11.0 + 0.1 * s, covered=0.35)]
        folder = os.path.join(root, "physics", f"eval-s{s}")
        os.makedirs(folder)
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump({"schema": "ssae.metrics/1", "saes": saes}, f)


def test_scoreboard_page_on_synthetic_metrics(tmp_path):
    _board(tmp_path)
    out = tmp_path / "page"
    lines = paper.scoreboard(str(tmp_path), ["physics"], [0, 1, 2], str(out), terms=["t500"], recipes=["bm25"],
                             recipe="bm25", long_term=None, ks=[])
    text = "\n".join(lines)
    heads = [line for line in lines if not line.startswith("    ")]
    assert len(heads) == 13  # one per result of the paper
    assert re.search(r"^Fig\. 3: .*: reproduced \(n=3 seeds, gsae-t500 vs gsae-t0\)", text, re.M)
    assert re.search(r"^Fig\. 1: .*: opposite \(n=3 seeds", text, re.M)  # ppl 11 > 10: the claimed direction fails
    assert re.search(r"^Fig\. 8: .*: not testable here \(n=0 seeds.*explainer endpoint", text, re.M)
    assert re.search(r"^Table 1: .*: not testable here .*shift/shift.json", text, re.M)
    assert re.search(r"^Figs\. 12 and 13: .*: not testable here", text, re.M)  # no k sweep in these runs
    assert re.search(r"^Fig\. 1: perplexity by retrieval method.*: not testable here .*RECIPES leaves out dense", text,
                     re.M)
    page = (out / "index.html").read_text()
    words = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "NaN" not in words and "Infinity" not in words and "None" not in words
    assert page.count("<section ") == 13 and "data:image/png;base64," in page
    assert (out / "fig3.png").exists() and (out / "fig5-entropy.png").exists()
    assert not (out / "fig1-dense.png").exists()  # nothing to compare, no figure
    for line in heads:  # the page carries the same verdicts
        title, verdict = re.match(r"^(.*?): (reproduced|not reproduced|opposite|not testable here) ", line).groups()
        assert f"{title}</a></td><td class='{verdict.replace(' ', '-')}'>{verdict}</td>" in page.replace("&#x27;", "'")


def test_tail_metrics_come_from_the_activations_evaluation_and_perplexity_from_the_documents(tmp_path):
    """With a tail-s evaluation beside eval-s, every metric but the spliced perplexity is read from tail-s."""
    _board(tmp_path)
    for s in (0, 1, 2):  # tail-s: the TERM GSAE's rare error now above ERM's, and no perplexity at all
        saes = [_sae("gsae-t0", 1.0, ppl=None), _sae("gsae-t500", 1.3 + 0.01 * s, ppl=None),
                _sae("ssae-bm25-t0", 1.0, ppl=None)]
        os.makedirs(tmp_path / "physics" / f"tail-s{s}")
        (tmp_path / "physics" / f"tail-s{s}" / "metrics.json").write_text(json.dumps({"saes": saes}))
    lines = paper.scoreboard(str(tmp_path), ["physics"], [0, 1, 2], str(tmp_path / "page"), terms=["t500"],
                             recipes=["bm25"], recipe="bm25", long_term=None, ks=[])
    text = "\n".join(lines)
    assert re.search(r"^Fig\. 3: .*: opposite \(n=3 seeds, gsae-t500 vs gsae-t0\)", text, re.M)
    assert re.search(r"^Fig\. 1: perplexity, .*: opposite \(n=3 seeds", text, re.M)  # eval-s's 11 > 10


def test_scoreboard_escapes_names_and_needs_three_seeds(tmp_path):
    _board(tmp_path, seeds=(0, 1), name="gsae-<t500>")
    out = tmp_path / "page"
    lines = paper.scoreboard(str(tmp_path), ["physics"], [0, 1], str(out), terms=["<t500>"], recipes=["bm25"],
                             recipe="bm25", long_term=None, ks=[])
    page = (out / "index.html").read_text()
    assert "gsae-<t500>" not in page and "gsae-&lt;t500&gt;" in page
    fig3 = next(line for line in lines if line.startswith("Fig. 3"))
    assert "not testable here (n=2 seeds" in fig3 and "the rule needs 3" in "\n".join(lines)


def test_table1_pairs_each_ssae_with_the_gsae_per_split(tmp_path):
    os.makedirs(tmp_path / "shift")
    diffs = [{"a": "shift:ssae-erm", "b": "original", "values": [0.5, 0.5, 0.5]},
             {"a": "shift:ssae-erm", "b": "shift:gsae", "values": [0.05, 0.06, 0.04]},
             {"a": "shift+retrain:ssae-erm", "b": "shift+retrain:gsae", "values": [-0.05, 0.06, 0.0]},
             {"a": "shift:ssae-term", "b": "shift:gsae", "values": [-0.05, -0.06, -0.04]}]
    (tmp_path / "shift" / "shift.json").write_text(json.dumps({"differences": diffs}))
    rows = paper.shift_row(paper.Runs(str(tmp_path), ["physics"], [0, 1, 2]))
    assert [(r.label, r.verdict.verdict) for r in rows] == [
        ("shift:ssae-erm vs shift:gsae", paper.REPRODUCED),
        ("shift+retrain:ssae-erm vs shift+retrain:gsae", paper.NOT_REPRODUCED),
        ("shift:ssae-term vs shift:gsae", paper.OPPOSITE)]


def test_split_domain_is_deterministic_and_disjoint(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import write_jsonl

    records = [{"id": f"r{i}", "text": f"text {i}", "toxic": i % 3 != 0, "split": "test" if i < 6 else "train"}
               for i in range(400)]
    src = write_jsonl(str(tmp_path / "tox.jsonl"), records)
    counts = paper.split_domain(src, str(tmp_path / "a"), n_seeds=50)
    paper.split_domain(src, str(tmp_path / "b"), n_seeds=50)
    ids = {}
    for name in ("seeds", "test", "indomain"):
        a = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert a == (tmp_path / "b" / f"{name}.jsonl").read_text()
        ids[name] = {json.loads(line)["id"] for line in a.splitlines()}
        assert len(ids[name]) == counts[name]
    assert counts["seeds"] == 50 and not (ids["seeds"] & ids["test"]) and not (ids["indomain"] & ids["test"])
    toxic = {r["id"] for r in records if r["toxic"]}
    assert set().union(*ids.values()) == toxic and {"r1", "r2", "r4", "r5"} <= ids["test"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "shell", "paper_page.py"), "split",
                        str(tmp_path / "missing.jsonl"), str(tmp_path / "c")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("paper_page.py: error: ") and len(p.stderr.splitlines()) == 1
    assert not (tmp_path / "c").exists()


@pytest.mark.integration
def test_paper_quick_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model):
    """`make paper-quick` itself with tiny overrides: every rule runs, the page has a computed verdict per
    result with its seed count, the same verdicts on stdout, and a rerun does nothing."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import WORDS, synthetic_bios, write_jsonl

    rng = random.Random(0)
    physics, medical, toxic = WORDS[22:34], WORDS[34:41], WORDS[49:56]
    general = [w for w in WORDS if w not in physics + medical + toxic]

    def doc(vocab, n=30):
        return " ".join(rng.choice(vocab) for _ in range(n))

    corpus = [{"id": f"c{i}", "text": doc((physics, medical, toxic, general)[i % 4] + general[:8])} for i in range(120)]
    files = {
        "CORPUS": write_jsonl(str(tmp_path / "corpus.jsonl"), corpus),
        "TEST": write_jsonl(str(tmp_path / "test.jsonl"), [{"id": f"t{i}", "text": doc(physics)} for i in range(8)]),
        "OOD_TEST": write_jsonl(str(tmp_path / "ood.jsonl"), [{"id": "q0", "text": doc(physics + general)}]),
        "INDOMAIN": write_jsonl(str(tmp_path / "indomain.jsonl"), [{"id": f"x{i}", "text": doc(physics)}
                                                                   for i in range(30)]),
        "TOX_TEST": write_jsonl(str(tmp_path / "tox_test.jsonl"), [{"id": f"y{i}", "text": doc(toxic)}
                                                                   for i in range(8)]),
        "BIOS": write_jsonl(str(tmp_path / "bios.jsonl"), synthetic_bios(per_cell=12)),
    }
    (tmp_path / "seeds.txt").write_text("star galaxy orbit planet\nquantum particle spin wave\n")
    (tmp_path / "tox.txt").write_text("market price bank game\nteam film music city\n")
    (tmp_path / "med.txt").write_text("nurse hospital patient care\n")
    grid = dict(files, PAPER=tmp_path / "paper", MODEL=tiny_model, HOOK="blocks.1.hook_resid_post", DEVICE="cpu",
                SEEDS=tmp_path / "seeds.txt", TOX_SEEDS=tmp_path / "tox.txt", TOX_INDOMAIN="",
                MED_SEEDS=tmp_path / "med.txt", PROFESSIONS="nurse physician,surgeon",
                GENERAL_TOKENS=2000, GSAE_TOKENS=2048, SUB_DOCS=20, SUB_TOKENS=600, SSAE_TOKENS=512, TAIL_TOKENS=600,
                BATCH_SIZE=256, EVAL_TOKENS=300, K=4, K_SWEEP=2, TERMS="t500", RECIPES="bm25", LONG_TERM="t500",
                LONG_FACTOR=2, SHIFT_SEEDS=3, SHIFT_SSAE_TOKENS=512)
    args = ["--assume-old=setup", *(f"{k}={v}" for k, v in grid.items())]
    # two jobs, as on a 2-core CI machine: the steps write distinct outputs, retrieval caches are atomic
    p = subprocess.run(["make", "-s", "-j2", "-C", "shell", "paper-quick", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    board = tmp_path / "paper" / "paper"
    verdicts = (board / "verdicts.txt").read_text()
    assert verdicts.strip() in p.stdout
    heads = [line for line in verdicts.splitlines() if not line.startswith("    ")]
    assert len(heads) == 13
    computed = 0
    for line in heads:
        m = re.match(r"^(.*?): (reproduced|not reproduced|opposite|not testable here) \(n=(\d+) seeds", line)
        assert m, line
        computed += int(m.group(3)) >= 3
    assert computed == 10  # all but the two that need an LLM explainer and dense against BM25 (no dense recipe)
    for domain in ("[physics]", "[toxicity]"):
        assert f"    {domain} gsae-t500 vs gsae-t0: rarest-decile mean error" in verdicts
    assert "ssae-bm25-long-t500 vs ssae-bm25-long-t0" in verdicts and "ssae-k<k> vs gsae-k<k>" in verdicts
    assert re.search(r"^Table 1: .*\(n=3 seeds, shift:ssae", verdicts, re.M)
    page = (board / "index.html").read_text()
    assert page.count("<section ") == 13
    assert "NaN" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    again = subprocess.run(["make", "-C", "shell", "-q", *args, "QUICK=1", str(board / "index.html")], cwd=ROOT)
    assert again.returncode == 0  # up to date: a rerun does nothing
