"""Graceful interruption: SIGTERM/SIGINT/SIGUSR1 set a flag; long loops checkpoint and exit 75."""
from __future__ import annotations

import logging
import signal
import threading

from .errors import Interrupted

log = logging.getLogger("ssae")
SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)


class StopFlag:
    """Install with `with StopFlag() as stop:`; call `stop.check(save)` at batch boundaries."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum
        log.warning("received %s: stopping at the next checkpoint", signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, save=None) -> None:
        """If a stop was requested: run `save` (the checkpoint), then raise Interrupted (exit 75)."""
        if self.signum is None:
            return
        if save is not None:
            save()
        raise Interrupted(f"interrupted by {signal.Signals(self.signum).name}; checkpoint saved, rerun the same command to resume")
