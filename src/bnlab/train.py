"""Train a LeNet of the family on Fashion-MNIST with minibatch SGD, as the D2L chapter does, as a real tool.

A run lives in its own directory:

    config.json    every setting, the versions, the seed and the device
    metrics.csv    epoch,train_loss,train_acc,test_loss,test_acc,examples_per_sec
    checkpoint.pt  model, optimizer, RNG state and history after the last finished epoch (atomic)
    curves.png     losses and accuracies per epoch, like the chapter's plot

Train metrics are averaged over the epoch in train mode (as the chapter prints them); test metrics
are computed in eval mode on the whole test set. ``resume`` continues from the checkpoint and ends
with the same metrics as an uninterrupted run: the data order of epoch e depends only on (seed, e),
and the RNG state is checkpointed. Same seed and device give identical metrics.

Divergence: a training loss that is not finite, or that exceeds DIVERGENCE_FACTOR times the first
batch's loss, stops the run with `Diverged` (naming the epoch, batch and learning rate). A sigmoid
LeNet keeps a finite loss even at lr 1e6 (about 2e7): finiteness alone would call that a success.

Example::

    from bnlab.train import TrainConfig, train
    result = train(TrainConfig(model="bn-lenet", epochs=1, out="runs/demo"))
    print(result.final.test_acc)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

import bnlab
from bnlab import data as data_mod
from bnlab import files, kernels
from bnlab.models import LeNetConfig, build_model, model_config

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "examples_per_sec")
DIVERGENCE_FACTOR = 100.0
PRESETS = {
    "current": {"lr": 0.1, "batch_size": 128, "epochs": 10},  # the current edition's settings
    "classic": {"lr": 1.0, "batch_size": 256, "epochs": 10},  # the older edition's
}
EVAL_BATCH_SIZE = 1000


class Diverged(RuntimeError):
    """Training stopped because the loss blew up (see the module docstring for the criterion)."""

    def __init__(self, epoch: int, batch: int, lr: float, loss: float, first_loss: float):
        self.epoch, self.batch, self.lr, self.loss, self.first_loss = epoch, batch, lr, loss, first_loss
        why = "is not finite" if not math.isfinite(loss) else (
            f"exceeds {DIVERGENCE_FACTOR:g}x the first batch's loss {first_loss:.4g}")
        super().__init__(
            f"training diverged at epoch {epoch}, batch {batch} (lr {lr:g}): loss {loss:.4g} {why}; "
            "try a smaller --lr"
        )


@dataclass
class TrainConfig:
    """Every setting of a run. `model_options` are LeNetConfig overrides (pool goes through `pool`)."""

    model: str = "bn-lenet"
    pool: str = "avg"
    epochs: int = PRESETS["current"]["epochs"]
    lr: float = PRESETS["current"]["lr"]
    batch_size: int = PRESETS["current"]["batch_size"]
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    data_dir: Optional[str] = None
    download: bool = True
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    model_options: dict = field(default_factory=dict)
    out: Optional[str] = None

    def validate(self) -> None:
        """ValueError naming the first bad setting, before anything is built or written."""
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive and finite, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be non-negative, got {self.weight_decay}"),
            (self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"device must be cpu, cuda[:N] or auto, got {self.device!r}"),
            (self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        model_config(self.model, pool=self.pool, **self.model_options)  # unknown model/option -> ValueError

    def network_config(self) -> LeNetConfig:
        return model_config(self.model, pool=self.pool, **self.model_options)


def with_preset(config: TrainConfig, preset: str) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    return dataclasses.replace(config, **PRESETS[preset])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    examples_per_sec: float


@dataclass
class RunResult:
    run_dir: Path
    history: list[EpochMetrics]
    config: TrainConfig

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]


# ---- the run directory ------------------------------------------------------------------------------


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


def save_checkpoint(run_dir: Path, state: dict) -> None:
    with files.atomic_open(run_dir / "checkpoint.pt", "wb") as f:
        torch.save(state, f)


def load_checkpoint(run_dir: Path, map_location="cpu") -> dict:
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"no checkpoint in {run_dir}: the run finished no epoch yet; start it again without --resume")
    return torch.load(path, map_location=map_location, weights_only=True)


# ---- training ---------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The data order of an epoch depends on (seed, epoch) only, so a resumed run sees the same batches."""
    return seed * 1_000_003 + epoch


def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) of `net` in eval mode over the whole set; the model's mode is restored."""
    was_training = net.training
    net.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for x, y in data_mod.batches(images, labels, EVAL_BATCH_SIZE, shuffle=False, device=device):
            logits = net(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
    net.train(was_training)
    return loss_sum / len(labels), correct / len(labels)


class _Progress:
    """A tqdm bar per epoch on a terminal; nothing otherwise (the caller prints a line per epoch)."""

    def __init__(self, enabled: bool, total: int, epoch: int, epochs: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, file=sys.stderr)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    dataset: Optional["data_mod.FashionMNIST"] = None,
    progress: Optional[bool] = None,
    log: Callable[[str], None] = print,
    stop_after: Optional[int] = None,
) -> RunResult:
    """Train as `config` says, writing the run directory; returns the metrics history.

    resume: continue the run in ``config.out`` from its last checkpoint (its stored settings must
        match `config`, except that `epochs` may grow).
    dataset: an already loaded data set (the studies share one per process); default: load it.
    progress: a progress bar per epoch; default: when stderr is a terminal.
    stop_after: stop (as if interrupted) after this many epochs of this call; for tests of resume.
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    progress = sys.stderr.isatty() if progress is None else progress

    with run_lock(run_dir):
        if resume:
            _check_resumable(run_dir, config)
        elif (run_dir / "config.json").exists():
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
        if dataset is None:
            dataset = data_mod.load(config.data_dir, download=config.download)
        dataset = dataset.subset(config.train_subset, config.test_subset, seed=config.seed)
        save_config(run_dir, config, device, dataset.root)

        torch.manual_seed(config.seed)
        net = build_model(config.model, pool=config.pool, **config.model_options).to(device)
        optimizer = torch.optim.SGD(
            [p for p in net.parameters() if p.requires_grad],
            lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        )
        history: list[EpochMetrics] = []
        first_loss: Optional[float] = None
        if resume and (run_dir / "checkpoint.pt").exists():
            state = load_checkpoint(run_dir, map_location=device)
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            history = [EpochMetrics(**m) for m in state["history"]]
            first_loss = state["first_loss"]
            log(f"resuming {run_dir} after epoch {len(history)}")

        last = config.epochs if stop_after is None else min(config.epochs, len(history) + stop_after)
        for epoch in range(len(history) + 1, last + 1):
            metrics, first_loss = _train_epoch(net, optimizer, dataset, config, device, epoch, first_loss, progress)
            history.append(metrics)
            save_checkpoint(run_dir, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                "history": [dataclasses.asdict(m) for m in history], "first_loss": first_loss,
            })
            write_metrics(run_dir, history)
            plot_curves(run_dir, history, f"{config.model} ({config.pool} pooling), lr {config.lr:g}, batch {config.batch_size}")
            log(format_epoch(metrics, config.epochs))
    return RunResult(run_dir, history, config)


def _check_resumable(run_dir: Path, config: TrainConfig) -> None:
    stored = load_config(run_dir)
    mine, theirs = dataclasses.asdict(config), dataclasses.asdict(stored)
    differing = [k for k in mine if k not in ("epochs", "out", "download", "data_dir", "threads") and mine[k] != theirs[k]]
    if differing:
        detail = ", ".join(f"{k}: run has {theirs[k]!r}, asked {mine[k]!r}" for k in differing)
        raise ValueError(f"cannot resume {run_dir} with different settings ({detail}); drop those options")
    if config.epochs < stored.epochs:
        raise ValueError(f"cannot resume {run_dir} with fewer epochs ({config.epochs}) than it was started with ({stored.epochs})")


def _train_epoch(net, optimizer, dataset, config, device, epoch, first_loss, progress):
    net.train()
    images, labels = dataset.train_images, dataset.train_labels
    total = data_mod.num_batches(len(labels), config.batch_size)
    bar = _Progress(progress, total, epoch, config.epochs)
    loss_sum = 0.0
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no extra sync
    start = time.perf_counter()
    try:
        batches = data_mod.batches(images, labels, config.batch_size, shuffle=True,
                                   seed=epoch_seed(config.seed, epoch), device=device)
        for batch, (x, y) in enumerate(batches, start=1):
            logits = net(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()  # one sync per batch: the divergence check needs it anyway
            if first_loss is None:
                first_loss = value
            if not math.isfinite(value) or value > DIVERGENCE_FACTOR * first_loss:
                raise Diverged(epoch, batch, config.lr, value, first_loss)
            loss_sum += value * len(y)
            correct += (logits.argmax(dim=1) == y).sum()
            bar.update(value)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(net, dataset.test_images, dataset.test_labels, device)
    n = len(labels)
    return EpochMetrics(epoch, loss_sum / n, correct.item() / n, test_loss, test_acc, n / seconds), first_loss


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    return (f"epoch {m.epoch:>3}/{epochs}  train loss {m.train_loss:.4f}  train acc {m.train_acc:.4f}  "
            f"test loss {m.test_loss:.4f}  test acc {m.test_acc:.4f}  {m.examples_per_sec:,.0f} examples/s")
