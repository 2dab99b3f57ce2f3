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

Data parallel (``nproc`` > 1, ``bnlab train --nproc N``, or launched by torchrun): N processes train
one model with DistributedDataParallel, every batch norm synchronized (`bnlab.nn.SyncBatchNorm`). All
draw the same seeded order and each takes its contiguous shard of every global batch (unequal, even
empty, when the batch does not divide), backpropagating `bnlab.distributed.ddp_loss`, so that a step
equals the one-process step on the whole batch up to float rounding. Rank 0 alone writes the run
directory and computes the test metrics; train metrics are summed over all processes.

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
import inspect
import io
import json
import math
import os
import platform
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab import data as data_mod
from bnlab import distributed, files, kernels
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

    def __reduce__(self):
        return Diverged, (self.epoch, self.batch, self.lr, self.loss, self.first_loss)


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
    threads: Optional[int] = None  # per process; with nproc > 1 the default is cores // nproc
    nproc: int = 1  # processes training data-parallel
    precise_stats: bool = False  # after the last epoch, set BN statistics exactly over the training set
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
            (isinstance(self.nproc, int) and self.nproc >= 1, f"nproc must be a positive integer, got {self.nproc!r}"),
            (self.nproc == 1 or self.network_config().norm != "batchnorm-chapter",
             f"{self.model} uses the chapter's naive batch norm, which cannot merge statistics across "
             "processes; use bn-lenet or bn-lenet-torch with --nproc, or --nproc 1"),
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
    timeout: Optional[float] = None,
) -> RunResult:
    """Train as `config` says, writing the run directory; returns the metrics history.

    resume: continue the run in ``config.out`` from its last checkpoint (its stored settings must
        match `config`, except that `epochs` may grow).
    dataset: an already loaded data set (the studies share one per process); default: load it.
    progress: a progress bar per epoch; default: when stderr is a terminal.
    stop_after: stop (as if interrupted) after this many epochs of this call; for tests of resume.
    timeout: data parallel only: end the processes and raise TimeoutError after this many seconds.
    """
    config.validate()
    progress = sys.stderr.isatty() if progress is None else progress
    launched = distributed.rank_environment()
    if config.nproc > 1 or (launched is not None and launched.world_size > 1):
        result = _train_data_parallel(config, resume, dataset, progress, log, stop_after, timeout)
    else:
        result = _train_single(config, resume, dataset, progress, log, stop_after)
    if config.precise_stats and len(result.history) == config.epochs and (launched is None or launched.rank == 0):
        apply_precise_stats(result, dataset, log)
    return result


def _train_single(config, resume, dataset, progress, log, stop_after) -> RunResult:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    run_dir = Path(config.out) if config.out else default_run_dir(config)

    with run_lock(run_dir):
        _check_run_dir(run_dir, config, resume)
        if dataset is None:
            dataset = data_mod.load(config.data_dir, download=config.download)
        dataset = dataset.subset(config.train_subset, config.test_subset, seed=config.seed)
        save_config(run_dir, config, device, dataset.root)

        torch.manual_seed(config.seed)
        net, optimizer = _build(config, device)
        history: list[EpochMetrics] = []
        first_loss: Optional[float] = None
        if resume and (run_dir / "checkpoint.pt").exists():
            history, first_loss = _restore(load_checkpoint(run_dir, map_location=device), net, optimizer)
            log(f"resuming {run_dir} after epoch {len(history)}")

        last = config.epochs if stop_after is None else min(config.epochs, len(history) + stop_after)
        for epoch in range(len(history) + 1, last + 1):
            metrics, first_loss = _train_epoch(net, optimizer, dataset, config, device, epoch, first_loss, progress)
            history.append(metrics)
            _record_epoch(run_dir, config, net, optimizer, history, first_loss, log)
    return RunResult(run_dir, history, config)


def apply_precise_stats(result: RunResult, dataset, log: Callable[[str], None] = print) -> dict:
    """Replace the finished run's running BN statistics by the exact ones over its training set.

    `bnlab.nn.recompute_stats` over the training set in the run's batch size; the checkpoint is saved
    with the new statistics (so `bnlab evaluate` and `inspect` see them), and precise_stats.json
    records the test metrics before (moving averages, as in metrics.csv) and after.
    """
    from bnlab.nn import recompute_stats

    config, run_dir = result.config, result.run_dir
    device = resolve_device(config.device)
    if dataset is None:
        dataset = data_mod.load(config.data_dir, download=config.download)
    dataset = dataset.subset(config.train_subset, config.test_subset, seed=config.seed)
    state = load_checkpoint(run_dir, map_location=device)
    net = build_model(config.model, pool=config.pool, **config.model_options).to(device)
    net.load_state_dict(state["model"])
    batches = data_mod.batches(dataset.train_images, dataset.train_labels, config.batch_size, shuffle=False, device=device)
    recompute_stats(net, (x for x, _ in batches))
    test_loss, test_acc = evaluate(net, dataset.test_images, dataset.test_labels, device)
    summary = {"moving_average": {"test_loss": result.final.test_loss, "test_acc": result.final.test_acc},
               "precise": {"test_loss": test_loss, "test_acc": test_acc}}
    save_checkpoint(run_dir, {**state, "model": net.state_dict(), "precise_stats": True})
    files.write_json(run_dir / "precise_stats.json", summary)
    log(f"precise BN statistics over {len(dataset.train_labels)} training examples: test loss {test_loss:.4f}, "
        f"test acc {test_acc:.4f} (moving averages: {result.final.test_acc:.4f})")
    return summary


def _check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    if resume:
        _check_resumable(run_dir, config)
    elif (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")


def _build(config: TrainConfig, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = build_model(config.model, pool=config.pool, **config.model_options).to(device)
    optimizer = torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )
    return net, optimizer


def _restore(state: dict, net: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[EpochMetrics], Optional[float]]:
    """Load a checkpoint into the model and optimizer; its (history, first_loss)."""
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return [EpochMetrics(**m) for m in state["history"]], state["first_loss"]


def _record_epoch(run_dir, config, net, optimizer, history, first_loss, log) -> None:
    """Checkpoint, metrics.csv, curves.png and the log line of the epoch just finished."""
    save_checkpoint(run_dir, {
        "model": net.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
        "history": [dataclasses.asdict(m) for m in history], "first_loss": first_loss,
    })
    write_metrics(run_dir, history)
    plot_curves(run_dir, history, f"{config.model} ({config.pool} pooling), lr {config.lr:g}, batch {config.batch_size}")
    log(format_epoch(history[-1], config.epochs))


def _check_resumable(run_dir: Path, config: TrainConfig) -> None:
    stored = load_config(run_dir)
    mine, theirs = dataclasses.asdict(config), dataclasses.asdict(stored)
    # nproc may change: a data-parallel step is the one-process step, up to float rounding.
    ignored = ("epochs", "out", "download", "data_dir", "threads", "nproc")
    differing = [k for k in mine if k not in ignored and mine[k] != theirs[k]]
    if differing:
        detail = ", ".join(f"{k}: run has {theirs[k]!r}, asked {mine[k]!r}" for k in differing)
        raise ValueError(f"cannot resume {run_dir} with different settings ({detail}); drop those options")
    if config.epochs < stored.epochs:
        raise ValueError(f"cannot resume {run_dir} with fewer epochs ({config.epochs}) than it was started with ({stored.epochs})")


def _train_epoch(net, optimizer, dataset, config, device, epoch, first_loss, progress):
    return sgd_epoch(net, optimizer, dataset, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                     lr=config.lr, device=device, first_loss=first_loss,
                     progress=_Progress(progress, data_mod.num_batches(len(dataset.train_labels), config.batch_size),
                                        epoch, config.epochs))


def sgd_epoch(
    net: nn.Module, optimizer: torch.optim.Optimizer, dataset, *, batch_size: int, seed: int, epoch: int,
    lr: float, device: torch.device, first_loss: Optional[float], progress: Optional[_Progress] = None,
    penalty: Optional[Callable[[nn.Module], Optional[torch.Tensor]]] = None,
    before_step: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor, int], None]] = None, first_step: int = 0,
) -> tuple[EpochMetrics, float]:
    """One epoch of minibatch SGD as `bnlab train` runs it, and (EpochMetrics, the run's first loss).

    The data order depends on (seed, epoch) only; each batch's loss goes through `check_divergence`;
    train metrics average over the epoch in train mode, test metrics come from `evaluate` after it.
    Studies that need more pass `penalty(net)`, a term added to the loss before backward (the metrics
    keep the plain cross-entropy), and `before_step(net, x, y, step)`, called before every step (step
    counted from `first_step`), whose time is left out of examples_per_sec.
    """
    net.train()
    images, labels = dataset.train_images, dataset.train_labels
    loss_sum, probing = 0.0, 0.0
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no extra sync
    start = time.perf_counter()
    try:
        batches = data_mod.batches(images, labels, batch_size, shuffle=True, seed=epoch_seed(seed, epoch), device=device)
        for batch, (x, y) in enumerate(batches, start=1):
            if before_step is not None:
                probe_start = time.perf_counter()
                before_step(net, x, y, first_step + batch - 1)
                probing += time.perf_counter() - probe_start
            logits = net(x)
            loss = nn.functional.cross_entropy(logits, y)
            extra = penalty(net) if penalty is not None else None
            optimizer.zero_grad(set_to_none=True)
            (loss if extra is None else loss + extra).backward()
            optimizer.step()
            value = loss.item()  # one sync per batch: the divergence check needs it anyway
            first_loss = check_divergence(value, first_loss, epoch, batch, lr)
            loss_sum += value * len(y)
            correct += (logits.argmax(dim=1) == y).sum()
            if progress is not None:
                progress.update(value)
    finally:
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - start - probing
    test_loss, test_acc = evaluate(net, dataset.test_images, dataset.test_labels, device)
    n = len(labels)
    return EpochMetrics(epoch, loss_sum / n, correct.item() / n, test_loss, test_acc, n / seconds), first_loss


def check_divergence(value: float, first_loss: Optional[float], epoch: int, batch: int, lr: float) -> float:
    """Raise Diverged if the batch's loss `value` blew up; the first loss of the run (this one if none yet)."""
    if first_loss is None:
        first_loss = value
    if not math.isfinite(value) or value > DIVERGENCE_FACTOR * first_loss:
        raise Diverged(epoch, batch, lr, value, first_loss)
    return first_loss


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    return (f"epoch {m.epoch:>3}/{epochs}  train loss {m.train_loss:.4f}  train acc {m.train_acc:.4f}  "
            f"test loss {m.test_loss:.4f}  test acc {m.test_acc:.4f}  {m.examples_per_sec:,.0f} examples/s")


# ---- data-parallel training ------------------------------------------------------------------------


def _train_data_parallel(config, resume, dataset, progress, log, stop_after, timeout) -> RunResult:
    """Under torchrun, be one of its processes; otherwise spawn config.nproc processes and wait for them."""
    launched = distributed.rank_environment()
    if launched is not None:
        if config.nproc not in (1, launched.world_size):
            raise ValueError(f"nproc is {config.nproc} but the launcher started {launched.world_size} processes; "
                             "drop --nproc under torchrun")
        config = dataclasses.replace(config, nproc=launched.world_size)
        config.validate()
        device = _rank_device(config, launched.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with distributed.joined_process_group(distributed.backend_for(device)):
            run_dir, history = _train_rank(config, resume, dataset, progress, log, stop_after)
        return RunResult(run_dir, history, config)

    device = resolve_device(config.device)
    if device.type == "cuda" and torch.cuda.device_count() < config.nproc:
        raise ValueError(f"nproc {config.nproc} needs a GPU per process, but {torch.cuda.device_count()} are "
                         "visible; lower --nproc or use --device cpu")
    if dataset is None:  # load (and download) once, here, rather than in every process
        dataset = data_mod.load(config.data_dir, download=config.download)
    results = distributed.launch(
        _launched_rank, config.nproc, args=(config, resume, dataset, progress, stop_after),
        backend=distributed.backend_for(device), timeout=timeout, on_message=log,
    )
    run_dir, history = results[0]
    return RunResult(run_dir, history, config)


def _launched_rank(config, resume, dataset, progress, stop_after):
    return _train_rank(config, resume, dataset, progress, distributed.report, stop_after)


def _rank_device(config: TrainConfig, local_rank: int) -> torch.device:
    device = resolve_device(config.device)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _broadcast_from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train_rank(config, resume, dataset, progress, log, stop_after) -> tuple[Path, list[EpochMetrics]]:
    """One process of data-parallel training, in an initialized default process group; every process
    returns the run directory and rank 0's history."""
    from torch.nn.parallel import DistributedDataParallel

    from bnlab.nn import convert_sync_batchnorm

    rank, world = dist.get_rank(), dist.get_world_size()
    launched = distributed.rank_environment()
    local_rank, local_world = (launched.local_rank, launched.local_world_size) if launched else (rank, world)
    torch.set_num_threads(config.threads or max(1, _usable_cores() // local_world))
    device = _rank_device(config, local_rank)
    writer = rank == 0
    with ExitStack() as held:
        # Rank 0 checks, locks and prepares the run directory; every process learns the outcome, so that
        # a refusal stops them all alike instead of leaving the others waiting in a collective.
        failure: Optional[Exception] = None
        outcome: dict = {}
        if writer:
            try:
                run_dir = Path(config.out) if config.out else default_run_dir(config)
                held.enter_context(run_lock(run_dir))
                _check_run_dir(run_dir, config, resume)
                if dataset is None:
                    dataset = data_mod.load(config.data_dir, download=config.download)
                save_config(run_dir, config, device, dataset.root)
                state = load_checkpoint(run_dir) if resume and (run_dir / "checkpoint.pt").exists() else None
                outcome = {"run_dir": run_dir, "state": state}
            except Exception as exc:  # noqa: BLE001 - re-raised below, in every process
                failure, outcome = exc, {"error": str(exc)}
        outcome = _broadcast_from_rank0(outcome)
        if failure is not None:
            raise failure
        if "error" in outcome:
            raise ValueError(outcome["error"])
        run_dir = outcome["run_dir"]
        if dataset is None:
            dataset = data_mod.load(config.data_dir, download=config.download)
        dataset = dataset.subset(config.train_subset, config.test_subset, seed=config.seed)

        torch.manual_seed(config.seed)
        net, optimizer = _build(config, device)
        net = convert_sync_batchnorm(net)  # keeps the parameter tensors: the optimizer stays valid
        history: list[EpochMetrics] = []
        first_loss: Optional[float] = None
        if outcome["state"] is not None:
            history, first_loss = _restore(outcome["state"], net, optimizer)
            if writer:
                log(f"resuming {run_dir} after epoch {len(history)}")
        # SyncBatchNorm leaves identical running statistics in every process: no buffer broadcast per step.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})  # torch < 2.13
        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      **no_buffer_sync)

        last = config.epochs if stop_after is None else min(config.epochs, len(history) + stop_after)
        for epoch in range(len(history) + 1, last + 1):
            # Dropout masks independent across processes, and a function of (seed, epoch, rank) on resume.
            torch.manual_seed(epoch_seed(config.seed, epoch) * world + rank)
            metrics, first_loss = _train_epoch_data_parallel(
                ddp, optimizer, dataset, config, device, epoch, first_loss, progress and writer, writer)
            if writer:
                history.append(metrics)
                _record_epoch(run_dir, config, net, optimizer, history, first_loss, log)
        history = _broadcast_from_rank0(history)
    return run_dir, history


def data_parallel_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One SGD step of data-parallel training on the global batch (x, y); every process runs it.

    This process takes its contiguous shard (`bnlab.distributed.shard_bounds`) and backpropagates
    `bnlab.distributed.ddp_loss` of its summed cross-entropy, so that DDP's average of the gradients is
    the gradient of the global batch's mean loss: the one-process step. Returns (sum of the losses,
    correct predictions) over the global batch, summed over all processes, in float64.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = distributed.shard_bounds(len(y), world, rank)
    shard_x, shard_y = x[start:stop], y[start:stop]
    logits = net(shard_x)
    loss_sum = nn.functional.cross_entropy(logits, shard_y, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    distributed.ddp_loss(loss_sum, len(y), world).backward()
    optimizer.step()
    totals = torch.stack([loss_sum.detach().double(), (logits.argmax(dim=1) == shard_y).sum().double()])
    dist.all_reduce(totals)
    return totals


def _train_epoch_data_parallel(ddp, optimizer, dataset, config, device, epoch, first_loss, progress, writer):
    ddp.train()
    images, labels = dataset.train_images, dataset.train_labels
    bar = _Progress(progress, data_mod.num_batches(len(labels), config.batch_size), epoch, config.epochs)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum and correct, all processes
    start = time.perf_counter()
    try:
        # Every process draws the same order: the global batches are the one-process run's.
        batches = data_mod.batches(images, labels, config.batch_size, shuffle=True,
                                   seed=epoch_seed(config.seed, epoch), device=device)
        for batch, (x, y) in enumerate(batches, start=1):
            batch_totals = data_parallel_step(ddp, optimizer, x, y)
            value = batch_totals[0].item() / len(y)
            first_loss = check_divergence(value, first_loss, epoch, batch, config.lr)
            totals += batch_totals
            bar.update(value)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    test_loss, test_acc = math.nan, math.nan
    if writer:  # once, on rank 0; evaluation uses the running statistics and communicates nothing
        test_loss, test_acc = evaluate(ddp.module, dataset.test_images, dataset.test_labels, device)
    n = len(labels)
    return EpochMetrics(epoch, totals[0].item() / n, totals[1].item() / n, test_loss, test_acc, n / seconds), first_loss
