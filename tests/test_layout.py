"""The package layout keeps its promises: the library never imports the CLI, the core imports no stage,
and a tool's --help loads no heavy library (torch, transformers)."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "ssae_common")
TOOLS = ("retrieve", "harvest", "fit", "eval", "shift", "explain", "export")
STAGES = ("data", "sae", "retrieval", "eval", "explain", "shift")


def imported_modules(path: str, package: str) -> set[str]:
    """Absolute names of every module `path` imports, at any depth (deferred imports included)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


def library_modules():
    for folder, _, files in os.walk(LIB):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                package = rel if name == "__init__.py" else rel.rsplit(".", 1)[0]
                yield path, rel.removesuffix(".__init__"), package


@pytest.mark.parametrize("path,module,package", list(library_modules()), ids=lambda v: str(v).split("/")[-1])
def test_library_never_imports_the_cli(path, module, package):
    imported = imported_modules(path, package)
    assert not {m for m in imported if m.split(".")[0] in ("click", "ssae_tools")}, module


def test_core_imports_no_stage():
    for path, module, package in library_modules():
        if module.startswith("ssae_common.core"):
            stages = {m for m in imported_modules(path, package)
                      if m.split(".")[:2][-1] in STAGES and m.startswith("ssae_common.")}
            assert not stages, f"{module} imports {stages}"


@pytest.mark.parametrize("tool", TOOLS)
def test_help_imports_no_heavy_library(tool):
    code = (f"import sys; from ssae_tools.{tool} import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'transformer_lens', 'sentence_transformers', "
            "'h5py', 'sklearn', 'matplotlib', 'datasets') if m in sys.modules)\n"
            "print(','.join(heavy), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1:] in ([], [""]), f"ssae-{tool} --help imported {done.stderr.strip()}"
