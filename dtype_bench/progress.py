"""Progress of a long loop (training steps, evaluation batches) that a terminal and a log file both show.

On a terminal (stdout is a tty): a tqdm bar. Anywhere else (`make demo > log`, CI, Slurm output): a line when the
loop starts, then one every `INTERVAL_SECONDS` (longer apart as a loop goes on) from a background thread, so that
the log moves on even while one step takes long (a first compilation, an evaluation), the way the Hugging Face
Trainer logs a line per logging step: what runs, position and percentage, the fields the loop last reported (e.g.
loss, samples/s), the rate, elapsed time and ETA. Only the innermost open `Progress` prints (an evaluation's lines
stand in for the training's while it runs); the thread only reads what the loop wrote, so it adds no host sync to
the loop.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

INTERVAL_SECONDS = 15.0
"""Log lines of an open Progress this far apart at first; later a fortieth of the time it has been open (30 s
apart after 20 minutes, a minute after 40), at most `MAX_INTERVAL_SECONDS`: a long run's log stays readable."""
MAX_INTERVAL_SECONDS = 300.0
_TICK_SECONDS = 1.0  # how often the background thread looks

_open: list["Progress"] = []
_lock = threading.Lock()
_thread: threading.Thread | None = None


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"


class Progress:
    """`update()` after each unit, `show(**fields)` for values to show with it, `close()` at the end.
    `enabled=False` shows nothing (e.g. DDP ranks other than 0); `announce`: a log line at the start too (else
    the first comes after `interval`, so that a short loop prints none); `activity()`: what a unit that takes
    long is busy with (e.g. "compiling"), or None."""

    def __init__(self, desc: str, total: int | None, *, unit: str = "step", initial: int = 0, enabled: bool = True,
                 announce: bool = True, activity: Callable[[], str | None] = lambda: None,
                 stream: TextIO | None = None, interval: float = INTERVAL_SECONDS, clock=time.monotonic):
        self.desc, self.total, self.unit, self.done, self.activity = desc, total, unit, initial, activity
        self.fields: dict[str, Any] = {}
        self.stream, self.interval, self.clock = stream or sys.stdout, interval, clock
        self._started = self._last_line = self._last_unit = clock()
        self._first: tuple[float, int] | None = None  # (time, done) at the first unit: the rate leaves start-up out
        self._bar = None
        self.lines = enabled and not (hasattr(self.stream, "isatty") and self.stream.isatty())
        if enabled and not self.lines:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=announce)
        if self.lines:
            if announce:
                self._print(self.line())
            _register(self)

    def update(self, n: int = 1) -> None:
        """`n` more units done."""
        now = self.clock()
        self.done += n
        self._last_unit = now
        if self._first is None:
            self._first = (now, self.done)
        if self._bar is not None:
            self._bar.update(n)

    def show(self, **fields: Any) -> None:
        """Values to show from now on (e.g. the loss of the last log step), each until replaced."""
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix({k: _shown(v) for k, v in self.fields.items()})

    def line(self) -> str:
        """The log line for now."""
        now = self.clock()
        where = f"{self.unit} {self.done}" + (f"/{self.total} ({100 * self.done / self.total:.0f}%)"
                                              if self.total else "")
        parts = [where] + [f"{k} {_shown(v)}" for k, v in self.fields.items() if v is not None]
        rate = None
        if self._first is not None and now > self._first[0] and self.done > self._first[1]:
            rate = (self.done - self._first[1]) / (now - self._first[0])
            parts.append(f"{rate:.3g} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {duration(now - self._started)}")
        if rate and self.total:
            parts.append(f"ETA {duration(max(self.total - self.done, 0) / rate)}")
        if now - self._last_unit >= self.interval:
            doing = self.activity()
            after = (f"{duration(now - self._last_unit)} since the last {self.unit}" if self.total and
                     self.done >= self.total else f"{duration(now - self._last_unit)} into {self.unit} {self.done + 1}")
            parts.append(after + (f" ({doing})" if doing else ""))
        return f"{self.desc}: " + ", ".join(parts)

    def _print(self, text: str) -> None:
        self._last_line = self.clock()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _tick(self) -> None:
        now = self.clock()
        gap = min(max(self.interval, (now - self._started) / 40), MAX_INTERVAL_SECONDS)
        if now - self._last_line >= gap:
            self._print(self.line())

    def write(self, text: str) -> None:
        """A line of the loop's own (e.g. an evaluation's result) that does not break a tqdm bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        elif self.lines:
            self._print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.lines:
            _unregister(self)
            if self.clock() - self._started >= self.interval:  # a log reader saw it run: say that it ended
                self._print(f"{self.desc}: {self.done} {self.unit}s in {duration(self.clock() - self._started)}")
            self.lines = False


def track(items: Iterable, desc: str, total: int | None, *, unit: str = "batch", enabled: bool = True) -> Iterator:
    """`items`, showing progress as they are consumed (no start line: a short loop prints nothing)."""
    progress = Progress(desc, total, unit=unit, enabled=enabled, announce=False)
    try:
        for item in items:
            yield item
            progress.update()
    finally:
        progress.close()


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _register(progress: Progress) -> None:
    global _thread
    with _lock:
        _open.append(progress)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_heartbeat, name="dtype-bench-progress", daemon=True)
            _thread.start()


def _unregister(progress: Progress) -> None:
    with _lock:
        if progress in _open:
            _open.remove(progress)


def _heartbeat() -> None:
    while True:
        time.sleep(_TICK_SECONDS)
        with _lock:
            innermost = _open[-1] if _open else None
        if innermost is not None:
            innermost._tick()
