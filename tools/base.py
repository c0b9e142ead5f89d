"""The shared base of every tool: common options, config files, SSAE_* variables, exit codes,
stdout discipline and logging.

A tool is written as

    @ssae_command("harvest")
    @click.argument(...)
    def main(ctx_opts: Common, ...):
        ...
        ctx_opts.emit(record)

Precedence of option values: command line > environment variable > --config file > built-in default.

Environment variables (ENV_RULE, listed in every tool's --help): SSAE_<TOOL>_<OPTION> sets any option of
one tool (SSAE_HARVEST_BATCH_SIZE); SSAE_<OPTION> only the options that mean the same thing in every tool
(SHARED_ENV: device, seed, model, hook, corpus, ...), so that one variable cannot set, say, the batch
size of every tool of a pipe at once.  An SSAE_* variable that no tool reads but that is close to one
that does (a typo) is refused with exit 2, as is an unknown --config key.
"""
from __future__ import annotations

import dataclasses
import difflib
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
from ssae_common.core.outputs import is_full_disk
from ssae_common.core.records import write_record
from ssae_common.core.runtime import RunContext, configure_threads, seed_everything

log = logging.getLogger("ssae")
ENV_PREFIX = "SSAE"
TOOLS = ("retrieve", "harvest", "fit", "eval", "explain", "shift", "export")
# options that name the same thing in every tool (by flag): SSAE_<OPTION> sets them everywhere
SHARED_ENV = ("CONFIG", "DEVICE", "SEED", "QUIET", "VERBOSE", "MODEL", "HOOK", "CORPUS", "TEXT_FIELD")
# SSAE_* variables read by other parts of the toolkit (not options); never taken for typos
OTHER_ENV = {"SSAE_WORKDIR": "default output folder (./ssae-work)",
             "SSAE_CACHE": "cache of converted models and corpus indexes (~/.cache/ssae)",
             "SSAE_THREADS": "CPU threads (default: the CPUs this process may use, affinity and cgroup quota)",
             "SSAE_TF32": "0: float32 matmuls on CUDA in full precision, not TF32 (docs/scale.md)",
             "SSAE_DATA": "shell/demo.sh: the data folder", "SSAE_TOKENS": "shell/paper.mk: SSAE token budget",
             "SSAE_PEERS_PYTHON": "bench-peers and the format round trips: the peers venv's python"}
EXIT_CODES = "0 success; 1 runtime failure; 2 usage or bad input; 75 interrupted after a checkpoint (rerun resumes)"


def env_key(option: click.Option) -> str:
    """The variable name of an option, from the flag the user types: --batch-size -> BATCH_SIZE."""
    flag = next((o for o in option.opts if o.startswith("--")), "--" + option.name)
    return flag[2:].replace("-", "_").upper()


def env_name(tool: str, key: str) -> str:
    """The tool-scoped variable of an option: SSAE_FIT_BATCH_SIZE."""
    return f"{ENV_PREFIX}_{tool.upper()}_{key}"


def _options(params) -> list[click.Option]:
    return [p for p in params if isinstance(p, click.Option) and p.name not in ("help", "version")]


def _closest(word: str, candidates) -> str:
    """ (did you mean X?)" for the closest candidate, or "" when none is close."""
    match = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _tool_params(tool: str) -> list:
    """The click parameters of ssae-<tool> (its module is light: only the config dataclass is imported)."""
    import importlib

    return importlib.import_module(f"ssae_tools.{tool}").main.params


def _config_keys(params) -> dict[str, str]:
    """--config keys -> parameter names: the long flag as typed (dashes or underscores) or the field name."""
    keys = {}
    for p in params:
        if not isinstance(p, click.Option) or p.name in ("help", "version", "config_file"):
            continue
        keys[p.name] = p.name
        for opt in p.opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = p.name
    return keys


def _option_names(tool: str) -> set[str]:
    return set(_config_keys(_tool_params(tool)))


def check_environment(tool: str, environ=None) -> None:
    """Refuse SSAE_* variables that no tool reads but look like one that does (exit 2, naming the closest);
    an SSAE_<OPTION> of a tool-specific option names the scoped variable to use instead."""
    environ = os.environ if environ is None else environ
    given = [k for k in environ if k.startswith(ENV_PREFIX + "_")]
    if not given:
        return
    known = set(OTHER_ENV) | {f"{ENV_PREFIX}_{k}" for k in SHARED_ENV}
    scoped = {}
    for t in TOOLS:
        for p in _options(_tool_params(t)):
            known.update(p.envvar or ())
            known.add(env_name(t, env_key(p)))
            scoped.setdefault(f"{ENV_PREFIX}_{env_key(p)}", []).append(env_name(t, env_key(p)))
    for var in sorted(given):
        if var in known:
            continue
        if var in scoped:
            mine = env_name(tool, var[len(ENV_PREFIX) + 1:])
            use = mine if mine in scoped[var] else " or ".join(scoped[var])
            raise BadInput(f"{var}: only the options every tool shares take SSAE_<OPTION>; this one is set per "
                           f"tool: use {use} (see --help)")
        hint = f" (did you mean {var.upper()}?)" if var.upper() in known else _closest(var, known)
        if hint:
            raise BadInput(f"{var}: no ssae tool reads this environment variable{hint}")


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
    _check_config_keys(data, value, ctx, param)
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    merged.update(data.get(tool, {}) if isinstance(data.get(tool), dict) else {})
    known = _config_keys(ctx.command.params)
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    norm = {}
    for k, v in merged.items():
        key = known.get(k.replace("-", "_"))
        if key is not None:
            norm[key] = [v] if key in repeatable and isinstance(v, str) else v
    ctx.default_map = {**(ctx.default_map or {}), **norm}
    ctx.meta["ssae.config_file"] = os.path.abspath(value)
    return value


def _check_config_keys(data: dict, path: str, ctx, param) -> None:
    """Top-level keys must be an option of some tool (one file serves the whole pipeline); keys in a
    [tool] table an option of that tool.  A typo is refused, naming the closest valid key."""
    names = {t: {n for n in _option_names(t)} for t in TOOLS}
    everywhere = set().union(*names.values())

    def shown(key: str) -> str:
        return key if key.isprintable() and key.strip() == key and key else repr(key)

    for key, value in data.items():
        if isinstance(value, dict):
            if key not in TOOLS:
                raise click.BadParameter(f"{path}: unknown table [{shown(key)}]{_closest(key, TOOLS)}; tables are "
                                         f"named after the tools ({', '.join(TOOLS)})", ctx, param)
            for sub in value:
                if sub.replace("-", "_") not in names[key]:
                    raise click.BadParameter(f"{path}: [{key}] {shown(sub)}: not an option of ssae-{key}"
                                             f"{_closest(sub.replace('-', '_'), names[key])}", ctx, param)
        elif key.replace("-", "_") not in everywhere:
            raise click.BadParameter(f"{path}: {shown(key)}: not an option of any ssae tool"
                                     f"{_closest(key.replace('-', '_'), everywhere)}", ctx, param)


@dataclass
class Common(RunContext):
    """The shared run options of a tool, plus its data stream (the real stdout)."""

    verbose: int = 0
    config_file: str | None = None
    seeds: tuple[int, ...] = ()  # every --seed of a tool that takes a list (ssae_command(seed_list=True))
    stdout: IO[str] = field(default=sys.stdout, repr=False)

    def emit(self, record: dict) -> None:
        """Write one record to the data stream."""
        write_record(self.stdout, record)


class ListOf(click.ParamType):
    """A comma-separated list of numbers (`0,10,500`) as a tuple; empty items and repeats are refused.
    A config file may give a list, or a single number."""

    def __init__(self, base: type, min: int | None = None):
        self.base, self.min = base, min
        self.name = f"{base.__name__}[,{base.__name__}...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = value if isinstance(value, list) else [value] if isinstance(value, (int, float)) else \
            str(value).split(",")
        values = []
        for item in items:
            text = str(item).strip()
            if not text:
                self.fail(f"{value!r}: an empty item (give a comma-separated list, e.g. 0,10,500)", param, ctx)
            try:
                values.append(self.base(text))
            except ValueError:
                self.fail(f"{text!r} is not a valid {self.base.__name__}", param, ctx)
        low = [v for v in values if self.min is not None and v < self.min]
        if low:
            self.fail(f"{low[0]} is not in the range x>={self.min}", param, ctx)
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            self.fail(f"{value!r}: {', '.join(repeated)} given twice", param, ctx)
        return tuple(values)


def common_options(f: Callable, seed_list: bool = False) -> Callable:
    seed = (click.option("--seed", type=ListOf(int, min=0), default="0", show_default=True,
                         help="Random seed; a comma-separated list trains one output per seed.") if seed_list else
            click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed."))
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), is_eager=True,
                     expose_value=True, callback=_load_config,
                     help="JSON or TOML file of option values (top level, or a table named after the tool)."),
        click.option("--device", "device_spec", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        seed,
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


def _discard(stream) -> None:
    """Point a broken data stream at /dev/null, so that flushing what it still holds raises nothing."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def _fail(tool: str, message: str, code: int) -> None:
    click.echo(f"ssae-{tool}: error: {message}", err=True)
    sys.exit(code)


class UsageError(click.ClickException):
    """A click usage error shown in the toolkit's one-line form: `ssae-X: error: MESSAGE (see --help)`."""

    exit_code = 2

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog

    def show(self, file=None) -> None:
        # click's sentences ("No such option 'x'. (Did you mean ...?)") as one clause of our line
        message = self.format_message().strip().replace(". (Did you", " (did you").rstrip(".")
        message = message[:1].lower() + message[1:] if message[1:2].islower() else message
        click.echo(f"{self.prog}: error: {message} (see --help)", file=file, err=True)


class SsaeCommand(click.Command):
    """click.Command whose usage errors take one line."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise UsageError(_from_environment(e) or e.format_message(), self.name) from None


def _from_environment(error: click.UsageError) -> str | None:
    """A bad value that came from an SSAE_* variable, named by the variable (not by the option it sets)."""
    from click.core import ParameterSource

    param, ctx = getattr(error, "param", None), getattr(error, "ctx", None)
    if not isinstance(error, click.BadParameter) or param is None or ctx is None:
        return None
    if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
        return None
    names = param.envvar if isinstance(param.envvar, (list, tuple)) else [param.envvar]
    var = next((n for n in names if n and os.environ.get(n)), None)
    if var is None:
        return None
    return f"{var}: {error.message.rstrip('.')}, for {param.opts[0]}"


def scope_environment(cmd: click.Command, tool: str) -> click.Command:
    """Give every option its variables: SSAE_<TOOL>_<OPTION>, then SSAE_<OPTION> for the shared ones, then
    any the option declares itself; and list them, with the exit codes, at the end of --help."""
    shared = []
    for p in _options(cmd.params):
        key = env_key(p)
        names = [env_name(tool, key)]
        if key in SHARED_ENV:
            names.append(f"{ENV_PREFIX}_{key}")
            shared.append(names[-1])
        extra = p.envvar if isinstance(p.envvar, (list, tuple)) else [p.envvar] if p.envvar else []
        p.envvar = names + [e for e in extra if e not in names]
    example = env_name(tool, "BATCH_SIZE" if any(p.name == "batch_size" for p in cmd.params) else "SEED")
    cmd.epilog = "\n".join([
        "\b", "Environment variables (used when the option is not on the command line):",
        f"  SSAE_{tool.upper()}_<OPTION>  any option of this tool, e.g. {example}",
        f"  SSAE_<OPTION>  the shared ones: {', '.join(shared)}",
        *(f"  {k}  {v}" for k, v in OTHER_ENV.items() if k in ("SSAE_WORKDIR", "SSAE_CACHE", "SSAE_THREADS")),
        "", "\b", f"Exit codes: {EXIT_CODES}."])
    return cmd


def ssae_command(tool: str, seed_list: bool = False, **command_kwargs):
    """Decorate a tool's main function: click command with the shared options and error handling.

    The function gets `common: Common` as its first argument.  With `seed_list`, --seed takes a
    comma-separated list: `common.seeds` holds it, `common.seed` its first value.
    """

    def decorate(f: Callable) -> click.Command:
        @functools.wraps(f)
        def run(config_file, device_spec, seed, force, quiet, verbose, **kwargs):
            setup_logging(tool, quiet, verbose)
            seeds = seed if isinstance(seed, tuple) else (seed,)
            with _StdoutGuard() as data:
                common = Common(tool=tool, device_spec=device_spec, seed=seeds[0], quiet=quiet, verbose=verbose,
                                force=force, config_file=config_file, stdout=data, seeds=seeds)
                try:
                    check_environment(tool)
                    configure_threads()
                    if device_spec not in ("auto", "cpu"):
                        common.device  # noqa: B018 (a device this machine lacks is refused before any work)
                    seed_everything(seeds[0])
                    return f(common, **kwargs)
                except Interrupted as e:
                    log.warning("%s", e)
                    sys.exit(e.exit_code)
                except ConfigError as e:
                    # the field's flag: a config field's, else the option of that name the tool declares
                    flags = {**{p.name: next((o for o in p.opts if o.startswith("--")), p.opts[0])
                                for p in _options(cmd.params)}, **getattr(f, "__ssae_flags__", {})}
                    message = e.with_flag(flags[e.field_name]) if e.field_name in flags else str(e)
                    _fail(tool, message, e.exit_code)
                except BadInput as e:
                    _fail(tool, str(e), e.exit_code)
                except SsaeError as e:
                    _fail(tool, str(e), e.exit_code)
                except KeyboardInterrupt:
                    _fail(tool, "interrupted", 130)
                except BrokenPipeError:
                    # the reader of stdout went away (`| head`): stop quietly, as any writer to a pipe does
                    _discard(data)
                    sys.exit(0)
                except click.exceptions.Exit:
                    raise
                except click.ClickException:
                    raise
                except MemoryError:
                    _fail(tool, "out of memory (try a smaller --batch-size)", EXIT_FAILURE)
                except Exception as e:
                    if is_full_disk(e):
                        where = getattr(e, "filename", None)
                        _fail(tool, f"{where + ': ' if where else ''}no space left on the device (or the file "
                                    "size limit was reached); free space and rerun", EXIT_FAILURE)
                    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) \
                            and e.filename:
                        # a path the user gave (an input, or the output's folder): bad input, not a crash
                        _fail(tool, f"{e.filename}: {(e.strerror or str(e)).lower()}", BadInput.exit_code)
                    if verbose:
                        traceback.print_exc(file=sys.stderr)
                    _fail(tool, f"{type(e).__name__}: {e} (rerun with -v for the traceback)", EXIT_FAILURE)

        run = common_options(run, seed_list)
        command_kwargs.setdefault("context_settings", {})
        command_kwargs["context_settings"].setdefault("help_option_names", ["-h", "--help"])
        cmd = click.command(name=f"ssae-{tool}", cls=SsaeCommand, **command_kwargs)(run)
        cmd = click.version_option(__version__, prog_name=f"ssae-{tool}")(cmd)
        return scope_environment(cmd, tool)

    return decorate


def config_options(cls, *, skip: tuple[str, ...] = (), name: str = "config", lists: tuple[str, ...] = ()):
    """Generate a tool's click options from a stage config dataclass (ssae_common.core.config) and hand
    the function one `cls` instance as `name` instead of the separate values.

    Fields in `skip`, or declared with cli=False, get no option (the tool sets them itself).  Fields in
    `lists` take a comma-separated list (ListOf): the instance holds each one's first value, and the
    function also gets `sweep`, {field: every value given} for those set."""
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
            if lists:
                kwargs["sweep"] = {n: values[n] for n in lists if values.get(n) is not None}
                values.update({n: v[0] for n, v in kwargs["sweep"].items()})
            kwargs[name] = cls(**values)
            return f(*args, **kwargs)

        for n in reversed(list(specs)):
            wrapper = _click_option(n, specs[n], types[n], defaults[n], n in lists)(wrapper)
        wrapper.__ssae_flags__ = {**getattr(f, "__ssae_flags__", {}), **{n: flag_name(n, s) for n, s in specs.items()}}
        return wrapper

    return decorate


def _click_option(name: str, spec, annotation, fld, listed: bool = False) -> Callable:
    flag = flag_name(name, spec)
    default = fld.default if fld.default is not dataclasses.MISSING else (
        fld.default_factory() if fld.default_factory is not dataclasses.MISSING else None)
    base = _base_type(annotation)
    help_text = spec.help
    if listed:
        help_text = f"{help_text} A comma-separated list: one output per combination.".strip()
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
    elif listed:
        kwargs["type"] = ListOf(base)
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
