"""SIGTERM / SIGINT for a training loop: noted rather than fatal, acted on at a step boundary that every rank
reaches together, and ended by `Interrupted` once the run has checkpointed."""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from dtype_bench.distributed import World, all_agree


class Interrupted(BaseException):
    """SIGTERM/SIGINT: the run checkpointed at `step` and stops without a results row; running the same
    command again resumes it. A BaseException (like KeyboardInterrupt) so that no `except Exception` records
    it as a failure."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def defer_stop_signals() -> None:
    """Called by a training loop that polls `stop_signal`: from now on SIGTERM and SIGINT do not kill the
    process but are noted, and the loop checkpoints and raises `Interrupted` at its next step boundary.
    (SIGKILL cannot be caught: a run killed that way resumes from its last evaluation's checkpoint.)"""
    _received.clear()
    for s in _STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: _received.append(signum))


@contextlib.contextmanager
def signal_handlers_restored() -> Iterator[None]:
    """Whatever a run does to the SIGTERM/SIGINT handlers (`defer_stop_signals`) ends with the block."""
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_signal(world: World, sync_point: bool) -> int | None:
    """The signal to stop on, or None. Under DDP ranks must stop at the same step, so they agree (one
    all-reduce) only at `sync_point` steps, which every rank must pass together."""
    if not world.distributed:
        return _received[0] if _received else None
    if not sync_point or not all_agree(bool(_received)):
        return None
    return _received[0] if _received else signal.SIGTERM  # another rank received it
