"""Progress a person or a log can follow: a bar on a terminal, log lines everywhere else.

Unattended runs (cron, systemd, CI) have no terminal, so a progress bar there shows nothing for
hours. :class:`Progress` draws a tqdm bar when asked (stderr is a TTY) and otherwise logs one
line every ``every_s`` seconds through the ``reidx`` logger — done/total, rate, ETA, failures —
which the CLI routes to stderr and to ``--log-file``.
"""

from __future__ import annotations

import logging
import time

LOG = logging.getLogger("reidx")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """``update(n, **status)`` as work is done; ``close()`` at the end (logs a last line)."""

    def __init__(self, total: int, what: str, unit: str = "images", bar: bool = False, every_s: float = 30.0):
        self.total, self.what, self.unit, self.every_s = total, what, unit, every_s
        self.done, self.status = 0, {}
        self.started = self.last_log = time.perf_counter()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit[:3], desc=what)

    def update(self, n: int, **status) -> None:
        self.done += n
        self.status.update(status)
        if self.bar is not None:
            self.bar.update(n)
            if status:
                self.bar.set_postfix(**self.status)
        elif time.perf_counter() - self.last_log >= self.every_s:
            self.log()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        extra = "".join(f", {k} {v}" for k, v in self.status.items())
        eta = _duration(left) if left != float("inf") else "?"
        return (f"{self.what}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.1f} {self.unit}/s, "
                f"ETA {eta}{extra}")

    def log(self) -> None:
        self.last_log = time.perf_counter()
        LOG.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total:
            self.log()
