"""analysis/verdicts.py: the error rates and powers it claims, measured by simulation, and results with a known truth
read through analysis/analyze_experiment.py and analysis/compare_experiments.py as a user would."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysis import analyze_experiment, compare_experiments, experiment_data, hypotheses, stats, verdicts
from dtype_bench import precision

ALPHA = 0.05


def simulation_bound(rate: float, sims: int) -> float:
    """The nominal rate plus three binomial standard errors of a rate estimated from `sims` simulations."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / sims)


def rows_of(config: str, values, *, key: str = "micro_f1", status=None, device: str = "cuda", extra=None) -> list[dict]:
    """One row per seed; `status` (seed -> status) marks diverged runs, which carry no quality."""
    out = []
    for seed, value in enumerate(values):
        state = (status or {}).get(seed, "completed")
        row = {"config": config, "seed": seed, "status": state, "env": {"device": device}}
        if state == "completed":
            row.update({key: float(value), **{k: float(v[seed]) for k, v in (extra or {}).items()}})
        else:
            row["diverged_at_step"] = 3
        out.append(row)
    return out


def experiment(rows: list[dict], name: str = "classification") -> experiment_data.Experiment:
    return experiment_data.Experiment(name, Path(name), rows, [], {})


# ---------------------------------------------------------------- Holm


def test_holm_adjusted_p_rejects_exactly_what_the_step_down_rejects():
    rng = np.random.default_rng(4)
    for _ in range(200):
        p = {i: float(x) for i, x in enumerate(rng.uniform(0, 0.08, rng.integers(1, 12)))}
        adjusted = stats.holm(p, ALPHA)
        rejected, order = set(), sorted(p, key=p.get)
        for i, key in enumerate(order):  # the textbook step-down, independently
            if p[key] > ALPHA / (len(p) - i):
                break
            rejected.add(key)
        assert {k for k, (a, _) in adjusted.items() if a <= ALPHA} == rejected
        assert [adjusted[k][1] for k in order] == pytest.approx([ALPHA / (len(p) - i) for i in range(len(p))])


# ---------------------------------------------------------------- false alarms and power, by simulation


def null_table(rng: np.random.Generator, configs: int = 16, seeds: int = 3) -> experiment_data.Experiment:
    """Every config identical to fp32: the same seed effect (data order, initialisation) plus run noise."""
    seed_effect = rng.normal(0.5, 0.02, seeds)
    rows = []
    for config in ["fp32_baseline"] + [f"config_{i}" for i in range(configs)]:
        rows += rows_of(config, seed_effect + rng.normal(0, 0.005, seeds))
    return experiment(rows)


def test_with_every_config_identical_to_fp32_false_quality_losses_stay_within_alpha():
    """600 tables of 16 configs x 3 seeds, all identical to fp32: the share of tables with at least one "quality
    loss" or "small loss" verdict is at most 5% (+ simulation error); uncorrected tests would raise one in about a
    third of them, which the same simulation measures (so the check can fail)."""
    rng, sims = np.random.default_rng(20), 600
    false_loss = false_any = uncorrected = 0
    for _ in range(sims):
        table = verdicts.table(null_table(rng), "micro_f1")
        kinds = {v.kind for v in table.values()}
        false_loss += bool(kinds & {"loss", "small_loss"})
        false_any += bool(kinds & {"loss", "small_loss", "gain", "small_gain"})
        uncorrected += any(v.p.get("loss", 1.0) <= ALPHA for v in table.values())
    assert false_loss / sims <= simulation_bound(ALPHA, sims), false_loss / sims
    assert false_any / sims <= simulation_bound(2 * ALPHA, sims)  # loss and gain: each kind at most alpha
    assert uncorrected / sims > 0.25


def test_the_frontier_claim_is_refuted_at_most_alpha_when_nothing_dominates():
    """amp_bf16 and 6 other configs identical in quality and throughput (4 seeds): nothing dominates amp_bf16, so
    a "dominated by" refutation is a false alarm; Holm over the others keeps it at most 5% (+ simulation error)."""
    rng, sims = np.random.default_rng(21), 300
    h4 = next(h for h in hypotheses.HYPOTHESES if h.key == "H4")
    claim = h4.claims[0]
    assert claim.kind == "on_frontier"
    refuted = 0
    for _ in range(sims):
        seed_q, seed_t = rng.normal(0.5, 0.02, 4), rng.normal(1000, 30, 4)
        rows = []
        for config in ("amp_bf16", "fp32_baseline", "amp_fp16", "bf16_naive", "bf16_sr_fp32_moments",
                       "amp_bf16_fp32_head", "fp32_tf32_matmul"):
            rows += rows_of(config, seed_q + rng.normal(0, 0.005, 4),
                            extra={"samples_per_second": seed_t + rng.normal(0, 10, 4)})
        refuted += hypotheses.evaluate_claim(experiment(rows), h4, claim)["outcome"] == "refuted"
    assert refuted / sims <= simulation_bound(ALPHA, sims), refuted / sims


@pytest.mark.parametrize("goal, delta, sd", [("difference", -0.004, 0.005), ("equivalence", 0.001, 0.006)])
def test_seeds_for_80_percent_power_have_that_power_in_simulation(goal, delta, sd):
    """The n that seeds_for_power names, with the observed difference and spread taken as the truth: 2,000
    simulated paired experiments at that n reject (one-sided test / TOST at the planned level) as often as the
    computed power says (within 3 standard errors), and at least 80% of the time (within simulation error)."""
    rng = np.random.default_rng(22)
    observed = stats.Comparison(delta, 3, True, "paired t", None, None, None, None, None, 0.01, spreads=(sd,))
    level = ALPHA / 4
    n, power = observed.seeds_for_power(goal, level)
    assert n > 3 and power >= 0.8
    assert observed.power(goal, n - 1, level) < 0.8  # the smallest such n
    sims, rejected = 2000, 0
    for _ in range(sims):
        reference = rng.normal(0.5, 0.02, n)
        c = stats.compare(dict(enumerate(reference + delta + rng.normal(0, sd, n))), dict(enumerate(reference)),
                          margin=0.01)
        rejected += (c.p_worse if goal == "difference" else c.p_equivalent) <= level
    se = math.sqrt(power * (1 - power) / sims)
    assert abs(rejected / sims - power) <= 3 * se + 0.005, (rejected / sims, power)
    assert rejected / sims >= 0.8 - 3 * se


def test_difference_power_is_scipy_noncentral_t():
    observed = stats.Comparison(-0.004, 3, True, "paired t", None, None, None, None, None, 0.01, spreads=(0.005,))
    n, level = 9, 0.0125
    critical = scipy_stats.t.ppf(1 - level, n - 1)
    want = scipy_stats.nct.sf(critical, n - 1, 0.004 / (0.005 / math.sqrt(n)))
    assert observed.power("difference", n, level) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- known truth through the scripts


SEEDS = 6
FP32 = 0.25 + 0.01 * np.sin(np.arange(SEEDS))  # the seed effect
TRUTH = {  # micro-F1 (= macro-F1) per config and seed, and which seeds diverged
    "fp32_baseline": (FP32, {}),
    # a certain loss of 1.5% of fp32's mean, inside the ±2% margin
    "amp_bf16": (FP32 - 0.015 * FP32.mean() + 1e-5 * np.cos(np.arange(SEEDS)), {}),
    # half the seeds diverge; the survivors equal fp32
    "bf16_naive": (FP32, {0: "diverged", 2: "diverged", 4: "diverged"}),
    "bf16_sr_fp32_moments": (FP32 + 1e-4 * np.cos(np.arange(SEEDS)), {}),
    "fp16_naive": (FP32 - 0.1, {}),
}


def write_results(path: Path, task: str) -> Path:
    path.mkdir(parents=True)
    rows = []
    for config, (values, status) in TRUTH.items():
        for seed in range(SEEDS):
            state = status.get(seed, "completed")
            row = {"experiment": task, "run_id": f"{task}-{config}-seed{seed}-abcdef12", "config": config,
                   "seed": seed, "status": state, "setup_fingerprint": "abcdef12" * 8,
                   "peak_memory_gb": 1.0, "peak_memory_kind": "cuda_max_allocated", "steps": 10,
                   "precision": precision.get(config).to_record(), "train_config": {"max_steps": 10},
                   "env": {"device": "cuda:0"}}
            if state == "completed":
                quality = float(values[seed])
                row.update({"samples_per_second": 100.0 + seed, "tokens_per_second": 1000.0 + seed}
                           | ({"micro_f1": quality, "macro_f1": quality} if task == "classification"
                              else {"val_loss": 3.0 - quality}))
            else:
                row.update(diverged_at_step=4, nonfinite_origin="optimizer:encoder")
            rows.append(row)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("known")
    cls, lm = write_results(base / "classification", "classification"), write_results(base / "lm", "lm")
    assert compare_experiments.main(["--lm_results", str(lm), "--cls_results", str(cls), "--output_dir",
                                     str(base / "comparison")]) == 0
    assert analyze_experiment.main(["--results_dir", str(cls)]) == 0
    return {"report": (cls / "analysis" / "report.md").read_text(),
            "comparison": json.loads((base / "comparison" / "comparison.json").read_text()),
            "comparison_report": (base / "comparison" / "report.md").read_text()}


def first_screen(report: str) -> dict[str, list[str]]:
    start = report.index("## Which config should I use")
    table = [line for line in report[start:report.index("\n## ", start + 1)].splitlines() if line.startswith("| ")]
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}


def test_a_certain_loss_inside_the_margin_reads_as_one(known):
    cells = first_screen(known["report"])
    assert cells["amp_bf16"][0] == "small loss inside the margin: -1.50%, significant"
    assert "one-sided Holm p=" in cells["amp_bf16"][1]
    assert cells["bf16_sr_fp32_moments"][0] == "equivalent within ±2% (TOST)"
    assert cells["fp16_naive"][0].startswith("quality loss: -")
    assert "no quality loss" not in known["report"] and "no quality loss" not in known["comparison_report"]
    # H1 (classification, macro-F1): amp_bf16 is worse, supported, as the table says
    h1 = known["comparison"]["verdicts"]["H1 output-layer precision"]["tasks"]["classification"]["claims"][0]
    assert h1["outcome"] == "supported" and h1["reason"].startswith("small loss inside the margin: -1.50%")


def test_divergences_never_read_as_equivalent_or_as_refuting_a_loss(known):
    cells = first_screen(known["report"])
    assert cells["bf16_naive"][0].startswith("unstable: 3 of 6 runs diverged")
    assert "with divergences counted Holm p=" in cells["bf16_naive"][1]
    assert "Fisher test of 3/6 vs 0/6 diverged" in cells["bf16_naive"][1]
    h4 = known["comparison"]["verdicts"]["H4 the frontier"]
    for task in ("classification", "lm"):
        worse = h4["tasks"][task]["claims"][1]
        assert "`bf16_naive` is worse" in worse["claim"] and worse["outcome"] == "inconclusive"
        assert worse["statistic"]["p_raw"]["loss"] == pytest.approx(  # Bonferroni: survivors' t and Fisher
            min(1.0, 2 * min(worse["statistic"]["p_worse"],
                             scipy_stats.fisher_exact([[3, 3], [0, 6]], alternative="greater").pvalue)))
    universal = " ".join(known["comparison"]["recommendations"]["universal"])
    assert "bf16_naive" not in universal and "bf16_sr_fp32_moments stays within the margin" in universal


def test_the_table_the_hypotheses_and_plan_agree(known):
    """Every quality claim on the table's metric against fp32 carries the table's verdict, and its outcome is what
    that verdict says; PLAN.md states the same decision rule."""
    cells = first_screen(known["report"])
    expected = {"worse": {"small_loss": "supported", "loss": "supported", "equivalent": "refuted",
                          "unstable": "inconclusive"},
                "equivalent": {"equivalent": "supported", "small_loss": "supported", "unstable": "inconclusive",
                               "loss": "refuted"}}
    checked = 0
    for h in hypotheses.HYPOTHESES:
        result = known["comparison"]["verdicts"][f"{h.key} {h.title}"]
        for task in h.tasks:
            if h.metric.get(task) != experiment_data.PRIMARY_QUALITY[task]:
                continue
            for claim, outcome in zip(h.claims, result["tasks"][task]["claims"]):
                if claim.kind in expected and claim.reference == "fp32_baseline" and task == "classification":
                    assert outcome["reason"].startswith(cells[claim.config][0]), (claim, outcome["reason"])
                    assert outcome["outcome"] == expected[claim.kind][outcome["statistic"]["verdict"]]
                    checked += 1
    assert checked == 2  # H4: bf16_naive worse, bf16_sr_fp32_moments equivalent
    plan = " ".join(hypotheses.PLAN.read_text().split())
    assert " ".join(verdicts.decision_rule().split()) in plan
    first = known["report"][known["report"].index("## Which config"):known["report"].index("## Summary")]
    assert " ".join(verdicts.decision_rule().split()) in " ".join(first.split())
    assert re.search(r"Here: \d+ comparisons in the family", first)


def test_random_results_keep_the_table_and_the_claims_consistent():
    """Across random results (loss, small loss, equivalence, noise, divergences), a claim against fp32 never says
    the opposite of the table: a shown loss is never refuted, a config with divergences is never equivalent."""
    rng = np.random.default_rng(23)
    h4 = next(h for h in hypotheses.HYPOTHESES if h.key == "H4")
    worse, equivalent = h4.claims[1], h4.claims[2]
    for _ in range(60):
        n = int(rng.integers(3, 7))
        fp32 = rng.normal(0.5, 0.02, n)
        rows = rows_of("fp32_baseline", fp32)
        for config in ("bf16_naive", "bf16_sr_fp32_moments"):
            shift, noise = rng.choice([0.0, -0.007, -0.05, 0.004]), rng.choice([1e-4, 0.003, 0.03])
            diverged = {s: "diverged" for s in range(n) if rng.random() < 0.2}
            rows += rows_of(config, fp32 + shift + rng.normal(0, noise, n), status=diverged)
        exp = experiment(rows)
        table = verdicts.table(exp, "micro_f1", hypotheses.quality_pairs("micro_f1", "classification"))
        for claim in (worse, equivalent):
            v = table[claim.config, "fp32_baseline"]
            outcome = hypotheses.evaluate_claim(exp, h4, claim)["outcome"]
            if v.kind in ("loss", "small_loss"):
                assert outcome == ("supported" if claim.kind == "worse" or v.kind == "small_loss" else
                                   outcome)  # a loss beyond the margin may also refute equivalence
                assert claim.kind == "equivalent" or outcome == "supported"
            if v.kind == "unstable":
                assert not (claim.kind == "worse" and outcome == "refuted")
                assert not (claim.kind == "equivalent" and outcome == "supported")
            if v.kind == "equivalent":
                assert outcome == ("refuted" if claim.kind == "worse" else "supported")
            if v.kind == "undecided":
                assert outcome == "inconclusive"


def test_identical_seed_pairs_say_why_the_interval_is_a_point():
    fp32 = (0.50, 0.51, 0.52)
    exp = experiment(rows_of("fp32_baseline", fp32) + rows_of("amp_fp16", fp32) + rows_of("amp_bf16", (0.501, 0.509, 0.52)))
    decided = verdicts.table(exp, "micro_f1")
    same, close = decided[("amp_fp16", "fp32_baseline")], decided[("amp_bf16", "fp32_baseline")]
    assert same.kind == "equivalent" and "the paired differences are all equal" in same.evidence("equivalence")
    assert "all equal" not in close.evidence("equivalence")
