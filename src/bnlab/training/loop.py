"""The one training loop: minibatch SGD on Fashion-MNIST as the D2L chapter runs it, as a real tool.

`Loop` runs the epochs of every training in bnlab: `bnlab train` (one process, or data-parallel), the
studies' runs with hooks (penalties, probes, per-step noise, custom models) and the depth study's deep
MLPs. What differs between them is a `step` function and `Hooks`; the epoch loop, the data order, the
divergence criterion, the evaluation and the history rows are the same for all.

Train metrics are averaged over the epoch in train mode (as the chapter prints them); test metrics are
computed in eval mode on the whole test set. `train(config, resume=True)` continues from the checkpoint
and ends with the same metrics as an uninterrupted run: the data order of epoch e depends only on
(seed, e), and the RNG state is checkpointed. Same seed and device give identical metrics.

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

    from bnlab.training import TrainConfig, train
    result = train(TrainConfig(model="bn-lenet", epochs=1, out="runs/demo"))
    print(result.final.test_acc)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab import data as data_mod
from bnlab import distributed
from bnlab.models import build_model, norm_layers
from bnlab.training import rundir
from bnlab.training.config import TrainConfig, resolve_device
from bnlab.training.rundir import EpochMetrics

DIVERGENCE_FACTOR = 100.0
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

    def where(self) -> dict:
        """{"epoch", "batch", "loss"}: where it blew up, as the studies record it."""
        return {"epoch": self.epoch, "batch": self.batch, "loss": self.loss}


@dataclass
class RunResult:
    run_dir: Path
    history: list[EpochMetrics]
    config: TrainConfig

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]


class Hooks:
    """What a run adds to the loop; the defaults add nothing. State that must survive a resume goes
    through `state_dict`/`load_state_dict` (tensors, numbers, lists and dicts only)."""

    def setup(self, net: nn.Module) -> nn.Module:
        """The network to train, given the freshly built one (before any checkpoint is loaded into it)."""
        return net

    def penalty(self, net: nn.Module) -> Optional[Tensor]:
        """A term added to the minibatch loss before backward (the reported loss stays the cross-entropy)."""
        return None

    def before_step(self, net: nn.Module, x: Tensor, y: Tensor, step: int) -> None:
        """Called before optimization step `step` (0-based over the whole run) on its batch; its time is
        left out of examples_per_sec."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---- one step ---------------------------------------------------------------------------------------

# A step: (net, optimizer, x, y, hooks) -> (summed loss of the batch, mean loss, correct predictions).
Step = Callable[[nn.Module, torch.optim.Optimizer, Tensor, Tensor, Hooks], tuple[float, float, Tensor]]


def sgd_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, hooks: Hooks):
    """One step of one-process minibatch SGD on the mean cross-entropy (plus the hooks' penalty)."""
    logits = net(x)
    loss = nn.functional.cross_entropy(logits, y)
    extra = hooks.penalty(net)
    optimizer.zero_grad(set_to_none=True)
    (loss if extra is None else loss + extra).backward()
    optimizer.step()
    value = loss.item()  # one sync per batch: the divergence check needs it anyway
    return value * len(y), value, (logits.argmax(dim=1) == y).sum()


def data_parallel_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
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


def _ddp_step(net, optimizer, x, y, hooks):
    totals = data_parallel_step(net, optimizer, x, y)
    loss_sum = totals[0].item()
    return loss_sum, loss_sum / len(y), totals[1]


# ---- the loop -------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The data order of an epoch depends on (seed, epoch) only, so a resumed run sees the same batches."""
    return seed * 1_000_003 + epoch


def check_divergence(value: float, first_loss: Optional[float], epoch: int, batch: int, lr: float) -> float:
    """Raise Diverged if the batch's loss `value` blew up; the first loss of the run (this one if none yet)."""
    if first_loss is None:
        first_loss = value
    if not math.isfinite(value) or value > DIVERGENCE_FACTOR * first_loss:
        raise Diverged(epoch, batch, lr, value, first_loss)
    return first_loss


def evaluate(net: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> tuple[float, float]:
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


@dataclass
class Loop:
    """The epochs of one training run.

    net: what the steps run (the model itself, or its DDP or torch.compile wrapper);
    module: the model that is evaluated and checkpointed (default `net`);
    step: `sgd_step` in one process, the data-parallel step under DDP;
    evaluates: whether this process computes the test metrics (DDP: rank 0 only; else NaN);
    before_epoch: called with the epoch number before it starts (DDP seeds dropout per rank there).
    """

    net: nn.Module
    optimizer: torch.optim.Optimizer
    dataset: data_mod.FashionMNIST
    device: torch.device
    batch_size: int
    seed: int
    lr: float
    epochs: int
    module: Optional[nn.Module] = None
    step: Step = sgd_step
    hooks: Hooks = field(default_factory=Hooks)
    progress: bool = False
    evaluates: bool = True
    before_epoch: Callable[[int], None] = lambda epoch: None

    def steps_per_epoch(self) -> int:
        return data_mod.num_batches(len(self.dataset.train_labels), self.batch_size)

    def run_epoch(self, epoch: int, first_loss: Optional[float]) -> tuple[EpochMetrics, float]:
        """One epoch and (its EpochMetrics, the run's first loss); Diverged if the loss blows up."""
        self.net.train()
        images, labels = self.dataset.train_images, self.dataset.train_labels
        bar = _Progress(self.progress, self.steps_per_epoch(), epoch, self.epochs)
        first_step = (epoch - 1) * self.steps_per_epoch()
        loss_sum, correct, probing = 0.0, 0, 0.0
        start = time.perf_counter()
        try:
            batches = data_mod.batches(images, labels, self.batch_size, shuffle=True,
                                       seed=epoch_seed(self.seed, epoch), device=self.device)
            for batch, (x, y) in enumerate(batches, start=1):
                probe_start = time.perf_counter()
                self.hooks.before_step(self.net, x, y, first_step + batch - 1)
                probing += time.perf_counter() - probe_start
                batch_loss_sum, value, batch_correct = self.step(self.net, self.optimizer, x, y, self.hooks)
                first_loss = check_divergence(value, first_loss, epoch, batch, self.lr)
                loss_sum += batch_loss_sum
                correct = correct + batch_correct  # summed on the device: no extra sync per batch
                bar.update(value)
        finally:
            bar.close()
        seconds = time.perf_counter() - start - probing
        test_loss, test_acc = math.nan, math.nan
        if self.evaluates:  # evaluation uses the running statistics and communicates nothing
            test_loss, test_acc = evaluate(self.module or self.net, self.dataset.test_images,
                                           self.dataset.test_labels, self.device)
        n = len(labels)
        return EpochMetrics(epoch, loss_sum / n, float(correct) / n, test_loss, test_acc, n / seconds), first_loss

    def run(self, history: list[EpochMetrics], first_loss: Optional[float], *, last: Optional[int] = None,
            after_epoch: Callable[[list[EpochMetrics], Optional[float]], None] = lambda history, first: None
            ) -> Optional[float]:
        """Epochs len(history) + 1 .. `last` (default: all), each appended to `history` and then passed
        to `after_epoch(history, first_loss)` (to checkpoint); the run's first loss. On Diverged,
        `history` holds the epochs finished before."""
        for epoch in range(len(history) + 1, (self.epochs if last is None else last) + 1):
            self.before_epoch(epoch)
            metrics, first_loss = self.run_epoch(epoch, first_loss)
            history.append(metrics)
            after_epoch(history, first_loss)
        return first_loss


# ---- building the model ----------------------------------------------------------------------------------


def build(config: TrainConfig, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (BN momentum and eps as configured) on `device`, and SGD over its trainable parameters."""
    net = build_model(config.model, pool=config.pool, **config.model_options)
    set_bn_hyperparameters(net, config.bn_momentum, config.bn_eps)
    net = net.to(device)
    optimizer = torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )
    return net, optimizer


def set_bn_hyperparameters(net: nn.Module, momentum: Optional[float], eps: Optional[float]) -> None:
    """Set momentum and eps of every batch norm layer of `net` (None: leave as built); ValueError if a
    value is given and `net` has no batch norm with running statistics."""
    if momentum is None and eps is None:
        return
    layers = [layer for _, layer in norm_layers(net) if hasattr(layer, "momentum") and hasattr(layer, "eps")]
    if not layers:
        raise ValueError("the model has no batch norm layer to take --bn-momentum/--bn-eps; drop them")
    for layer in layers:
        layer.momentum = layer.momentum if momentum is None else momentum
        layer.eps = layer.eps if eps is None else eps


def trained_form(net: nn.Module, compile: bool) -> nn.Module:
    """What the steps run: `torch.compile(net)` when asked (it shares net's parameters and buffers, so
    checkpoints of `net` keep their plain keys), else `net`."""
    return torch.compile(net) if compile else net


# ---- bnlab train --------------------------------------------------------------------------------------


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


def _last_epoch(config: TrainConfig, history: list, stop_after: Optional[int]) -> int:
    return config.epochs if stop_after is None else min(config.epochs, len(history) + stop_after)


def _recorder(run_dir: Path, config: TrainConfig, net: nn.Module, optimizer, log):
    """after_epoch for `bnlab train`: checkpoint, metrics.csv, curves.png and the epoch's log line."""
    title = f"{config.model} ({config.pool} pooling), lr {config.lr:g}, batch {config.batch_size}"

    def record(history: list[EpochMetrics], first_loss: Optional[float]) -> None:
        state = rundir.checkpoint_state(net, optimizer, history, first_loss, {}, rundir.architecture(config))
        try:
            rundir.save_checkpoint(run_dir, state)
            rundir.write_metrics(run_dir, history)
            rundir.plot_curves(run_dir, history, title)
        except OSError as exc:
            raise OSError(f"{exc}; the run is intact up to its last saved epoch: continue it with "
                          f"`bnlab train --out {run_dir} --resume`") from None
        log(format_epoch(history[-1], config.epochs))

    return record


def _train_single(config, resume, dataset, progress, log, stop_after) -> RunResult:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    run_dir = Path(config.out) if config.out else rundir.default_run_dir(config)

    with rundir.run_lock(run_dir):
        # Everything that can refuse the run comes before the first write into its directory.
        rundir.check_run_dir(run_dir, config, resume)
        state = rundir.resumable_state(run_dir, config, log, map_location=device) if resume else None
        if dataset is None:
            dataset = data_mod.load(config.data_dir, download=config.download)
        dataset = dataset.subset(config.train_subset, config.test_subset, seed=config.seed)

        torch.manual_seed(config.seed)
        net, optimizer = build(config, device)
        history: list[EpochMetrics] = []
        first_loss: Optional[float] = None
        if state is not None:
            history, first_loss = rundir.restore(state, net, optimizer, run_dir / "checkpoint.pt")
        rundir.save_config(run_dir, config, device, dataset.root)
        if state is not None:
            log(f"resuming {run_dir} after epoch {len(history)}")
        loop = Loop(trained_form(net, config.compile), optimizer, dataset, device, config.batch_size, config.seed,
                    config.lr, config.epochs, module=net, progress=progress)
        loop.run(history, first_loss, last=_last_epoch(config, history, stop_after),
                 after_epoch=_recorder(run_dir, config, net, optimizer, log))
    return RunResult(run_dir, history, config)


def apply_precise_stats(result: RunResult, dataset, log: Callable[[str], None] = print) -> dict:
    """Replace the finished run's running BN statistics by the exact ones over its training set.

    `bnlab.nn.recompute_stats` over the training set in the run's batch size; the checkpoint is saved
    with the new statistics (so `bnlab evaluate` and `inspect` see them), and precise_stats.json
    records the test metrics before (moving averages, as in metrics.csv) and after.
    """
    from bnlab import files
    from bnlab.nn import recompute_stats

    config, run_dir = result.config, result.run_dir
    device = resolve_device(config.device)
    if dataset is None:
        dataset = data_mod.load(config.data_dir, download=config.download)
    dataset = dataset.subset(config.train_subset, config.test_subset, seed=config.seed)
    state = rundir.load_checkpoint(run_dir, map_location=device)
    net, _ = build(config, device)
    rundir.load_weights(net, state["model"], run_dir / "checkpoint.pt")
    batches = data_mod.batches(dataset.train_images, dataset.train_labels, config.batch_size, shuffle=False, device=device)
    recompute_stats(net, (x for x, _ in batches))
    test_loss, test_acc = evaluate(net, dataset.test_images, dataset.test_labels, device)
    summary = {"moving_average": {"test_loss": result.final.test_loss, "test_acc": result.final.test_acc},
               "precise": {"test_loss": test_loss, "test_acc": test_acc}}
    rundir.save_checkpoint(run_dir, {**state, "model": net.state_dict(), "precise_stats": True})
    files.write_json(run_dir / "precise_stats.json", summary)
    log(f"precise BN statistics over {len(dataset.train_labels)} training examples: test loss {test_loss:.4f}, "
        f"test acc {test_acc:.4f} (moving averages: {result.final.test_acc:.4f})")
    return summary


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


def _prepare_run_dir_on_rank0(config, resume, dataset, device, held: ExitStack, log) -> dict:
    """Rank 0 checks, locks and prepares the run directory; every process learns the outcome
    ({"run_dir", "state"}), so that a refusal stops them all alike instead of leaving the others
    waiting in a collective."""
    failure: Optional[Exception] = None
    outcome: dict = {}
    if dist.get_rank() == 0:
        try:
            run_dir = Path(config.out) if config.out else rundir.default_run_dir(config)
            held.enter_context(rundir.run_lock(run_dir))
            # Everything that can refuse the run comes before the first write into its directory.
            rundir.check_run_dir(run_dir, config, resume)
            state = rundir.resumable_state(run_dir, config, log) if resume else None
            if state is not None:
                with torch.random.fork_rng(devices=[]):
                    rundir.restore(state, *build(config, torch.device("cpu")), run_dir / "checkpoint.pt")
            if dataset is None:
                dataset = data_mod.load(config.data_dir, download=config.download)
            rundir.save_config(run_dir, config, device, dataset.root)
            outcome = {"run_dir": run_dir, "state": state}
        except Exception as exc:  # noqa: BLE001 - re-raised below, in every process
            failure, outcome = exc, {"error": str(exc)}
    outcome = _broadcast_from_rank0(outcome)
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise ValueError(outcome["error"])
    return outcome


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
        outcome = _prepare_run_dir_on_rank0(config, resume, dataset, device, held, log)
        run_dir = outcome["run_dir"]
        if dataset is None:
            dataset = data_mod.load(config.data_dir, download=config.download)
        dataset = dataset.subset(config.train_subset, config.test_subset, seed=config.seed)

        torch.manual_seed(config.seed)
        net, optimizer = build(config, device)
        net = convert_sync_batchnorm(net)  # keeps the parameter tensors: the optimizer stays valid
        history: list[EpochMetrics] = []
        first_loss: Optional[float] = None
        if outcome["state"] is not None:
            history, first_loss = rundir.restore(outcome["state"], net, optimizer, run_dir / "checkpoint.pt")
            if writer:
                log(f"resuming {run_dir} after epoch {len(history)}")
        # SyncBatchNorm leaves identical running statistics in every process: no buffer broadcast per step.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})  # torch < 2.13
        ddp = DistributedDataParallel(trained_form(net, config.compile),
                                      device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)

        def seed_dropout(epoch: int) -> None:
            # Dropout masks independent across processes, and a function of (seed, epoch, rank) on resume.
            torch.manual_seed(epoch_seed(config.seed, epoch) * world + rank)

        loop = Loop(ddp, optimizer, dataset, device, config.batch_size, config.seed, config.lr, config.epochs,
                    module=net, step=_ddp_step, progress=progress and writer, evaluates=writer,
                    before_epoch=seed_dropout)
        record = _recorder(run_dir, config, net, optimizer, log) if writer else (lambda history, first: None)
        loop.run(history, first_loss, last=_last_epoch(config, history, stop_after), after_epoch=record)
        history = _broadcast_from_rank0(history)
    return run_dir, history
