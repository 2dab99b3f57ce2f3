"""Run functions the studies share, and the training runs they are built on.

- "train" (`train_run`): `bnlab train` with the run's parameters as TrainConfig fields, resumable; every
  study may use it (`SHARED_RUN_KINDS`); `trained_network` rebuilds its final network.
- `train_with_hooks`: the same loop (`bnlab.training.Loop`: model registry, seeded data order per epoch,
  divergence criterion, evaluation, checkpoint and history rows) on a run's own directory, resumable
  per epoch, with `Hooks` to change the network, add a penalty to the loss, and probe the network before
  a step; for studies whose runs need more than "train" (research, smoothness).
- `training_result`: the one shape of a training run's result, finished or diverged.

A run function takes (JSON parameters, RunContext) and returns a JSON-able dict; every kind of run is
registered in `bnlab.studies.RUN_KINDS`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from bnlab import data as data_mod
from bnlab.models import build_model
from bnlab.nn import recompute_stats
from bnlab.studies.engine.runner import RunContext
from bnlab.training import Diverged, Hooks, Loop, TrainConfig, read_metrics, rundir, train


def training_result(history: list[dict], diverged: Optional[dict] = None) -> dict:
    """The result of a training run: {"status": "ok", "history": rows} or, when the loss blew up,
    {"status": "diverged", "diverged": {epoch, batch, loss}, "history": the epochs finished before}."""
    if diverged:
        return {"status": "diverged", "diverged": diverged, "history": history}
    return {"status": "ok", "history": history}


def trained_network(params: dict, context: RunContext):
    """Train as the "train" run kind does (resumable), then rebuild the trained network from its checkpoint.

    Returns (result, the network in eval mode), or (result, None) when the run diverged: its checkpoint
    would hold an earlier epoch, not a trained model.
    """
    result = train_run(params, context)
    if result["status"] != "ok":
        return result, None
    net = build_model(params["model"], pool=params.get("pool", "avg"), **params.get("model_options", {}))
    net.load_state_dict(rundir.load_checkpoint(context.run_dir)["model"])
    return result, net.eval()


def with_precise_statistics(net, images, labels, batch_size: int):
    """A copy of `net` whose BN running statistics are recomputed exactly over (images, labels), taken in
    order in batches of `batch_size` (`bnlab.nn.recompute_stats`): the chapter's "standard practice" for
    prediction, free of the moving averages' lag. `net` itself is left as it was."""
    return recompute_stats(copy.deepcopy(net), data_mod.batches(images, labels, batch_size, shuffle=False))


def training_data(params: dict, context: RunContext):
    """The data set exactly as the training run saw it (the same seeded subsets)."""
    return context.dataset().subset(params.get("train_subset"), params.get("test_subset"), seed=params["seed"])


def train_run(params: dict, context: RunContext) -> dict:
    """`bnlab train` with `params` as TrainConfig fields, in a resumable run directory.

    Returns {"status": "ok", "history": [...]} or, when the loss blew up, {"status": "diverged",
    "diverged": {epoch, batch, loss}, "history": the epochs finished before}.
    """
    config = TrainConfig(**params, out=str(context.run_dir), data_dir=context.data_dir, download=context.download)
    resume = (context.run_dir / "config.json").exists()
    try:
        result = train(config, resume=resume, dataset=context.dataset(), progress=False, log=lambda line: None)
    except Diverged as exc:
        finished = read_metrics(context.run_dir) if (context.run_dir / "metrics.csv").exists() else []
        return training_result([dataclasses.asdict(m) for m in finished], exc.where())
    return training_result([dataclasses.asdict(m) for m in result.history])


SHARED_RUN_KINDS = {"train": train_run}


# ---- runs with hooks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopSpec:
    """What a custom run trains: a registered model with LeNetConfig overrides, plain SGD as `bnlab train`."""

    model: str
    lr: float
    epochs: int
    seed: int = 0
    batch_size: int = 128
    model_options: dict = dataclasses.field(default_factory=dict)
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None

    @classmethod
    def from_params(cls, params: dict) -> LoopSpec:
        """The loop's fields out of a run's parameters (the rest belong to the study)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class LoopOutcome:
    net: nn.Module
    dataset: data_mod.FashionMNIST  # the subsets the run used
    history: list[dict]  # per epoch: the fields of bnlab.training.EpochMetrics
    diverged: Optional[dict]  # {epoch, batch, loss} when the loss blew up, else None

    def result(self) -> dict:
        """The JSON result every custom run starts from, shaped like the "train" kind's."""
        return training_result(self.history, self.diverged)


def train_with_hooks(spec: LoopSpec, context: RunContext, hooks: Optional[Hooks] = None) -> LoopOutcome:
    """Train `spec` on the CPU with `hooks` (none: plain training), checkpointing after every epoch in
    context.run_dir.

    A run cut off mid-way resumes from its last finished epoch and ends as an uninterrupted one would:
    the data order of an epoch depends on (seed, epoch) only, and the checkpoint holds the RNG state
    and the hooks' state.
    """
    hooks = hooks or Hooks()
    dataset = context.dataset().subset(spec.train_subset, spec.test_subset, seed=spec.seed)
    torch.manual_seed(spec.seed)
    net = hooks.setup(build_model(spec.model, **spec.model_options))
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=spec.lr)
    history, first_loss = [], None
    if (context.run_dir / "checkpoint.pt").exists():
        state = rundir.load_checkpoint(context.run_dir)
        history, first_loss = rundir.restore(state, net, optimizer)
        hooks.load_state_dict(state["hooks"])

    def save(history, first_loss) -> None:
        rundir.save_checkpoint(context.run_dir,
                               rundir.checkpoint_state(net, optimizer, history, first_loss, hooks.state_dict()))

    loop = Loop(net, optimizer, dataset, torch.device("cpu"), spec.batch_size, spec.seed, spec.lr, spec.epochs,
                hooks=hooks)
    diverged = None
    try:
        loop.run(history, first_loss, after_epoch=save)
    except Diverged as exc:
        diverged = exc.where()
    return LoopOutcome(net, dataset, [dataclasses.asdict(m) for m in history], diverged)
