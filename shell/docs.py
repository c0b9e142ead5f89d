"""Regenerate the options block of every tool's page in docs/ from the tool's own `--help`.

Run from anywhere as `make -C shell docs` (or `python shell/docs.py`).  Each page docs/<tool>.md keeps
its block between the two markers below; the rest of the page is written by hand and left alone.
The help is rendered at a fixed width, without this shell's SSAE_* variables, so the pages do not
depend on who regenerates them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click
from click.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
# Each tool is the click command `main` of ssae_tools.<tool>, documented in docs/<tool>.md.
TOOLS = ("retrieve", "harvest", "fit", "eval", "explain", "shift", "tables", "export")
START, END = "<!-- options:start -->", "<!-- options:end -->"
WIDTH = 100


def page(tool: str) -> str:
    return os.path.join(DOCS, f"{tool}.md")


def command(tool: str) -> click.Command | None:
    """The tool's click command, or None when this tree does not have the tool (yet)."""
    name = f"ssae_tools.{tool}"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name).main


def help_text(tool: str, cmd: click.Command) -> str:
    runner = CliRunner(env={key: None for key in os.environ if key.startswith("SSAE_")})
    result = runner.invoke(cmd, ["--help"], prog_name=f"ssae-{tool}", terminal_width=WIDTH,
                           max_content_width=WIDTH)
    if result.exit_code != 0:
        raise RuntimeError(f"ssae-{tool} --help exited {result.exit_code}: {result.output}{result.exception or ''}")
    return result.output


def long_flags(cmd: click.Command) -> list[str]:
    """Every --flag that the command's --help lists (both halves of a --x/--no-x switch)."""
    ctx = click.Context(cmd, info_name=cmd.name)
    flags = []
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Option) and not param.hidden:
            flags += [f for f in param.opts + param.secondary_opts if f.startswith("--")]
    return flags


def options_block(tool: str, cmd: click.Command) -> str:
    return f"{START}\n```text\n{help_text(tool, cmd).rstrip()}\n```\n{END}"


def replace_block(text: str, block: str, where: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{where}: no {START} ... {END} block")
    return text[:start] + block + text[end + len(END):]


def main() -> int:
    for tool in TOOLS:
        cmd = command(tool)
        if cmd is None:
            print(f"docs: ssae_tools.{tool} is not in this tree; {page(tool)} left as it is", file=sys.stderr)
            continue
        with open(page(tool), encoding="utf-8") as f:
            text = f.read()
        new = replace_block(text, options_block(tool, cmd), page(tool))
        if new != text:
            with open(page(tool), "w", encoding="utf-8") as f:
                f.write(new)
            print(f"docs: updated {os.path.relpath(page(tool), ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
