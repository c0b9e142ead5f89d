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
