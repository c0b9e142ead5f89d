"""Stage configurations that declare each option once.

A stage's config is a dataclass whose fields are made with `option(...)`: the field owns its default,
its help text, its bounds or choices, and (for defaults that depend on other values) a description of
the derived default that `resolve()` fills in.  The command-line tools generate their click options from
these fields (`ssae_tools.base.config_options`), so a default or a help text is written in one place.

Library errors name the field (`ConfigError`); a tool maps the field to the flag its user typed.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import BadInput

META = "ssae"


@dataclass(frozen=True)
class OptionSpec:
    help: str = ""
    flag: str | None = None  # the long flag without dashes, when it differs from the field name
    short: str | None = None  # e.g. "-o"
    choices: tuple[str, ...] | None = None
    min: float | None = None  # inclusive lower bound
    above: float | None = None  # exclusive lower bound
    max: float | None = None  # inclusive upper bound
    derived: str | None = None  # how a None default is resolved, shown as [default: ...]
    negative: str | None = None  # bool options: the name of the off switch (default no-<flag>)
    multiple: bool = False  # repeatable (a tuple of values)
    nargs: int | None = None  # a fixed number of values after one flag (a tuple)
    required: bool = False  # the tool refuses to run without it
    cli: bool = True  # False: library-only field, no flag
    envvar: tuple[str, ...] | None = None  # extra environment variables read by the tool
    hashed: bool = True  # part of the stage's output hash (see hashed_values)
    why: str | None = None  # with hashed=False: why the field cannot change the output


def option(default: Any = MISSING, *, help: str = "", default_factory: Any = MISSING, **spec) -> Any:
    """A config field that is also a command-line option (see OptionSpec for the keywords)."""
    if spec.get("hashed", True) is False and not spec.get("why"):
        raise TypeError("option(hashed=False) needs why=: the reason the field cannot change the output")
    meta = {META: OptionSpec(help=help, **spec)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(BadInput):
    """A config field has a bad value.  `str()` names the field; tools rename it to the flag."""

    def __init__(self, field_name: str, value: Any, message: str):
        self.field_name, self.value, self.message = field_name, value, message
        super().__init__(f"{field_name}{'' if _unset(value) else f' {value!r}'}: {message}")

    def with_flag(self, flag: str) -> str:
        value = self.value
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        return f"{flag}{'' if _unset(value) else f' {value}'}: {self.message}"


def _unset(value: Any) -> bool:
    """No value to show (e.g. a required option left out): the message alone says what is wrong."""
    return value is None or value in ("", (), [])


def option_specs(cls) -> dict[str, OptionSpec]:
    return {f.name: f.metadata[META] for f in fields(cls) if META in f.metadata}


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flag_name(name: str, spec: OptionSpec) -> str:
    return "--" + (spec.flag or name.replace("_", "-"))


def check_bounds(config) -> None:
    """Check every field's declared choices and bounds (None means not set and is skipped).  A number is
    never NaN or infinite: no option means anything by them (a large tilt is written as a large number)."""
    for name, spec in option_specs(type(config)).items():
        value = getattr(config, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None:
                continue
            if spec.choices is not None and v not in spec.choices:
                raise ConfigError(name, v, f"expected one of {', '.join(spec.choices)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isnan(v):
                raise ConfigError(name, v, "not a number")
            if math.isinf(v):
                raise ConfigError(name, v, "must be finite")
            if spec.min is not None and v < spec.min:
                raise ConfigError(name, v, f"must be at least {_num(spec.min)}")
            if spec.above is not None and v <= spec.above:
                raise ConfigError(name, v, f"must be greater than {_num(spec.above)}")
            if spec.max is not None and v > spec.max:
                raise ConfigError(name, v, f"must be at most {_num(spec.max)}")


def hashed_values(config, **overrides) -> dict:
    """The fields of `config` that name its output: every field unless declared `hashed=False` (with the
    reason beside the declaration).  `overrides` replace a field's value by the form that is hashed (a
    model's identity for its spec, an input's fingerprint for its path) or add values that are not fields
    (the inputs); a field that is not hashed cannot be given."""
    specs = option_specs(type(config))
    values = {f.name: getattr(config, f.name) for f in fields(config)
              if f.name not in specs or specs[f.name].hashed}
    unhashed = sorted(k for k in overrides if k in specs and not specs[k].hashed)
    if unhashed:
        raise TypeError(f"{type(config).__name__}: {', '.join(unhashed)} is declared not hashed")
    return {**values, **overrides}


def unhashed_fields(cls) -> dict[str, str]:
    """{field: why} for the fields of `cls` declared not to change the output."""
    return {name: spec.why for name, spec in option_specs(cls).items() if not spec.hashed}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def replace(config, **changes):
    return dataclasses.replace(config, **changes)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
