"""shell/Makefile's paper targets: the experiment grid, and idempotence (nothing changed: nothing to do)."""
import os
import re
import subprocess


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
    # GSAEs from scratch: ERM, the recommended TERM and the paper's tilts, every seed, two calls at equal budget
    gsaes = sorted(f.split(str(tmp_path) + "/gsae/")[1] for f in fits if "/gsae/" in f)
    assert gsaes == sorted(f"s{s}/gsae-{t}" for s in range(3) for t in ("t0", "t500", "t1e9", "ess0.5"))
    gsae_calls = [c for c in calls if "/gsae/s{seed}" in c]
    assert len(gsae_calls) == 2 and len({re.search(r"--train-tokens \S+", c).group(0) for c in gsae_calls}) == 1
    for domain in ("physics", "toxicity"):
        ssaes = sorted(os.path.basename(f) for f in fits if f"/{domain}/s1/" in f)
        grid = [f"ssae-bm25-{t}" for t in ("t0", "t500", "t1e9", "ess0.5")] + [
            f"ssae-{r}-t0" for r in ("dense", "dense_tracin", "indomain")]
        long = ["ssae-bm25-long-t0", "ssae-bm25-long-ess0.5"] if domain == "physics" else []
        assert ssaes == sorted(grid + long), (domain, ssaes)
        assert all(f"--init {tmp_path}/gsae/s1/gsae-t0 " in c for c in calls if f"/{domain}/s1/" in c)
    assert re.search(r"--train-tokens \$\(\(500000 \* 5\)\) -o \S+/physics/s0/ssae-bm25-long-ess0.5", cmds)
    assert sorted(os.path.basename(f) for f in fits if "/pareto/s2/" in f) == ["gsae-k64", "gsae-k8", "ssae-k64",
                                                                             "ssae-k8"]
    assert sum("--k 8,64 --seed 0,1,2" in c for c in calls) == 1  # the GSAEs of the k sweep in one call
    assert all("--tilt-ess 0.5" in c for c in calls if "/pareto/s" in c and "ssae-k" in c)
    assert "--tilt 500" not in cmds.replace("--tilt 0,500,1e9", "")  # 500 only beside ERM and 1e9: the paper's
    assert "--rerank tracin" in cmds and "--method dense" in cmds and "--method bm25" in cmds
    evals = re.findall(r"ssae-eval .*", cmds)
    assert len(evals) == 15 and all("--baseline" in e for e in evals if "/pareto/" not in e)
    # per domain and seed: every SAE on the held-out activations, only Fig. 1's SAEs on the documents
    tails = [e for e in evals if "/tail-s" in e]
    assert len(tails) == 6 and all("--activations" in e and "heldout-test.h5" in e for e in tails)
    spliced = [e.split(" --baseline")[0].split()[1:] for e in evals if re.search(r"-o \S+/(physics|toxicity)/eval-s", e)]
    assert len(spliced) == 6 and all("--docs" in e for e in evals if "/eval-s" in e)
    assert sorted(os.path.basename(x) for x in spliced[0]) == ["gsae-t0", "ssae-bm25-t0", "ssae-dense-t0",
                                                             "ssae-dense_tracin-t0", "ssae-indomain-t0"]
    assert re.search(r"ssae-shift .*--ablate auto", cmds) and "paper_page.py split" in cmds
    assert re.search(r"paper_page.py score .* --domains physics toxicity --seeds 0 1 2 ", cmds)
    assert "--exclude" in cmds  # the test set never leaks into training text
    quick = make("-n", "--assume-old=setup", "paper", "QUICK=1", f"PAPER={tmp_path}").stdout
    assert "--max-tokens 100000 " in quick and "--method dense" not in quick


def test_shift_ssaes_are_finetuned_with_the_named_setting(tmp_path):
    cmds = make("-n", "--assume-old=setup", "paper-shift", f"PAPER={tmp_path}", "SHIFT_TERM=type-ess0.1").stdout
    assert re.search(r"ssae-fit \S+medical.h5 --init \S+/gsae/s0/gsae-t0 +--train-tokens .* -o \S+/medical-erm ", cmds)
    assert re.search(r"--tilt-groups token --tilt-ess 0.1 --train-tokens .* -o \S+/medical-type-ess0.1 ", cmds)


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
        assert f"--init {tmp_path}/gsae/s0/gsae-t0 {flag}--train-tokens" in flags[name], flags[name]
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
        if "paper_page.py split" in line:
            outputs += [os.path.join(tmp_path, "toxicity", "data", f) for f in ("seeds.jsonl", "test.jsonl",
                                                                             "indomain.jsonl")]
        elif m and str(tmp_path) in m.group(1):
            path = m.group(1)
            if "ssae-fit" in line:
                outputs += [os.path.join(f, "cfg.json") for f in fit_outputs(line)]
            elif "ssae-eval" in line:
                outputs.append(os.path.join(path, "metrics.json"))
            else:
                outputs.append(path if path.endswith((".h5", ".jsonl", ".json")) else os.path.join(path, "cfg.json"))
    assert len(outputs) >= 60
    for path in outputs:  # in the order make would build them
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    finals = [os.path.join(tmp_path, d, "eval-s2", "metrics.json") for d in ("physics", "toxicity", "pareto")]
    finals.append(os.path.join(tmp_path, "shift", "shift.json"))
    q = make("-q", "--assume-old=setup", f"PAPER={tmp_path}", *finals)
    assert q.returncode == 0, make("-n", "--assume-old=setup", f"PAPER={tmp_path}", *finals).stdout
    os.utime(os.path.join(tmp_path, "general.h5"))  # newer general text: everything downstream reruns
    assert make("-q", "--assume-old=setup", f"PAPER={tmp_path}", *finals).returncode == 1
