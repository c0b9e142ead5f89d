"""The whole pipeline from Python, without click (retrieve -> harvest -> fit -> eval -> explain -> shift):
docs/python.md runs as written, its Python blocks in order on the tiny model (the page's MODEL and HOOK
lines are the only things replaced), so the page cannot drift from the API."""
import json
import os
import re

from helpers import sample_docs, synthetic_bios, write_jsonl

PAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "python.md")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_python_page_runs(tiny_model, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(open(PAGE).read())
    assert len(blocks) >= 4
    code = "\n".join(blocks)
    code, n_model = re.subn(r'^MODEL = "smollm2".*$', f"MODEL = {tiny_model!r}", code, flags=re.M)
    code, n_hook = re.subn(r'^HOOK = ".*"$', 'HOOK = "blocks.0.hook_resid_post"', code, flags=re.M)
    assert n_model == n_hook == 1

    monkeypatch.chdir(tmp_path)
    write_jsonl("corpus.jsonl", sample_docs(60, words=40, seed=1))
    write_jsonl("seeds.jsonl", [{"id": "s0", "text": "star galaxy planet orbit mass light"}])
    write_jsonl("test.jsonl", sample_docs(8, seed=7))
    write_jsonl("bios.jsonl", synthetic_bios())
    page = {}
    exec(compile(code, PAGE, "exec"), page)

    kinds = {name: page[name]["kind"] for name in ("docs", "general", "subdomain", "gsae", "ssae", "metrics",
                                                     "explained", "report")}
    assert kinds == {"docs": "docs", "general": "activations", "subdomain": "activations", "gsae": "sae",
                     "ssae": "sae", "metrics": "metrics", "explained": "explanations", "report": "shift"}
    assert page["docs"]["n_docs"] == 30 and page["ssae"]["parent"]["path"] == os.path.abspath("gsae")
    saes = {s["name"]: s for s in json.load(open(page["metrics"]["path"]))["saes"]}
    assert set(saes) == {"gsae", "ssae"}
    trained_on = saes["ssae"]["training_data"]  # the harvest's composition, carried into the metrics
    assert trained_on[0]["path"] == os.path.abspath("subdomain.h5")
    assert trained_on[0]["composition"]["sources"] == {"corpus.jsonl": 1.0}  # retrieve records the source file
    assert "trained on subdomain.h5: corpus.jsonl 100.0%" in open(page["metrics"]["report"]).read()
    assert os.path.exists(page["metrics"]["report"]) and os.path.exists(page["explained"]["browser"])
    assert len(open(page["explained"]["explanations"]).read().splitlines()) == 4
    assert "tilt_ess - tilt_ess nan: not a number" in capsys.readouterr().out
