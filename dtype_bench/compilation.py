"""What torch.compile did during a run, read from dynamo's own records, so that a row's `compiled: true` can be
checked: graphs, graph breaks, recompiles, and whether dynamo gave up and ran code eagerly.

`CompileWatch` starts from a clean dynamo (`torch._dynamo.reset()`: a run that follows another in one process,
e.g. a `--plan` calibration, compiles and counts as if it had its own process) and counts what was compiled
between its creation and `record()`, and the optimizer step of the last compilation (`step_done(step)`, called
by the loop after each step). Sources: `torch._dynamo.utils.counters` (graph breaks, unique graphs) and
`torch._dynamo.utils.get_compilation_metrics()` (one entry per compile attempt, with its compile id
"frame/attempt", recompile reason and failure). A recompile is an attempt on code dynamo had compiled before
(attempt > 0): a guard of every earlier graph failed. Past `torch._dynamo.config.recompile_limit` attempts dynamo
stops compiling that code and runs it eagerly for every input its graphs do not cover: `fell_back`. An attempt
that fails otherwise (a graph break dynamo cannot resume from) runs that one function eagerly, its callees still
compiled: `frames_run_eagerly`.

Recompiles by design, not seen on the tiny presets: torchao's AdamW compiles its per-parameter step once per
parameter shape and hyper-parameters (its source disables the limit for it), on the first optimizer step; and by
dynamo's default (automatic dynamic shapes) a model fed a second batch width (dynamic padding on real documents)
recompiles once with that dimension dynamic.
"""
from __future__ import annotations

import torch._dynamo
from torch._dynamo.utils import counters, get_compilation_metrics, set_compilation_metrics_limit

METRICS_KEPT = 100_000  # dynamo keeps its last 64 compile attempts by default: enough for any run, not for a count
REASONS_KEPT = 5


class CompileWatch:
    def __init__(self):
        torch._dynamo.reset()
        set_compilation_metrics_limit(max(METRICS_KEPT, len(get_compilation_metrics())))
        self._first = len(get_compilation_metrics())
        self._graph_breaks = sum(counters["graph_break"].values())
        self._graphs = counters["stats"]["unique_graphs"]
        self._seen = self._first
        self.last_compile_step: int | None = None
        self.compiling = False  # a compilation is running now (read by the progress lines)
        torch._dynamo.callback_handler.register_start_callback(lambda _: setattr(self, "compiling", True))
        torch._dynamo.callback_handler.register_end_callback(lambda _: setattr(self, "compiling", False))

    def activity(self) -> str | None:
        """"compiling" while dynamo/inductor compile, else None."""
        return "compiling" if self.compiling else None

    def _attempts(self) -> list:
        return get_compilation_metrics()[self._first:]

    def step_done(self, step: int) -> None:
        """After optimizer step `step`: remembers it if anything was compiled since the previous call."""
        seen = len(get_compilation_metrics())
        if seen != self._seen:
            self._seen, self.last_compile_step = seen, step

    def record(self) -> dict:
        """The row's `compile` fields."""
        attempts = self._attempts()
        limit = [m for m in attempts if "recompile limit" in (m.fail_reason or "")]
        others = [m for m in attempts if "recompile limit" not in (m.fail_reason or "")]
        failed = [m for m in others if m.fail_type]
        recompiles = [m for m in others if _attempt(m) > 0]
        reasons = list(dict.fromkeys(f"{m.co_name}: {m.recompile_reason}" for m in recompiles if m.recompile_reason))
        return {
            "frames_compiled": sum(_attempt(m) == 0 for m in attempts),
            "graphs": counters["stats"]["unique_graphs"] - self._graphs,
            "graph_breaks": sum(counters["graph_break"].values()) - self._graph_breaks,
            "recompiles": len(recompiles),
            "recompile_reasons": [r[:300] for r in reasons[:REASONS_KEPT]],
            "recompile_limit_hits": len(limit),
            "frames_run_eagerly": len(failed),
            "fell_back": bool(limit),
            "last_compile_step": self.last_compile_step,
            "recompile_limit": torch._dynamo.config.recompile_limit,
        }


def _attempt(metrics) -> int:
    """The attempt number of a compile id "frame/attempt" (compiled autograd prefixes "!n/")."""
    return int(str(metrics.compile_id).rsplit("/", 1)[-1]) if metrics.compile_id else 0


def summary_line(record: dict) -> str | None:
    """One line for the run's output when compilation did not go as planned (None when it did)."""
    if not (record["recompiles"] or record["fell_back"] or record["frames_run_eagerly"]):
        return None
    fell_back = (f"; hit recompile_limit ({record['recompile_limit']}) {record['recompile_limit_hits']} time(s): "
                 "that code then ran eagerly" if record["fell_back"] else "")
    reasons = f"; first reason: {record['recompile_reasons'][0]}" if record["recompile_reasons"] else ""
    return (f"torch.compile: {record['recompiles']} recompile(s), {record['frames_run_eagerly']} function(s) run "
            f"eagerly, {record['graph_breaks']} graph break(s){fell_back}{reasons}")
