"""Stage configurations that declare each option once.

A stage's config is a dataclass whose fields are made with `option(...)`: the field owns its default,
its help text, its bounds or choices, and (for defaults that depend on other values) a description of
the derived default that `resolve()` fills in.  The command-line tools generate their click options from
these fields (`ssae_tools.base.config_options`), so a default or a help text is written in one place.

Library errors name the field (`ConfigError`); a tool maps the field to the flag its user typed.
"""
from __future__ import annotations

import dataclasses
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


def option(default: Any = MISSING, *, help: str = "", default_factory: Any = MISSING, **spec) -> Any:
    """A config field that is also a command-line option (see OptionSpec for the keywords)."""
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
    """Check every field's declared choices and bounds (None means not set and is skipped)."""
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
            if spec.min is not None and v < spec.min:
                raise ConfigError(name, v, f"must be at least {_num(spec.min)}")
            if spec.above is not None and v <= spec.above:
                raise ConfigError(name, v, f"must be greater than {_num(spec.above)}")
            if spec.max is not None and v > spec.max:
                raise ConfigError(name, v, f"must be at most {_num(spec.max)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def replace(config, **changes):
    return dataclasses.replace(config, **changes)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
