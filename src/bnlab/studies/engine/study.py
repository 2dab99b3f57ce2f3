"""The study base: a study is a list of `Run`s, the functions that compute them, and an `analyse` step.

`run_study` executes the runs (cached, in parallel; see `runner`), analyses them and writes report.md.
The run functions come as a table (kind -> module-level function), explicitly: nothing registers itself
on import (`bnlab.studies.RUN_KINDS` is the table of every study).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bnlab import files
from bnlab.studies.engine.report import Report
from bnlab.studies.engine.runner import Outcome, Run, RunFunction, Settings, execute


class Study:
    """A study: subclasses set `name`, `question`, `full_runtime` and implement `runs` and `analyse`.

    What differs between the reduced version (--quick) and the full study (epochs, data subsets, grids) a
    study declares as `quick_plan` and `full_plan`, values of its own choosing; `plan` gives the one in force.
    """

    name: str = ""
    question: str = ""
    full_runtime: str = ""
    quick_plan: Any = None
    full_plan: Any = None

    def plan(self, settings: Settings) -> Any:
        """`quick_plan` for the reduced version (--quick), else `full_plan`."""
        return self.quick_plan if settings.quick else self.full_plan

    def runs(self, settings: Settings) -> list[Run]:
        raise NotImplementedError

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        raise NotImplementedError


def run_study(study: Study, settings: Settings, command: str, kinds: dict[str, RunFunction]) -> Path:
    """Execute a study's runs (cached, parallel) with the run functions `kinds`, analyse them, write
    report.md; return its path."""
    start = time.perf_counter()
    settings.out.mkdir(parents=True, exist_ok=True)
    outcomes = execute(study.runs(settings), settings, kinds)
    report = study.analyse(outcomes, settings)
    path = settings.out / "report.md"
    files.write_text(path, report.render(outcomes, time.perf_counter() - start, command))
    return path
