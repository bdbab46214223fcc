"""`dtype-bench`: one command for the project, in the style of `tune run` / `litgpt finetune`.

    dtype-bench configs                                        the precision registry as a table
    dtype-bench prepare [classification|lm] --source ... --output_dir ...
    dtype-bench run [classification|lm] --config amp_bf16 --preset tiny
    dtype-bench analyze --results_dir results/classification
    dtype-bench compare --lm_results results/lm --cls_results results/classification --output_dir results/comparison
    dtype-bench bench [trainer|loader] --preset tiny
    dtype-bench forecast [classification|lm] --config all --preset tiny [--forecast 0.1]

The experiment defaults to classification. Every subcommand but `configs` calls the `main(argv)` of the script
the plan's commands run (experiments/<experiment>/run.py, analysis/analyze_experiment.py, ...; installed as
the packages experiments, analysis and benchmarks) with the flags as
given, so `dtype-bench run --config amp_bf16 --seed 0` and `python experiments/classification/run.py --config
amp_bf16 --seed 0` are the same code and write the same rows. `dtype-bench <subcommand> --help` lists the flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

# subcommand -> (target -> module of the script the plan's commands run); the first target is the default
SCRIPTS: dict[str, dict[str, str]] = {
    "prepare": {"classification": "experiments.classification.prepare_data",
                "lm": "experiments.lm.prepare_data"},
    "run": {"classification": "experiments.classification.run", "lm": "experiments.lm.run"},
    "analyze": {"": "analysis.analyze_experiment"},
    "compare": {"": "analysis.compare_experiments"},
    "bench": {"trainer": "benchmarks.vs_hf_trainer", "loader": "benchmarks.loader"},
}
SUMMARIES = {
    "configs": "print the precision registry: dtypes, loss scaling, optimizer, what each config needs",
    "prepare": "prepare a dataset cache (classification: EURLEX57K; lm: OpenWebText)",
    "run": "train configs x seeds (classification or lm) and append results rows",
    "analyze": "summary.csv/.parquet, plots and report.md for one experiment's results",
    "compare": "cross-task comparison of the classification and LM results",
    "bench": "benchmarks: our loop vs the Hugging Face Trainer (trainer), data-loader throughput (loader)",
    "forecast": "train each config (and fp32) for the first --forecast fraction of max_steps (default 0.1) and "
                "predict its outcome [classification|lm; default classification]",
}


# ---------------------------------------------------------------- `dtype-bench configs`

# The hardware a config's boolean feature needs beyond a CPU (its packages: precision.optional_packages; whether it
# runs on this machine: precision.unsupported_reason).
FEATURE_HARDWARE = {"tf32": "CUDA cc >= 8.0", "fp8": "CUDA cc >= 8.9"}
NOT_COLUMNS = ("name", "description")


def _cell(value) -> str:
    import torch

    from dtype_bench.precision import dtype_name

    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return "-" if value is None else str(value)


def registry_table(device_spec: str = "auto") -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per PrecisionConfig field (whatever fields it has), the dtype most matmuls run
    in, what the config needs beyond a CPU and whether it runs on `device_spec`."""
    from dtype_bench import precision
    from dtype_bench.runner import pick_device

    device = pick_device(device_spec)
    fields = [f.name for f in dataclasses.fields(precision.PrecisionConfig) if f.name not in NOT_COLUMNS]
    header = ["config", *fields, "compute_dtype", "needs", f"runs on {device}"]
    rows = []
    for pc in precision.REGISTRY.values():
        needs = [hw for feature, hw in FEATURE_HARDWARE.items() if getattr(pc, feature, False)]
        needs += sorted({dist for _, dist, _ in precision.optional_packages(pc)})
        reason = precision.unsupported_reason(pc, device)
        rows.append([pc.name, *(_cell(getattr(pc, f)) for f in fields), _cell(pc.compute_dtype),
                     ", ".join(needs) or "-", "yes" if reason is None else f"no: {reason}"])
    return header, rows


def format_table(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def summary_table(header: list[str], rows: list[list[str]], width: int) -> str:
    """The registry in `width` columns: name, compute dtype, whether it runs here, and the description wrapped
    into what is left."""
    import textwrap

    from dtype_bench import precision

    descriptions = {pc.name: pc.description for pc in precision.REGISTRY.values()}
    keep = [header.index("config"), header.index("compute_dtype"), len(header) - 1]
    cells = [[row[i] if i != len(header) - 1 else row[i].split(":")[0] for i in keep] for row in rows]
    widths = [max(len(line[i]) for line in [[header[k] for k in keep], *cells]) for i in range(len(keep))]
    left = sum(widths) + 2 * len(widths)
    text_width = max(30, width - left)
    lines = ["  ".join(h.ljust(w) for h, w in zip([header[k] for k in keep], widths)) + "  description"]
    lines.append("-" * min(width, left + text_width))
    for row, line in zip(rows, cells):
        wrapped = textwrap.wrap(descriptions[row[0]], text_width) or [""]
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + wrapped[0])
        lines += [" " * left + more for more in wrapped[1:]]
    return "\n".join(lines)


def configs_main(argv: list[str]) -> int:
    import shutil
    import textwrap

    from dtype_bench import precision
    from dtype_bench.configs import HelpFormatter, field_docs

    parser = argparse.ArgumentParser(prog="dtype-bench configs", formatter_class=HelpFormatter,
                                     description="The precision registry (dtype_bench/precision.py): one row per "
                                                 "config with what it does and whether it runs here; --wide adds "
                                                 "one column per PrecisionConfig field.")
    parser.add_argument("--format", choices=("text", "markdown"), default="text", help="table layout")
    parser.add_argument("--wide", action="store_true", help="one column per PrecisionConfig field (wider than a "
                                                            "terminal: for a pager or a file)")
    parser.add_argument("--device", default="auto", help="device the `runs on` column checks")
    parser.add_argument("--explain", action="store_true", help="also print each column's and config's meaning")
    args = parser.parse_args(argv)
    header, rows = registry_table(args.device)
    groups = "groups: " + "; ".join(f"{g} = {', '.join(names)}" for g, names in precision.GROUPS.items())
    if args.wide or args.format == "markdown":
        print(format_table(header, rows, args.format))
        print(f"\n{groups}")
    else:
        width = shutil.get_terminal_size((120, 24)).columns
        print(summary_table(header, rows, width))
        reasons = [f"{row[0]}: {row[-1].removeprefix('no: ')}" for row in rows if row[-1] != "yes"]
        if reasons:
            print(f"\nnot on {header[-1].removeprefix('runs on ')}:")
            for reason in reasons:
                print(textwrap.fill(reason, width, initial_indent="  ", subsequent_indent="      "))
        print("\n" + textwrap.fill(groups, width, subsequent_indent="  "))
    if args.explain:
        print("\ncolumns:")
        for name, doc in field_docs(precision.PrecisionConfig).items():
            if name not in NOT_COLUMNS:
                print(f"  {name}: {doc}")
        print("\nconfigs:")
        for pc in precision.REGISTRY.values():
            print(f"  {pc.name}: {pc.description}")
    return 0


# ---------------------------------------------------------------- dispatch


def version() -> str:
    """The installed distribution's version, else pyproject.toml's (a clone that was never installed)."""
    import importlib.metadata
    import tomllib
    from pathlib import Path

    try:
        return importlib.metadata.version("dtype-bench")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def usage() -> str:
    lines = [__doc__.split("\n\n")[0], "", "usage: dtype-bench <subcommand> [target] [flags]", "", "subcommands:"]
    for name, text in SUMMARIES.items():
        targets = [t for t in SCRIPTS.get(name, {}) if t]
        lines.append(f"  {name:<8} {text}" + (f" [{'|'.join(targets)}; default {targets[0]}]" if targets else ""))
    lines += ["", "`dtype-bench <subcommand> --help` lists the subcommand's flags with their meaning and defaults;",
              "`dtype-bench --version` prints the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        print(f"dtype-bench {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "configs":
        return configs_main(rest)
    if command == "forecast":  # run.py's flags, then the table (analysis/forecast.py)
        target = rest[0] if rest[:1] and rest[0] in SCRIPTS["run"] else next(iter(SCRIPTS["run"]))
        rest = rest[1:] if rest[:1] == [target] else rest
        sys.argv = [f"dtype-bench forecast {target}", *rest]
        return importlib.import_module("analysis.forecast").forecast_command(target, rest)
    if command not in SCRIPTS:
        print(f"dtype-bench: unknown subcommand {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    targets = SCRIPTS[command]
    target = rest[0] if rest and rest[0] in targets else next(iter(targets))
    if rest and rest[0] == target:
        rest = rest[1:]
    sys.argv = [f"dtype-bench {command}" + (f" {target}" if target else ""), *rest]  # argparse's prog
    return importlib.import_module(targets[target]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
