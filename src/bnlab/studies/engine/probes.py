"""Measuring a network while it trains, without changing what it learns.

- `side_effect_free`: forward passes that leave parameters and running statistics untouched, so that
  a probe in train mode does not disturb the training it measures.
- `activations_at`: capture the inputs or outputs of chosen modules during a forward pass.
- `channel_columns`: one column per channel, for correlations between channels.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import Tensor, nn
from torch.func import functional_call


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
