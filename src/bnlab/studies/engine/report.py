"""The report of a study: report.md, its tables and its sections.

`Report` holds what a study found (settings, what varied, sections of markdown, conclusions computed
from the numbers, plots); `render` writes it with the runs' provenance and the runtime.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from bnlab.studies.engine.runner import Outcome


def _cell(value) -> str:
    # A bare | would split the cell; one already escaped (\|) stays as it is.
    return re.sub(r"(?<!\\)\|", r"\\|", str(value))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(map(_cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """What a study found; `render` turns it into report.md."""

    title: str
    question: str
    settings: dict  # every setting that was fixed across runs
    varied: dict  # what varied, name -> values
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, markdown)
    conclusions: list[str] = field(default_factory=list)  # sentences computed from the numbers
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)

    def render(self, outcomes: Sequence[Outcome], seconds: float, command: str) -> str:
        computed = sum(o.seconds for o in outcomes if not o.cached)
        reused = sum(o.seconds for o in outcomes if o.cached)
        lines = [f"# {self.title}", "", f"**Question.** {self.question}", "", "## Findings", ""]
        lines += [f"- {c}" for c in self.conclusions] or ["- (no conclusion could be drawn)"]
        lines += ["", "## What was run", "", f"Command: `{command}`", ""]
        lines += [f"- {k}: {v}" for k, v in self.settings.items()]
        lines += [f"- varied — {k}: {', '.join(map(str, v))}" for k, v in self.varied.items()]
        lines += [f"- runs: {len(outcomes)} ({sum(o.cached for o in outcomes)} from the cache)", ""]
        for heading, body in self.sections:
            lines += [f"## {heading}", "", body, ""]
        if self.plots:
            lines += ["## Plots", ""]
            for name, caption in self.plots:
                lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        lines += ["## Runtime", "",
                  f"This invocation took {seconds:.0f} s of wall time. The runs' own times: {computed:.0f} s computed now, "
                  f"{reused:.0f} s reused from the cache (sum over runs; with several jobs they overlap).", ""]
        return "\n".join(lines)
