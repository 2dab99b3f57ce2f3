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
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

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


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory: two runs must never write into one at once."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another bnlab run is writing into {run_dir}; wait for it or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def load_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig a run was started with; ValueError if `run_dir` holds no run."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"no bnlab run in {run_dir} (no config.json); check the path, or start one with `bnlab train --out {run_dir}`")
    try:
        stored = json.loads(path.read_text())["config"]
        return TrainConfig(**stored)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a bnlab run configuration ({exc}); was it edited by hand?") from None


def check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    """ValueError unless `run_dir` may take this run: empty for a new one, the same settings for a resume."""
    if resume:
        _check_resumable(run_dir, config)
    elif (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")


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


def write_metrics(run_dir: Path, history: list[EpochMetrics]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for m in history:
        writer.writerow([m.epoch, f"{m.train_loss:.6f}", f"{m.train_acc:.6f}", f"{m.test_loss:.6f}",
                         f"{m.test_acc:.6f}", f"{m.examples_per_sec:.1f}"])
    files.write_text(run_dir / "metrics.csv", buffer.getvalue())


def read_metrics(run_dir: Path) -> list[EpochMetrics]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [EpochMetrics(int(r["epoch"]), *(float(r[c]) for c in METRIC_COLUMNS[1:])) for r in rows]


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


def save_checkpoint(run_dir: Path, state: dict) -> None:
    with files.atomic_open(run_dir / "checkpoint.pt", "wb") as f:
        torch.save(state, f)


def load_checkpoint(run_dir: Path, map_location="cpu") -> dict:
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"no checkpoint in {run_dir}: the run finished no epoch yet; start it again without --resume")
    return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_state(net: nn.Module, optimizer: torch.optim.Optimizer, history: list[EpochMetrics],
                     first_loss: Optional[float], hooks_state: dict) -> dict:
    """The one checkpoint format: everything a run needs to continue exactly where it stopped."""
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "hooks": hooks_state, "history": [dataclasses.asdict(m) for m in history], "first_loss": first_loss}


def restore(state: dict, net: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[EpochMetrics], Optional[float]]:
    """Load a checkpoint into the model, optimizer and torch's RNG; its (history, first_loss). The hooks'
    state is `state["hooks"]` (absent in checkpoints written before hooks were saved: empty)."""
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return [EpochMetrics(**m) for m in state["history"]], state["first_loss"]
