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
