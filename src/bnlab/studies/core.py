"""The machinery every study shares: runs, their cache, parallel execution, and the report.

A study is a list of `Run`s and an `analyse` step. A run is a registered function (its `kind`) and
JSON parameters; the hash of both names its cache file, so a finished run is never done twice: an
interrupted study resumes, and a rerun reuses every result whose configuration is unchanged. Training
runs also keep a resumable run directory, so even a run cut off mid-way continues from its last epoch.
Runs not yet cached execute in up to `jobs` worker processes (spawned; each loads the data once and
gets an equal share of the CPU threads).

Layout of a study's output directory::

    report.md        what was run, results as mean ± std over seeds, conclusions, runtime, plots
    *.png            the plots report.md embeds
    cache/KEY.json   one finished run: its parameters and result
    runs/KEY/        a training run's directory (config, metrics, checkpoint, curves)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from bnlab import files

# Bump when a change in bnlab alters what an existing run configuration produces: old cache files
# are then ignored instead of mixed with new results.
RESULTS_VERSION = 1


@dataclass(frozen=True)
class Run:
    """One unit of work: `RUN_KINDS[kind](params, context)`, returning a JSON-able dict."""

    kind: str
    params: dict = field(default_factory=dict, hash=False)

    def key(self) -> str:
        text = json.dumps({"kind": self.kind, "params": self.params, "version": RESULTS_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class RunContext:
    """What a run function gets besides its parameters."""

    run_dir: Path  # a directory of its own, for resumable state
    data_dir: Optional[str]
    download: bool

    def dataset(self):
        """The Fashion-MNIST set, loaded once per process."""
        return _dataset(self.data_dir, self.download)


RUN_KINDS: dict[str, Callable[[dict, RunContext], dict]] = {}


def run_kind(name: str):
    """Register a run function under `name` (decorator)."""

    def register(fn):
        RUN_KINDS[name] = fn
        return fn

    return register


_DATASETS: dict = {}


def _dataset(data_dir, download):
    from bnlab import data

    key = (data_dir, download)
    if key not in _DATASETS:
        _DATASETS[key] = data.load(data_dir, download=download)
    return _DATASETS[key]


@dataclass
class Settings:
    """How a study is run: `bnlab study NAME [--quick] [--seeds K] [--jobs J] [--out DIR]`."""

    out: Path
    quick: bool = False
    seeds: Optional[int] = None  # None: the study's default (1 when quick)
    jobs: int = 1
    data_dir: Optional[str] = None
    download: bool = True
    progress: Callable[[str], None] = print

    def seed_list(self, full_default: int) -> list[int]:
        count = self.seeds if self.seeds is not None else (1 if self.quick else full_default)
        return list(range(count))


@dataclass
class Outcome:
    """A run and its result (the dict its function returned), with the seconds it took when it ran."""

    run: Run
    result: dict
    seconds: float
    cached: bool


# ---- execution --------------------------------------------------------------------------------------


def _cache_path(out: Path, run: Run) -> Path:
    return out / "cache" / f"{run.key()}.json"


def _read_cache(out: Path, run: Run) -> Optional[Outcome]:
    path = _cache_path(out, run)
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:  # a damaged entry is redone, not trusted
        return None
    return Outcome(run, stored["result"], stored["seconds"], cached=True)


def _execute(run: Run, out: str, data_dir, download, threads: int) -> tuple[dict, float]:
    """Worker entry point: run one Run and write its cache entry (atomically)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    context = RunContext(Path(out) / "runs" / run.key(), data_dir, download)
    result = RUN_KINDS[run.kind](run.params, context)
    seconds = time.perf_counter() - start
    files.write_json(_cache_path(Path(out), run), {"kind": run.kind, "params": run.params, "result": result,
                                                    "seconds": seconds})
    return result, seconds


def _import_studies() -> None:
    # Workers are spawned fresh: importing the studies registers their run kinds.
    import bnlab.studies  # noqa: F401


def execute(runs: Sequence[Run], settings: Settings) -> list[Outcome]:
    """Every run's outcome, in order: from the cache when there, else computed (in parallel)."""
    unique = list({run.key(): run for run in runs}.values())
    done = {run.key(): outcome for run in unique if (outcome := _read_cache(settings.out, run))}
    todo = [run for run in unique if run.key() not in done]
    settings.progress(f"{len(unique)} runs: {len(done)} cached, {len(todo)} to do with {settings.jobs} job(s)")
    threads = max(1, (os.cpu_count() or 1) // settings.jobs)
    args = (str(settings.out), settings.data_dir, settings.download, threads)
    if settings.jobs == 1:
        for i, run in enumerate(todo, 1):
            result, seconds = _execute(run, *args)
            done[run.key()] = Outcome(run, result, seconds, cached=False)
            settings.progress(f"[{i}/{len(todo)}] {describe(run)}: {summarize(result)} ({seconds:.0f}s)")
    elif todo:
        with ProcessPoolExecutor(settings.jobs, mp_context=get_context("spawn"), initializer=_import_studies) as pool:
            pending = {pool.submit(_execute, run, *args): run for run in todo}
            finished = 0
            while pending:
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in ready:
                    run = pending.pop(future)
                    result, seconds = future.result()
                    done[run.key()] = Outcome(run, result, seconds, cached=False)
                    finished += 1
                    settings.progress(f"[{finished}/{len(todo)}] {describe(run)}: {summarize(result)} ({seconds:.0f}s)")
    return [done[run.key()] for run in runs]


def describe(run: Run) -> str:
    shown = {k: v for k, v in run.params.items() if k not in ("train_subset", "test_subset", "epochs")}
    return f"{run.kind}(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"


def summarize(result: dict) -> str:
    if result.get("status") == "diverged":
        return f"diverged at epoch {result['diverged']['epoch']}"
    if "history" in result and result["history"]:
        return f"test acc {result['history'][-1]['test_acc']:.4f}"
    return ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))[:80]


# ---- statistics over seeds --------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN mean for no values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """'0.872 ± 0.004' over seeds; a single value without the ±; '—' for none."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    n = len([v for v in values if v is not None and not math.isnan(v)])
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """(mean(a) - mean(b), a word for how clear that is given the seed-to-seed spread).

    "clear" when the difference exceeds twice its standard error (Welch), "within noise" when it does
    not, "single seed" when either side has one value (no spread to compare with).
    """
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2:
        return diff, "single seed"
    standard_error = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if standard_error == 0:
        return diff, "clear" if diff != 0 else "within noise"
    return diff, "clear" if abs(diff) > 2 * standard_error else "within noise"


# ---- the report -------------------------------------------------------------------------------------


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


def save_figure(fig, path: Path) -> None:
    with files.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def pyplot():
    """matplotlib.pyplot with a file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LINE_STYLES = ("-o", "--s", ":^", "-.v", "-d", "--x", ":*", "-.p")


def mean_curve(results: Sequence[dict], metric: str) -> list[float]:
    """Per-epoch mean of `metric` over the training results (seeds), up to the shortest history."""
    curves = [[h[metric] for h in r.get("history", [])] for r in results]
    length = min((len(c) for c in curves), default=0)
    return [sum(c[i] for c in curves) / len(curves) for i in range(length)]


def plot_epoch_curves(ax, curves: dict[str, list[float]], ylabel: str) -> None:
    """One line per label against epoch 1..n, each in its own style so identical curves stay visible."""
    from matplotlib.ticker import MaxNLocator

    for (label, values), style in zip(curves.items(), LINE_STYLES * len(curves)):
        ax.plot(range(1, len(values) + 1), values, style, ms=3, label=label, alpha=0.85)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


class Study:
    """A study: subclasses set `name`, `question`, `full_runtime` and implement `runs` and `analyse`."""

    name: str = ""
    question: str = ""
    full_runtime: str = ""

    def runs(self, settings: Settings) -> list[Run]:
        raise NotImplementedError

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        raise NotImplementedError


def run_study(study: Study, settings: Settings, command: str) -> Path:
    """Execute a study's runs (cached, parallel), analyse them, write report.md; return its path."""
    start = time.perf_counter()
    settings.out.mkdir(parents=True, exist_ok=True)
    outcomes = execute(study.runs(settings), settings)
    report = study.analyse(outcomes, settings)
    path = settings.out / "report.md"
    files.write_text(path, report.render(outcomes, time.perf_counter() - start, command))
    return path
