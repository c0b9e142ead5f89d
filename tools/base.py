"""The shared base of every tool: common options, config files, SSAE_* variables, exit codes,
stdout discipline and logging.

A tool is written as

    @ssae_command("harvest")
    @click.argument(...)
    def main(ctx_opts: Common, ...):
        ...
        ctx_opts.emit(record)

Precedence of option values: command line > SSAE_<OPTION> environment variable > --config file >
built-in default.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import traceback
import typing
from dataclasses import dataclass, field
from typing import IO, Callable

import click

from ssae_common import __version__
from ssae_common.core.config import ConfigError, field_types, flag_name, option_specs
from ssae_common.core.errors import EXIT_FAILURE, BadInput, Interrupted, SsaeError
from ssae_common.core.records import write_record
from ssae_common.core.runtime import RunContext, seed_everything

log = logging.getLogger("ssae")
ENV_PREFIX = "SSAE"


def _load_config(ctx: click.Context, param, value):
    if not value:
        return value
    try:
        with open(value, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise click.BadParameter(f"{value}: {e.strerror}", ctx, param)
    try:
        if value.endswith(".toml"):
            import tomllib

            data = tomllib.loads(raw.decode())
        else:
            data = json.loads(raw)
    except Exception as e:
        raise click.BadParameter(f"{value}: not valid {'TOML' if value.endswith('.toml') else 'JSON'} ({e})", ctx, param)
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value}: expected a table of option names", ctx, param)
    tool = ctx.command.name.removeprefix("ssae-")
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    merged.update(data.get(tool, {}) if isinstance(data.get(tool), dict) else {})
    known = {p.name for p in ctx.command.params}
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    norm = {}
    for k, v in merged.items():
        key = k.replace("-", "_")
        if key in known:
            norm[key] = [v] if key in repeatable and isinstance(v, str) else v
    ctx.default_map = {**(ctx.default_map or {}), **norm}
    ctx.meta["ssae.config_file"] = os.path.abspath(value)
    return value


@dataclass
class Common(RunContext):
    """The shared run options of a tool, plus its data stream (the real stdout)."""

    verbose: int = 0
    config_file: str | None = None
    stdout: IO[str] = field(default=sys.stdout, repr=False)

    def emit(self, record: dict) -> None:
        """Write one record to the data stream."""
        write_record(self.stdout, record)


def common_options(f: Callable) -> Callable:
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), is_eager=True,
                     expose_value=True, callback=_load_config,
                     help="JSON or TOML file of option values (top level, or a table named after the tool)."),
        click.option("--device", "device_spec", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
        click.option("--force", is_flag=True, help="Overwrite existing outputs."),
        click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr."),
        click.option("--verbose", "-v", count=True, help="More logging (repeat for debug)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def setup_logging(tool: str, quiet: bool, verbose: int) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"ssae-{tool}: %(message)s"))
    root = logging.getLogger("ssae")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("transformers", "transformer_lens", "datasets", "huggingface_hub", "sentence_transformers", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose < 2 else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose < 2:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except Exception:
            pass


class _StdoutGuard:
    """Keep the data stream clean: while a tool runs, anything printed to stdout (by Python code or C
    libraries) goes to stderr; records go to the saved real stdout."""

    def __enter__(self) -> IO[str]:
        self._saved_fd = None
        self._saved_sys = sys.stdout
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        if fd == 1:
            sys.stdout.flush()
            self._saved_fd = os.dup(1)
            os.dup2(2, 1)
            data = os.fdopen(os.dup(self._saved_fd), "w", encoding="utf-8", buffering=1)
        else:
            data = sys.stdout  # e.g. click's CliRunner: a Python-level stream only
        sys.stdout = sys.stderr
        self._data = data
        return data

    def __exit__(self, *exc):
        try:
            self._data.flush()
        except Exception:
            pass
        sys.stdout = self._saved_sys
        if self._saved_fd is not None:
            self._data.close()
            os.dup2(self._saved_fd, 1)
            os.close(self._saved_fd)


def _fail(tool: str, message: str, code: int) -> None:
    click.echo(f"ssae-{tool}: error: {message}", err=True)
    sys.exit(code)


def ssae_command(tool: str, **command_kwargs):
    """Decorate a tool's main function: click command with the shared options and error handling.

    The function gets `common: Common` as its first argument.
    """

    def decorate(f: Callable) -> click.Command:
        @functools.wraps(f)
        def run(config_file, device_spec, seed, force, quiet, verbose, **kwargs):
            setup_logging(tool, quiet, verbose)
            with _StdoutGuard() as data:
                common = Common(tool=tool, device_spec=device_spec, seed=seed, quiet=quiet, verbose=verbose,
                                force=force, config_file=config_file, stdout=data)
                try:
                    seed_everything(seed)
                    return f(common, **kwargs)
                except Interrupted as e:
                    log.warning("%s", e)
                    sys.exit(e.exit_code)
                except ConfigError as e:
                    flags = getattr(f, "__ssae_flags__", {})
                    message = e.with_flag(flags[e.field_name]) if e.field_name in flags else str(e)
                    _fail(tool, message, e.exit_code)
                except BadInput as e:
                    _fail(tool, str(e), e.exit_code)
                except SsaeError as e:
                    _fail(tool, str(e), e.exit_code)
                except KeyboardInterrupt:
                    _fail(tool, "interrupted", 130)
                except click.exceptions.Exit:
                    raise
                except click.ClickException:
                    raise
                except MemoryError:
                    _fail(tool, "out of memory (try a smaller --batch-size)", EXIT_FAILURE)
                except Exception as e:
                    if verbose:
                        traceback.print_exc(file=sys.stderr)
                    _fail(tool, f"{type(e).__name__}: {e} (rerun with -v for the traceback)", EXIT_FAILURE)

        run = common_options(run)
        command_kwargs.setdefault("context_settings", {})
        command_kwargs["context_settings"].setdefault("auto_envvar_prefix", ENV_PREFIX)
        command_kwargs["context_settings"].setdefault("help_option_names", ["-h", "--help"])
        cmd = click.command(name=f"ssae-{tool}", **command_kwargs)(run)
        cmd = click.version_option(__version__, prog_name=f"ssae-{tool}")(cmd)
        return cmd

    return decorate


def config_options(cls, *, skip: tuple[str, ...] = (), name: str = "config"):
    """Generate a tool's click options from a stage config dataclass (ssae_common.core.config) and hand
    the function one `cls` instance as `name` instead of the separate values.

    Fields in `skip`, or declared with cli=False, get no option (the tool sets them itself)."""
    specs = {n: s for n, s in option_specs(cls).items() if s.cli and n not in skip}
    types = field_types(cls)
    defaults = {f.name: f for f in dataclasses.fields(cls)}

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in specs if n in kwargs}
            for n, spec in specs.items():
                if spec.multiple and n in values:
                    values[n] = tuple(values[n])
            kwargs[name] = cls(**values)
            return f(*args, **kwargs)

        for n in reversed(list(specs)):
            wrapper = _click_option(n, specs[n], types[n], defaults[n])(wrapper)
        wrapper.__ssae_flags__ = {**getattr(f, "__ssae_flags__", {}), **{n: flag_name(n, s) for n, s in specs.items()}}
        return wrapper

    return decorate


def _click_option(name: str, spec, annotation, fld) -> Callable:
    flag = flag_name(name, spec)
    default = fld.default if fld.default is not dataclasses.MISSING else (
        fld.default_factory() if fld.default_factory is not dataclasses.MISSING else None)
    base = _base_type(annotation)
    help_text = spec.help
    if spec.derived:
        help_text = f"{help_text} [default: {spec.derived}]".strip()
    kwargs = {"default": default, "help": help_text, "show_default": default is not None and not spec.derived
              and default != () and default is not False}
    if spec.envvar:
        kwargs["envvar"] = list(spec.envvar)
    if spec.required or (fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING):
        kwargs["required"] = True
        if kwargs.get("default") is None:
            del kwargs["default"]  # click 8.3 takes an explicit default=None as a given value
    decls = [flag] + ([spec.short] if spec.short else [])
    if base is bool:
        off = "--" + (spec.negative or "no-" + flag[2:])
        decls = [f"{flag}/{off}"]
        kwargs["show_default"] = True
    elif spec.multiple:
        kwargs.update(multiple=True, default=tuple(default or ()), type=base if base in (int, float) else str)
    elif spec.nargs:
        kwargs.update(nargs=spec.nargs, type=base if base in (int, float) else str)
    elif spec.choices:
        # not click.Choice: the config's check() refuses other values, in the words of every other bad value
        kwargs.update(type=str, metavar="[" + "|".join(spec.choices) + "]")
    elif base in (int, float, str):
        kwargs["type"] = base
    return click.option(*decls, name, **kwargs)


def _base_type(annotation):
    """int | None -> int; tuple[str, ...] -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return args[0] if args else str
    if args:
        return _base_type(args[0])
    return annotation
