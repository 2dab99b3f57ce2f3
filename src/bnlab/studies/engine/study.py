"""The study base: a study is a list of `Run`s, the functions that compute them, and an `analyse` step.

`run_study` executes the runs (cached, in parallel; see `runner`), analyses them and writes report.md.
A study names the run functions it uses in `run_kinds`, explicitly: nothing registers itself on import.
"""

from __future__ import annotations

import time
from pathlib import Path

from bnlab import files
from bnlab.studies.engine.report import Report
from bnlab.studies.engine.runkinds import SHARED_RUN_KINDS
from bnlab.studies.engine.runner import Outcome, Run, RunFunction, Settings, execute


class Study:
    """A study: subclasses set `name`, `question`, `full_runtime`, the run functions they add to the
    shared ones (`run_kinds`: kind -> module-level function) and implement `runs` and `analyse`."""

    name: str = ""
    question: str = ""
    full_runtime: str = ""
    run_kinds: dict[str, RunFunction] = {}

    def all_run_kinds(self) -> dict[str, RunFunction]:
        """The shared run kinds ("train") and this study's own."""
        return {**SHARED_RUN_KINDS, **self.run_kinds}

    def runs(self, settings: Settings) -> list[Run]:
        raise NotImplementedError

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        raise NotImplementedError


def run_study(study: Study, settings: Settings, command: str) -> Path:
    """Execute a study's runs (cached, parallel), analyse them, write report.md; return its path."""
    start = time.perf_counter()
    settings.out.mkdir(parents=True, exist_ok=True)
    outcomes = execute(study.runs(settings), settings, study.all_run_kinds())
    report = study.analyse(outcomes, settings)
    path = settings.out / "report.md"
    files.write_text(path, report.render(outcomes, time.perf_counter() - start, command))
    return path
