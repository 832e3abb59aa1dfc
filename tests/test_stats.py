"""The statistics of studies (arow.reporting.stats) and the comparison section of a results page
(arow.reporting.comparison), checked against scipy on the same numbers and hand-worked examples."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats as st

from arow.evaluation.cascade import pack_verdicts, unpack_verdicts
from arow.reporting.comparison import check_wording, compare, comparison_table, seed_values, verdict_sentences
from arow.reporting.stats import (HIGHER, LOWER, NOT_SEPARATED, Paired, Summary, Tost, best_row, best_rows,
                                  check_plan, holm, mcnemar, paired, paired_bootstrap, plan_hash, summarize, tost,
                                  verdict)

ROOT = Path(__file__).resolve().parents[1]
A = {0: 0.8123, 1: 0.8051, 2: 0.8199, 3: 0.8102, 4: 0.8150}
B = {0: 0.8010, 1: 0.8049, 2: 0.8101, 3: 0.8111, 4: 0.8020, 9: 0.5}  # seed 9: only in B, not paired


def _seeds(d, seeds):
    return [d[s] for s in seeds]


# --------------------------------------------------------------------------- summarize / paired
def test_summarize_matches_numpy_and_scipy():
    x = [0.71, 0.74, 0.69, 0.73]
    s = summarize(x)
    lo, hi = st.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=st.sem(x))
    assert s.n == 4 and s.mean == pytest.approx(np.mean(x), abs=1e-15)
    assert s.std == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert (s.lo, s.hi) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    lo90, hi90 = st.t.interval(0.90, 3, loc=np.mean(x), scale=st.sem(x))
    assert summarize(x, 0.90).lo == pytest.approx(lo90, rel=1e-12)


def test_summarize_edge_cases():
    assert summarize([]) == Summary(0, None, None, None, None)
    assert summarize([0.5]) == Summary(1, 0.5, None, None, None)
    z = summarize([0.3, 0.3, 0.3])
    assert (z.std, z.lo, z.hi) == (0.0, pytest.approx(0.3), pytest.approx(0.3))
    with pytest.raises(ValueError):
        summarize([0.1, 0.2], confidence=1.0)


def test_paired_matches_scipy_ttest_rel():
    p = paired(A, B)
    seeds = [0, 1, 2, 3, 4]
    a, b = _seeds(A, seeds), _seeds(B, seeds)
    d = np.subtract(a, b)
    ref = st.ttest_rel(a, b)
    lo, hi = st.t.interval(0.95, 4, loc=d.mean(), scale=st.sem(d))
    assert p.seeds == tuple(seeds) and p.n == 5
    assert p.mean == pytest.approx(d.mean(), abs=1e-15)
    assert p.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert (p.lo, p.hi) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    assert (p.wins, p.ties) == (int((d > 0).sum()), 0) == (4, 0)
    # the interval excludes 0 exactly when the two-sided p is below 0.05
    assert (p.lo > 0 or p.hi < 0) == (p.p_value < 0.05)


def test_paired_one_seed_and_none_have_no_interval_and_say_so():
    one = paired({0: 0.8, 1: 0.7}, {0: 0.75})
    assert (one.n, one.mean, one.lo, one.hi, one.p_value, one.wins) == (1, pytest.approx(0.05), None, None, None, 1)
    assert "no interval" in one.note and "no p-value" in one.note
    none = paired({0: 0.8}, {1: 0.7})
    assert (none.n, none.mean, none.p_value) == (0, None, None) and none.note


def test_paired_all_ties_and_constant_difference():
    ties = paired({0: 0.8, 1: 0.7, 2: 0.75}, {0: 0.8, 1: 0.7, 2: 0.75})
    assert (ties.wins, ties.ties, ties.mean, ties.lo, ties.hi, ties.p_value) == (0, 3, 0.0, 0.0, 0.0, 1.0)
    const = paired({0: 0.81, 1: 0.71}, {0: 0.80, 1: 0.70})  # +1 point on both seeds, up to float noise
    assert const.p_value == 0.0 and const.lo == pytest.approx(0.01) and const.hi == pytest.approx(0.01)
    with warnings.catch_warnings():  # scipy warns that the differences are identical, which is the point
        warnings.simplefilter("ignore", RuntimeWarning)
        assert st.ttest_rel([0.5, 0.6], [0.4, 0.5]).pvalue == 0.0  # scipy agrees on an exact constant


# --------------------------------------------------------------------------- holm / tost / verdict
def test_holm_hand_worked():
    # sorted: d 0.005*4 = 0.02, a 0.01*3 = 0.03, c 0.03*2 = 0.06, b 0.04*1 = 0.04 -> monotone 0.06
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert list(got) == ["a", "b", "c", "d"]
    assert got == {"a": pytest.approx(0.03), "b": pytest.approx(0.06), "c": pytest.approx(0.06),
                   "d": pytest.approx(0.02)}
    assert holm({("x", "clean"): 0.6, ("y", "pgd20"): 0.7}) == {("x", "clean"): 1.0, ("y", "pgd20"): 1.0}
    assert holm({"only": 0.03}) == {"only": 0.03} and holm({}) == {}
    for bad in (float("nan"), -0.1, 1.5, None):
        with pytest.raises(ValueError):
            holm({"a": bad})


def test_tost_matches_two_one_sided_scipy_tests():
    d = [0.001, -0.002, 0.0015, 0.0005, -0.001, 0.002]
    margin = 0.005
    t = tost(d, margin)
    p_low = st.ttest_1samp(d, -margin, alternative="greater").pvalue
    p_high = st.ttest_1samp(d, margin, alternative="less").pvalue
    lo, hi = st.t.interval(0.90, len(d) - 1, loc=np.mean(d), scale=st.sem(d))
    assert t.p_value == pytest.approx(max(p_low, p_high), rel=1e-9)
    assert (t.lo90, t.hi90) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    assert t.equivalent and t.p_value < 0.05
    wide = tost([0.01, -0.012, 0.004], margin)  # interval wider than the margin: not equivalent
    assert not wide.equivalent and wide.p_value >= 0.05 and (wide.lo90 <= -margin or wide.hi90 >= margin)


def test_tost_edge_cases():
    assert tost([0.001], 0.005) == Tost(None, None, None, False)
    assert tost([0.001, 0.001], 0.005).equivalent and tost([0.001, 0.001], 0.005).p_value == 0.0
    assert not tost([0.006, 0.006], 0.005).equivalent
    with pytest.raises(ValueError):
        tost([0.1, 0.2], 0.0)


def _p(mean: float, p: float | None, n: int = 8) -> Paired:
    return Paired(n, tuple(range(n)), mean, mean - 0.01, mean + 0.01, 0, 0, p)


def test_verdict_primary_sentences():
    eq = Tost(0.01, -0.002, 0.003, True)
    assert verdict(_p(0.01, 0.001), 0.004, None, None) == HIGHER == "higher (separated after correction)"
    assert verdict(_p(-0.01, 0.001), 0.004, None, None) == LOWER
    assert verdict(_p(0.01, 0.01), 0.06, None, None) == NOT_SEPARATED  # nominal < alpha, adjusted is not
    assert verdict(_p(0.0005, 0.6), 1.0, eq, 0.005) == "equivalent within ±0.5 points"
    assert verdict(_p(0.0005, 0.6), 1.0, Tost(0.2, -0.01, 0.01, False), 0.005) == NOT_SEPARATED
    assert verdict(_p(0.001, None, 1), None, None, None) == NOT_SEPARATED
    assert verdict(_p(0.002, 0.001), 0.003, eq, 0.005) == HIGHER  # a difference wins over equivalence
    assert verdict(_p(0.01, 0.03), 0.03, None, None, alpha=0.01) == NOT_SEPARATED


def test_verdict_exploratory_never_claims_correction():
    assert verdict(_p(0.01, 0.012), None, None, None, exploratory=True) == "higher (nominal p = 0.012, exploratory)"
    assert verdict(_p(-0.01, 0.0001), 0.0001, None, None, exploratory=True) == \
        "lower (nominal p < 0.001, exploratory)"
    assert verdict(_p(0.01, 0.2), 0.001, None, None, exploratory=True) == NOT_SEPARATED  # p_adjusted ignored
    assert verdict(_p(0.0, 0.9), None, Tost(0.01, -0.001, 0.001, True), 0.01, exploratory=True) == \
        "equivalent within ±1 points (exploratory)"


# --------------------------------------------------------------------------- per-example verdicts
def _exact_mcnemar(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def test_mcnemar_exact_binomial():
    rng = np.random.default_rng(1)
    a = rng.random(500) < 0.8
    b = a.copy()
    flip = rng.choice(500, 40, replace=False)
    b[flip] = ~b[flip]
    only_a, only_b, p = mcnemar(a, b)
    assert only_a == int((a & ~b).sum()) and only_b == int((b & ~a).sum()) and only_a + only_b == 40
    assert p == pytest.approx(_exact_mcnemar(only_a, only_b), rel=1e-9)
    assert mcnemar(np.array([True] * 13 + [False] * 3), np.array([False] * 13 + [True] * 3)).p_value == \
        pytest.approx(_exact_mcnemar(13, 3), rel=1e-9) == pytest.approx(0.0213, abs=1e-4)
    assert mcnemar(a, a) == (0, 0, 1.0)


def test_mcnemar_reads_stored_verdicts_and_refuses_bad_input():
    a = torch.tensor([True, False, True, True, False, True, False, True, True])
    b = torch.tensor([False, False, True, False, False, True, True, True, False])
    packed = json.loads(json.dumps(pack_verdicts({"pgd20": a, "other": b})))  # as eval.json stores them
    v = unpack_verdicts(packed, 9)
    assert mcnemar(v["pgd20"], v["other"])[:2] == (3, 1)
    with pytest.raises(ValueError):
        mcnemar(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError):
        mcnemar(np.ones(3), np.ones(3))


def test_paired_bootstrap_matches_index_resampling():
    rng = np.random.default_rng(2)
    a = rng.random(2000) < 0.75
    b = np.where(rng.random(2000) < 0.1, ~a, a)
    got = paired_bootstrap(a, b, n_boot=4000, seed=3)
    assert got.diff == pytest.approx(a.mean() - b.mean())
    assert got == paired_bootstrap(a, b, n_boot=4000, seed=3) and got != paired_bootstrap(a, b, n_boot=4000, seed=4)
    idx = np.random.default_rng(5).integers(0, a.size, size=(4000, a.size))  # resampling image indices
    naive = np.quantile(a[idx].mean(1) - b[idx].mean(1), [0.025, 0.975])
    assert got.lo == pytest.approx(naive[0], abs=0.002) and got.hi == pytest.approx(naive[1], abs=0.002)
    d = a.astype(float) - b
    half = 1.96 * d.std() / math.sqrt(a.size)  # normal approximation of the same interval
    assert got.lo == pytest.approx(d.mean() - half, abs=0.002) and got.hi == pytest.approx(d.mean() + half, abs=0.002)
    same = paired_bootstrap(a, a)
    assert (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- the plan
def _frontier():
    data = yaml.safe_load((ROOT / "studies" / "fmnist-frontier.yaml").read_text())
    labels = [m if isinstance(m, str) else m.get("label", m["method"]) for m in data["methods"]]
    return data["plan"], labels, [a.strip() for a in data["attacks"].split(",")]


def test_frontier_plan_validates():
    raw, labels, metrics = _frontier()
    plan = check_plan(raw, labels, metrics)
    assert plan.family() == [("arow", "clean"), ("arow", "pgd20"), ("trades-b3.5", "clean"),
                             ("trades-b3.5", "pgd20")]
    assert plan.margin == pytest.approx(0.005) and plan.correction == "holm" and plan.alpha == 0.05


@pytest.mark.parametrize("change", [
    {"alpha": 0}, {"alpha": 1.0}, {"alpha": True}, {"alpha": "0.05"}, {"correction": "bonferroni"},
    {"equivalence_margin": 0}, {"equivalence_margin": -0.5}, {"equivalence_margin": "half"},
    {"primary_metrics": []}, {"primary_metrics": "clean"}, {"primary_metrics": ["clean", "clean"]},
    {"comparisons": ["trades"]}, {"baseline": ""}, {"comparisons": ["no-such-row"]},
    {"primary_metrics": ["autoattack"]}, {"primary_metric": ["clean"]}, {"alpha": None},
])
def test_broken_plans_are_refused_with_one_line(change):
    raw, labels, metrics = _frontier()
    bad = {**raw, **change}
    if "primary_metric" in change:
        bad.pop("primary_metrics")
    if change == {"alpha": None}:
        bad.pop("alpha")
    with pytest.raises(ValueError) as e:
        check_plan(bad, labels, metrics)
    assert str(e.value).startswith("plan") and "\n" not in str(e.value)


def test_plan_without_margin_and_not_a_mapping():
    raw, _, _ = _frontier()
    assert check_plan({k: v for k, v in raw.items() if k != "equivalence_margin"}).margin is None
    with pytest.raises(ValueError):
        check_plan(["clean"])


def test_plan_hash_is_canonical():
    raw, _, _ = _frontier()
    h = plan_hash(raw)
    assert len(h) == 64 and int(h, 16) >= 0
    assert plan_hash(dict(reversed(list(raw.items())))) == h
    assert plan_hash({**raw, "equivalence_margin": 1.0}) != h
    assert plan_hash({**raw, "comparisons": ["trades-b3.5", "arow"]}) != h


# --------------------------------------------------------------------------- bold
def _s(mean: float, half: float, n: int = 3) -> Summary:
    return Summary(n, mean, half, mean - half, mean + half)


def test_best_rows_bolds_only_a_separated_best():
    table = {"arow": {"clean": _s(0.85, 0.004), "pgd20": _s(0.70, 0.01)},
             "trades": {"clean": _s(0.83, 0.004), "pgd20": _s(0.69, 0.01)},
             "mart": {"clean": _s(0.80, 0.004), "pgd20": _s(0.60, 0.01)}}
    assert best_rows(table) == {"clean": "arow", "pgd20": None}
    assert best_rows(table, ["pgd20"]) == {"pgd20": None}
    assert best_row({k: v["clean"] for k, v in table.items()}, higher=False) == "mart"
    assert best_row({"a": Summary(1, 0.9, None, None, None), "b": _s(0.5, 0.01)}) is None  # one seed
    assert best_row({"a": _s(0.9, 0.01)}) is None
    assert best_row({"a": _s(0.9, 0.01), "b": _s(0.9, 0.01), "c": _s(0.1, 0.01)}) is None


# --------------------------------------------------------------------------- the comparison section
def _rows():
    rng = np.random.default_rng(7)
    rows = {}
    for label, shift, seeds in [("trades", 0.0, range(8)), ("arow", 0.001, range(8)),
                                ("trades-b3.5", 0.02, range(8)), ("arow-lam2", 0.004, range(3))]:
        base = {s: 0.8 + 0.01 * math.sin(s) for s in seeds}  # shared per-seed effect: pairing removes it
        rows[label] = {m: {s: base[s] + shift + float(rng.normal(0, 0.003)) for s in seeds}
                       for m in ("clean", "pgd20", "cw")}
    return rows


def test_compare_family_holm_and_exploratory():
    raw, _, _ = _frontier()
    rows = _rows()
    out = compare(rows, "trades", ["pgd20", "cw", "clean"], raw)
    assert [(c.row, c.metric, c.primary) for c in out[:4]] == [
        ("arow", "clean", True), ("arow", "pgd20", True), ("trades-b3.5", "clean", True),
        ("trades-b3.5", "pgd20", True)]
    assert all(not c.primary and c.p_adjusted is None for c in out[4:]) and len(out) == 4 + 5
    raw_p = {(c.row, c.metric): paired(rows[c.row][c.metric], rows["trades"][c.metric]).p_value for c in out[:4]}
    assert {(c.row, c.metric): c.p_adjusted for c in out[:4]} == pytest.approx(holm(raw_p))
    v = {(c.row, c.metric): c.verdict for c in out}
    assert v[("trades-b3.5", "pgd20")] == HIGHER
    assert all("separated after correction" not in s for (r, m), s in v.items() if r == "arow-lam2" or m == "cw")
    assert v == verdict_sentences(rows, "trades", ["pgd20", "cw", "clean"], raw)


def test_compare_counts_a_missing_primary_test_as_p_one():
    raw, _, _ = _frontier()
    rows = {k: v for k, v in _rows().items() if k != "trades-b3.5"}
    rows["arow"] = {m: {s: x + 0.005 for s, x in rows["trades"][m].items()} for m in rows["trades"]}
    rows["arow"]["clean"][0] += 0.002  # +0.5 points on every seed, one seed a little more
    rows["arow"]["pgd20"][1] -= 0.004
    out = compare(rows, "trades", ["clean", "pgd20"], raw)
    missing = [c for c in out if c.row == "trades-b3.5"]
    assert len(missing) == 2 and all(c.paired.n == 0 and c.verdict == NOT_SEPARATED for c in missing)
    arow = {c.metric: c for c in out if c.row == "arow"}
    raw_p = {m: arow[m].paired.p_value for m in arow}
    family = holm({("arow", "clean"): raw_p["clean"], ("arow", "pgd20"): raw_p["pgd20"],
                   ("trades-b3.5", "clean"): 1.0, ("trades-b3.5", "pgd20"): 1.0})
    assert {m: arow[m].p_adjusted for m in arow} == pytest.approx({m: family[("arow", m)] for m in arow})
    assert all(arow[m].p_adjusted >= min(1.0, 3 * raw_p[m]) - 1e-12 for m in arow)  # family of 4, not 2


def test_compare_without_correction_uses_the_nominal_p():
    raw, _, _ = _frontier()
    rows = _rows()
    out = compare(rows, "trades", ["clean", "pgd20"], {**raw, "correction": "none"})
    primary = [c for c in out if c.primary]
    assert len(primary) == 4 and all(c.p_adjusted == c.paired.p_value for c in primary)
    assert "| adjusted p (none) " in comparison_table(rows, "trades", ["clean"], {**raw, "correction": "none"})


def test_compare_against_another_baseline_is_all_exploratory():
    raw, _, _ = _frontier()
    out = compare(_rows(), "arow", ["clean", "pgd20"], raw)
    assert out and not any(c.primary for c in out)
    assert not any("after correction" in c.verdict for c in out)
    with pytest.raises(ValueError):
        compare(_rows(), "mart", ["clean"], raw)


def test_comparison_table_three_seeds_not_separated():
    raw, _, _ = _frontier()
    rows = {"trades": {"clean": {0: 0.800, 1: 0.810, 2: 0.790}},
            "arow": {"clean": {0: 0.812, 1: 0.804, 2: 0.8}},
            "trades-b3.5": {"clean": {0: 0.8, 1: 0.81, 2: 0.79}}}
    text = comparison_table(rows, "trades", ["clean"], {**raw, "primary_metrics": ["clean"]})
    lines = [line for line in text.splitlines() if line.startswith("| arow")]
    p = paired(rows["arow"]["clean"], rows["trades"]["clean"])
    assert len(lines) == 1 and f"[{100 * p.lo:+.2f}, {100 * p.hi:+.2f}]" in lines[0] and "2/3" in lines[0]
    assert lines[0].rstrip(" |").endswith(NOT_SEPARATED) and "primary" in lines[0]
    assert "Holm-Bonferroni" in text and "2 primary tests" in text and "Student-t" in text
    assert "(1 tied)" not in lines[0] and "3 tied" in next(x for x in text.splitlines() if x.startswith("| trades-b3.5"))
    assert f"sha256 {plan_hash({**raw, 'primary_metrics': ['clean']})[:16]}" in text
    assert "| Holm p " in text and "| TOST ±0.5 " in text
    unplanned = comparison_table(rows, "trades", ["clean"], None)
    assert [c.strip() for c in unplanned.splitlines()[0].split("|")[7:9]] == ["p", "adjusted p"]
    assert "No analysis plan" in unplanned and " primary " in text and " primary " not in unplanned


def test_seed_values_reads_results_json_rows():
    rows = [{"label": "arow", "metrics": {"clean": {"per_seed": {0: 0.8, 1: 0.81}, "mean": 0.805}}}]
    back = json.loads(json.dumps(rows))
    assert seed_values(back) == {"arow": {"clean": {0: 0.8, 1: 0.81}}}


# --------------------------------------------------------------------------- wording
VERDICTS = {("arow", "clean"): NOT_SEPARATED, ("arow", "pgd20"): HIGHER,
            ("trades-b3.5", "pgd20"): "higher (nominal p = 0.012, exploratory)",
            ("trades-b3.5", "clean"): "equivalent within ±0.5 points"}


@pytest.mark.parametrize("text, word", [
    ("ARoW beats TRADES on clean accuracy.", "beats"),
    ("On clean images arow outperforms the baseline.", "outperforms"),
    ("ARoW is better on clean accuracy than TRADES.", "better"),
    ("With the smoothing equal, ARoW closes the gap in clean accuracy.", "closes the gap"),
    ("ARoW's clean accuracy is separated from TRADES.", "separated"),
    ("trades-b3.5 is separated on PGD-20 at eight seeds.", "separated"),
    ("trades-b3.5 beats TRADES on clean accuracy.", "beats"),
])
def test_check_wording_flags_over_claims(text, word):
    found = check_wording(text, VERDICTS)
    assert len(found) == 1 and f'"{word}"' in found[0] and found[0].startswith("line 1:")


@pytest.mark.parametrize("text", [
    "ARoW's clean accuracy is not separated from TRADES (+0.40, [-0.44, +1.23]).",
    "ARoW beats TRADES on PGD-20, separated after correction.",
    "ARoW does not beat TRADES on clean accuracy.",
    "trades-b3.5 closes the gap on clean accuracy.",
    "trades-b3.5 is higher on PGD-20 (nominal p = 0.012, exploratory).",
    "ARoW is better overall.",  # no metric named: one of its verdicts supports a direction
    "| arow | clean | primary | +0.40 | [-0.44, +1.23] | higher (separated after correction) |",
    "TRADES beats MART on clean accuracy.",  # neither is a compared row
])
def test_check_wording_passes_supported_wording(text):
    assert check_wording(text, VERDICTS) == []


def test_check_wording_reports_line_numbers():
    page = "# Results\n\nThe numbers are below.\nIn short, ARoW\nbeats TRADES on clean images.\n"
    found = check_wording(page, VERDICTS)
    assert len(found) == 1 and found[0].startswith("line 4:") and "clean: not separated" in found[0]
