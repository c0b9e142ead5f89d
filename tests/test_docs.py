"""The documentation keeps up with the tools: every flag a tool's --help lists is on its docs page,
every page the README or docs/ links to exists, and the README stays short."""
from __future__ import annotations

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_docs_script():
    spec = importlib.util.spec_from_file_location("ssae_docs_script", os.path.join(ROOT, "shell", "docs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docs = _load_docs_script()
MARKDOWN = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                                  if name.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def read(relpath: str) -> str:
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("tool", docs.TOOLS)
def test_every_flag_is_documented(tool):
    cmd = docs.command(tool)
    if cmd is None:
        pytest.skip(f"ssae_tools.{tool} is not in this tree")
    text = read(os.path.relpath(docs.page(tool), ROOT))
    assert docs.START in text and docs.END in text, f"docs/{tool}.md has no options block"
    missing = [flag for flag in docs.long_flags(cmd) if not re.search(re.escape(flag) + r"(?![\w-])", text)]
    assert not missing, f"docs/{tool}.md does not mention {', '.join(missing)}: run `make -C shell docs`"


@pytest.mark.parametrize("relpath", MARKDOWN)
def test_relative_links_resolve(relpath):
    folder = os.path.dirname(os.path.join(ROOT, relpath))
    targets = [t.split("#")[0] for t in LINK.findall(read(relpath))]
    local = [t for t in targets if t and not re.match(r"[a-z]+:", t)]
    broken = [t for t in local if not os.path.exists(os.path.join(folder, t))]
    assert not broken, f"{relpath} links to missing files: {', '.join(broken)}"


def test_readme_links_every_docs_page():
    linked = {os.path.normpath(t.split("#")[0]) for t in LINK.findall(read("README.md"))}
    unlinked = [p for p in MARKDOWN[1:] if p not in linked]
    assert not unlinked, f"README.md does not link {', '.join(unlinked)}"


def test_readme_is_short():
    n = len(read("README.md").splitlines())
    assert n < 200, f"README.md has {n} lines; keep it under 200 and move detail into docs/"


# The repository speaks of the tool, not of how it was written: no tracker numbers, no note of which machine
# was at hand, no pointer to a design file a clone does not have (docs/formats.md is the specification).
# The examples below are built from pieces so that this file passes the same check.
HISTORY = {
    "tracker number": re.compile(r"\bissues?\s?#?\d+", re.IGNORECASE),
    "numbered stop": re.compile(r"\bstop \d+\b", re.IGNORECASE),
    "machine loan": re.compile(r"\b" + "le" + r"nt\b", re.IGNORECASE),
    "missing design file": re.compile(r"\bDESIGN\.md\b"),
}
SCANNED = ["README.md", "docs", "shell", "tests", "ssae_common", "tools"]
BINARY = (".png", ".jpg", ".gz", ".h5", ".parquet", ".safetensors", ".npz", ".npy", ".gguf", ".pt", ".pyc")


def history_in(text: str) -> list[str]:
    return [name for name, pattern in HISTORY.items() if pattern.search(text)]


def scanned_files():
    for top in SCANNED:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            yield top
            continue
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if d != "__pycache__" and not d.startswith("."))
            for name in sorted(files):
                if not name.endswith(BINARY):
                    yield os.path.relpath(os.path.join(folder, name), ROOT)


def test_history_stays_out_of_the_repository():
    found = []
    for relpath in scanned_files():
        try:
            lines = read(relpath).splitlines()
        except UnicodeDecodeError:
            continue
        found += [f"{relpath}:{number}: {what}: {line.strip()}"
                  for number, line in enumerate(lines, 1) for what in history_in(line)]
    assert not found, "say what the code does and why, not how it was written:\n" + "\n".join(found)


@pytest.mark.parametrize("text, what", [
    ("as " + "issue" + " 12 found", "tracker number"), ("Issues" + " #3 and 4", "tracker number"),
    ("issue" + "#7", "tracker number"), ("stop" + " 20", "numbered stop"),
    ("the GPU " + "le" + "nt to us", "machine loan"), ("see " + "DESIGN" + ".md", "missing design file"),
])
def test_the_history_patterns_catch_what_they_name(text, what):
    assert history_in(text) == [what]


@pytest.mark.parametrize("text", ["a silent mismatch", "excellent", "lentil", "relentless", "tissue" + " 12",
                                  "nonstop" + " 3", "issues with 2 files", "design.md", "docs/formats.md"])
def test_the_history_patterns_leave_ordinary_words_alone(text):
    assert history_in(text) == []
