"""One experiment's results directory, loaded for analysis: rows, step logs, metric definitions, plot styles.

Rows and step logs are read through `dtype_bench.results.read_results` / `dtype_bench.io.read_jsonl`, so every
malformed line ends up in `Experiment.problems` (and from there in the report), never silently dropped. Values
are kept as they are: a NaN loss stays NaN.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dtype_bench import precision as precision_registry
from dtype_bench.io import read_jsonl
from dtype_bench.results import STATUSES, read_results

BASELINE = "fp32_baseline"
Role = Literal["throughput", "memory", "quality", "time"]


@dataclass(frozen=True)
class Metric:
    key: str
    """Field name in a results row."""
    label: str
    """How the report and plots name it."""
    role: Role
    """throughput/time/memory are compared to fp32 as ratios, quality as differences."""
    higher_is_better: bool
    floor: float | None = None
    """A mean below this is near the score's floor (a model that predicts almost nothing right): its differences
    say little, and the report flags it."""

    def near_floor(self, mean: float | None) -> bool:
        return self.floor is not None and mean is not None and mean < self.floor


SCORE_FLOOR = 0.01
"""Where a score in [0, 1] (F1, precision@k, nDCG) is flagged as near its floor."""

METRICS: tuple[Metric, ...] = (
    Metric("samples_per_second", "samples/s", "throughput", True),
    Metric("tokens_per_second", "tokens/s", "throughput", True),
    Metric("mfu", "MFU (of its compute dtype's measured peak)", "throughput", True),
    Metric("mfu_datasheet", "MFU (of its compute dtype's datasheet peak)", "throughput", True),
    Metric("peak_memory_gb", "peak memory (GB)", "memory", False),
    Metric("train_peak_memory_gb", "training peak memory (GB)", "memory", False),
    Metric("eval_peak_memory_gb", "evaluation peak memory (GB)", "memory", False),
    Metric("micro_f1", "micro-F1", "quality", True, SCORE_FLOOR),
    Metric("macro_f1", "macro-F1 (all labels)", "quality", True, SCORE_FLOOR),
    Metric("macro_f1_present_labels", "macro-F1 (labels with gold)", "quality", True, SCORE_FLOOR),
    Metric("precision_at_1", "P@1", "quality", True, SCORE_FLOOR),
    Metric("precision_at_3", "P@3", "quality", True, SCORE_FLOOR),
    Metric("precision_at_5", "P@5", "quality", True, SCORE_FLOOR),
    Metric("rp_at_5", "RP@5", "quality", True, SCORE_FLOOR),
    Metric("ndcg_at_5", "nDCG@5", "quality", True, SCORE_FLOOR),
    Metric("val_loss", "validation loss", "quality", False),
    Metric("perplexity", "validation perplexity", "quality", False),
    Metric("train_wall_seconds", "training wall time (s)", "time", False),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
EMULATION_COSTS = tuple(m.key for m in METRICS if m.role in ("throughput", "memory", "time"))
"""What a run with emulated matmuls (`matmuls_emulated`) measured of the emulation, not of its dtype."""

# What each experiment is judged on; other experiments fall back to the first quality metric they report.
PRIMARY_QUALITY = {"classification": "micro_f1", "lm": "val_loss"}
PRIMARY_THROUGHPUT = {"classification": "samples_per_second", "lm": "tokens_per_second"}

MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA: the torch allocator's max allocated bytes (reserved: *_peak_memory_reserved_gb)",
    "cpu_peak_rss_per_phase": "CPU: peak resident set size of the run process, reset per phase (training / evaluation)",
    "cpu_peak_rss_whole_process": "CPU: peak resident set size of the whole run process since it started",
}


def memory_kind_text(kind: str) -> str:
    if kind in MEMORY_KINDS:
        return MEMORY_KINDS[kind]
    if kind.startswith("cpu_peak_rss"):
        return "CPU: peak resident set size of the run process"
    return "unknown kind"


def is_cpu_rss(kind: str | None) -> bool:
    return bool(kind) and kind.startswith("cpu_peak_rss")


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class Experiment:
    name: str
    results_dir: Path
    rows: list[dict]
    """One row per (config, seed); if a pair was recorded twice the later row is kept and the earlier noted."""
    problems: list[str]
    """Malformed lines, duplicate rows, missing step logs, mixed setups: all shown in the report."""
    step_logs: dict[str, list[dict]] = field(default_factory=dict)
    """run_id -> that run's step-log records (training and evaluation lines, as written)."""

    @property
    def configs(self) -> list[str]:
        """Configs with at least one row, in registry order (unknown names last, sorted)."""
        present = {r["config"] for r in self.rows}
        known = [c for c in precision_registry.REGISTRY if c in present]
        return known + sorted(present - set(known))

    @property
    def seeds(self) -> list[int]:
        return sorted({r["seed"] for r in self.rows if is_number(r.get("seed"))})

    def runs(self, config: str, status: str | None = None) -> list[dict]:
        return sorted((r for r in self.rows if r["config"] == config and (status is None or r["status"] == status)),
                      key=lambda r: r.get("seed", 0))

    def precision(self, config: str) -> dict:
        """The precision record of a config: from its rows; rows written by the sweep for a crashed process carry
        none, so fall back to the registry's record of the same name."""
        for row in self.runs(config):
            if isinstance(row.get("precision"), dict):
                return row["precision"]
        pc = precision_registry.REGISTRY.get(config)
        return pc.to_record() if pc else {}

    @property
    def metrics(self) -> list[Metric]:
        """Known metrics that some row reports as a number."""
        return [m for m in METRICS if any(is_number(r.get(m.key)) for r in self.rows)]

    def primary_metric(self, role: Role) -> Metric | None:
        """The metric this experiment is judged on for a role: its declared one if reported, else the first
        reported metric of that role."""
        key = {"quality": PRIMARY_QUALITY, "throughput": PRIMARY_THROUGHPUT}.get(role, {}).get(self.name)
        present = self.metrics
        if key and METRIC_BY_KEY[key] in present:
            return METRIC_BY_KEY[key]
        return next((m for m in present if m.role == role), None)

    @property
    def quality_metric(self) -> Metric | None:
        return self.primary_metric("quality")

    @property
    def throughput_metric(self) -> Metric | None:
        return self.primary_metric("throughput")

    def training_records(self, run_id: str) -> list[dict]:
        return [r for r in self.step_logs.get(run_id, []) if "eval" not in r]

    def eval_records(self, run_id: str) -> list[dict]:
        return [r for r in self.step_logs.get(run_id, []) if "eval" in r]

    def precisions(self) -> dict[str, dict]:
        return {c: self.precision(c) for c in self.configs}

    def emulated_configs(self) -> list[str]:
        """Configs with a run whose fp16/bf16 matmuls were emulated in fp32 (`set_aside_emulated_costs`)."""
        return [c for c in self.configs if any(r.get("matmuls_emulated") for r in self.runs(c))]

    def missing_configs(self) -> list[str]:
        """Registry configs with no row at all."""
        return [c for c in precision_registry.REGISTRY if c not in set(self.configs)]

    def missing_seeds(self, config: str) -> list[int]:
        have = {r.get("seed") for r in self.runs(config)}
        return [s for s in self.seeds if s not in have]


def load_experiment(results_dir: str | Path) -> Experiment:
    results_dir = Path(results_dir)
    raw_rows, problems = read_results(results_dir)
    if not (results_dir / "results.jsonl").exists():
        problems.append(f"{results_dir / 'results.jsonl'}: no such file")
    by_run: dict[tuple[str, int], dict] = {}
    for lineno, row in enumerate(raw_rows, 1):
        missing = [k for k in ("config", "seed", "status") if k not in row]
        if missing or row["status"] not in STATUSES:
            problems.append(f"row {lineno}: unusable (missing {missing or 'a valid status'}): {str(row)[:80]}")
            continue
        key = (row["config"], row["seed"])
        if key in by_run and by_run[key]["status"] != "skipped":  # a skipped run trained later is not a duplicate
            problems.append(f"{row['config']} seed {row['seed']}: recorded more than once; the last row is used")
        by_run[key] = row
    rows = list(by_run.values())
    set_aside_emulated_costs(rows)
    old_macro = sorted({f"{r['config']} seed {r['seed']}" for r in rows
                        if "macro_f1" in r and "macro_f1_present_labels" not in r})
    if old_macro:  # before the metric followed the seed, macro_f1 averaged only the labels with gold
        problems.append("macro_f1 of rows written before it averaged all labels (it then averaged the labels with "
                        f"gold only; not comparable with newer rows): {', '.join(old_macro)}")

    experiments = sorted({r.get("experiment", "?") for r in rows})
    if len(experiments) > 1:
        problems.append(f"rows from several experiments in one directory: {', '.join(experiments)}")
    setups = {r.get("setup_fingerprint") for r in rows}
    if len(setups) > 1:
        problems.append(f"rows from {len(setups)} different setups (setup_fingerprint): their numbers are not comparable")

    step_logs: dict[str, list[dict]] = {}
    for row in rows:
        rid = row.get("run_id")
        if not rid or row["status"] == "skipped":
            continue
        path = results_dir / "logs" / f"{rid}.jsonl"
        if not path.exists():
            problems.append(f"{rid}: step log {path} is missing")
            continue
        records, log_problems = read_jsonl(path)
        step_logs[rid] = records
        problems.extend(log_problems)
    exp = Experiment(experiments[0] if experiments else "?", results_dir, rows, problems, step_logs)
    add_activation_flush_vs_baseline(exp)
    return exp


def set_aside_emulated_costs(rows: list[dict]) -> None:
    """A run whose fp16/bf16 matmuls were emulated in fp32 (`matmuls_emulated`) is compared on quality only: its
    `EMULATION_COSTS` (speed, memory, time: the emulation's) move to its row's `emulated_costs`, where the runs
    table still shows them, and out of every summary, ratio, frontier and verdict (the report's device note
    names these configs)."""
    for row in rows:
        if row.get("matmuls_emulated"):
            row["emulated_costs"] = {k: row.pop(k) for k in EMULATION_COSTS if k in row}


ACT_GRAD_FLUSHED = "act_grad_flushed_frac_vs_fp32"


def add_activation_flush_vs_baseline(exp: Experiment) -> None:
    """Adds `ACT_GRAD_FLUSHED` {group: fraction} to each training record that the fp32 baseline's run of the same
    seed measured at the same step: of the activation-gradient elements in rows that are not structurally zero in
    fp32, the fraction that are zero in this config, whether inside a row with non-zeros (`act_grad_zero_in_live_rows_frac`)
    or in a row that flushed to zero entirely (which the run itself cannot tell from a structural row, so
    `act_grad_structural_zero_frac` counts it there). The same seed trains on the same batches in every config, and
    fp32 flushes nothing at these magnitudes, so its structural rows are the reference; late in training the
    configs' weights differ, which leaves the position-determined structure (padding, positions the loss does not
    reach) unchanged."""
    baseline = {r.get("seed"): r.get("run_id") for r in exp.runs(BASELINE, "completed")}
    for row in exp.rows:
        reference_id = baseline.get(row.get("seed"))
        if reference_id is None or row.get("run_id") not in exp.step_logs:
            continue
        reference = {rec["step"]: rec.get("act_grad_structural_zero_frac") or {}
                     for rec in exp.training_records(reference_id) if "step" in rec}
        for rec in exp.training_records(row["run_id"]):
            structural, zeros = rec.get("act_grad_structural_zero_frac"), rec.get("act_grad_zero_in_live_rows_frac")
            base = reference.get(rec.get("step"))
            if not (isinstance(structural, dict) and isinstance(zeros, dict) and base):
                continue
            flushed = {}
            for group, s in structural.items():
                s0, z = base.get(group), zeros.get(group)
                if is_number(s) and is_number(s0) and is_number(z) and s0 < 1:
                    flushed[group] = (z * (1 - s) + max(s - s0, 0.0)) / (1 - s0)
            rec[ACT_GRAD_FLUSHED] = flushed


# ---------------------------------------------------------------- plot styles: one colour family per precision

_FAMILY_MARKERS = {"fp32": "o", "fp16": "^", "bf16": "s"}


@dataclass(frozen=True)
class Style:
    family: str
    colour: tuple
    linestyle: str
    """'--' for 8-bit optimizer states, '-' otherwise."""
    hatch: str
    marker: str
    eight_bit: bool


def devices(exp: "Experiment") -> set[str]:
    """The device types the runs were measured on ('cpu', 'cuda'), from their rows' env."""
    return {str((row.get("env") or {}).get("device", "")).split(":")[0] for row in exp.rows} - {""}


def family_of(record: dict) -> str:
    """A config's precision family from its precision record, never from its name: the dtype most of its matmuls
    run in (autocast's, else the weights'): fp32, fp16, bf16, or unknown for a record that does not say."""
    compute = record.get("autocast_dtype") or record.get("weight_dtype")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(compute, "unknown")


def styles(precisions: dict[str, dict]) -> dict[str, Style]:
    """config -> Style, from each config's precision record (`family_of`, `optimizer`), never from its name: a
    colour of its own for every config (fp32_baseline black, the others from a qualitative palette in the given
    order), the marker by family (fp32 circle, fp16 triangle, bf16 square), dashed/hatched if 8-bit optimizer
    states."""
    import matplotlib

    others = [c for c in precisions if c != BASELINE]
    palette = matplotlib.colormaps["tab10" if len(others) <= 10 else "tab20"]
    grey = {7} if len(others) <= 10 else {14, 15}  # the palette's greys: too close to the baseline's black
    colours = [palette(i) for i in range(palette.N) if i not in grey]
    out = {}
    for config, record in precisions.items():
        family = family_of(record)
        colour = (0.0, 0.0, 0.0, 1.0) if config == BASELINE else colours[others.index(config) % len(colours)]
        eight_bit = record.get("optimizer") == "adamw_8bit"
        out[config] = Style(family, colour, "--" if eight_bit else "-", "//" if eight_bit else "",
                            _FAMILY_MARKERS.get(family, "D"), eight_bit)
    return out