"""Atomic outputs: write under a temporary name in the target folder, rename into place when complete.

Never click's File(atomic=True): it replaces the target even when the command fails.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Iterator

from .errors import BadInput


def check_target(path: str, force: bool) -> None:
    """Refuse to overwrite without --force, and fail early on an unwritable folder."""
    if os.path.exists(path) and not force:
        raise BadInput(f"{path}: exists (use --force to overwrite)")
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{folder}: cannot create output folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"{folder}: output folder is not writable")


def partial_path(path: str) -> str:
    """The fixed temporary name of an output that can be resumed (kept on interruption)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def commit(tmp: str, path: str) -> None:
    """Move a finished temporary output into place (replacing an old one only now)."""
    if os.path.isdir(path) and not os.path.islink(path):
        old = tmp + ".old"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str, force: bool = False, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it into place, on error remove it."""
    check_target(path, force)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    commit(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str, force: bool = False) -> Iterator[str]:
    """Like atomic_file, for an output directory."""
    check_target(path, force)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(path)) + ".", suffix=".tmp", dir=folder)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    commit(tmp, path)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode())
                h.update(sha256_file(full, chunk).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold a lock on `path`'s output for this process alone (two jobs writing one output is an error)."""
    import fcntl

    lock_path = partial_path(path) + ".lock"
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"{path}: another process is writing this output") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(lock_path)


def workdir() -> str:
    return os.environ.get("SSAE_WORKDIR", "ssae-work")


def default_output(kind: str, digest: str, suffix: str) -> str:
    """Where a bulk output goes when -o is not given: $SSAE_WORKDIR/<kind>/<hash><suffix>."""
    return os.path.join(workdir(), kind, digest + suffix)


def existing_output(kind: str, digest: str, suffix: str = "", marker: str | None = None,
                    force: bool = False) -> tuple[str, bool]:
    """The default output path of a stage and whether a complete artifact is already there to reuse.

    `marker` is the file inside a folder output whose presence means complete (e.g. "cfg.json")."""
    import logging

    path = default_output(kind, digest, suffix)
    done = os.path.exists(os.path.join(path, marker) if marker else path)
    if done and not force:
        logging.getLogger("ssae").info("reusing %s", path)
        return path, True
    return path, False
