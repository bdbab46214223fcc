"""StepTimer's check of its device-event windows against the host clock (`timer_check`), and its warm-up seconds."""
from __future__ import annotations

import torch

from dtype_bench import throughput


class FakeEvent:
    """A CUDA event stand-in: the time a fake device clock read when it was recorded."""

    def __init__(self, at: float):
        self.at = at

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "FakeEvent") -> float:
        return (end.at - self.at) * 1000.0  # milliseconds, as torch.cuda.Event


class EventTimer(throughput.StepTimer):
    """Windows from `device_clock`, the check's synchronized host clock from `clock`."""

    device_clock = None

    def _mark(self):
        return FakeEvent(self.device_clock())


def run(device_seconds_per_step: float, host_seconds_per_step: float, steps: int = 12, warmup: int = 2) -> dict:
    host, device = [0.0], [0.0]
    timer = EventTimer(torch.device("cpu"), warmup_steps=warmup, last_step=steps, clock=lambda: host[0])
    timer.device_clock = lambda: device[0]
    host[0] += 7.0  # before the first step: not part of the warm-up
    for step in range(steps):
        timer.start()
        host[0] += host_seconds_per_step + (5.0 if step == 0 else 0.0)  # the first step compiles
        device[0] += device_seconds_per_step
        timer.stop(samples=8)
    return timer.summary()


def test_windows_that_match_the_host_clock_agree_and_ones_that_do_not_are_flagged():
    agree = run(0.1, 0.1)
    assert agree["timer_check"] == "agrees" and abs(agree["host_over_window_seconds"] - 1) < 1e-9
    assert agree["paused_windows"] == 0
    short = run(0.1, 0.11)  # the events miss 10% of the host time
    assert short["timer_check"] == "differs" and abs(short["host_over_window_seconds"] - 1.1) < 1e-9


def test_warmup_seconds_are_the_host_time_of_the_untimed_steps():
    assert abs(run(0.1, 0.1, warmup=2)["warmup_seconds"] - 5.2) < 1e-9


def test_no_check_on_the_host_clock_or_without_a_last_step():
    timer = throughput.StepTimer(torch.device("cpu"), warmup_steps=0, last_step=3)
    for _ in range(3):
        timer.start()
        timer.stop(samples=1)
    assert "timer_check" not in timer.summary()  # host-clock windows: one clock, nothing to check
    events = EventTimer(torch.device("cpu"), warmup_steps=0, clock=lambda: 0.0)
    events.device_clock = lambda: 0.0
    events.start()
    events.stop(samples=1)
    assert "timer_check" not in events.summary()
