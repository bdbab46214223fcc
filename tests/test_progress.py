"""What a log shows while a run runs (dtype_bench.progress), what --plan calibrates (dtype_bench.plan), and which
third-party notice is filtered: a fake clock drives the progress lines, a fake `train` the plan."""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import time

import pytest
import torch

from dtype_bench import plan, progress, results, sweep
from test_timing import FakeClock

CPU = torch.device("cpu")


def test_a_log_gets_a_start_line_then_a_line_per_interval_with_position_fields_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    doing = [None]
    bar = progress.Progress("amp_bf16 seed 0", 100, stream=out, interval=20, clock=clock, activity=lambda: doing[0])
    assert out.getvalue() == "amp_bf16 seed 0: step 0/100 (0%), elapsed 0s\n"
    clock.now = 30.0  # start-up and a first (compiling) step: left out of the rate
    bar.update()
    for _ in range(10):
        clock.now += 2.0
        bar.update()
    bar.show(loss=0.5, **{"samples/s": 16.0})
    bar._tick()
    assert out.getvalue().splitlines()[-1] == (
        "amp_bf16 seed 0: step 11/100 (11%), loss 0.5, samples/s 16, 2 s/step, elapsed 50s, ETA 2m58s")
    lines = len(out.getvalue().splitlines())
    clock.now += 5.0
    bar._tick()  # within the interval of the last line: nothing
    assert len(out.getvalue().splitlines()) == lines
    clock.now += 40.0  # a long step: the line says how long the loop has been in it, and at what
    bar._tick()
    assert out.getvalue().splitlines()[-1].endswith("45s into step 12")
    doing[0] = "compiling"
    clock.now += 20.0
    bar._tick()
    assert out.getvalue().splitlines()[-1].endswith("1m05s into step 12 (compiling)")
    bar.close()
    assert out.getvalue().splitlines()[-1] == "amp_bf16 seed 0: 11 steps in 1m55s"


def test_after_the_last_step_the_line_names_no_step_beyond_the_total():
    clock, out = FakeClock(), io.StringIO()
    bar = progress.Progress("run", 2, stream=out, interval=20, clock=clock)
    for _ in range(2):
        clock.now += 1.0
        bar.update()
    clock.now += 60.0  # the final evaluation
    bar._tick()
    assert out.getvalue().splitlines()[-1].endswith("1m00s since the last step"), out.getvalue()
    bar.close()


def test_a_long_loop_logs_less_often():
    clock, out = FakeClock(), io.StringIO()
    bar = progress.Progress("run", None, stream=out, interval=15, clock=clock)
    for _ in range(3 * 3600):  # three hours, looked at every second
        clock.now += 1.0
        bar._tick()
    lines = out.getvalue().splitlines()
    # 15 s apart for the first 10 minutes (40 lines), then elapsed/40 apart: 40 ln(3 h / 10 min) more
    assert len(lines) == pytest.approx(600 / 15 + 40 * math.log(3 * 3600 / 600), abs=3)
    bar.close()


def test_the_background_thread_prints_the_innermost_open_progress_only(monkeypatch):
    monkeypatch.setattr(progress, "_TICK_SECONDS", 0.01)
    out = io.StringIO()
    training = progress.Progress("train", 10, stream=out, interval=0.05)
    evaluation = progress.Progress("eval", 4, unit="batch", stream=out, interval=0.05, announce=False)
    time.sleep(0.3)
    evaluation.close()
    training.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: step 0/10") and len(lines) >= 3
    assert all(line.startswith("eval: batch 0/4") for line in lines[1:-2]), lines
    assert lines[-1].startswith("train: 0 steps in")


def test_a_terminal_gets_a_bar_and_a_disabled_progress_prints_nothing(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = progress.Progress("run", 3, stream=terminal)
    assert bar._bar is not None and not bar.lines
    bar.close()
    quiet = io.StringIO()
    for _ in progress.track(range(3), "eval", 3, enabled=False):
        pass
    assert quiet.getvalue() == ""


def test_duration():
    assert [progress.duration(s) for s in (4.4, 65, 3600 * 2 + 125)] == ["4s", "1m05s", "2h02m"]


# ------------------------------------------------------------------------------------------------ --plan

@dataclasses.dataclass(frozen=True)
class Cfg:
    output_dir: str
    max_steps: int = 100
    eval_steps: int = 50
    max_cpu_slowdown: float | None = None
    emulate_slow_matmuls: bool = False
    timing_warmup_steps: int = 5
    diagnostics_every: int = 10
    report_to: str = "none"


def fake_train(calls: list[str]):
    def train(short, pc, rid):
        calls.append(pc.name)
        time.sleep(0.05)
        # 4 steps of 8 samples at 16 samples/s (0.5 s/step), 2 evaluations of 3 s each
        return {"status": "completed", "samples_per_second": 16.0, "samples_seen": 32, "steps": 4,
                "train_wall_seconds": 30.0, "eval_wall_seconds": 6.0, "evaluations": 2}
    return train


def test_calibration_takes_evaluation_time_from_the_evaluations_and_compilation_as_fixed_cost(monkeypatch):
    ticks = iter([0.0, 40.0])
    monkeypatch.setattr(plan.time, "perf_counter", lambda: next(ticks))
    estimate = plan.calibrate(Cfg("unused"), plan.precision.get("fp32_baseline"), fake_train([]))
    assert (estimate.seconds_per_step, estimate.seconds_per_evaluation) == (0.5, 3.0)
    assert estimate.fixed_seconds == pytest.approx(40 - 4 * 0.5 - 2 * 3)  # build, warm-up/compile, final test
    assert estimate.full_run_seconds(100, 50) == pytest.approx(100 * 0.5 + 2 * 3 + 32)


def test_plan_calibrates_only_configs_with_runs_left_and_nothing_when_all_are_done(tmp_path, capsys):
    setup, experiment = "f" * 16, "classification"
    runs = sweep.grid(["fp32_baseline", "amp_bf16"], 0, 2)
    done = {"fp32_baseline": ("completed", "skipped"), "amp_bf16": ("completed", "failed")}
    for config, statuses in done.items():
        for seed, status in enumerate(statuses):
            results.append_result(tmp_path, {"run_id": results.run_id(experiment, config, seed, setup),
                                             "setup_fingerprint": setup, "status": status})
    still_skipped = {"fp32_baseline": "too slow here", "amp_bf16": None}

    def pending(**rules) -> list[sweep.RunSpec]:
        return sweep.Grid(runs, str(tmp_path), setup, experiment, **rules).pending()

    assert pending(skip_reasons=still_skipped, retry_failed=False, fresh=False) == []
    todo = pending(skip_reasons=still_skipped, retry_failed=True, fresh=False)
    assert todo == [sweep.RunSpec("amp_bf16", 1)]
    assert pending(skip_reasons=dict.fromkeys(still_skipped), retry_failed=False, fresh=False) == [
        sweep.RunSpec("fp32_baseline", 1)]  # its skip no longer applies: it would train now
    assert len(pending(skip_reasons=still_skipped, retry_failed=False, fresh=True)) == 4

    calls: list[str] = []
    cfg = Cfg(str(tmp_path))
    assert plan.print_plan(["fp32_baseline", "amp_bf16"], 2, [], cfg, CPU, fake_train(calls)) == 0
    assert calls == [] and "nothing to run" in capsys.readouterr().out
    plan.print_plan(["fp32_baseline", "amp_bf16"], 2, todo, cfg, CPU, fake_train(calls))
    out = capsys.readouterr().out
    assert calls == ["amp_bf16"] and "  fp32_baseline: done" in out
    assert re.search(r"estimated total: ~[\d.]+ s for 1 run\(s\)", out)


# ------------------------------------------------------------------------------------------------ noise

def test_only_torchs_enum_pytree_constant_notice_is_filtered(caplog):
    import dtype_bench  # noqa: F401  (installs the filter)

    logger = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        logger.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                       "type. Calling register_constant() on Enum subclasses is deprecated", "<enum 'X'>")
        logger.warning("%s cannot be registered", "Y")
    assert [r.getMessage() for r in caplog.records] == ["Y cannot be registered"]
