"""shell/Makefile's paper targets: the experiment grid, and idempotence (nothing changed: nothing to do)."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(*args, cwd=ROOT):
    return subprocess.run(["make", "-C", "shell", *args], cwd=cwd, capture_output=True, text=True, timeout=120)



def test_paper_grid_covers_the_experiments(tmp_path):
    p = make("-n", "--assume-old=setup", "paper", f"PAPER={tmp_path}")
    assert p.returncode == 0, p.stderr
    cmds = p.stdout
    fits = re.findall(r"ssae-fit .*?-o (\S+)", cmds)
    ssaes = sorted(os.path.basename(f) for f in fits if "/ssae/" in f)
    grid = [f"{r}-t{t}" for r in ("bm25", "dense", "dense_tracin", "indomain") for t in ("0", "500", "1e9")]
    assert ssaes == sorted(grid + ["medical-t500"])
    assert sum("/sweep/" in f for f in fits) == 6
    assert "--rerank tracin" in cmds and "--method dense" in cmds and "--method bm25" in cmds
    evals = re.findall(r"ssae-eval .*", cmds)
    assert len(evals) == 3 and all("--baseline" in e for e in evals)
    assert "mmlu_physics_questions" in cmds or "physics_test.txt" in cmds
    assert re.search(r"ssae-shift .*--ablate auto", cmds)
    assert "--exclude" in cmds  # the test set never leaks into training text


def test_rerun_with_nothing_changed_does_nothing(tmp_path):
    cmds = make("-n", "--assume-old=setup", "paper", f"PAPER={tmp_path}").stdout
    outputs = []
    for line in cmds.splitlines():
        m = re.search(r"-o ([^\s;]+)", line)
        if m and str(tmp_path) in m.group(1):
            path = m.group(1)
            outputs.append(path if path.endswith((".h5", ".jsonl", ".json")) else os.path.join(path, "cfg.json"))
            if "ssae-eval" in line:
                outputs[-1] = os.path.join(path, "metrics.json")
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
