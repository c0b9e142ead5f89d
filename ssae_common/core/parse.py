"""Parsers for the small languages users type: latent ranges (`0-99,512`) and NAME=VALUE lists, and the
names that label several inputs (SAEs) in tables."""
from __future__ import annotations

import os

from .config import ConfigError


def parse_latent_ranges(spec: str | None, d_sae: int, *, field: str = "latents", allow_all: bool = True) -> list[int]:
    """`0-99,512` -> sorted unique latent indices.  None, "" or "all" -> every latent (where allowed).

    A range is inclusive and must not run backwards (`5-3` is refused: it is almost always a typo)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        if not allow_all:
            raise ConfigError(field, spec, "no latents given")
        return list(range(d_sae))
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                indices = range(lo, hi + 1)
            else:
                indices = [int(part)]
        except ValueError:
            raise ConfigError(field, spec, f"{part!r} is not a latent index or a range like 0-99") from None
        for i in indices:
            if not 0 <= i < d_sae:
                raise ConfigError(field, spec, f"latent {i} is out of range (the SAE has {d_sae} latents, "
                                               f"0-{d_sae - 1})")
        chosen.update(indices)
    if not chosen:
        raise ConfigError(field, spec, "no latents given")
    return sorted(chosen)


def split_named(value: str) -> tuple[str | None, str]:
    """`NAME=VALUE` -> (NAME, VALUE); a value with no `=`, or a path that exists, -> (None, value)."""
    name, sep, rest = value.partition("=")
    if sep and name and not os.path.exists(value):
        return name, rest
    return None, value


def unique_names(paths: list[str], given: list[str | None] | None = None) -> list[str]:
    """Labels for several inputs: the given name, else the folder's base name; repeats get -2, -3, ..."""
    given = given or [None] * len(paths)
    names, used = [], set()
    for name, path in zip(given, paths):
        base = name or os.path.basename(os.path.normpath(path)) or "sae"
        candidate, n = base, 2
        while candidate in used:
            candidate, n = f"{base}-{n}", n + 1
        used.add(candidate)
        names.append(candidate)
    return names
