"""Pieces for studies whose runs need more than the shared "train" run kind (`research`, `smoothness`).

- `train_with_hooks`: the trainer's minibatch SGD (same model registry, seeded data order per epoch,
  divergence criterion and evaluation as `bnlab.train`), resumable per epoch, with `Hooks` to change
  the network, add a penalty to the loss, and probe the network before a step.
- `side_effect_free`: forward passes that leave parameters and running statistics untouched, so that
  a probe in train mode does not disturb the training it measures.
- `activations_at`: capture the inputs or outputs of chosen modules during a forward pass.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnlab import data as data_mod
from bnlab.models import build_model
from bnlab.studies.core import RunContext
from bnlab.train import Diverged, load_checkpoint, save_checkpoint, sgd_epoch


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


class Hooks:
    """What a study adds to the loop; the defaults add nothing. State that must survive a resume goes
    through `state_dict`/`load_state_dict` (tensors, numbers, lists and dicts only)."""

    def setup(self, net: nn.Module) -> nn.Module:
        """The network to train, given the freshly built one (before any checkpoint is loaded into it)."""
        return net

    def penalty(self, net: nn.Module) -> Optional[Tensor]:
        """A term added to the minibatch loss before backward (the reported loss stays the cross-entropy)."""
        return None

    def before_step(self, net: nn.Module, x: Tensor, y: Tensor, step: int) -> None:
        """Called before optimization step `step` (0-based over the whole run) on its batch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class LoopOutcome:
    net: nn.Module
    dataset: data_mod.FashionMNIST  # the subsets the run used
    history: list[dict]  # per epoch: epoch, train_loss, train_acc, test_loss, test_acc, seconds
    diverged: Optional[dict]  # {epoch, batch, loss} when the loss blew up, else None

    def result(self) -> dict:
        """The JSON result every custom run starts from, shaped like the "train" kind's."""
        if self.diverged:
            return {"status": "diverged", "diverged": self.diverged, "history": self.history}
        return {"status": "ok", "history": self.history}


def train_with_hooks(spec: LoopSpec, context: RunContext, hooks: Optional[Hooks] = None) -> LoopOutcome:
    """Train `spec` on the CPU with `hooks` (none: plain training), checkpointing after every epoch in
    context.run_dir.

    A run cut off mid-way resumes from its last finished epoch and ends as an uninterrupted one would:
    the data order of an epoch depends on (seed, epoch) only and nothing else draws random numbers.
    """
    hooks = hooks or Hooks()
    dataset = context.dataset().subset(spec.train_subset, spec.test_subset, seed=spec.seed)
    torch.manual_seed(spec.seed)
    net = hooks.setup(build_model(spec.model, **spec.model_options))
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=spec.lr)
    history: list[dict] = []
    first_loss: Optional[float] = None
    if (context.run_dir / "checkpoint.pt").exists():
        state = load_checkpoint(context.run_dir)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        hooks.load_state_dict(state["hooks"])
        history, first_loss = state["history"], state["first_loss"]
    steps_per_epoch = data_mod.num_batches(len(dataset.train_labels), spec.batch_size)
    for epoch in range(len(history) + 1, spec.epochs + 1):
        try:
            metrics, first_loss = _epoch(net, optimizer, dataset, spec, epoch, first_loss, hooks,
                                         first_step=(epoch - 1) * steps_per_epoch)
        except Diverged as exc:
            return LoopOutcome(net, dataset, history, {"epoch": exc.epoch, "batch": exc.batch, "loss": exc.loss})
        history.append(metrics)
        save_checkpoint(context.run_dir, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                          "hooks": hooks.state_dict(), "history": history, "first_loss": first_loss})
    return LoopOutcome(net, dataset, history, None)


def _epoch(net, optimizer, dataset, spec: LoopSpec, epoch: int, first_loss, hooks: Hooks, first_step: int):
    metrics, first_loss = sgd_epoch(net, optimizer, dataset, batch_size=spec.batch_size, seed=spec.seed,
                                    epoch=epoch, lr=spec.lr, device=torch.device("cpu"), first_loss=first_loss,
                                    penalty=hooks.penalty, before_step=hooks.before_step, first_step=first_step)
    row = dataclasses.asdict(metrics)
    row["seconds"] = len(dataset.train_labels) / row.pop("examples_per_sec")  # training time, probes left out
    return row, first_loss


# ---- measuring without side effects --------------------------------------------------------------------


def side_effect_free(net: nn.Module, x: Tensor, params: Optional[dict] = None, *, train: bool = True) -> Tensor:
    """net(x) with `params` (name -> tensor; default the net's own) in train or eval mode, leaving the
    net's parameters, running statistics and mode as they were: the buffers are copies, so the running
    statistics a train-mode pass updates are thrown away. Gradients flow to `params`."""
    params = dict(net.named_parameters()) if params is None else params
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    was_training = net.training
    net.train(train)
    try:
        return functional_call(net, (params, buffers), (x,))
    finally:
        net.train(was_training)


@contextmanager
def activations_at(modules: dict[str, nn.Module], which: str = "input") -> Iterator[dict[str, Tensor]]:
    """Within the block, every forward pass stores each module's input or output (detached) under its
    label in the yielded dict (the last pass wins)."""
    if which not in ("input", "output"):
        raise ValueError(f"which must be 'input' or 'output', got {which!r}")
    captured: dict[str, Tensor] = {}

    def recorder(label):
        def hook(module, args, output):
            captured[label] = (args[0] if which == "input" else output).detach()
        return hook

    handles = [m.register_forward_hook(recorder(label)) for label, m in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def channel_columns(t: Tensor) -> Tensor:
    """(values, C) from (N, C) or (N, C, H, W): one column per channel over the batch and positions."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).T
