"""A training loop's resumable state: step counters, data position, validation results and the helpers'
state, saved into and restored from a checkpoint's `progress` as one unit."""
from __future__ import annotations

import time
from typing import Any

import torch


class RunState:
    """A training loop's counters and its stateful helpers, saved and restored as one unit (the checkpoint's
    `progress`), the same way by every experiment.

    The loop advances `step` (optimizer steps) and `micro_batches` (summed over ranks); `evals` holds the
    validation results an experiment reports as a curve (the LM's), `best` the best validation so far with its
    weights' directory (an experiment that keeps best weights: classification). `state_dict()` adds what the
    helpers need to continue exactly: the data position (`batches.position`, restored by `batches.seek`), the
    monitor's state, the diagnostics' state (its history: a resumed run's diagnostics summary covers the whole
    run), the step-log offset, the steps at which the run was resumed, the training wall time across
    processes, the step timer's windows and the peak memory of the processes that trained (so a row written
    by a process resumed after the last checkpoint reports the training that happened), and `segments`: each
    process's steps and torch thread count. `RunState(..., resumed=<that dict>)` puts everything back;
    `resumed=None` starts at 0.
    """

    def __init__(self, *, batches: Any, monitor: Any, diagnostics: Any, log: Any, timer: Any, memory: Any,
                 resumed: dict | None):
        self.batches, self.monitor, self.diagnostics, self.log = batches, monitor, diagnostics, log
        self.timer, self.memory = timer, memory
        self.step, self.micro_batches, self.evals, self.best = 0, 0, [], None
        self.resumed_from_steps: list[int] = []
        self.earlier_segments: list[dict] = []
        self._earlier_train_seconds = 0.0
        if resumed:
            self.step, self.micro_batches = resumed["step"], resumed["micro_batches"]
            self.evals, self.best = resumed["evals"], resumed["best"]
            self.resumed_from_steps = resumed["resumed_from_steps"] + [self.step]
            self._earlier_train_seconds = resumed["train_wall_seconds"]
            self.earlier_segments = resumed["segments"]
            batches.seek(resumed["data_position"])
            monitor.load_state_dict(resumed["monitor"])
            diagnostics.load_state_dict(resumed["diagnostics"])  # same measured steps, history and first origin
            timer.load_state_dict(resumed["timer"])
            memory.load_state_dict(resumed["memory"])
        self.first_step = self.step
        self._started = time.perf_counter()

    @property
    def trained(self) -> bool:
        """Whether this process ran an optimizer step."""
        return self.step > self.first_step

    @property
    def segments(self) -> list[dict]:
        """Per process of this run so far: the steps it trained (from_step, to_step] and its torch threads."""
        return [*self.earlier_segments,
                {"from_step": self.first_step, "to_step": self.step, "threads": torch.get_num_threads()}]

    @property
    def train_seconds(self) -> float:
        """Wall time of the training loop, all processes of this run together."""
        return self._earlier_train_seconds + time.perf_counter() - self._started

    @property
    def best_dir(self) -> str | None:
        return self.best["dir"] if self.best else None

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_batches": self.micro_batches, "evals": self.evals, "best": self.best,
                "data_position": self.batches.position, "monitor": self.monitor.state_dict(),
                # after the monitor's flush, which sets the diagnostics' first non-finite origin
                "diagnostics": self.diagnostics.state_dict(),
                "log_offset": self.log.offset(), "resumed_from_steps": self.resumed_from_steps,
                "train_wall_seconds": self.train_seconds, "segments": self.segments,
                "timer": self.timer.state_dict(), "memory": self.memory.state_dict(self.trained)}
