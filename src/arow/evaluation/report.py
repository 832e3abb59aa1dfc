"""What an evaluation reports: the accuracies, what was evaluated, the guards' verdicts and where
the results went (:class:`EvalReport`), and the error a tripped guard raises in Python
(:class:`RobustnessGuardError`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..reporting.tables import markdown_table
from ..threat import format_eps, norm_label
from .cascade import EvalResult


@dataclass
class EvalReport:
    """What ``arow eval`` reports: the accuracies, what was evaluated, the guards and where it went."""

    result: Optional[EvalResult]
    info: dict[str, Any]
    guards: list[Any] = field(default_factory=list)  # GuardResult per guard that ran
    guards_ran: bool = False
    path: Optional[Path] = None  # the JSON written
    robustbench: Optional[Path] = None
    error: Optional[str] = None  # set when a guard tripped: before the attacks (they did not run) or after them

    @property
    def accuracy(self) -> dict[str, float]:
        return self.result.accuracy if self.result is not None else {}

    @property
    def tripped(self) -> list[Any]:
        return [g for g in self.guards if not g.passed]

    def guards_text(self) -> str:
        """The guards' verdicts as a table, with the subset they ran on."""

        s = getattr(self.guards, "subset", None) or {}
        rows = [[g.name, "pass" if g.passed else "FAIL", f"{g.value:.4g}", f"{g.threshold:.4g}", g.message]
                for g in self.guards]
        where = (f"{s.get('n')} of {s.get('total')} test images drawn with seed {s.get('seed')} "
                 f"({s.get('seed_from', 'given')}; docs/guards.md)") if s else ""
        return f"robustness guards on {where}\n" + markdown_table(rows, ["guard", "result", "value", "limit", "what"])

    def text(self) -> str:
        """The accuracies as a table, with what was evaluated and every warning that applies."""

        res, info = self.result, self.info
        if res is None:
            return f"no accuracies: {self.error or 'the attacks did not run'}"
        rows = [[k, f"{100 * v:.2f}%", res.descriptions.get(k, "worst case over all attacks above")]
                for k, v in res.accuracy.items()]
        lines = [f"{info['dataset']} test set, {res.n} of {info['test_set_size']} images"
                 f"{' (SUBSET)' if info['subset'] else ''}, {norm_label(res.norm)} eps={format_eps(res.eps)}",
                 markdown_table(rows, ["attack", "accuracy", "what"])]
        if info["subset"]:
            lines.append(f"WARNING: {info['warning']}.")
        if self.tripped:
            names = ", ".join(repr(g.name) for g in self.tripped)
            lines.append(f"WARNING: robustness guards tripped ({names}: {self.tripped[0].message}); these numbers "
                         f"are likely overstated.")
        if not self.guards_ran:
            lines.append("NOTE: the robustness guards did not run (--no-guards).")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = self.result.to_json() if self.result is not None else {}
        out.update(self.info)
        out["guards"] = [g.to_json() for g in self.guards]
        out["guards_ran"] = self.guards_ran
        out["arow_version"] = __version__  # which code evaluated (its attacks' random starts, for one)
        if self.error:
            out["error"] = self.error
        return out


class RobustnessGuardError(ValueError):
    """A robustness guard tripped: the model's robust accuracy would likely be overstated.

    ``report`` holds the guards' verdicts (:meth:`EvalReport.guards_text`)."""

    def __init__(self, message: str, report: EvalReport) -> None:
        super().__init__(message)
        self.report = report
