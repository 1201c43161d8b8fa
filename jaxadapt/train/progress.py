"""A dependency-free progress bar for training loops, on stderr.

On a terminal the line is redrawn in place (`\\r`) at most every
`tty_interval_s`. Elsewhere (CI logs, files) a full line is printed every ~10%
of the total (at most one line per 10 s), or every `log_interval_s` seconds, so logs
stay short but never silent.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, TextIO


def _fmt_time(seconds: float) -> str:
    """Formats seconds as H:MM:SS or M:SS."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_metrics(metrics: Mapping[str, Any]) -> str:
    """Formats the latest scalars as `name=value` pairs."""
    out = []
    for k, v in metrics.items():
        try:
            out.append(f"{k}={float(v):.4g}")
        except (TypeError, ValueError):
            continue  # non-scalar metrics are not shown
    return " ".join(out)


class ProgressBar:
    """Counts steps; shows rate (steps/s, images/s), ETA and latest metrics."""

    def __init__(
        self,
        total: int | None,
        *,
        desc: str = "",
        stream: TextIO | None = None,
        is_tty: bool | None = None,
        log_interval_s: float = 60.0,
        tty_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        """Starts the clock.

        Args:
          total: number of steps expected, or None if unknown (no ETA then).
          desc: prefix of every line, e.g. "epoch 3/200".
          stream: output; default `sys.stderr`.
          is_tty: redraw in place; default: `stream.isatty()`.
          log_interval_s: off a TTY, the longest time between two lines.
          tty_interval_s: on a TTY, the shortest time between two redraws.
          clock: time source in seconds (injectable for tests).
        """
        self.total = total
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.is_tty = getattr(self.stream, "isatty", lambda: False)() if is_tty is None else is_tty
        self.log_interval_s = log_interval_s
        self.tty_interval_s = tty_interval_s
        self._clock = clock
        self.start = clock()
        self.count = 0
        self.images = 0
        self.metrics: dict[str, Any] = {}
        self._last_print = self.start
        self._next_tenth = 1  # next 10% mark, in integer tenths (0.1 sums drift)
        self._closed = False
        self._printed_count = -1

    def update(
        self, n: int = 1, *, images: int = 0, metrics: Mapping[str, Any] | None = None
    ) -> None:
        """Advances by `n` steps and maybe prints.

        Args:
          n: steps done since the last call.
          images: images processed in those steps (for images/s).
          metrics: latest scalars to show (values are converted with `float`;
            pass host values, converting device arrays here would block).

        Returns:
          None.
        """
        self.count += n
        self.images += images
        if metrics is not None:
            self.metrics = dict(metrics)
        now = self._clock()
        if self._due(now):
            self._print(now, final=False)

    def _due(self, now: float) -> bool:
        """Whether a line is due now (TTY: throttled; else 10% marks or timer)."""
        if self.is_tty:
            return now - self._last_print >= self.tty_interval_s
        if self.total and 10 * self.count >= self._next_tenth * self.total:
            while self._next_tenth * self.total <= 10 * self.count:
                self._next_tenth += 1
            # A 10% mark of a short loop is noise in a CI log: keep lines >= 10 s apart.
            return now - self._last_print >= min(10.0, self.log_interval_s) - 1e-6
        return now - self._last_print >= self.log_interval_s

    def line(self, now: float | None = None) -> str:
        """Returns the current status line (without newline)."""
        now = self._clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        parts = [self.desc] if self.desc else []
        if self.total:
            pct = 100.0 * self.count / self.total
            left = (self.total - self.count) / rate if rate > 0 else float("inf")
            parts.append(f"{self.count}/{self.total} ({pct:3.0f}%)")
            parts.append(f"{_fmt_time(elapsed)}<{_fmt_time(left)} ETA")
        else:
            parts.append(f"{self.count} steps {_fmt_time(elapsed)}")
        parts.append(f"{rate:.2f} steps/s")
        if self.images:
            parts.append(f"{self.images / elapsed:.1f} img/s")
        m = _fmt_metrics(self.metrics)
        if m:
            parts.append(m)
        return " | ".join(parts)

    def _print(self, now: float, *, final: bool) -> None:
        text = self.line(now)
        if self.is_tty:
            end = "\n" if final else ""
            self.stream.write("\r\x1b[2K" + text + end)  # clear the old, longer line
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_print = now
        self._printed_count = self.count

    def close(self) -> None:
        """Prints the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.is_tty or self._printed_count != self.count:  # no duplicate line
            self._print(self._clock(), final=True)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
