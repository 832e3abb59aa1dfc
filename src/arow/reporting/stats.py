"""The statistics of a study: what a handful of seeds, or two sets of per-example verdicts, support.

Every function here is pure and takes accuracies as fractions in [0, 1] (margins too); the caller
formats points. The pieces:

- :func:`summarize`: mean, sample std and Student-t interval of one row's values over seeds;
- :func:`paired`: ``a - b`` over the seeds both have: mean, Student-t interval, seeds won and tied,
  two-sided paired t-test p-value;
- :func:`holm`: Holm-Bonferroni adjusted p-values of a family of tests;
- :func:`tost`: two one-sided t-tests for equivalence within a margin;
- :func:`verdict`: the one sentence a comparison supports;
- :func:`mcnemar` and :func:`paired_bootstrap`: two models scored on the same test images, from their
  per-example verdicts (``eval.json["verdicts"]``, see :func:`arow.evaluation.cascade.unpack_verdicts`);
- :func:`check_plan` and :func:`plan_hash`: the analysis plan a study fixes before its first run;
- :func:`best_rows`: which cell of a table column may be bolded.

>>> p = paired({0: 0.81, 1: 0.80, 2: 0.82}, {0: 0.80, 1: 0.80, 2: 0.80})
>>> (p.n, p.wins, p.ties, round(p.mean, 4))
(3, 2, 1, 0.01)
>>> holm({"clean": 0.01, "pgd20": 0.04})
{'clean': 0.02, 'pgd20': 0.04}
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, NamedTuple, Optional, Sequence, TypeVar

import numpy as np
from scipy import stats as _st

K = TypeVar("K", bound=Hashable)

#: verdict sentences (see :func:`verdict`)
HIGHER = "higher (separated after correction)"
LOWER = "lower (separated after correction)"
NOT_SEPARATED = "not separated"
CORRECTIONS = ("holm", "none")
PLAN_KEYS = ("primary_metrics", "baseline", "comparisons", "equivalence_margin", "correction", "alpha")


def _is_zero(std: float, mean: float) -> bool:
    """Whether a sample std is zero up to floating-point noise (differences of accuracies that are
    equal in exact arithmetic can differ in the last bits)."""
    return std <= 1e-12 * max(1.0, abs(mean))


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t``)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1 (at least 2 values), got df={df}")
    return float(_st.t.ppf(q, df))


# --------------------------------------------------------------------------- one row over seeds
@dataclass(frozen=True)
class Summary:
    """Values of one row and metric over seeds.

    ``std`` is the sample std (n - 1); ``lo``/``hi`` the Student-t interval of the mean at the
    confidence :func:`summarize` was given. With one value there is no std and no interval (None);
    with none, no mean either.
    """

    n: int
    mean: Optional[float]
    std: Optional[float]
    lo: Optional[float]
    hi: Optional[float]


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, sample std and Student-t interval (df = n - 1) of ``values``."""
    _check_confidence(confidence)
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = math.fsum(x) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1))
    if _is_zero(std, mean):
        std = 0.0
    half = t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


# --------------------------------------------------------------------------- paired over seeds
@dataclass(frozen=True)
class Paired:
    """``a - b`` over the seeds both rows have.

    ``mean``: mean paired difference (None without a common seed); ``lo``/``hi``: its Student-t
    interval (df = n - 1); ``wins``/``ties``: seeds where ``a`` scored higher / the same;
    ``p_value``: two-sided paired t-test. With fewer than 2 pairs there is no interval and no
    p-value (None), and ``note`` says so. A constant difference has zero variance: p = 0 when it is
    not zero (the t statistic is infinite), p = 1 when every seed ties.
    """

    n: int
    seeds: tuple[int, ...]
    mean: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    wins: int
    ties: int
    p_value: Optional[float]
    note: str = ""


def paired_diffs(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[tuple[int, ...], list[float]]:
    """The seeds both ``a`` and ``b`` have (sorted) and ``a[s] - b[s]`` on each."""
    seeds = tuple(sorted(set(a) & set(b)))
    return seeds, [float(a[s]) - float(b[s]) for s in seeds]


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Paired:
    """Mean paired difference ``a - b`` over common seeds, Student-t interval, seeds won, p-value."""
    seeds, d = paired_diffs(a, b)
    s = summarize(d, confidence)
    wins, ties = sum(x > 0 for x in d), sum(x == 0 for x in d)
    if s.n < 2:
        note = "no common seed" if s.n == 0 else "1 common seed: no interval and no p-value"
        return Paired(s.n, seeds, s.mean, None, None, wins, ties, None, note)
    assert s.mean is not None and s.std is not None
    if s.std == 0.0:
        p = 1.0 if s.mean == 0.0 else 0.0
    else:
        t = s.mean / (s.std / math.sqrt(s.n))
        p = float(min(1.0, 2 * _st.t.sf(abs(t), s.n - 1)))
    return Paired(s.n, seeds, s.mean, s.lo, s.hi, wins, ties, p)


# --------------------------------------------------------------------------- families of tests
def holm(p_values: Mapping[K, float]) -> dict[K, float]:
    """Holm-Bonferroni adjusted p-values, keys (and their order) preserved.

    The i-th smallest of m p-values is multiplied by m - i + 1, the results are made monotone
    (an adjusted p is never below that of a smaller raw p) and capped at 1. Rejecting where the
    adjusted p < alpha controls the family-wise error rate at alpha.
    """
    for k, p in p_values.items():
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
            raise ValueError(f"p-value of {k!r} must be a number in [0, 1], got {p!r}")
    m = len(p_values)
    order = sorted(p_values, key=lambda k: p_values[k])
    out: dict[K, float] = {}
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * float(p_values[k])))
        out[k] = running
    return {k: out[k] for k in p_values}


@dataclass(frozen=True)
class Tost:
    """Two one-sided t-tests of ``|mean difference| < margin``.

    ``p_value`` is the larger of the two one-sided p-values; ``lo90``/``hi90`` the (1 - 2 alpha)
    Student-t interval of the mean (90% at alpha = 0.05); ``equivalent`` is True iff that interval
    lies inside (-margin, +margin), which is the same as p < alpha. Fewer than 2 differences: no
    test (None, not equivalent).
    """

    p_value: Optional[float]
    lo90: Optional[float]
    hi90: Optional[float]
    equivalent: bool


def tost(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> Tost:
    """Equivalence of the paired differences ``diffs`` to zero within ``margin`` (same units)."""
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be > 0, got {margin!r}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha of a TOST must be in (0, 0.5), got {alpha!r}")
    s = summarize(diffs, 1 - 2 * alpha)
    if s.n < 2:
        return Tost(None, None, None, False)
    assert s.mean is not None and s.std is not None and s.lo is not None and s.hi is not None
    if s.std == 0.0:
        p = 0.0 if abs(s.mean) < margin else 1.0
    else:
        se = s.std / math.sqrt(s.n)
        p_low = _st.t.sf((s.mean + margin) / se, s.n - 1)  # H0: mean <= -margin
        p_high = _st.t.cdf((s.mean - margin) / se, s.n - 1)  # H0: mean >= +margin
        p = float(max(p_low, p_high))
    return Tost(p, s.lo, s.hi, bool(-margin < s.lo and s.hi < margin))


def format_p(p: float) -> str:
    """A p-value for prose: three decimals, ``< 0.001`` below that."""
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def format_margin(margin: float) -> str:
    """An accuracy-fraction margin in points, e.g. ``0.005`` -> ``'±0.5'``."""
    return f"±{round(100 * margin, 6):g}"


def verdict(paired: Paired, p_adjusted: Optional[float], tost: Optional[Tost], margin: Optional[float],
            alpha: float = 0.05, *, exploratory: bool = False) -> str:
    """The one sentence a comparison supports.

    A primary comparison (in the plan's corrected family) is exactly one of ``"higher (separated
    after correction)"``, ``"lower (separated after correction)"``, ``"equivalent within ±m points"``
    and ``"not separated"``; separated means ``p_adjusted < alpha``, and it takes precedence over
    equivalence (a consistent difference smaller than the margin is reported as a difference).
    An exploratory comparison (``exploratory=True``; ``p_adjusted`` is ignored) uses the nominal
    p-value of ``paired`` and says so: ``"higher (nominal p = 0.012, exploratory)"``,
    ``"equivalent within ±m points (exploratory)"`` or ``"not separated"``. ``margin`` is an accuracy
    fraction (0.005 is written ±0.5); without a margin or a TOST there is no equivalence verdict.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    p = paired.p_value if exploratory else p_adjusted
    if p is not None and p < alpha and paired.mean is not None and paired.mean != 0:
        direction = "higher" if paired.mean > 0 else "lower"
        if exploratory:
            return f"{direction} (nominal p {format_p(p)}, exploratory)"
        return f"{direction} (separated after correction)"
    if tost is not None and margin is not None and tost.equivalent:
        return f"equivalent within {format_margin(margin)} points" + (" (exploratory)" if exploratory else "")
    return NOT_SEPARATED


# --------------------------------------------------------------------------- per-example verdicts
class McNemar(NamedTuple):
    """Test images only ``a`` / only ``b`` classified correctly, and the exact two-sided p-value."""

    only_a: int
    only_b: int
    p_value: float


def _verdict_pair(correct_a: Any, correct_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"per-example verdicts must be two non-empty 1-D arrays of one length, "
                         f"got shapes {a.shape} and {b.shape}")
    if a.dtype != bool or b.dtype != bool:
        raise ValueError(f"per-example verdicts must be boolean arrays, got {a.dtype} and {b.dtype}")
    return a, b


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact McNemar test of two models on the same test images, in the same order.

    Only the discordant images count: under the null hypothesis (equal accuracy) each is equally
    likely to favour either model, so ``only_a`` is Binomial(only_a + only_b, 1/2); the p-value is
    the exact two-sided binomial test (1 when no image is discordant).
    """
    a, b = _verdict_pair(correct_a, correct_b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(_st.binomtest(only_a, n, 0.5).pvalue)
    return McNemar(only_a, only_b, min(1.0, p))


class Bootstrap(NamedTuple):
    """Accuracy of ``a`` minus that of ``b`` and its percentile bootstrap interval."""

    diff: float
    lo: float
    hi: float
    n_boot: int


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> Bootstrap:
    """Percentile interval of ``accuracy(a) - accuracy(b)`` resampling test images with replacement.

    Each resample draws n images (the same for both models, which keeps the pairing). Only how many
    of the drawn images are "only a correct" and "only b correct" changes the difference, and those
    counts are multinomial, so they are drawn directly: the same distribution as resampling indices,
    at the cost of ``n_boot`` draws rather than ``n_boot * n``. The interval is random only through
    ``seed``.
    """
    _check_confidence(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    a, b = _verdict_pair(correct_a, correct_b)
    n = a.size
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    probs = [only_a / n, only_b / n, (n - only_a - only_b) / n]
    counts = np.random.default_rng(seed).multinomial(n, probs, size=n_boot)
    boot = (counts[:, 0] - counts[:, 1]) / n
    q = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [q, 1 - q])
    return Bootstrap((only_a - only_b) / n, float(lo), float(hi), n_boot)


# --------------------------------------------------------------------------- the analysis plan
@dataclass(frozen=True)
class Plan:
    """A study's analysis plan, fixed before its first run (see :func:`check_plan`).

    ``equivalence_margin`` is in accuracy points as written in the study file (None: no equivalence
    test); :attr:`margin` is the same as a fraction.
    """

    primary_metrics: tuple[str, ...]
    baseline: str
    comparisons: tuple[str, ...]
    equivalence_margin: Optional[float]
    correction: str
    alpha: float

    @property
    def margin(self) -> Optional[float]:
        return None if self.equivalence_margin is None else self.equivalence_margin / 100

    def family(self) -> list[tuple[str, str]]:
        """The primary tests, (row, metric): comparisons x primary metrics, in plan order."""
        return [(row, m) for row in self.comparisons for m in self.primary_metrics]


def plan_hash(plan: Mapping[str, Any]) -> str:
    """sha256 (hex) of the plan as canonical JSON (sorted keys, no spaces): changes iff the plan does."""
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _names(plan: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = plan[key]
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"plan: {key} must be a non-empty list of names, got {v!r}")
    if len(set(v)) != len(v):
        raise ValueError(f"plan: {key} must not repeat a name, got {list(v)}")
    return tuple(v)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_plan(plan: Any, labels: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None) -> Plan:
    """The validated plan; a bad one raises ValueError with one line saying what is wrong.

    Keys: ``primary_metrics`` (metric names), ``baseline`` (a row label), ``comparisons`` (row labels
    compared with the baseline), ``equivalence_margin`` (accuracy points, > 0; optional), ``correction``
    (``holm`` or ``none``) and ``alpha`` (0 < alpha < 1). Given the study's row ``labels`` and
    ``metrics``, the rows and metrics the plan names must be among them.
    """
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must be a mapping with keys {', '.join(PLAN_KEYS)}; got {plan!r}")
    unknown = sorted(set(plan) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"plan: unknown key(s) {unknown}; known: {list(PLAN_KEYS)}")
    missing = [k for k in PLAN_KEYS if k != "equivalence_margin" and k not in plan]
    if missing:
        raise ValueError(f"plan: missing key(s) {missing}")
    primary, comparisons = _names(plan, "primary_metrics"), _names(plan, "comparisons")
    baseline = plan["baseline"]
    if not isinstance(baseline, str) or not baseline:
        raise ValueError(f"plan: baseline must be a row label, got {baseline!r}")
    if baseline in comparisons:
        raise ValueError(f"plan: the baseline {baseline!r} cannot be compared with itself (comparisons)")
    margin = plan.get("equivalence_margin")
    if margin is not None and not (_number(margin) and margin > 0):
        raise ValueError(f"plan: equivalence_margin must be a number of accuracy points > 0, got {margin!r}")
    if plan["correction"] not in CORRECTIONS:
        raise ValueError(f"plan: correction must be one of {list(CORRECTIONS)}, got {plan['correction']!r}")
    alpha = plan["alpha"]
    if not (_number(alpha) and 0 < alpha < 1):
        raise ValueError(f"plan: alpha must be a number in (0, 1), got {alpha!r}")
    if labels is not None:
        bad = [x for x in (baseline, *comparisons) if x not in labels]
        if bad:
            raise ValueError(f"plan: row(s) {bad} are not rows of the study ({', '.join(labels)})")
    if metrics is not None:
        bad = [m for m in primary if m not in metrics]
        if bad:
            raise ValueError(f"plan: primary metric(s) {bad} are not metrics of the study ({', '.join(metrics)})")
    return Plan(primary, baseline, comparisons, None if margin is None else float(margin),
                str(plan["correction"]), float(alpha))


# --------------------------------------------------------------------------- bold in a table
def best_row(column: Mapping[str, Summary], higher: bool = True) -> Optional[str]:
    """The row whose value in this column may be bolded, or None.

    The best mean is bolded only when its interval and the runner-up's do not overlap; a tie for
    best, a best or runner-up without an interval (fewer than 2 seeds) or a column with fewer than
    two rows bolds nothing. Non-overlap of the two intervals is a conservative criterion (stricter
    than a test of the difference).
    """
    rows = [(k, s) for k, s in column.items() if s.mean is not None]
    if len(rows) < 2:
        return None
    sign = 1.0 if higher else -1.0
    rows.sort(key=lambda ks: sign * ks[1].mean, reverse=True)  # type: ignore[operator]
    (best, b), (_, r) = rows[0], rows[1]
    if b.mean == r.mean or None in (b.lo, b.hi, r.lo, r.hi):
        return None
    separated = b.lo > r.hi if higher else b.hi < r.lo  # type: ignore[operator]
    return best if separated else None


def best_rows(table: Mapping[str, Mapping[str, Summary]], metrics: Optional[Sequence[str]] = None,
              higher: bool = True) -> dict[str, Optional[str]]:
    """Per metric, the row (label) that may be bolded (:func:`best_row`), or None.

    ``table`` maps a row label to its :class:`Summary` per metric; ``metrics`` defaults to every
    metric any row has, in first-seen order.
    """
    if metrics is None:
        metrics = list(dict.fromkeys(m for cols in table.values() for m in cols))
    return {m: best_row({k: cols[m] for k, cols in table.items() if m in cols}, higher) for m in metrics}
