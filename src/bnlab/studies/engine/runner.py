"""Runs and their cache: a study's work, done once.

A run is a function (its `kind`) and JSON parameters; the hash of both names its cache file, so a
finished run is never done twice: an interrupted study resumes, and a rerun reuses every result whose
configuration is unchanged. Training runs also keep a resumable run directory, so even a run cut off
mid-way continues from its last epoch. Runs not yet cached execute in up to `jobs` worker processes
(spawned; each loads the data once and gets an equal share of the CPU threads).

Layout of a study's output directory::

    report.md        what was run, results as mean ± std over seeds, conclusions, runtime, plots
    *.png            the plots report.md embeds
    cache/KEY.json   one finished run: its kind, parameters, result, seconds and their sha256
    runs/KEY/        a training run's directory (config, metrics, checkpoint, curves)

Why not joblib (`Memory` for the cache, `Parallel` for the pool): its Memory keys an entry by the
function's code and arguments, so editing any line of a run function (a comment, a docstring) throws
away hours of finished runs; here the key is the kind, the parameters and RESULTS_VERSION, bumped by
hand when results really change. Its cache is pickles, where ours is JSON that the tests and the
reports read directly. And `Parallel` returns results when the batch ends, where a study reports and
caches each run as soon as it finishes, so that an interrupted study keeps every finished run. The
pool here is the standard library's ProcessPoolExecutor, spawned, and ~40 lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from bnlab import files

# Bump when a change in bnlab alters what an existing run configuration produces: old cache files
# are then ignored instead of mixed with new results. 2: the hooked runs' history rows carry
# examples_per_sec (as every run's) instead of seconds.
RESULTS_VERSION = 2


@dataclass(frozen=True)
class Run:
    """One unit of work: the function registered as `kind` (see `bnlab.studies.RUN_KINDS`) on `params`,
    returning a JSON-able dict."""

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


RunFunction = Callable[[dict, RunContext], dict]

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


def _cache_path(out: Path, run: Run) -> Path:
    return out / "cache" / f"{run.key()}.json"


def _read_cache(out: Path, run: Run, progress: Optional[Callable[[str], None]] = None) -> Optional[Outcome]:
    """The cached outcome of `run`, or None when it must be done. The cache is untrusted: an entry that
    cannot be read, is not UTF-8 JSON, lacks "result" or "seconds", records another kind or other
    parameters, or no longer matches the sha256 written with it is damaged. It is removed (so that the
    redone run writes its own) and reported in one line through `progress`; never trusted, never fatal.
    Entries written before the sha256 was recorded are checked for all the rest."""
    path = _cache_path(out, run)
    if not os.path.lexists(path):
        return None
    problem = _cache_problem(path, run)
    if isinstance(problem, Outcome):
        return problem
    if progress is not None:
        progress(f"study cache: {path} is damaged ({problem}); redoing the run")
    try:  # only this entry, inside the study's cache/
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass  # the redone run's atomic write replaces a file; a directory that stays makes it fail loudly
    return None


def _cache_problem(path: Path, run: Run):
    """The Outcome stored at `path` for `run`, or a short reason why the entry cannot be trusted."""
    try:
        stored = json.loads(path.read_bytes().decode("utf-8"))
    except IsADirectoryError:
        return "a directory stands where the file should be"
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    except UnicodeDecodeError:
        return "it is not UTF-8 text"
    except ValueError:  # json.JSONDecodeError
        return "it is not valid JSON"
    if not isinstance(stored, dict):
        return f"it holds a JSON {type(stored).__name__}, not an object"
    missing = [name for name in ("kind", "params", "result", "seconds") if name not in stored]
    if missing:
        return f"it lacks {', '.join(missing)}"
    canonical = lambda params: json.dumps(params, sort_keys=True)  # noqa: E731 - tuples are lists, NaN is NaN
    if stored["kind"] != run.kind or canonical(stored["params"]) != canonical(run.params):
        return "it records another run (its kind or parameters differ)"
    seconds = stored["seconds"]
    if "sha256" in stored and stored["sha256"] != _entry_digest(stored):  # entries before it had none
        return "its contents differ from what was written (sha256 mismatch)"
    if not isinstance(stored["result"], dict):
        return "its result is not an object"
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
        return "its seconds is not a non-negative number"
    return Outcome(run, stored["result"], float(seconds), cached=True)


def _entry_digest(entry: dict) -> str:
    """The sha256 of an entry's kind, params, result and seconds, as canonical JSON: the entry records it,
    so that bytes changed on disk (a digit flipped, the length kept) are caught on reading."""
    text = json.dumps({name: entry[name] for name in ("kind", "params", "result", "seconds")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _execute(function: RunFunction, run: Run, out: str, data_dir, download, threads: int) -> tuple[dict, float]:
    """Worker entry point: run one Run and write its cache entry (atomically). The function travels by
    reference (module and name), so a spawned worker needs no registry."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    context = RunContext(Path(out) / "runs" / run.key(), data_dir, download)
    result = function(run.params, context)
    seconds = time.perf_counter() - start
    entry = {"kind": run.kind, "params": run.params, "result": result, "seconds": seconds}
    files.write_json(_cache_path(Path(out), run), {**entry, "sha256": _entry_digest(entry)})
    return result, seconds


def execute(runs: Sequence[Run], settings: Settings, kinds: dict[str, RunFunction]) -> list[Outcome]:
    """Every run's outcome, in order: from the cache when there, else computed by `kinds[run.kind]`
    (in parallel); ValueError naming a kind that `kinds` does not hold."""
    unknown = sorted({run.kind for run in runs} - set(kinds))
    if unknown:
        raise ValueError(f"no run function for kind(s) {', '.join(unknown)}; register them in bnlab.studies.RUN_KINDS")
    unique = list({run.key(): run for run in runs}.values())
    done = {run.key(): outcome for run in unique if (outcome := _read_cache(settings.out, run, settings.progress))}
    todo = [run for run in unique if run.key() not in done]
    settings.progress(f"{len(unique)} runs: {len(done)} cached, {len(todo)} to do with {settings.jobs} job(s)")
    threads = max(1, (os.cpu_count() or 1) // settings.jobs)
    args = (str(settings.out), settings.data_dir, settings.download, threads)

    def finished(run: Run, result: dict, seconds: float, count: int) -> None:
        done[run.key()] = Outcome(run, result, seconds, cached=False)
        settings.progress(f"[{count}/{len(todo)}] {describe(run)}: {summarize(result)} ({seconds:.0f}s)")

    if settings.jobs == 1:
        for i, run in enumerate(todo, 1):
            finished(run, *_execute(kinds[run.kind], run, *args), i)
    elif todo:
        with ProcessPoolExecutor(settings.jobs, mp_context=get_context("spawn")) as pool:
            pending = {pool.submit(_execute, kinds[run.kind], run, *args): run for run in todo}
            count = 0
            while pending:
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in ready:
                    count += 1
                    finished(pending.pop(future), *future.result(), count)
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
