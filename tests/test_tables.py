"""ssae-tables: the paper's tables from ssae-eval and ssae-shift outputs."""
import json
import subprocess
import sys

from click.testing import CliRunner

from ssae_tools.tables import main as tables_main


def write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def tables(*paths):
    return CliRunner().invoke(tables_main, list(paths))


def test_eval_and_shift_tables(tmp_path):
    metrics = write(tmp_path / "metrics.json", {
        "schema": "ssae.metrics/1", "n_tokens": 1234, "dataset": {"paths": ["/data/astro_ph_test.jsonl.gz"]},
        "saes": [{"name": "gsae", "is_baseline": True, "l0": 32.0, "fvu": 0.125, "ppl_clean": 9.8765,
                  "ppl_spliced": 11.0, "rel_ppl_vs_baseline": 1.0},
                 {"name": "ssae", "l0": 31.5, "fvu": 0.2, "ppl_spliced": 10.5, "rel_ppl_vs_baseline": 0.9545}]})
    shift = write(tmp_path / "shift.json", {"schema": "ssae.shift/1", "rows": [
        {"method": "shift:gsae", "profession_accuracy": 0.9, "gender_accuracy": 0.5, "worst_group_accuracy": 0.725,
         "group_accuracy": {"nurse|female": 0.95}, "n": 40, "ablated_latents": [3, 7]}]})
    p = tables(metrics, shift)
    assert p.exit_code == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"{metrics}: 1234 tokens of astro_ph_test.jsonl.gz; clean-model perplexity 9.877"
    assert lines[1].split() == ["SAE", "L0", "FVU", "ppl", "spliced", "ppl/base"]
    assert lines[3].split() == ["gsae", "*", "32.0", "0.1250", "11.000", "1.0000"]
    assert lines[4].split() == ["ssae", "31.5", "0.2000", "10.500", "0.9545"]
    shift_rows = p.stdout.split("\n\n")[1].splitlines()
    assert shift_rows[0] == f"{shift}: accuracies in %"
    assert shift_rows[2].split() == ["shift:gsae", "90.0", "50.0", "72.5", "95.0", "40", "2"]
    # the way shell/paper.mk runs it, with no console script installed
    run = subprocess.run([sys.executable, "-m", "ssae_tools.tables", metrics, shift], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == p.stdout


def test_unknown_file_exits_2(tmp_path):
    other = write(tmp_path / "cfg.json", {"schema": "ssae.sae/1"})
    p = tables(other)
    assert p.exit_code == 2 and p.stdout == ""
    assert p.stderr == f"ssae-tables: error: {other}: not ssae-eval metrics or ssae-shift output (schema 'ssae.sae/1')\n"


def test_no_file_is_a_usage_error():
    p = tables()
    assert p.exit_code == 2 and "ssae-tables: error: missing argument 'FILES...' (see --help)" in p.stderr
