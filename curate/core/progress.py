"""One progress line per stage: rows done of the total, rows/s, time left.

Every stage shows its progress the same way, through ``Progress``, instead of
each stage printing its own counter and Ray Data drawing a stack of bars per
operator. Whether a line is drawn at all is decided once per run
(``StageContext.progress``: on when stderr is a terminal, off with ``--quiet``).

On a terminal the line is redrawn in place (``\\r``) at most four times a
second, and erased when the work ends, for the stage's summary line::

      filter            61,440/100,000 rows   61%  20,460 rows/s  0:02 left

In a log (stderr a file or a pipe: ``2> run.log``, CI) redrawing is wrong:
every redraw would stay in the file. There a line is written at most every
30 s, then the final line. A user reading a log wants to see that a long stage
is alive and how far it got, not thousands of lines: a stage that takes a
minute writes two lines and its final one, a stage under 30 s only its final
line, and a 10-hour stage 1,200 lines.

Work the driver only waits on (Ray Data tasks, img2dataset's processes) is
counted from what it has written so far: ``Progress.poll`` with ``FinishedRows``
(Parquet footers, img2dataset's stats files), nothing added to the work itself.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import pyarrow.parquet as pq

#: Seconds between redraws on a terminal, and between lines in a log.
TTY_EVERY = 0.25
LOG_EVERY = 30.0


class Progress:
    """``label  done/total unit  pct  rate unit/s  time left  extra`` on ``stream``.

    ``total`` may be None (unknown: no percentage, no time left). ``done`` starts
    the count where earlier work left it (a resumed download): the rate counts only
    what this run did. ``extra`` returns more text for the line (the trainer's step
    and loss); it is called only when a line is drawn, so it may be costly.
    ``enabled=False`` makes every method a no-op, so callers need no ``if``.
    ``stream`` defaults to ``sys.stderr`` as it is when the line is made: a stage that
    then silences a library by swapping ``sys.stderr`` still draws on the real one.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "rows",
        done: int = 0,
        enabled: bool = True,
        extra: Callable[[], str] | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.unit, self.extra = label, total, unit, extra
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and _isatty(self.stream)
        self.every = TTY_EVERY if self.tty else LOG_EVERY
        self.clock = clock
        self.done = self._first = done
        self.start = self._shown = clock()
        self._closed = False

    def add(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        """Set the count; draw the line if the last one is old enough."""
        self.done = done
        if self.enabled and not self._closed and self.clock() - self._shown >= self.every:
            self._write(self.line())

    def rate(self) -> float | None:
        """Units per second since the start (None before any time has passed)."""
        elapsed = self.clock() - self.start
        return (self.done - self._first) / elapsed if elapsed > 0 else None

    def left(self) -> float | None:
        """Seconds to the total at the current rate (None: unknown total, or no rate yet)."""
        rate = self.rate()
        if self.total is None or not rate:
            return None
        return max(0, self.total - self.done) / rate

    def line(self, final: bool = False) -> str:
        parts = [f"{self.label:<16}"]
        if final:
            parts.append(f"{self.done:,} {self.unit} in {_seconds(self.clock() - self.start)}")
        elif self.total is None:
            parts.append(f"{self.done:,} {self.unit}")
        else:
            percent = f"{100 * self.done // self.total}%" if self.total else "100%"
            parts.append(f"{self.done:,}/{self.total:,} {self.unit}  {percent:>4}")
        rate = self.rate()
        if rate:
            parts.append(f"{rate:,.0f} {self.unit}/s")
        left = None if final else self.left()
        if left is not None:
            parts.append(f"{_clock_time(left)} left")
        if self.extra is not None:
            parts.append(self.extra())
        return "  " + "  ".join(p for p in parts if p)

    def close(self) -> None:
        """End the line (once): erased on a terminal, a final line in a log.

        On a terminal the caller's summary (``curate run``'s line per stage, the
        trainer's closing numbers) takes the redrawn line's place, so each stage
        leaves one line on screen, not two saying nearly the same thing.
        """
        if self.enabled and not self._closed:
            if self.tty:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            else:
                self._write(self.line(final=True))
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def poll(self, count: Callable[[], int], every: float = 1.0) -> Iterator[None]:
        """While the block runs, ``update(count())`` every ``every`` s from a thread.

        For work the driver only waits on (Ray Data writing files, img2dataset's
        processes): ``count`` reads how far it got from what it wrote, e.g.
        ``FinishedRows``.
        """
        if not self.enabled:
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                self.update(count())

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        self.update(count())

    def _write(self, text: str) -> None:
        self._shown = self.clock()
        if self.tty:  # back to the line's start, draw it, clear what a longer line left
            self.stream.write(f"\r{text}\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class FinishedRows:
    """Rows in the finished files of a folder, each file read once: a ``Progress.poll`` count.

    A file being written has no readable footer (Parquet) or whole JSON yet; it is
    counted on a later call.
    """

    def __init__(
        self,
        folder: Path,
        pattern: str = "*.parquet",
        rows: Callable[[Path], int] = lambda p: pq.read_metadata(p).num_rows,
    ):
        self.folder, self.pattern, self.rows = Path(folder), pattern, rows
        self._seen: dict[str, int] = {}

    def __call__(self) -> int:
        for path in self.folder.glob(self.pattern):
            if path.name not in self._seen:
                with contextlib.suppress(OSError, ValueError, KeyError):  # not finished yet
                    self._seen[path.name] = self.rows(path)
        return sum(self._seen.values())


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else _clock_time(s)


def _clock_time(s: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour."""
    s = round(s)
    hours, rest = divmod(s, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
