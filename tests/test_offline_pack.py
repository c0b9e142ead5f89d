"""shell/offline_pack.py: what a GPU machine without network is sent (the download itself needs an index)."""
import importlib.metadata as md
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "shell"))

import offline_pack  # noqa: E402

# distributions this package's benchmarks import, at the versions installed here
USED = {n: md.version(n) for n in ("transformer-lens", "transformers", "datasets", "dill", "multiprocess",
                                   "huggingface-hub", "numpy", "h5py", "torch")}


def have_all(**override):
    have = {offline_pack.canonical(n): v for n, v in USED.items()}
    have.update(override)
    return {n: v for n, v in have.items() if v != "absent"}


def test_nothing_is_carried_to_a_machine_that_has_it_all():
    assert offline_pack.to_carry(USED, have_all(), "3.12") == {}


def test_what_is_missing_is_carried_with_what_it_needs_that_is_missing_too():
    have = have_all(**{"transformer-lens": "absent", "datasets": "absent", "dill": "absent"})
    carry = offline_pack.to_carry(USED, have, "3.12")
    assert carry == {"datasets": USED["datasets"], "dill": USED["dill"], "transformer-lens": USED["transformer-lens"]}


def test_a_version_the_requirements_exclude_is_replaced_and_torch_never_travels():
    carry = offline_pack.to_carry(USED, have_all(transformers="4.40.0", torch="absent"), "3.12")
    assert carry == {"transformers": USED["transformers"]}  # transformer-lens 4 needs transformers >= 5.9
    # a bare name (version unknown) counts as satisfying
    assert offline_pack.to_carry(USED, have_all(transformers=None), "3.12") == {}


def test_the_example_image_list_parses_and_bad_lines_are_named(tmp_path):
    have = offline_pack.read_have(os.path.join(ROOT, "shell", "gpu-image.example.txt"))
    assert have["torch"] == "2.11.0" and have["transformers"] == "5.17.0" and have["h5py"] is None
    assert "transformer-lens" not in have
    bad = tmp_path / "have.txt"
    bad.write_text("# freeze\nnumpy==2.0\ntorch >= 2\n")
    with pytest.raises(SystemExit, match=r"have.txt:3: expected name or name==version, got 'torch >= 2'"):
        offline_pack.read_have(str(bad))


def test_offline_bench_without_a_pack_says_what_to_run(tmp_path):
    import subprocess

    p = subprocess.run(["bash", os.path.join(ROOT, "shell", "offline-bench.sh"), str(tmp_path / "out")],
                       env={**os.environ, "PACK": str(tmp_path / "none")}, capture_output=True, text=True)
    assert p.returncode == 2 and not (tmp_path / "out").exists()
    assert p.stderr.strip() == (f"offline-bench: no {tmp_path / 'none'}/manifest.json (run make -C shell "
                                "offline-pack, and bring the pack)")


@pytest.mark.parametrize("args, line", [
    (["--python-version", "3"], "offline-pack: --python-version '3': expected major.minor, e.g. 3.12"),
    (["--have", "/no/such/have.txt"], "offline-pack: --have /no/such/have.txt: no such file"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, args, line):
    with pytest.raises(SystemExit) as e:
        offline_pack.main([*args, "--out", str(tmp_path / "pack")])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == line
    assert not (tmp_path / "pack").exists()
