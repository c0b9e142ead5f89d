"""Progress on stderr: rich bars on a terminal, otherwise a plain line every few seconds (the first at
the start, so a batch-job log shows the work began).  Rates count this run's work only: after a resume
the amount done before (`done` set before the first update) is not this run's speed."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("ssae")


class Progress:
    def __init__(self, description: str, total: float | None = None, unit: str = "", quiet: bool = False,
                 interval: float = 5.0):
        self.description, self.total, self.unit, self.quiet = description, total, unit, quiet
        self.interval = interval
        self.done = 0.0
        self._base = None  # `done` when this run's work began (set at the first update)
        self._bar = None
        self._start = self._last = time.monotonic()
        if not quiet and not sys.stderr.isatty():
            log.info("%s: started%s", description, f" ({total:.0f} {unit} in all)" if total else "")
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn(unit), TimeRemainingColumn(),
                                     console=Console(file=sys.stderr), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)

    def update(self, advance: float = 1, **info) -> None:
        if self._base is None:
            self._base = self.done
        self.done += advance
        if self._bar is not None:
            self._bar.update(self._task, advance=advance)
            return
        now = time.monotonic()
        if not self.quiet and now - self._last >= self.interval:
            self._last = now
            self._line(info)

    def _line(self, info: dict) -> None:
        rate = (self.done - (self._base or 0)) / max(time.monotonic() - self._start, 1e-9)
        of = f"/{self.total:.0f}" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in info.items())
        log.info("%s: %.0f%s %s (%.1f %s/s)%s", self.description, self.done, of, self.unit, rate, self.unit, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
