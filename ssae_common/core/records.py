"""Schema-tagged JSONL records and readers for every input form of docs/formats.md.

Inputs are paths (`.jsonl`, `.jsonl.gz`, `.txt`, `.parquet`), `hf:NAME[:SPLIT]` (streamed), or `-`
for stdin.  Errors name the file and line.

Text hygiene: bytes that are not UTF-8 are refused (exit 2, naming file and line).  Two things valid
JSON can carry but no UTF-8 consumer takes, NUL characters (HDF5 strings end at them) and lone
surrogates (`"\ud800"`, which cannot be encoded), are repaired as the records are read: each becomes
U+FFFD, and one warning per input says how many records were repaired and where the first was.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import shutil
import sys
from contextlib import closing
import tempfile
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

from .errors import BadInput

log = logging.getLogger("ssae")
DOC = "ssae.doc/1"
ARTIFACT = "ssae.artifact/1"
ARTIFACT_KINDS = ("docs", "activations", "sae", "metrics", "explanations", "shift")


def doc_record(doc_id: str, text: str, **extra) -> dict:
    rec = {"schema": DOC, "id": str(doc_id), "text": text}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def artifact_record(kind: str, path: str, **summary) -> dict:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    return {"schema": ARTIFACT, "kind": kind, "path": os.path.abspath(path), **summary}


def finite(value):
    """`value` for strict JSON: every NaN or infinite float becomes None (null), numpy scalars Python
    numbers.  A setting is never NaN (core.config.check_bounds); a measurement can be undefined (an AUC on
    one class, a loss that diverged), and JSON has no NaN: strict parsers reject it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return finite(value.item())
    return value


def to_json(value, **kwargs) -> str:
    """json.dumps for files and streams others read: strict (no NaN or Infinity, see `finite`)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def dump_json(value, f: IO[str], **kwargs) -> None:
    """json.dump, strict as `to_json`."""
    json.dump(finite(value), f, allow_nan=False, **kwargs)


def write_record(stream: IO[str], record: dict) -> None:
    stream.write(to_json(record, ensure_ascii=False) + "\n")
    stream.flush()


@dataclass
class Source:
    """Where a record came from, for error messages ("file.jsonl:17")."""

    name: str
    line: int

    def __str__(self) -> str:
        return f"{self.name}:{self.line}" if self.line else self.name


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _open_bytes(path: str) -> IO:
    """The input as a binary stream of lines (decoded line by line, so a bad byte is named by its line)."""
    if path == "-":
        return getattr(sys.stdin, "buffer", sys.stdin)
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a directory, expected a file of records")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


_UNSAFE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def repair_text(value):
    """`value` (a string, or JSON-like data holding strings) with NUL and lone surrogates replaced by
    U+FFFD, and whether anything was replaced."""
    if isinstance(value, str):
        if value.isascii() and "\x00" not in value:
            return value, False
        fixed = _UNSAFE.sub(REPLACEMENT, value)
        return fixed, fixed != value
    if isinstance(value, dict):
        changed = False
        out = {}
        for k, v in value.items():
            (k2, a), (v2, b) = repair_text(k), repair_text(v)
            out[k2] = v2
            changed |= a or b
        return (out, True) if changed else (value, False)
    if isinstance(value, list):
        fixed = [repair_text(v) for v in value]
        if any(c for _, c in fixed):
            return [v for v, _ in fixed], True
        return value, False
    return value, False


class _Repairs:
    """Counts repaired records of one input; warns once per input and process (inputs are often read
    twice: a check before the model loads, then the run)."""

    reported: set[str] = set()

    def __init__(self, name: str):
        self.name, self.count, self.first = name, 0, None

    def add(self, source: "Source") -> None:
        self.count += 1
        self.first = self.first or str(source)

    def report(self) -> None:
        if self.count and self.name not in self.reported:
            self.reported.add(self.name)
            log.warning("%s: %d record(s) held NUL or lone surrogate characters, replaced by U+FFFD (first at %s)",
                        self.name, self.count, self.first)


def _display(path: str) -> str:
    return "<stdin>" if path == "-" else path


def iter_raw(path: str) -> Iterator[tuple[dict | str, Source]]:
    """Yield (parsed JSON object or plain text line, source) from one input."""
    if path.startswith("hf:"):
        yield from _iter_hf(path)
        return
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    plain_text = path.endswith(".txt") or path.endswith(".txt.gz")
    stream = _open_bytes(path)
    name = _display(path)
    repairs = _Repairs(name)
    lineno = 0
    try:
        for lineno, raw in enumerate(stream, 1):
            if isinstance(raw, bytes):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadInput(f"{name}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
            else:
                line = raw
            stripped = line.strip()
            if not stripped:
                continue
            source = Source(name, lineno)
            if plain_text:
                yield _repaired(stripped, source, repairs), source
                continue
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as e:
                if path == "-" and lineno == 1 and not stripped.startswith(("{", "[")):
                    # stdin with plain text: treat it as a .txt stream
                    plain_text = True
                    yield _repaired(stripped, source, repairs), source
                    continue
                raise BadInput(f"{name}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise BadInput(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield _repaired(obj, source, repairs), source
        repairs.report()
    except (OSError, EOFError) as e:
        raise BadInput(f"{name}:{lineno + 1}: cannot read ({e})") from None
    finally:
        if stream is not sys.stdin and stream is not getattr(sys.stdin, "buffer", None):
            stream.close()


def _repaired(value, source: Source, repairs: _Repairs):
    fixed, changed = repair_text(value)
    if changed:
        repairs.add(source)
    return fixed


def _iter_parquet(path: str) -> Iterator[tuple[dict, Source]]:
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise BadInput(f"{path}: not a readable parquet file ({e})") from None
    row = 0
    repairs = _Repairs(path)
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield _repaired(obj, Source(path, row), repairs), Source(path, row)
    repairs.report()


def parse_hf_spec(spec: str) -> tuple[str, str]:
    body = spec[3:]
    name, _, split = body.partition(":")
    if not name:
        raise BadInput(f"{spec}: expected hf:NAME[:SPLIT]")
    return name, split or "train"


def _iter_hf(spec: str) -> Iterator[tuple[dict, Source]]:
    name, split = parse_hf_spec(spec)
    import datasets

    try:
        if os.path.isfile(os.path.join(name, "state.json")):
            # one Dataset written by save_to_disk, which load_dataset refuses: its Arrow files, memory-mapped
            # and read row by row
            if split != "train":
                raise BadInput(f"{spec}: a Dataset saved with save_to_disk has no splits (leave out :{split})")
            ds = datasets.load_from_disk(name).to_iterable_dataset()
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
    except BadInput:
        raise
    except Exception as e:  # network, missing dataset or split
        raise BadInput(f"{spec}: cannot open Hugging Face dataset ({type(e).__name__}: {e})") from None
    repairs = _Repairs(spec)
    for row, obj in enumerate(ds, 1):
        yield _repaired(obj, Source(spec, row), repairs), Source(spec, row)
    repairs.report()


def text_of(obj: dict | str, source: Source, text_field: str = "text") -> str:
    if isinstance(obj, str):
        return obj
    if text_field not in obj:
        raise BadInput(f"{source}: record has no {text_field!r} field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise BadInput(f"{source}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def id_of(obj: dict | str, source: Source) -> str:
    if isinstance(obj, dict):
        for key in ("id", "_id", "doc_id"):
            value = obj.get(key)
            if value is not None:
                # a list or object id is kept as its JSON text, never as a Python repr
                return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"{os.path.basename(source.name)}:{source.line}"


def _is_docs_artifact(obj) -> bool:
    return isinstance(obj, dict) and obj.get("schema") == ARTIFACT and obj.get("kind") == "docs"


def follow_doc_artifacts(paths: Iterable[str]) -> list[str]:
    """`paths` with every file of `ssae.artifact/1` records of kind `docs` (what `ssae-retrieve -o`
    prints) replaced by the documents files it points to; other inputs unchanged (stdin is not peeked:
    iter_docs follows such records as it reads them)."""
    out: list[str] = []
    for path in paths:
        if path == "-" or path.startswith("hf:") or path.endswith((".parquet", ".txt", ".txt.gz")) \
                or not os.path.isfile(path):
            out.append(path)
            continue
        with closing(iter_raw(path)) as records:
            first = next(records, None)
        if first is None or not _is_docs_artifact(first[0]):
            out.append(path)
            continue
        for obj, source in iter_raw(path):
            if not _is_docs_artifact(obj):
                raise BadInput(f"{source}: expected only {ARTIFACT} records of kind 'docs' here, as on line 1")
            out.append(obj["path"])
    return out


def iter_docs(paths: Iterable[str], text_field: str = "text") -> Iterator[tuple[dict, Source]]:
    """(`ssae.doc/1` record, source) from any input form; ids made up from file:line if absent.  An
    `ssae.artifact/1` record of kind `docs` stands for the documents of the file it points to."""
    for path in paths:
        for obj, source in iter_raw(path):
            if _is_docs_artifact(obj):
                yield from iter_docs([obj["path"]], text_field)
                continue
            if isinstance(obj, dict) and obj.get("schema") == ARTIFACT:
                raise BadInput(f"{source}: got an artifact record ({obj.get('kind')}), expected documents")
            text = text_of(obj, source, text_field)
            rec = doc_record(id_of(obj, source), text)
            if isinstance(obj, dict):
                for key in ("score", "source", "seed_ids", "meta", "rank", "method"):
                    if key in obj:
                        rec[key] = obj[key]
                extra = {k: v for k, v in obj.items() if k not in rec and k not in ("schema", "_id", "doc_id", text_field)}
                if extra and "meta" not in rec:
                    rec["meta"] = extra
            yield rec, source


def count_docs(paths: Iterable[str], text_field: str = "text") -> int | None:
    """Read every document once, so that bad input (a malformed line, a missing field, bytes that are
    not UTF-8) is refused before a model loads; the number of documents, or None for a Hugging Face
    dataset or stdin (streamed: not read twice)."""
    paths = list(paths)
    if any(p.startswith("hf:") or p == "-" for p in paths):
        return None
    return sum(1 for _ in iter_docs(paths, text_field))


def read_docs(paths: Iterable[str], text_field: str = "text") -> Iterator[dict]:
    for rec, _ in iter_docs(paths, text_field):
        yield rec


def resolve_artifacts(args: Iterable[str], kind: str) -> list[str]:
    """Paths to artifacts of `kind`: path arguments, or artifact records read from stdin (`-` or none)."""
    args = list(args)
    paths: list[str] = []
    if not args or args == ["-"]:
        if stdin_is_terminal():
            article = "an" if kind[0] in "aeiou" else "a"
            raise BadInput(f"no input: give {article} {kind} path or pipe an {ARTIFACT} record on stdin")
        for obj, source in iter_raw("-"):
            if not isinstance(obj, dict) or obj.get("schema") != ARTIFACT:
                raise BadInput(f"{source}: expected an {ARTIFACT} record of kind {kind!r}")
            if obj.get("kind") != kind:
                raise BadInput(f"{source}: artifact is of kind {obj.get('kind')!r}, expected {kind!r}")
            paths.append(obj["path"])
        if not paths:
            raise BadInput(f"<stdin>: empty input, expected an {ARTIFACT} record of kind {kind!r}")
        return paths
    for arg in args:
        if arg == "-":
            paths.extend(resolve_artifacts(["-"], kind))
        elif os.path.isfile(arg) and arg.endswith((".jsonl", ".json")) and kind != "metrics":
            for obj, source in iter_raw(arg):
                if obj.get("schema") != ARTIFACT or obj.get("kind") != kind:
                    raise BadInput(f"{source}: expected an {ARTIFACT} record of kind {kind!r}")
                paths.append(obj["path"])
        else:
            paths.append(arg)
    return paths


def spool_stdin(folder: str) -> str:
    """Copy stdin to a file under `folder`, so that the hash of its bytes can name a default output (an
    identical pipe then reuses it, an interrupted one resumes it); returns the path.  Callers record the
    input as "-" with that hash, never the spool's name, which is per process (two identical pipes at once
    must not delete each other's spool) and carries the pid, so that spools of killed runs are cleaned."""
    from .outputs import is_full_disk, make_folder, no_space

    if stdin_is_terminal():
        raise BadInput("no input: give document paths or pipe documents on stdin")
    make_folder(folder)
    _clean_spools(folder)
    try:
        fd, path = tempfile.mkstemp(prefix=f"stdin.{os.getpid()}.", suffix=".jsonl", dir=folder)
    except OSError as e:
        raise BadInput(f"{folder}: cannot keep a copy of stdin there ({e.strerror}); set SSAE_WORKDIR to a "
                       "writable folder, or give the documents as a file") from None
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin, out)
    except BaseException as e:
        os.remove(path)  # nothing left behind, whatever stopped the copy
        if isinstance(e, OSError) and is_full_disk(e):
            raise no_space(path, kept=False) from None
        raise
    return path


def _clean_spools(folder: str) -> None:
    """Remove the spools left by processes that no longer run (killed before their cleanup)."""
    from .outputs import pid_alive

    for name in os.listdir(folder):
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "stdin" and parts[1].isdigit() and not pid_alive(int(parts[1])):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
