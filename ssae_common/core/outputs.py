"""Atomic outputs: write under a temporary name in the target folder, rename into place when complete.

Never click's File(atomic=True): it replaces the target even when the command fails.  Outputs get the
permissions the umask gives (0644 files, 0755 folders by default), not the private ones of temporary
names, so colleagues on a shared cluster can read them.  One process at a time writes an output
(`exclusive`).
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str) -> None:
    """Give `path` (and, for a folder, everything in it) the permissions a plain open()/mkdir() would:
    mkstemp and mkdtemp make them private (0600/0700) whatever the umask."""
    mask = _umask()
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    os.chmod(full, (0o777 if os.stat(full).st_mode & 0o100 else 0o666) & ~mask)
    elif os.path.isfile(path):
        os.chmod(path, 0o666 & ~mask)


def commit(tmp: str, path: str) -> None:
    """Move a finished temporary output into place (replacing an old one only now)."""
    honour_umask(tmp)
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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def lock_path(path: str) -> str:
    return partial_path(path) + ".lock"


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold the lock of output `path` for this process alone: a second writer (another job, or the same
    command started twice) gets BadInput "another process is writing OUT (pid N)".

    The lock is an flock on `.OUT.partial.lock`, which holds the writer's pid.  The kernel drops an flock
    when its process dies, however it dies, so the lock of a killed run is never stale: the next run takes
    it over.  The file is removed on release; a process that locked a file just removed by its previous
    holder sees that the path now names another file and locks again."""
    import fcntl

    lock = lock_path(path)
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise BadInput(f"another process is writing {path}" + (f" (pid {holder})" if holder.isdigit() else "")
                           + "; wait for it, or give another -o") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder removed in the meantime: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)
        os.close(fd)


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
