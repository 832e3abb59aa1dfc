"""The published studies, recomputed: every mean, std and paired interval on docs/results/ follows
from the per-seed values stored beside it, with today's statistics (arow.reporting.stats).

The published intervals were computed with a table of Student-t quantiles rounded to three decimals;
the statistics module uses scipy's exact quantiles, so intervals agree to 1e-5 in accuracy (0.001
points), means and stds exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from arow.reporting.stats import paired, summarize

RESULTS = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("*/results*.json"))


def _per_seed(metric: dict) -> dict[int, float]:
    return {int(s): v for s, v in metric["per_seed"].items()}


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_published_tables_follow_from_their_per_seed_values(path):
    result = json.loads(path.read_text())
    rows = {r["label"]: r for r in result["rows"]}
    base = rows[result["baseline"]]
    checked = 0
    for row in rows.values():
        for name, metric in row["metrics"].items():
            values = list(_per_seed(metric).values())
            if not values or metric.get("mean") is None:
                continue
            s = summarize(values)
            assert s.mean == pytest.approx(metric["mean"], abs=1e-9)
            if metric.get("std") is not None:
                assert s.std == pytest.approx(metric["std"], abs=1e-9)
            checked += 1
        for name, pub in row.get("paired", {}).items():
            if pub.get("mean") is None or name not in base["metrics"]:
                continue
            p = paired(_per_seed(row["metrics"][name]), _per_seed(base["metrics"][name]))
            assert p.mean == pytest.approx(pub["mean"], abs=1e-9) and p.wins == pub["wins"] and p.n == pub["n"]
            if pub.get("low") is not None:
                assert p.lo == pytest.approx(pub["low"], abs=1e-5) and p.hi == pytest.approx(pub["high"], abs=1e-5)
            checked += 1
    assert checked > 0


def test_the_published_studies_are_found():
    assert len(RESULTS) >= 5


PAGES = [p for p in sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("*.md"))
         if (p.with_suffix("") / "results.json").is_file()
         and json.loads((p.with_suffix("") / "results.json").read_text()).get("spec", {}).get("plan")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_a_planned_studys_page_says_no_more_than_its_verdicts(page):
    """The prose of a page whose study fixed an analysis plan is checked against the verdicts the
    study's statistics generate (the plan's primary tests corrected, the rest exploratory)."""
    from arow.reporting.comparison import check_wording, seed_values, verdict_sentences

    result = json.loads((page.with_suffix("") / "results.json").read_text())
    metrics = [m for m in result["metrics"] if m in result["rows"][0]["metrics"]]
    verdicts = verdict_sentences(seed_values(result["rows"]), result["baseline"], metrics, result["spec"]["plan"])
    assert check_wording(page.read_text(), verdicts) == []
