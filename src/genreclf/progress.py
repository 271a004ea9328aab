"""Progress for long jobs: a live bar on a terminal, a log line now and then in a log file.

A tqdm bar redrawn with `\\r` is what a person at a terminal wants; in a file (`make demo > log`,
a batch job's output) the same bar becomes thousands of updates on one line. There, the job
logs one line every `every` seconds instead, with the count, the rate and the ETA.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("genreclf")


class LineProgress:
    """tqdm's update/close for output that is not a terminal: a log line at most every `every` seconds."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", every: float = 30.0):
        self.total, self.n, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.start_n, self.t0 = initial, time.monotonic()
        self.last = self.t0

    def update(self, n: int = 1) -> None:
        """Count `n` more items; log a line when `every` seconds have passed since the last."""
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._line()

    def close(self) -> None:
        """Log the final count (if anything was done)."""
        if self.n > self.start_n:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        log.info(
            "%s: %d/%d %ss (%.0f%%), %.1f %ss/s, %s elapsed, ETA %s",
            self.desc,
            self.n,
            self.total,
            self.unit,
            100.0 * self.n / max(1, self.total),
            rate,
            self.unit,
            hms(elapsed),
            hms(left),
        )


def progress_bar(total: int, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True):
    """Return a tqdm bar on a terminal, a LineProgress when stderr is a file, a silent one when disabled."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial, desc, unit)
    return tqdm(
        total=total, initial=initial, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.05
    )


def hms(seconds: float) -> str:
    """Format seconds as H:MM:SS ("?" when unknown)."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
