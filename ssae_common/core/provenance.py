"""Provenance carried by every artifact: tool, version, command line, resolved config, input hashes."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
import time

from .. import __version__


def created_by(tool: str) -> dict:
    return {
        "tool": tool,
        "version": __version__,
        "command_line": " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def config_hash(*parts) -> str:
    """A short, stable hash of JSON-able parts (inputs and resolved configuration)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def input_fingerprint(path: str) -> str:
    """sha256 of a file's bytes; a stable string for non-file inputs such as hf:NAME."""
    from .outputs import sha256_file

    from .errors import BadInput

    if path.startswith("hf:") or path == "-":
        return hashlib.sha256(path.encode()).hexdigest()
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    return sha256_file(path)
