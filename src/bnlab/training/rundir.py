"""The run directory: what a training run leaves behind, and the one format of each file.

    config.json    every setting, the versions, the seed and the device
    metrics.csv    epoch,train_loss,train_acc,test_loss,test_acc,examples_per_sec
    checkpoint.pt  model, optimizer, RNG state, hooks' state and history after the last finished epoch
    curves.png     losses and accuracies per epoch, like the chapter's plot
    .lock          held while a run writes, so that two runs never write into one directory

Every file is written atomically. The study runs keep the same checkpoint (with hooks' state) and the
same history rows (`EpochMetrics`) as `bnlab train`.

Example::

    from bnlab.training import rundir
    config = rundir.load_config("runs/demo")
    rundir.read_metrics("runs/demo")[-1].test_acc
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

import bnlab
from bnlab import files, kernels
from bnlab.training.config import TrainConfig

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "examples_per_sec")


@dataclass
class EpochMetrics:
    """One history row: train metrics averaged over the epoch in train mode, test metrics in eval mode,
    and the training throughput (time spent in probes left out)."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    examples_per_sec: float


# What a run leaves behind: a directory holding any of these is a run, and no new run may start in it.
ARTIFACTS = ("config.json", "checkpoint.pt", "metrics.csv", "curves.png", "precise_stats.json")


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory: two runs must never write into one at once.

    Temporaries that a killed writer left are removed once the lock is held. If the body fails and the
    directory was created here and holds nothing but the lock, it is removed again: a failed start
    leaves no trace."""
    import fcntl

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, but a run needs a directory there; choose another --out")
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "w")
    except OSError as exc:
        raise ValueError(f"cannot lock {run_dir / '.lock'} ({exc.strerror or exc}); check the directory's "
                         "permissions, or choose another --out") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another bnlab run is writing into {run_dir}; wait for it or choose another --out") from None
        files.remove_temporaries(run_dir)
        try:
            yield
        except BaseException:
            _remove_if_unused(created)
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_if_unused(created: list[Path]) -> None:
    """Remove the directories in `created` (innermost first) that hold nothing but a lock file."""
    for directory in created:
        entries = list(directory.iterdir()) if directory.is_dir() else []
        if any(entry.name != ".lock" for entry in entries):
            return
        for entry in entries:
            entry.unlink()
        directory.rmdir()


def is_locked(run_dir: Path) -> bool:
    """Whether a bnlab process is writing into `run_dir` now (holds its lock)."""
    import fcntl

    try:
        with open(Path(run_dir) / ".lock", "r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        pass
    return False


def artifacts(run_dir: Path) -> list[str]:
    """The names of the run artifacts present in `run_dir`."""
    return [name for name in ARTIFACTS if os.path.lexists(Path(run_dir) / name)]


def default_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model}-{config.pool}-lr{config.lr:g}-b{config.batch_size}-s{config.seed}-{stamp}"


def environment(device: torch.device) -> dict:
    return {
        "bnlab": bnlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "bnlab_kernels": kernels.status()["backend"],
    }


def save_config(run_dir: Path, config: TrainConfig, device: torch.device, data_root: Path) -> None:
    files.write_json(run_dir / "config.json", {
        "config": dataclasses.asdict(config),
        "network": dataclasses.asdict(config.network_config()),
        "environment": environment(device),
        "data_root": str(data_root),
    })


def _restore_hint(run_dir: Path) -> str:
    return f"restore it from a backup, or start a new run with another --out than {run_dir}"


def load_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig a run was started with; ValueError if `run_dir` holds no run or a damaged one."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    try:
        os.listdir(run_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:  # not a directory, no permission
        raise files.unreadable(run_dir, exc) from None
    if not os.path.lexists(path):
        present = artifacts(run_dir)
        if present:
            raise ValueError(f"{run_dir} holds a run ({', '.join(present)}) but its config.json is missing, which "
                             f"bnlab needs to read or continue it; {_restore_hint(run_dir)}")
        raise ValueError(f"no bnlab run in {run_dir} (no config.json); check the path, or start one with "
                         f"`bnlab train --out {run_dir}`")
    try:
        stored = json.loads(path.read_bytes().decode("utf-8"))["config"]
        config = TrainConfig(**stored)
        config.validate()
    except OSError as exc:
        raise files.unreadable(path, exc) from None
    except (ValueError, KeyError, TypeError) as exc:  # JSON, UTF-8, missing or unknown keys, bad values
        raise ValueError(f"{path} is not a valid bnlab run configuration ({files.one_line(exc)}); "
                         f"{_restore_hint(run_dir)}") from None
    return config


def check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    """ValueError unless `run_dir` may take this run: holding no run artifact for a new one, the same
    settings and regular files for a resume."""
    if resume:
        _check_resumable(run_dir, config)
    elif present := artifacts(run_dir):
        raise ValueError(f"{run_dir} already holds a run ({', '.join(present)}); continue it with --resume or "
                         "choose another --out")


def _check_resumable(run_dir: Path, config: TrainConfig) -> None:
    stored = load_config(run_dir)
    mine, theirs = dataclasses.asdict(config), dataclasses.asdict(stored)
    # nproc and compile may change: the step is the same, up to float rounding.
    ignored = ("epochs", "out", "download", "data_dir", "threads", "nproc", "compile")
    differing = [k for k in mine if k not in ignored and mine[k] != theirs[k]]
    if differing:
        detail = ", ".join(f"{k}: run has {theirs[k]!r}, asked {mine[k]!r}" for k in differing)
        raise ValueError(f"cannot resume {run_dir} with different settings ({detail}); drop those options")
    if config.epochs < stored.epochs:
        raise ValueError(f"cannot resume {run_dir} with fewer epochs ({config.epochs}) than it was started with ({stored.epochs})")
    for name in ARTIFACTS:
        if (run_dir / name).is_dir():
            raise ValueError(f"{run_dir / name} is a directory where the run keeps a file; move it away and resume")


def write_metrics(run_dir: Path, history: list[EpochMetrics]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    writer.writerows(_row(m) for m in history)
    files.write_text(run_dir / "metrics.csv", buffer.getvalue())


def _row(m: EpochMetrics) -> list[str]:
    return [str(m.epoch), f"{m.train_loss:.6f}", f"{m.train_acc:.6f}", f"{m.test_loss:.6f}", f"{m.test_acc:.6f}",
            f"{m.examples_per_sec:.1f}"]


def read_metrics(run_dir: Path) -> list[EpochMetrics]:
    """metrics.csv's rows; ValueError naming the file if it is missing, unreadable or damaged."""
    path = Path(run_dir) / "metrics.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != METRIC_COLUMNS:
                raise ValueError(f"header {reader.fieldnames}, expected {','.join(METRIC_COLUMNS)}")
            rows = list(reader)
            return [EpochMetrics(int(r["epoch"]), *(float(r[c]) for c in METRIC_COLUMNS[1:])) for r in rows]
    except OSError as exc:
        raise files.unreadable(path, exc) from None
    except (ValueError, TypeError, csv.Error) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path} is damaged ({files.one_line(exc)}); delete it and `bnlab train --out {run_dir} "
                         "--resume` rewrites it from the checkpoint") from None


def check_metrics(run_dir: Path, history: list[EpochMetrics], log: Callable[[str], None]) -> None:
    """Make metrics.csv agree with the checkpoint's `history`, the source of truth: a missing, damaged or
    different metrics.csv is rewritten from it, with a notice."""
    path = Path(run_dir) / "metrics.csv"
    try:
        if [_row(m) for m in read_metrics(run_dir)] == [_row(m) for m in history]:
            return
        problem = "differs from the checkpoint's history"
    except ValueError:
        problem = "is damaged" if os.path.lexists(path) else "is missing"
    write_metrics(run_dir, history)
    log(f"notice: {path} {problem}; rewritten from the checkpoint's history ({len(history)} epochs)")


def plot_curves(run_dir: Path, history: list[EpochMetrics], title: str) -> None:
    """curves.png: loss (train, test) and accuracy (train, test) against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [m.epoch for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [m.train_loss for m in history], "-o", ms=3, label="train loss")
    ax_loss.plot(epochs, [m.test_loss for m in history], "--o", ms=3, label="test loss")
    ax_acc.plot(epochs, [m.train_acc for m in history], "-o", ms=3, label="train acc")
    ax_acc.plot(epochs, [m.test_acc for m in history], "--o", ms=3, label="test acc")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with files.atomic_open(run_dir / "curves.png", "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# ---- the checkpoint ----------------------------------------------------------------------------------


CHECKPOINT_KEYS = ("model", "optimizer", "rng", "hooks", "history", "first_loss")


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write checkpoint.pt atomically. The bytes are made in memory first, so that a failing disk raises
    WriteError (an OSError naming the file) rather than an error from inside torch's zip writer."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files.write_bytes(Path(run_dir) / "checkpoint.pt", buffer.getvalue())


def load_checkpoint(run_dir: Path, map_location="cpu") -> dict:
    """The run's checkpoint, loaded as untrusted data (`weights_only`: tensors and plain containers, no
    code); ValueError naming the file if it is missing, unreadable, damaged or not a bnlab checkpoint."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint.pt"
    if not os.path.lexists(path):
        if os.path.lexists(run_dir / "metrics.csv"):
            raise _lost_checkpoint(run_dir)
        if is_locked(run_dir):
            raise ValueError(f"{run_dir} has no checkpoint yet: its first epoch is still running (another bnlab "
                             "process holds its lock); try again when it has finished an epoch")
        raise ValueError(f"{run_dir} has no checkpoint: the run stopped before it finished its first epoch; "
                         f"run it again with `bnlab train --out {run_dir} --resume`")
    state = files.load_torch_file(path, map_location, fix=_restore_hint(run_dir))
    problem = _checkpoint_problem(state)
    if problem:
        raise ValueError(f"{path} is a torch file but not a bnlab checkpoint ({problem}); {_restore_hint(run_dir)}")
    return state


def _lost_checkpoint(run_dir: Path) -> ValueError:
    return ValueError(f"{run_dir / 'checkpoint.pt'} is missing, but metrics.csv records finished epochs (a resume "
                      f"would start over and lose them); {_restore_hint(run_dir)}")


def _checkpoint_problem(state) -> Optional[str]:
    """What makes `state` not a bnlab checkpoint, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    missing = [key for key in CHECKPOINT_KEYS if key not in state and key != "hooks"]
    if missing:
        return f"no {', '.join(map(repr, missing))}"
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        return "'model' is not a state dict of tensors"
    if not isinstance(state["rng"], torch.Tensor) or state["rng"].dtype != torch.uint8:
        return "'rng' is not a torch RNG state"
    fields = {f.name for f in dataclasses.fields(EpochMetrics)}
    if not isinstance(state["history"], list) or not all(isinstance(m, dict) and set(m) == fields
                                                          for m in state["history"]):
        return "'history' is not a list of epoch metrics"
    return None


def architecture(config: TrainConfig) -> dict:
    """What a checkpoint's weights fit: the model, its pooling and options (a checkpoint records it)."""
    return {"model": config.model, "pool": config.pool, "model_options": config.model_options}


def resumable_state(run_dir: Path, config: TrainConfig, log: Callable[[str], None],
                    map_location="cpu") -> Optional[dict]:
    """The checkpoint a resume continues from (None when the run finished no epoch), checked against the
    run's config.json, with metrics.csv made to agree with it; ValueError if the checkpoint is missing
    while metrics.csv says epochs finished (the progress would be lost)."""
    run_dir = Path(run_dir)
    if not os.path.lexists(run_dir / "checkpoint.pt"):
        if os.path.lexists(run_dir / "metrics.csv"):
            raise _lost_checkpoint(run_dir)
        return None
    state = load_checkpoint(run_dir, map_location)
    check_fits(run_dir, state, config)
    check_metrics(run_dir, [EpochMetrics(**m) for m in state["history"]], log)
    return state


def check_fits(run_dir: Path, state: dict, config: TrainConfig) -> None:
    """ValueError unless the checkpoint was trained as the model that config.json names (checkpoints
    written before the architecture was recorded are checked by their weights' shapes when loaded)."""
    recorded = state.get("architecture")
    if recorded is not None and recorded != architecture(config):
        raise ValueError(f"{run_dir / 'config.json'} names {_describe(architecture(config))}, but "
                         f"{run_dir / 'checkpoint.pt'} was trained as {_describe(recorded)}: one of them was edited "
                         "or copied from another run; put back the run's own config.json")


def _describe(arch: dict) -> str:
    options = "".join(f", {k}={v!r}" for k, v in sorted(arch.get("model_options", {}).items()))
    return f"{arch.get('model')} ({arch.get('pool')} pooling{options})"


def load_weights(net: nn.Module, state: dict, path: Path) -> None:
    """Load `state` (a model state dict) into `net`; ValueError naming `path` if they do not fit."""
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"the weights in {path} do not fit the model that config.json names ({detail}); "
                         "put back the run's own config.json") from None


def checkpoint_state(net: nn.Module, optimizer: torch.optim.Optimizer, history: list[EpochMetrics],
                     first_loss: Optional[float], hooks_state: dict, arch: Optional[dict] = None) -> dict:
    """The one checkpoint format: everything a run needs to continue exactly where it stopped, and the
    architecture its weights fit (`architecture(config)`), when known."""
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "hooks": hooks_state, "history": [dataclasses.asdict(m) for m in history], "first_loss": first_loss}
    if arch is not None:
        state["architecture"] = arch
    return state


def restore(state: dict, net: nn.Module, optimizer: torch.optim.Optimizer,
            path: Optional[Path] = None) -> tuple[list[EpochMetrics], Optional[float]]:
    """Load a checkpoint (read from `path`, for error messages) into the model, optimizer and torch's
    RNG; its (history, first_loss). The hooks' state is `state["hooks"]` (absent in checkpoints written
    before hooks were saved: empty)."""
    path = path or Path("the checkpoint")
    load_weights(net, state["model"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the optimizer state in {path} does not fit the model ({files.one_line(exc)}); "
                         "put back the run's own checkpoint") from None
    torch.set_rng_state(state["rng"])
    return [EpochMetrics(**m) for m in state["history"]], state["first_loss"]
