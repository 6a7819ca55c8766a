"""A progress display for long host-side work (discovery, extraction).

One log line at most every `interval` seconds, with count, rate and ETA, so that it reads
the same in a terminal, a CI log and a pod worker's log file:
  discover/extract: 120/888 patients (13.5%), 2.1 patients/s, ETA 6m05s
"""

from __future__ import annotations

import logging
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Counts work done and logs where it is; `done()` logs the total time."""

    def __init__(self, what: str, total: int, unit: str = "items", interval: float = 5.0,
                 log=logging.info):
        self.what, self.total, self.unit, self.interval, self._log = what, total, unit, interval, log
        self.count = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= self.interval or self.count == self.total:
            self._last = now
            self._log("%s", self.line(now, extra))

    def line(self, now: float | None = None, extra: str = "") -> str:
        elapsed = (now or time.monotonic()) - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        text = f"{self.what}: {self.count}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100.0 * self.count / self.total:.1f}%)"
        text += f", {rate:.3g} {self.unit}/s"
        if rate > 0 and self.count < self.total:
            text += f", ETA {format_duration((self.total - self.count) / rate)}"
        return text + (f", {extra}" if extra else "")

    def done(self) -> float:
        elapsed = time.monotonic() - self._start
        self._log("%s: %d %s in %s", self.what, self.count, self.unit, format_duration(elapsed))
        return elapsed
