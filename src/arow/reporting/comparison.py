"""The comparison section of a study's results page: every row against the baseline, paired by seed,
with the analysis plan's correction and the one verdict each comparison supports.

Input is ``rows``: row label -> metric -> ``{seed: accuracy in [0, 1]}`` (:func:`seed_values` builds
it from the rows of a study's ``results.json``), the baseline's label, the metrics to compare and the
study's analysis plan (:func:`arow.reporting.stats.check_plan`). The plan's primary tests (its
comparisons x its primary metrics, against its baseline) form the family the correction runs over;
every other row and metric is exploratory, reported with its nominal p-value and never called
"separated after correction".

>>> rows = {"trades": {"clean": {0: 0.80, 1: 0.81, 2: 0.79}},
...         "arow": {"clean": {0: 0.81, 1: 0.81, 2: 0.80}}}
>>> verdict_sentences(rows, "trades", ["clean"], None)
{('arow', 'clean'): 'not separated'}
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from .stats import NOT_SEPARATED, Paired, Plan, Tost, check_plan, format_margin, holm, paired, \
    paired_diffs, plan_hash, tost, verdict
from .labels import metric_label
from .tables import markdown_table

#: row label -> metric -> {seed: accuracy}
RowValues = Mapping[str, Mapping[str, Mapping[int, float]]]

#: the words that name a metric in prose, for :func:`check_wording`
METRIC_WORDS = {"clean": ("clean",), "pgd20": ("pgd-20", "pgd20", "pgd"), "cw": ("cw-30", "cw30", "cw"),
                "fgsm": ("fgsm",), "autoattack": ("autoattack", "auto-attack"),
                "val_robust": ("validation robust",), "val_clean": ("validation clean",)}


@dataclass(frozen=True)
class Comparison:
    """One row against the baseline on one metric.

    ``primary``: in the plan's corrected family; ``p_adjusted``: the family's adjusted p-value
    (primary tests only; with ``correction: none`` the nominal p); ``tost``: the equivalence test
    when the plan gives a margin; ``verdict``: :func:`arow.reporting.stats.verdict`.
    """

    row: str
    metric: str
    primary: bool
    paired: Paired
    p_adjusted: Optional[float]
    tost: Optional[Tost]
    verdict: str


def seed_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """``rows`` of a study's results (``results.json["rows"]``: ``label`` and ``metrics[m]["per_seed"]``)
    as row -> metric -> {seed: value}; seeds read back from JSON become integers again."""
    return {r["label"]: {m: {int(s): float(v) for s, v in cell["per_seed"].items() if v is not None}
                         for m, cell in r["metrics"].items()} for r in rows}


def _plan(plan: Union[Plan, Mapping[str, Any], None]) -> Optional[Plan]:
    return plan if plan is None or isinstance(plan, Plan) else check_plan(plan)


def compare(rows: RowValues, baseline: str, metrics: Sequence[str],
            plan: Union[Plan, Mapping[str, Any], None] = None) -> list[Comparison]:
    """Every comparison with ``baseline``: the plan's primary tests first (in plan order), then the
    other rows x ``metrics`` as exploratory ones (in row order).

    A primary test whose row has fewer than 2 seeds in common with the baseline has no p-value; it
    still counts in the family, as p = 1 (the family is what the plan fixed, not what finished).
    Without a plan, or when ``baseline`` is not the plan's baseline, every comparison is exploratory.
    """
    if baseline not in rows:
        raise ValueError(f"baseline {baseline!r} is not a row ({', '.join(rows) or 'no rows'})")
    p = _plan(plan)
    margin, alpha = (p.margin, p.alpha) if p else (None, 0.05)
    family = p.family() if p and p.baseline == baseline else []
    base = rows[baseline]

    def test(row: str, metric: str) -> tuple[Paired, Optional[Tost]]:
        a, b = rows.get(row, {}).get(metric, {}), base.get(metric, {})
        pr = paired(a, b)
        return pr, (tost(paired_diffs(a, b)[1], margin, alpha) if margin is not None else None)

    primary = {key: test(*key) for key in family}
    raw = {key: (pr.p_value if pr.p_value is not None else 1.0) for key, (pr, _) in primary.items()}
    adjusted = holm(raw) if p and p.correction == "holm" else raw
    out = []
    for key, (pr, tt) in primary.items():
        adj = adjusted[key] if pr.p_value is not None else None
        out.append(Comparison(*key, True, pr, adj, tt, verdict(pr, adj, tt, margin, alpha)))
    for row in rows:
        for metric in metrics:
            if row == baseline or (row, metric) in primary:
                continue
            pr, tt = test(row, metric)
            out.append(Comparison(row, metric, False, pr, None, tt,
                                  verdict(pr, None, tt, margin, alpha, exploratory=True)))
    return out


def verdict_sentences(rows: RowValues, baseline: str, metrics: Sequence[str],
                      plan: Union[Plan, Mapping[str, Any], None] = None) -> dict[tuple[str, str], str]:
    """(row, metric) -> the verdict sentence of :func:`compare`, e.g. to check a page's wording
    (:func:`check_wording`)."""
    return {(c.row, c.metric): c.verdict for c in compare(rows, baseline, metrics, plan)}


# --------------------------------------------------------------------------- the Markdown section
def _pts(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def _p(x: Optional[float]) -> str:
    return "-" if x is None else ("<0.001" if x < 0.001 else f"{x:.3f}")


def _cells(c: Comparison, labels: Mapping[str, str]) -> list[str]:
    pr = c.paired
    if pr.n == 0:
        interval, won = "- (no common seed)", "-"
    else:
        interval = f"- ({pr.n} seed)" if pr.lo is None else f"[{_pts(pr.lo)}, {_pts(pr.hi)}]"
        won = f"{pr.wins}/{pr.n}" + (f" ({pr.ties} tied)" if pr.ties else "")
    tt = c.tost
    equiv = "-" if tt is None or tt.p_value is None else f"p {_p(tt.p_value)}, [{_pts(tt.lo90)}, {_pts(tt.hi90)}]"
    return [c.row, labels.get(c.metric) or metric_label(c.metric), "primary" if c.primary else "exploratory",
            _pts(pr.mean), interval, won, _p(pr.p_value), _p(c.p_adjusted), equiv, c.verdict]


def _footnote(comparisons: Sequence[Comparison], baseline: str, plan: Optional[Plan],
              raw_plan: Union[Plan, Mapping[str, Any], None], labels: Mapping[str, str]) -> list[str]:
    n_primary = sum(c.primary for c in comparisons)
    text = [f"Difference: mean over the seeds both rows finished of (row - `{baseline}`), in accuracy points. "
            "95% interval: Student-t interval of that mean (df = seeds - 1). Seeds won: seeds on which the row "
            "scored higher. p: two-sided paired t-test over seeds; a row with fewer than 2 common seeds has "
            "no interval and no p."]
    if plan is None:
        text.append("No analysis plan: every comparison is exploratory, its p nominal and uncorrected.")
    elif n_primary == 0:
        text.append(f"The analysis plan's primary tests are against `{plan.baseline}`: against `{baseline}` "
                    "every comparison is exploratory, its p nominal and uncorrected.")
    else:
        how = ("Holm-Bonferroni adjusted" if plan.correction == "holm" else "not corrected (the plan says none)")
        text.append(f"Adjusted p: {how} over the plan's {n_primary} primary tests (comparisons "
                    f"{', '.join(plan.comparisons)} x primary metrics "
                    f"{', '.join(labels.get(m) or metric_label(m) for m in plan.primary_metrics)}; a test without a p "
                    f"counts as p = 1); a primary difference is \"separated after correction\" when its "
                    f"adjusted p < {plan.alpha:g}. Exploratory comparisons are outside that family: their "
                    "p is nominal, a hypothesis for a later study rather than a finding.")
    if plan is not None and plan.equivalence_margin is not None:
        text.append(f"TOST: two one-sided t-tests against {format_margin(plan.margin or 0)} points, with the "
                    f"{100 * (1 - 2 * plan.alpha):g}% interval of the difference; \"equivalent\" when that "
                    "interval lies inside the margin.")
    text.append(f"\"{NOT_SEPARATED}\" is written wherever the seeds show neither a separated difference nor "
                "equivalence: the data do not tell the two rows apart, which is not evidence that they are equal.")
    if plan is not None and isinstance(raw_plan, Mapping):
        text.append(f"Analysis plan sha256 {plan_hash(raw_plan)[:16]}.")
    return [" ".join(text)]


def comparison_table(rows: RowValues, baseline: str, metrics: Sequence[str],
                     plan: Union[Plan, Mapping[str, Any], None] = None,
                     labels: Optional[Mapping[str, str]] = None) -> str:
    """Markdown: one line per comparison with ``baseline`` (:func:`compare`; primary tests first), then
    a footnote saying what the interval, p-values, correction and verdicts mean. Metrics are named as
    everywhere else (:func:`~arow.reporting.labels.metric_label`: ``pgd20`` is "PGD-20"), or as
    ``labels`` says (e.g. ``{"autoattack": "AutoAttack (first 1000)"}``: on which images it ran)."""
    p = _plan(plan)
    comparisons = compare(rows, baseline, metrics, p)
    adjusted = "adjusted p" if p is None else ("Holm p" if p.correction == "holm" else "adjusted p (none)")
    equiv = f"TOST {format_margin(p.margin)}" if p is not None and p.margin is not None else "TOST"
    header = ["row", "metric", "test", "difference (points)", "95% interval", "seeds won", "p", adjusted, equiv, "verdict"]
    lines = [markdown_table([_cells(c, labels or {}) for c in comparisons], header), ""]
    return "\n".join(lines + _footnote(comparisons, baseline, p, plan, labels or {})) + "\n"


# --------------------------------------------------------------------------- checking prose
#: phrases stronger than some verdicts, by what they claim
CLAIMS = {
    "direction": r"beat(?:s|ing)?|better|outperform(?:s|ed|ing)?|ahead of|superior|worse|inferior|trail(?:s|ed|ing)?",
    "separation": r"separated|separates?|separably|significant(?:ly)?",
    "equality": r"clos(?:es|ed|ing) the gap|on par|as (?:good|robust|accurate) as",
}
_NEGATION = re.compile(r"\b(?:not|no|never|cannot|can't|none|nor|neither|without)\b(?:\s+[\w-]+){0,2}\s*$",
                       re.IGNORECASE)
_BREAK = re.compile(r"(?<=[.!?;])\s+|\n[ \t]*\n")


def _supports(claim: str, sentence: str) -> bool:
    """Whether a verdict sentence supports a claim of the kind ``claim`` (a key of :data:`CLAIMS`)."""
    if claim == "direction":
        return sentence.startswith(("higher", "lower"))
    if claim == "separation":
        return "separated after correction" in sentence
    return sentence.startswith("equivalent")


def _prose(text: str) -> str:
    """``text`` with tables, headings and fenced code blanked out (line numbers kept)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced or line.lstrip().startswith(("|", "#")) else line)
    return "\n".join(out)


def _mentions(sentence: str, names: Sequence[str]) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-]|\.\w)", sentence, re.IGNORECASE) for n in names)


def _sentences(text: str) -> list[tuple[int, str]]:
    prose, out, start = _prose(text), [], 0
    for m in [*_BREAK.finditer(prose), None]:
        end = m.start() if m else len(prose)
        chunk = prose[start:end]
        if chunk.strip():
            line = prose.count("\n", 0, start + len(chunk) - len(chunk.lstrip())) + 1
            out.append((line, " ".join(chunk.split())))
        start = m.end() if m else end
    return out


def check_wording(page_text: str, verdicts: Mapping[tuple[str, str], str],
                  metric_words: Optional[Mapping[str, Sequence[str]]] = None) -> list[str]:
    """Phrases of a results page stronger than the verdicts (:func:`verdict_sentences`), one line each.

    Sentence by sentence, a claim is flagged when the sentence names a compared row and the row's
    verdict does not support the claim: a direction ("beats", "better", "outperforms", "worse",
    "trails", ...) needs "higher" or "lower"; "separated"/"significant" needs "separated after
    correction"; an equality ("closes the gap", "on par") needs "equivalent". A sentence that also
    names metrics is checked against those metrics' verdicts; one that names none is flagged only
    when no metric of the row supports the claim. A claim after a negation ("not", "no", "cannot",
    "none", ... up to two words before it) is not a claim.

    Limits (a heuristic for the common over-claims, not a parser): rows are recognised by their
    labels and metrics by :data:`METRIC_WORDS` (or ``metric_words``), so prose that names a row
    otherwise ("TRADES with beta 3.5") is not checked; who beats whom is not parsed (a "beats" whose
    verdict is "lower" passes); tables, headings and fenced code are skipped; sentences end at
    ``. ! ?`` or ``;`` followed by a space, so an abbreviation can split one.
    """
    words = {**METRIC_WORDS, **(metric_words or {})}
    by_row: dict[str, dict[str, str]] = {}
    for (row, metric), v in verdicts.items():
        by_row.setdefault(row, {})[metric] = v
    found = []
    for line, sentence in _sentences(page_text):
        rows = [r for r in by_row if _mentions(sentence, [r])]
        if not rows:
            continue
        for claim, pattern in CLAIMS.items():
            for m in re.finditer(rf"\b(?:{pattern})\b", sentence, re.IGNORECASE):
                if _NEGATION.search(sentence[:m.start()]):
                    continue
                for row in rows:
                    named = {k: v for k, v in by_row[row].items() if _mentions(sentence, words.get(k, (k,)))}
                    checked = named or by_row[row]
                    if not named and any(_supports(claim, v) for v in checked.values()):
                        continue
                    bad = [f"{k}: {v}" for k, v in checked.items() if not _supports(claim, v)]
                    if bad:
                        found.append(f"line {line}: \"{m.group(0)}\" about {row}, whose verdict is "
                                     f"{'; '.join(bad)}: {sentence[:120]}")
    return found
