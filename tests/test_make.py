"""shell/Makefile's paper targets: the experiment grid, and idempotence (nothing changed: nothing to do)."""
import os
import random
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(*args, cwd=ROOT):
    return subprocess.run(["make", "-C", "shell", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def fit_outputs(line: str) -> list[str]:
    """The SAE folders of one ssae-fit command line: its -o, a {field} template filled with every
    combination of the listed values (ssae_common.sae.stage)."""
    import itertools

    out = re.search(r"-o (\S+)", line).group(1)
    lists = {field: re.search(rf"--{flag} (\S+)", line) for field, flag in
             (("tilt", "tilt"), ("tilt_ess", "tilt-ess"), ("k", "k"), ("seed", "seed"))}
    lists = {field: m.group(1).split(",") for field, m in lists.items() if m}
    return sorted({out.format(**dict(zip(lists, values))) for values in itertools.product(*lists.values())})


def test_paper_grid_covers_the_experiments(tmp_path):
    p = make("-n", "--assume-old=setup", "paper", f"PAPER={tmp_path}")
    assert p.returncode == 0, p.stderr
    cmds = p.stdout
    calls = re.findall(r"ssae-fit .*?-o \S+", cmds)
    fits = [f for call in calls for f in fit_outputs(call)]
    ssaes = sorted(os.path.basename(f) for f in fits if "/ssae/" in f)
    grid = [f"{r}-t{t}" for r in ("bm25", "dense", "dense_tracin", "indomain") for t in ("0", "500", "1e9")]
    assert ssaes == sorted(grid + ["medical-erm", "medical-ess0.5"])
    assert sum("-o " + str(tmp_path / "ssae") in c and "--tilt 0,500,1e9" in c for c in calls) == 4  # one per recipe
    assert sorted(os.path.basename(f) for f in fits if "/sweep/" in f) == sorted(
        [f"gsae-k{k}" for k in (8, 16, 64)] + [f"ssae-k{k}" for k in (8, 16, 64)])
    assert sum("--k 8,16,64" in c for c in calls) == 1  # the GSAEs of the k sweep in one call
    assert "--rerank tracin" in cmds and "--method dense" in cmds and "--method bm25" in cmds
    evals = [e for e in re.findall(r"ssae-eval .*", cmds) if "/tilt/" not in e]
    assert len(evals) == 3 and all("--baseline" in e for e in evals)
    assert len([f for f in fits if "/tilt/" in f]) == 20  # the TERM sweep is part of the paper
    assert "mmlu_physics_questions" in cmds or "physics_test.txt" in cmds
    assert re.search(r"ssae-shift .*--ablate auto", cmds)
    assert "--exclude" in cmds  # the test set never leaks into training text


def test_tilt_sweep_grid(tmp_path):
    """paper-tilt: every TERM setting finetuned from one GSAE on one text with one budget, per seed."""
    p = make("-n", "--assume-old=setup", "paper-tilt", f"PAPER={tmp_path}", "TILT_SEEDS=0 1")
    assert p.returncode == 0, p.stderr
    calls = re.findall(r"ssae-fit .*?-o \S+/tilt/\S+", p.stdout)
    fits = {f: call for call in calls for f in fit_outputs(call)}
    assert len(fits) == 20 and {os.path.basename(os.path.dirname(f)) for f in fits} == {"s0", "s1"}
    assert len(calls) == 4 and all("--seed 0,1 " in c for c in calls)  # erm, t<T>, ess<F>, type-ess<F>
    flags = {os.path.basename(f): re.sub(" +", " ", a) for f, a in fits.items()}
    expected = {"erm": "", "t1": "--tilt 1,10,100,500,1e9 ", "t1e9": "--tilt 1,10,100,500,1e9 ",
                "ess0.01": "--tilt-ess 0.5,0.1,0.01 ", "type-ess0.1": "--tilt-groups token --tilt-ess 0.1 "}
    for name, flag in expected.items():
        assert f"--init {tmp_path}/gsae {flag}--train-tokens" in flags[name], flags[name]
    assert len({" ".join(re.sub(r"--(tilt|tilt-ess|tilt-groups) \S+|-o \S+", "", a).split()) for a in calls}) == 1
    evals = re.findall(r"ssae-eval .*", p.stdout)
    assert len(evals) == 4 and all("--baseline" in e and e.count("/tilt/s") == 10 for e in evals)
    assert sum("--activations" in e for e in evals) == 2 and sum("--docs" in e for e in evals) == 2
    assert "ssae_tools.tables" in p.stdout


def test_rerun_with_nothing_changed_does_nothing(tmp_path):
    cmds = make("-n", "--assume-old=setup", "paper", f"PAPER={tmp_path}").stdout
    outputs = []
    for line in cmds.splitlines():
        m = re.search(r"-o ([^\s;]+)", line)
        if m and str(tmp_path) in m.group(1):
            path = m.group(1)
            if "ssae-fit" in line:
                outputs += [os.path.join(f, "cfg.json") for f in fit_outputs(line)]
            elif "ssae-eval" in line:
                outputs.append(os.path.join(path, "metrics.json"))
            else:
                outputs.append(path if path.endswith((".h5", ".jsonl", ".json")) else os.path.join(path, "cfg.json"))
    assert len(outputs) >= 30
    for path in outputs:  # in the order make would build them
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    finals = [os.path.join(tmp_path, *p) for p in (("eval", "physics", "metrics.json"), ("eval", "mmlu", "metrics.json"),
                                                   ("eval", "pareto", "metrics.json"), ("shift", "shift.json"))]
    q = make("-q", "--assume-old=setup", f"PAPER={tmp_path}", *finals)
    assert q.returncode == 0, make("-n", "--assume-old=setup", f"PAPER={tmp_path}", *finals).stdout
    os.utime(os.path.join(tmp_path, "general.h5"))  # newer general text: everything downstream reruns
    assert make("-q", "--assume-old=setup", f"PAPER={tmp_path}", *finals).returncode == 1


@pytest.mark.integration
def test_paper_runs_end_to_end_on_a_tiny_grid(tmp_path, tiny_model):
    """`make paper` itself, every rule executed: the tiny model, built data and a reduced grid."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import WORDS, write_jsonl
    from helpers import synthetic_bios

    rng = random.Random(0)
    physics, medical = WORDS[22:34], WORDS[34:41]
    general = [w for w in WORDS if w not in physics + medical]

    def doc(vocab, n=30):
        return " ".join(rng.choice(vocab) for _ in range(n))

    corpus = [{"id": f"c{i}", "text": doc(physics + general[:8] if i % 4 == 0 else
                                          medical + general[:8] if i % 4 == 1 else general)} for i in range(160)]
    files = {
        "CORPUS": write_jsonl(str(tmp_path / "corpus.jsonl"), corpus),
        "TEST": write_jsonl(str(tmp_path / "test.jsonl"), [{"id": f"t{i}", "text": doc(physics)} for i in range(8)]),
        "OOD_TEST": write_jsonl(str(tmp_path / "ood.jsonl"), [{"id": f"q{i}", "text": doc(physics + general)}
                                                              for i in range(8)]),
        "INDOMAIN": write_jsonl(str(tmp_path / "indomain.jsonl"), [{"id": f"x{i}", "text": doc(physics)}
                                                                   for i in range(40)]),
        "BIOS": write_jsonl(str(tmp_path / "bios.jsonl"), synthetic_bios(per_cell=12)),
    }
    (tmp_path / "seeds.txt").write_text("star galaxy orbit planet\nquantum particle spin wave\n")
    (tmp_path / "med.txt").write_text("nurse hospital patient care\n")
    grid = dict(files, PAPER=tmp_path / "paper", MODEL=tiny_model, HOOK="blocks.1.hook_resid_post", DEVICE="cpu",
                SEEDS=tmp_path / "seeds.txt", MED_SEEDS=tmp_path / "med.txt", PROFESSIONS="nurse physician,surgeon",
                GENERAL_TOKENS=3000, GSAE_TOKENS=4096, SUB_DOCS=30, SUB_TOKENS=800, SSAE_TOKENS=1024,
                BATCH_SIZE=256, EVAL_TOKENS=400, K=4, K_SWEEP=2, TILTS=500, RECIPES="bm25 dense_tracin",
                TILT_SETTINGS="erm ess0.5", TILT_SEEDS=0)
    args = ["--assume-old=setup", *(f"{k}={v}" for k, v in grid.items())]
    p = subprocess.run(["make", "-C", "shell", "paper", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    paper = tmp_path / "paper"
    tables = (paper / "tables.txt").read_text()
    assert tables in p.stderr and (paper / "tilt" / "tables.txt").read_text() in p.stderr  # printed at the end
    for name in ("gsae *", "bm25-t500", "dense_tracin-t500", "gsae-k2", "ssae-k2"):
        assert re.search(rf"^{re.escape(name)}\s", tables, re.M), name
    assert re.search(r"^shift\+retrain:", tables, re.M) and re.search(r"^original\s", tables, re.M)
    for log in ("general.h5.log", "gsae.log", "ssae/bm25.log", "eval/physics.log", "shift/shift.json.log"):
        assert (paper / log).exists(), log
    again = subprocess.run(["make", "-C", "shell", "-q", *args, str(paper / "tables.txt")], cwd=ROOT)
    assert again.returncode == 0  # up to date: a rerun does nothing
