import gzip
import json

import pytest

from ssae_common.core.errors import BadInput
from ssae_common.core.outputs import atomic_dir, atomic_file
from ssae_common.core.records import ARTIFACT, iter_docs, read_docs, resolve_artifacts


def test_every_file_form_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "text": "first doc"}, {"id": "b", "text": "second doc", "source": "x"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "d.txt").write_text("first doc\n\nsecond doc\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.jsonl.gz", "d.parquet"):
        docs = list(read_docs([str(tmp_path / name)]))
        assert [d["id"] for d in docs] == ["a", "b"], name
        assert [d["text"] for d in docs] == ["first doc", "second doc"]
        assert all(d["schema"] == "ssae.doc/1" for d in docs)
    txt = list(read_docs([str(tmp_path / "d.txt")]))
    assert [d["text"] for d in txt] == ["first doc", "second doc"]
    assert [d["id"] for d in txt] == ["d.txt:1", "d.txt:3"]


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1, "text": "ok"}\n{"id": 2, "text": \n')
    with pytest.raises(BadInput, match=r"bad.jsonl:2: malformed JSON"):
        list(read_docs([str(p)]))


def test_missing_text_field_and_text_field_option(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": 1, "body": "hello"}\n')
    with pytest.raises(BadInput, match=r"d.jsonl:1: record has no 'text' field"):
        list(read_docs([str(p)]))
    assert [d["text"] for d in read_docs([str(p)], text_field="body")] == ["hello"]


def test_missing_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        list(iter_docs([str(tmp_path / "nope.jsonl")]))


def test_resolve_artifacts_from_records_file(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"schema": ARTIFACT, "kind": "sae", "path": "/x/sae"}) + "\n")
    assert resolve_artifacts([str(p)], "sae") == ["/x/sae"]
    with pytest.raises(BadInput, match="expected an ssae.artifact/1 record of kind 'activations'"):
        resolve_artifacts([str(p)], "activations")


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_file(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(str(target)) as tmp:
        open(tmp, "w").write("whole")
    assert target.read_text() == "whole"
    with pytest.raises(BadInput, match="exists"):
        with atomic_file(str(target)):
            pass
    with atomic_file(str(target), force=True) as tmp:
        open(tmp, "w").write("new")
    assert target.read_text() == "new"


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "sae"
    with atomic_dir(str(target)) as tmp:
        open(f"{tmp}/cfg.json", "w").write("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(str(target), force=True) as tmp:
            open(f"{tmp}/cfg.json", "w").write("half")
            raise RuntimeError
    assert (target / "cfg.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


# --- hf:NAME[:SPLIT] without the hub: the same code path on datasets kept on disk ------------------------
@pytest.fixture
def hf_offline(monkeypatch):
    """Offline datasets, and a record of each load_dataset call (to check that hf: inputs stream)."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


def _data_files(folder):
    folder.mkdir()
    for split, n in (("train", 3), ("test", 2)):
        (folder / f"{split}.jsonl").write_text("".join(
            json.dumps({"id": f"{split}-{i}", "body": f"{split} text {i}", "year": 2000 + i}) + "\n" for i in range(n)))
    return str(folder)


def test_hf_data_files_folder_streams_with_split_and_text_field(tmp_path, hf_offline):
    import datasets

    folder = _data_files(tmp_path / "corpus")
    docs = list(read_docs([f"hf:{folder}:test"], text_field="body"))
    assert [d["id"] for d in docs] == ["test-0", "test-1"] and docs[1]["text"] == "test text 1"
    assert docs[0]["meta"] == {"year": 2000} and all(d["schema"] == "ssae.doc/1" for d in docs)
    assert hf_offline and all(c.get("streaming") is True and c.get("split") == "test" for c in hf_offline)
    assert [d["id"] for d in read_docs([f"hf:{folder}"], text_field="body")] == ["train-0", "train-1", "train-2"]
    # the stream is lazy: the first document comes without reading the rest
    first = next(iter_docs([f"hf:{folder}"], text_field="body"))
    assert first[0]["id"] == "train-0" and first[1].line == 1 and str(first[1]) == f"hf:{folder}:1"
    assert isinstance(datasets.load_dataset(folder, split="train", streaming=True), datasets.IterableDataset)

    with pytest.raises(BadInput, match="has no 'text' field"):
        list(read_docs([f"hf:{folder}:test"]))
    with pytest.raises(BadInput, match=r"hf:.*:validation: cannot open Hugging Face dataset"):
        list(read_docs([f"hf:{folder}:validation"], text_field="body"))
    with pytest.raises(BadInput, match="expected hf:NAME"):
        list(read_docs(["hf:"]))


def test_hf_save_to_disk_folders(tmp_path, hf_offline):
    import datasets

    rows = [{"body": f"saved {i}", "label": i % 2} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    docs = list(read_docs([f"hf:{tmp_path / 'one'}"], text_field="body"))
    assert [d["text"] for d in docs] == [r["body"] for r in rows]
    assert [d["id"] for d in docs] == [f"one:{i}" for i in range(1, 6)] and docs[3]["meta"] == {"label": 1}
    with pytest.raises(BadInput, match="has no splits"):
        list(read_docs([f"hf:{tmp_path / 'one'}:test"], text_field="body"))

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                   "validation": datasets.Dataset.from_list(rows[:2])})
    splits.save_to_disk(str(tmp_path / "dict"))
    docs = list(read_docs([f"hf:{tmp_path / 'dict'}:validation"], text_field="body"))
    assert [d["text"] for d in docs] == ["saved 0", "saved 1"]


def test_harvest_reads_an_hf_input(tmp_path, tiny_model, hf_offline):
    import h5py

    from helpers import invoke
    from ssae_tools.harvest import main as harvest

    folder = _data_files(tmp_path / "corpus")
    out = tmp_path / "acts.h5"
    invoke(harvest, [f"hf:{folder}:test", "--text-field", "body", "--model", tiny_model, "--layer", "0",
                     "--context-size", "16", "-o", out], code=0)
    with h5py.File(out) as f:
        assert [i.decode() for i in f["docs/id"][:]] == ["test-0", "test-1"]
        assert int(f.attrs["n_docs"]) == 2 and int(f.attrs["n_tokens"]) > 0
        assert [i["path"] for i in json.loads(f.attrs["config"])["inputs"]] == [f"hf:{folder}:test"]
