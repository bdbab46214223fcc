"""analysis/hypotheses.py and stats.compare: every statistic against scipy, and the verdict of each hypothesis on
synthetic results built for each case (clear effect, clear equivalence, noise, one seed, all diverged)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats


from analysis import analyze_experiment, experiment_data, hypotheses, stats, verdicts

H = {h.key: h for h in hypotheses.HYPOTHESES}
ALPHA = 0.05


# ---------------------------------------------------------------- synthetic results


def runs(config: str, n: int = 3, status: str = "completed", device: str = "cuda", **metrics) -> list[dict]:
    """n seeds of one config; a diverged/failed run carries no quality metric, as the real rows do."""
    rows = []
    for seed in range(n):
        row = {"config": config, "seed": seed, "status": status, "env": {"device": device}}
        if status == "completed":
            row.update({k: (v if isinstance(v, dict) else float(np.asarray(v)[seed])) for k, v in metrics.items()})
        elif status == "diverged":
            row["diverged_at_step"] = 2
        rows.append(row)
    return rows


def task_rows(task: str, config: str, n: int = 3, status: str = "completed", device: str = "cuda", *,
              quality=None, throughput=None, memory=None, state_bytes=None) -> list[dict]:
    """The same synthetic outcome in either experiment's metrics: classification's F1 (higher is better) or the
    LM's validation loss (lower is better, = 3 - quality)."""
    metrics = {}
    if quality is not None:
        q = np.asarray(quality, dtype=float)
        metrics.update({"micro_f1": q, "macro_f1": q} if task == "classification" else {"val_loss": 3.0 - q})
    if throughput is not None:
        metrics["samples_per_second" if task == "classification" else "tokens_per_second"] = throughput
    if memory is not None:
        metrics["peak_memory_gb"] = memory
    if state_bytes is not None:
        metrics["static_memory_bytes"] = {"optimizer_state": {"encoder": state_bytes, "head": state_bytes / 10}}
    return runs(config, n, status, device, **metrics)


def experiment(task: str, rows: list[dict]):
    return experiment_data.Experiment(task, Path(task), rows, [], {})


def both(build) -> dict:
    """task -> Experiment from build(task) -> rows."""
    return {task: experiment(task, build(task)) for task in ("classification", "lm")}


def paired(n: int, delta: float, noise: float, seed: int = 0, base: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(reference, config) over n seeds sharing a seed effect: config = reference + delta + noise."""
    rng = np.random.default_rng(seed)
    reference = base + rng.normal(0, 0.02, n)
    return reference, reference + delta + rng.normal(0, noise, n)


def claims(result: dict, task: str) -> list[dict]:
    return result["tasks"][task]["claims"]


# ---------------------------------------------------------------- statistics against scipy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_comparison_matches_scipy(seed):
    b, a = paired(6, -0.01, 0.01, seed)
    margin = 0.02 * b.mean()
    c = stats.compare(dict(enumerate(a)), dict(enumerate(b)), margin=margin)
    d = a - b
    assert c.paired and c.n == 6 and c.delta == pytest.approx(d.mean())
    assert c.p_worse == pytest.approx(scipy_stats.ttest_rel(a, b, alternative="less").pvalue, rel=1e-9)
    assert c.p_better == pytest.approx(scipy_stats.ttest_rel(a, b, alternative="greater").pvalue, rel=1e-9)
    tost = max(scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue,
               scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue)
    assert c.p_equivalent == pytest.approx(tost, rel=1e-9)
    beyond = min(scipy_stats.ttest_1samp(d, -margin, alternative="less").pvalue,
                 scipy_stats.ttest_1samp(d, margin, alternative="greater").pvalue)
    assert c.p_beyond == pytest.approx(beyond, rel=1e-9)
    for alpha in (ALPHA, ALPHA / 7):  # the interval at a Holm step's level decides that step's tests
        lo, hi = scipy_stats.t.interval(1 - 2 * alpha, 5, loc=d.mean(), scale=scipy_stats.sem(d))
        assert c.interval(alpha) == (pytest.approx(lo), pytest.approx(hi))
        assert (c.p_equivalent <= alpha) == (-margin < lo and hi < margin) and (c.p_worse <= alpha) == (hi < 0)
    # lower is better (a loss): oriented so that positive = better
    low = stats.compare(dict(enumerate(a)), dict(enumerate(b)), margin=margin, higher_is_better=False)
    assert low.p_better == pytest.approx(scipy_stats.ttest_rel(a, b, alternative="less").pvalue, rel=1e-9)
    assert low.delta == pytest.approx(-d.mean())


def test_welch_comparison_when_the_seeds_differ_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.48, 0.01, 4), rng.normal(0.5, 0.03, 5)
    margin = 0.01
    c = stats.compare({10 + i: v for i, v in enumerate(a)}, dict(enumerate(b)), margin=margin)
    assert not c.paired and c.test == "Welch t" and c.n == 4
    welch = lambda x, y, alt: scipy_stats.ttest_ind(x, y, equal_var=False, alternative=alt).pvalue  # noqa: E731
    assert c.p_worse == pytest.approx(welch(a, b, "less"), rel=1e-9)
    assert c.p_better == pytest.approx(welch(a, b, "greater"), rel=1e-9)
    assert c.p_equivalent == pytest.approx(max(welch(a + margin, b, "greater"), welch(a - margin, b, "less")), rel=1e-9)


def test_one_seed_and_too_few_seeds_decide_nothing():
    one = stats.compare({0: 0.1}, {0: 0.9}, margin=0.01)
    assert one.n == 1 and one.interval(ALPHA) == (None, None) and one.p_worse is None and not one.tested
    b, a = paired(2, -0.3, 0.0001)
    two = stats.compare(dict(enumerate(a)), dict(enumerate(b)), margin=0.01)
    assert two.p_worse < ALPHA and not two.tested  # significant at n=2, yet below MIN_SEEDS: no decision
    rows = (task_rows("classification", "fp32_baseline", 2, quality=b)
            + task_rows("classification", "amp_bf16", 2, quality=a))
    verdict = verdicts.table(experiment("classification", rows), "micro_f1")["amp_bf16", "fp32_baseline"]
    assert verdict.kind == "undecided" and verdict.family == 0 and "n=2" in verdict.label


@pytest.mark.parametrize("table", [(3, 0, 0, 3), (2, 1, 0, 3), (5, 0, 1, 4), (0, 3, 3, 0), (4, 2, 1, 6)])
def test_exact_test_wrappers_match_the_exact_distributions(table):
    """stats.fisher_more / binomial_below_half (scipy) against the hypergeometric and binomial tails summed here."""
    div_a, done_a, div_b, done_b = table
    na, nb = div_a + done_a, div_b + done_b
    diverged, total = div_a + div_b, na + nb
    tail = sum(math.comb(diverged, k) * math.comb(total - diverged, na - k)
               for k in range(div_a, min(na, diverged) + 1)) / math.comb(total, na)
    assert stats.fisher_more((div_a, done_a), (div_b, done_b)) == pytest.approx(tail, rel=1e-12)
    below = sum(math.comb(na, k) for k in range(div_a + 1)) / 2 ** na
    assert stats.binomial_below_half(div_a, na) == pytest.approx(below, rel=1e-12)


def test_plan_states_the_hypotheses_as_defined():
    plan = hypotheses.PLAN.read_text()
    assert hypotheses.plan_section() in plan, "run: python analysis/hypotheses.py --write_plan"
    for h in hypotheses.HYPOTHESES:
        assert f"**{h.key} – {h.title}.**" in plan
        for claim in h.claims:
            assert f"`{claim.config}`" in plan


# ---------------------------------------------------------------- H1


def h1_experiments(n: int, bf16_delta: float, head_delta: float, noise: float, head_status: str = "completed"):
    fp32, bf16 = paired(n, bf16_delta, noise, seed=1)
    _, head = paired(n, head_delta, noise, seed=1)
    rows = (task_rows("classification", "fp32_baseline", n, quality=fp32)
            + task_rows("classification", "amp_bf16", n, quality=bf16)
            + task_rows("classification", "amp_bf16_fp32_head", n, head_status, quality=head))
    lm = (task_rows("lm", "fp32_baseline", n, quality=fp32) + task_rows("lm", "amp_bf16", n, quality=fp32)
          + task_rows("lm", "amp_bf16_fp32_head", n, quality=fp32 - 0.3))  # the LM says the opposite
    return {"classification": experiment("classification", rows), "lm": experiment("lm", lm)}, fp32, bf16


def test_h1_clear_effect_is_supported_on_classification_whatever_the_lm_says():
    exps, fp32, bf16 = h1_experiments(5, bf16_delta=-0.05, head_delta=0.0, noise=0.001)
    result = hypotheses.evaluate(H["H1"], exps)
    assert result["verdict"] == "supported"
    worse, equivalent = claims(result, "classification")
    assert worse["outcome"] == equivalent["outcome"] == "supported"
    assert worse["statistic"]["metric"] == "macro_f1"
    assert worse["statistic"]["p_worse"] == pytest.approx(
        scipy_stats.ttest_rel(bf16, fp32, alternative="less").pvalue, rel=1e-9)
    assert not result["tasks"]["lm"]["decides"] and result["tasks"]["lm"]["verdict"] == "refuted"


def test_h1_refuted_when_amp_bf16_is_shown_equivalent():
    exps, _, _ = h1_experiments(5, bf16_delta=0.0, head_delta=0.0, noise=0.001)
    result = hypotheses.evaluate(H["H1"], exps)
    assert result["verdict"] == "refuted"
    assert claims(result, "classification")[0]["outcome"] == "refuted"
    assert claims(result, "classification")[0]["reason"].startswith("equivalent within ±2% (TOST)")


def test_h1_noise_is_inconclusive_with_n_interval_and_seeds_needed():
    exps, _, _ = h1_experiments(3, bf16_delta=-0.01, head_delta=0.0, noise=0.05)
    result = hypotheses.evaluate(H["H1"], exps)
    assert result["verdict"] == "inconclusive"
    for claim in claims(result, "classification"):
        assert claim["outcome"] == "inconclusive" and claim["reason"].startswith("undecided (n=3; ~")
        assert "% CI)" in claim["reason"] and "80% power" in claim["settle"]


def test_h1_one_seed_is_inconclusive_even_with_a_large_effect():
    exps, _, _ = h1_experiments(1, bf16_delta=-0.2, head_delta=0.0, noise=0.0)
    result = hypotheses.evaluate(H["H1"], exps)
    assert result["verdict"] == "inconclusive"
    assert all(c["reason"].startswith("undecided (n=1; at least 3 completed seeds") for c in
               claims(result, "classification"))


def test_h1_head_diverging_in_every_run_refutes_matching_fp32():
    """5 of 5 diverged against 5 completed: Fisher p = 1/252, Bonferroni-combined with no completed runs (the
    Fisher test alone), Holm over the family: beyond the margin, so not equivalent."""
    exps, _, _ = h1_experiments(5, bf16_delta=-0.05, head_delta=0.0, noise=0.001, head_status="diverged")
    result = hypotheses.evaluate(H["H1"], exps)
    assert result["verdict"] == "refuted"
    head = claims(result, "classification")[1]
    assert head["reason"].startswith("unstable: 5 of 5 runs diverged; quality loss with divergences counted")
    assert head["statistic"]["p_raw"]["beyond"] == pytest.approx(
        scipy_stats.fisher_exact([[5, 0], [0, 5]], alternative="greater").pvalue)
    # three diverged runs: Fisher p = 0.05 alone, 0.1 after Holm over the two comparisons: not decided
    exps, _, _ = h1_experiments(3, bf16_delta=-0.05, head_delta=0.0, noise=0.001, head_status="diverged")
    assert claims(hypotheses.evaluate(H["H1"], exps), "classification")[1]["outcome"] == "inconclusive"


# ---------------------------------------------------------------- H2


def h2_rows(task: str, n: int, naive: str, control: str = "completed", origin: str = "optimizer:encoder"
            ) -> list[dict]:
    """fp16_naive (status `naive`, its diverged runs' first non-finite value in `origin`) and the two controls."""
    q = np.full(n, 0.5)
    rows = task_rows(task, "fp16_naive", n, naive, quality=q)
    for row in rows:
        if row["status"] == "diverged":
            row["nonfinite_origin"] = origin
    return rows + task_rows(task, "amp_fp16", n, quality=q) + task_rows(task, "fp16_fp32_adam_states", n, control,
                                                                        quality=q)


def test_h2_fp16_naive_failing_in_both_tasks_in_the_optimizer_is_what_plan_predicts():
    result = hypotheses.evaluate(H["H2"], both(lambda task: h2_rows(task, 5, "diverged")))
    assert result["verdict"] == "supported", result["reason"]
    for task in ("classification", "lm"):
        *divergence, mechanism = claims(result, task)
        for claim in divergence:
            want = scipy_stats.fisher_exact([[5, 0], [0, 5]], alternative="greater").pvalue
            assert claim["statistic"]["fisher_p_more"] == pytest.approx(want) and claim["outcome"] == "supported"
        assert mechanism["outcome"] == "supported" and mechanism["statistic"]["optimizer_first"] == 5
        assert mechanism["statistic"]["binomial_p_optimizer_most"] == pytest.approx(
            scipy_stats.binomtest(5, 5, 0.5, alternative="greater").pvalue)


def test_h2_mechanism_is_tested_from_the_first_nonfinite_origin():
    """Divergences alone do not support H2: its mechanism (the optimizer update goes non-finite first) is a claim."""
    backward = hypotheses.evaluate(H["H2"], both(lambda task: h2_rows(task, 5, "diverged", origin="backward:head")))
    assert backward["verdict"] == "refuted" and "mostly elsewhere" in claims(backward, "classification")[2]["reason"]
    three = hypotheses.evaluate(H["H2"], both(lambda task: h2_rows(task, 3, "diverged")))
    mechanism = claims(three, "classification")[2]
    assert three["verdict"] == "inconclusive" and mechanism["outcome"] == "inconclusive"
    assert mechanism["reason"].startswith("3 of 3 diverged runs") and "about 5 diverged runs" in mechanism["settle"]
    unrecorded = hypotheses.evaluate(H["H2"], both(lambda task: h2_rows(task, 5, "diverged", origin="")))
    assert "with a recorded origin" in claims(unrecorded, "lm")[2]["reason"]


def test_h2_one_seed_is_inconclusive():
    result = hypotheses.evaluate(H["H2"], both(lambda task: h2_rows(task, 1, "diverged")))
    assert result["verdict"] == "inconclusive" and "finished runs (< 3)" in result["reason"]


def test_h2_refuted_when_fp16_naive_completes_in_most_runs():
    result = hypotheses.evaluate(H["H2"], both(lambda task: h2_rows(task, 5, "completed" if task == "lm" else
                                                                    "diverged")))
    assert result["verdict"] == "refuted"
    assert result["tasks"]["classification"]["verdict"] == "supported"
    assert "completes in most runs" in claims(result, "lm")[0]["reason"]


def test_h2_all_diverged_including_the_controls_is_inconclusive():
    result = hypotheses.evaluate(H["H2"], both(lambda task: h2_rows(task, 5, "diverged", control="diverged")))
    outcomes = [c["outcome"] for c in claims(result, "classification")]
    assert outcomes == ["supported", "inconclusive", "supported"] and result["verdict"] == "inconclusive"
    assert claims(result, "classification")[1]["statistic"]["fisher_p_more"] == 1.0


# ---------------------------------------------------------------- H3


def h3_rows(task: str, n: int, delta: float, noise: float, status: str = "completed", ratio: float = 0.26):
    rows = []
    for reference, eight_bit in (("amp_bf16", "amp_bf16_8bit_adam"), ("amp_fp16", "amp_fp16_8bit_adam")):
        ref, new = paired(n, delta, noise, seed=5)
        rows += task_rows(task, reference, n, quality=ref, state_bytes=8e6)
        rows += task_rows(task, eight_bit, n, status, quality=new, state_bytes=8e6 * ratio)
    return rows


def test_h3_clear_equivalence_is_supported():
    result = hypotheses.evaluate(H["H3"], both(lambda task: h3_rows(task, 4, 0.0, 0.001)))
    assert result["verdict"] == "supported"
    eq = claims(result, "classification")[0]["statistic"]
    assert eq["p_equivalent"] <= ALPHA and -eq["margin"] < eq["interval"][0] < eq["interval"][1] < eq["margin"]
    assert claims(result, "classification")[2]["statistic"]["ratio"] == pytest.approx(0.26)


def test_h3_clear_loss_and_too_many_bytes_are_refuted():
    loss = hypotheses.evaluate(H["H3"], both(lambda task: h3_rows(task, 4, -0.1, 0.001)))
    assert loss["verdict"] == "refuted" and claims(loss, "classification")[0]["outcome"] == "refuted"
    heavy = hypotheses.evaluate(H["H3"], both(lambda task: h3_rows(task, 4, 0.0, 0.001, ratio=0.6)))
    assert heavy["verdict"] == "refuted" and claims(heavy, "lm")[3]["outcome"] == "refuted"


def test_h3_all_diverged_refutes_and_noise_or_one_seed_is_inconclusive():
    diverged = hypotheses.evaluate(H["H3"], both(lambda task: h3_rows(task, 5, 0.0, 0.001, status="diverged")))
    assert diverged["verdict"] == "refuted"
    noisy = hypotheses.evaluate(H["H3"], both(lambda task: h3_rows(task, 3, 0.0, 0.05)))
    assert noisy["verdict"] == "inconclusive"
    assert claims(noisy, "classification")[0]["reason"].startswith("undecided (n=3; ~")
    one = hypotheses.evaluate(H["H3"], both(lambda task: h3_rows(task, 1, 0.0, 0.0)))
    assert one["verdict"] == "inconclusive" and all(c["outcome"] == "inconclusive" for c in claims(one, "lm"))


# ---------------------------------------------------------------- H4


def h4_rows(task: str, n: int = 4, device: str = "cuda", rival_speed: float | None = None) -> list[dict]:
    fp32, naive = paired(n, -0.1, 0.002, seed=7)
    _, same = paired(n, 0.0, 0.001, seed=7)
    speed = lambda mean: mean + np.random.default_rng(int(mean)).normal(0, 5, n)  # noqa: E731
    config = lambda name, **values: task_rows(task, name, n, device=device, **values)  # noqa: E731
    rows = (config("fp32_baseline", quality=fp32, throughput=speed(500), memory=np.full(n, 2.0))
            + config("amp_bf16", quality=same, throughput=speed(1000), memory=np.full(n, 1.8))
            + config("bf16_naive", quality=naive, throughput=speed(950), memory=np.full(n, 1.0))
            + config("bf16_sr_fp32_moments", quality=same, throughput=speed(900), memory=np.full(n, 1.0) + np.arange(n) * 1e-3)
            + task_rows(task, "fp16_naive", n, "diverged", device=device))  # no completed run: on no frontier
    if rival_speed:
        rows += task_rows(task, "amp_fp16", n, device=device, quality=same, throughput=speed(rival_speed),
                          memory=np.full(n, 1.8))
    return rows


def test_h4_clear_effects_are_supported_on_gpu():
    result = hypotheses.evaluate(H["H4"], both(h4_rows))
    assert result["verdict"] == "supported", result["reason"]
    frontier = claims(result, "classification")[0]["statistic"]["against"]
    assert set(frontier) == {"fp32_baseline", "bf16_naive", "bf16_sr_fp32_moments"}


def test_h4_on_cpu_the_frontier_claim_is_inconclusive():
    result = hypotheses.evaluate(H["H4"], both(lambda task: h4_rows(task, device="cpu")))
    assert result["verdict"] == "inconclusive"
    assert [c["outcome"] for c in claims(result, "classification")] == ["inconclusive", "supported", "supported",
                                                                         "supported"]


def test_h4_refuted_when_a_faster_config_keeps_quality():
    result = hypotheses.evaluate(H["H4"], both(lambda task: h4_rows(task, rival_speed=1500)))
    assert result["verdict"] == "refuted" and "dominated by amp_fp16 (Holm p=" in claims(result, "classification")[0]["reason"]


def test_h4_one_seed_and_everything_diverged_are_inconclusive():
    one = hypotheses.evaluate(H["H4"], both(lambda task: h4_rows(task, n=1)))
    assert one["verdict"] == "inconclusive"
    assert all(c["outcome"] == "inconclusive" for c in claims(one, "classification"))
    dead = both(lambda task: [r for c in ("fp32_baseline", "amp_bf16", "bf16_naive", "bf16_sr_fp32_moments")
                              for r in task_rows(task, c, 3, "diverged")])
    result = hypotheses.evaluate(H["H4"], dead)
    assert result["verdict"] == "inconclusive"
    assert all(c["outcome"] == "inconclusive" for c in claims(result, "lm"))


def test_missing_experiment_or_config_is_inconclusive_and_says_so():
    result = hypotheses.evaluate(H["H2"], {"classification": experiment("classification", [])})
    assert result["verdict"] == "inconclusive" and "no lm results" in result["reason"]
    assert "not run: fp16_naive, amp_fp16" in result["reason"]


# ---------------------------------------------------------------- recommendations' quality verdict


def quality_verdict(differences: list[float], extra: list[dict] = ()) -> verdicts.Verdict:
    """amp_bf16's verdict when its micro-F1 is fp32's plus `differences` (one per seed)."""
    n = len(differences)
    fp32 = 0.25 + 0.01 * np.sin(np.arange(n))
    rows = task_rows("classification", "fp32_baseline", n, quality=fp32) + task_rows(
        "classification", "amp_bf16", n, quality=fp32 + np.asarray(differences)) + list(extra)
    exp = experiment("classification", rows)
    analysis = analyze_experiment.Analysis(exp, stats.summarize(exp), {}, [], {}, Path("unused"), 0.02)
    return analyze_experiment.quality_verdicts(analysis)["amp_bf16"]


def test_quality_verdict_names_what_the_tests_showed():
    undecided = quality_verdict([-0.05, 0.03, 0.0])  # the 90% CI [-0.075, +0.061]: nothing decided
    assert undecided.kind == "undecided" and undecided.label.startswith("undecided (n=3; ~")
    assert "90% CI" in undecided.text() and "TOST Holm p=" in undecided.text()
    assert quality_verdict([0.001, -0.001, 0.0005, -0.0005]).kind == "equivalent"  # margin ±0.005 (2% of 0.25)
    assert quality_verdict([-0.05, -0.051, -0.049]).label.startswith("quality loss: -")
    assert quality_verdict([0.0]).kind == "undecided"
    # a certain loss inside the margin: a small loss, significant, never "no quality loss"
    small = quality_verdict([-0.0036, -0.0037, -0.00365, -0.0036, -0.00362])
    assert small.kind == "small_loss" and small.label.startswith("small loss inside the margin: -1.4")
    assert small.shows("loss") and small.shows("equivalence")
    unstable = task_rows("classification", "amp_bf16", 1, "diverged")
    unstable[0]["seed"] = 9
    v = quality_verdict([0.001, -0.001, 0.0005, -0.0005], extra=unstable)
    assert v.kind == "unstable" and not v.shows("equivalence") and v.label.startswith("unstable: 1 of 5 runs")


def test_h4_memory_claim_is_not_decided_on_cpu_resident_set_size():
    """A CPU run's peak memory is the process's RSS (compiled code, allocator caches): even a clear difference
    there does not decide a claim about the tensors a GPU holds."""
    def cpu_rss(task):
        rows = h4_rows(task, device="cpu")
        for row in rows:
            row["peak_memory_kind"] = "cpu_peak_rss_per_phase"
        return rows

    memory = claims(hypotheses.evaluate(H["H4"], both(cpu_rss)), "classification")[3]
    assert memory["outcome"] == "inconclusive" and "resident set" in memory["reason"]
    assert "CUDA" in memory["settle"]


def test_state_bytes_read_the_recorded_total_once():
    """Rows record optimizer-state bytes per group plus their total: the claim reports the totals (250 and 1,000
    bytes), not the groups and the total summed (500 and 2,000)."""
    def rows_with_totals(task):
        rows = (task_rows(task, "amp_bf16", quality=[0.5, 0.51, 0.52])
                + task_rows(task, "amp_bf16_8bit_adam", quality=[0.5, 0.51, 0.52]))
        for row in rows:
            per_group = {"encoder": 800.0, "head": 200.0} if row["config"] == "amp_bf16" else {"encoder": 200.0,
                                                                                                  "head": 50.0}
            row["static_memory_bytes"] = {"optimizer_state": {**per_group, "total": sum(per_group.values())}}
        return rows

    result = hypotheses.evaluate(H["H3"], both(rows_with_totals))
    state = next(c for c in claims(result, "classification") if "optimizer-state bytes of `amp_bf16`" in c["claim"])
    assert state["outcome"] == "supported" and state["statistic"]["bytes"] == {"config": [250.0],
                                                                               "reference": [1000.0]}
