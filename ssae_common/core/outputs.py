"""Atomic outputs: write under a temporary name in the target folder, rename into place when complete.

Never click's File(atomic=True): it replaces the target even when the command fails.  Outputs get the
permissions the umask gives (0644 files, 0755 folders by default), not the private ones of temporary
names, so colleagues on a shared cluster can read them.  One process at a time writes an output
(`exclusive`).

The folder may be shared and writable by others, so the fixed names beside an output (its `.partial`,
lock and resume state) are never followed when they are symbolic links: a planted link is refused, and
state files are opened with O_NOFOLLOW, created with O_EXCL.  A full disk is one line naming the path
(`no_space`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from typing import IO, Iterator

from .errors import BadInput, SsaeError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_full_disk(error: BaseException) -> bool:
    """Whether `error` (an OSError, or a library's error wrapping one) says the disk or quota is full."""
    if isinstance(error, OSError) and error.errno in FULL_DISK:
        return True
    text = str(error).lower()
    return any(words in text for words in ("no space left", "disk quota", "file too large"))


def no_space(path: str, kept: bool = True) -> SsaeError:
    """The one-line failure of a write that ran out of space (exit 1: the run can be repeated as it is).
    `kept`: a resumable partial stays (else nothing was written)."""
    then = ("the partial output is kept: free space and rerun to resume, or --force to start over" if kept else
            "nothing was written: free space and rerun")
    return SsaeError(f"{path}: no space left on the device (or the file size limit was reached); {then}")


def bytes_free(path: str) -> int:
    """Bytes that can still be written to the file `path` (it may not exist yet): the space left on its
    file system for this user, and under the file size limit (ulimit -f) what remains of it."""
    folder = os.path.dirname(os.path.abspath(path))
    vfs = os.statvfs(folder)
    free = vfs.f_bavail * vfs.f_frsize
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, ValueError, OSError):
        limit = -1
    if limit >= 0:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        free = min(free, max(0, limit - size))
    return free


def refuse_link(path: str) -> None:
    """Refuse a symbolic link at a name where the toolkit keeps its own files (partials, locks, state):
    following it would write over whatever it points to."""
    if os.path.islink(path):
        raise BadInput(f"{path}: a symbolic link where ssae keeps its partial output; remove it (nothing was "
                       "written through it)")


def open_partial(path: str) -> IO[bytes] | None:
    """`path` opened for reading when it is a regular file (never through a symbolic link); None when it
    is absent, a link or anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # absent, a link (ELOOP), unreadable
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def write_private_file(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: a new file (O_EXCL, never through a link) renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # replaces a link itself, never what it points to
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_target(path: str, force: bool) -> None:
    """Refuse to overwrite without --force, and fail early on an unwritable folder."""
    if os.path.exists(path) and not force:
        raise BadInput(f"{path}: exists (use --force to overwrite)")
    folder = make_folder(os.path.dirname(os.path.abspath(path)) or ".")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"{folder}: output folder is not writable")


def make_folder(folder: str) -> str:
    """Create the output folder `folder` (and its parents), or say in one line why it cannot be."""
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        above = folder
        while above and not os.path.isdir(above):
            if os.path.lexists(above):
                raise BadInput(f"{folder}: cannot create output folder ({above} is a file)") from None
            above = os.path.dirname(above)
        raise BadInput(f"{folder}: cannot create output folder (not a folder)") from None
    except OSError as e:
        raise BadInput(f"{folder}: cannot create output folder ({e.strerror})") from None
    return folder


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
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, Exception) and is_full_disk(e):
            raise no_space(path, kept=False) from None
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
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, Exception) and is_full_disk(e):
            raise no_space(path, kept=False) from None
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
    folder = make_folder(os.path.dirname(lock))
    while True:
        refuse_link(lock)
        try:
            # never through a link planted at the lock's name (it would truncate what it points to)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                refuse_link(lock)
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise BadInput(f"{folder}: output folder is not writable") from None
            raise BadInput(f"{lock}: cannot create the output's lock ({e.strerror})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            raise BadInput(f"{lock}: not a lock file ssae made (a hard link or special file); remove it")
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
