"""Fuzzing the readers: JSONL records, the text repairs and --config files either give records
that can be written back out or a one-line BadInput; never a crash.  Bounded: a few hundred examples."""
from __future__ import annotations

import json

import pytest

from helpers import invoke
from ssae_common.core.errors import BadInput
from ssae_tools.fit import main as fit_main

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_jsonl_reader_never_crashes(tmp_path_factory, data):
    from ssae_common.core.records import iter_docs

    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(data)
    try:
        for rec, _ in iter_docs([str(path)]):
            json.dumps(rec, ensure_ascii=False).encode("utf-8")  # every record can be written back out
    except BadInput as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


@FUZZ
@given(st.lists(st.dictionaries(st.text(max_size=5), st.one_of(st.text(), st.integers(), st.none()), max_size=4),
                max_size=5))
def test_fuzz_records_are_repaired_or_refused(tmp_path_factory, objs):
    from ssae_common.core.records import iter_docs

    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    try:
        for rec, _ in iter_docs([str(path)]):
            rec["text"].encode("utf-8")
            assert "\x00" not in rec["text"]
    except BadInput as e:
        assert "\n" not in str(e)


@FUZZ
@given(st.dictionaries(st.text(max_size=12), st.one_of(st.integers(), st.text(max_size=8), st.booleans()),
                       max_size=4))
def test_fuzz_config_files_are_taken_or_refused_in_one_line(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    cfg = folder / "c.json"
    cfg.write_text(json.dumps(data))
    r = invoke(fit_main, [str(folder / "missing.h5"), "--config", cfg], catch_exceptions=True)
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.exception)
    assert len(r.stderr.strip().splitlines()) == 1
