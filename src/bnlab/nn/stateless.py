"""Batch norm in pure training steps: `functional_call` returns a model's new running statistics.

torch.func's transforms (grad, vmap, ...) refuse a function that updates buffers in place, so torch
tells users to strip the running statistics from their batch norms (`replace_all_batch_norm_modules_`)
and lose them. `functional_call` keeps them, the way Flax's ``apply(..., mutable=["batch_stats"])``
does: it runs the model on the given parameters and buffers, every training-mode batch norm computes
its new running statistics with `bnlab.functional.batch_norm_with_stats` instead of writing them,
and they come back beside the output, ready to be fed to the next step.

Example, a pure SGD step under torch.func::

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}

    def loss_fn(params, buffers, x, y):
        out, new_buffers = bnlab.nn.functional_call(model, {**params, **buffers}, (x,))
        return torch.nn.functional.cross_entropy(out, y), new_buffers

    grads, buffers = torch.func.grad(loss_fn, has_aux=True)(params, buffers, x, y)
    params = {k: p - lr * grads[k] for k, p in params.items()}
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor
from torch.nn import Module

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNormBase, forwards_replaced

__all__ = ["functional_call"]

# Layers whose training step is batch norm's with torch's bookkeeping: bnlab's batch norm proper
# (the default `normalize`) and torch's own BatchNorm1d/2d/3d and SyncBatchNorm.
_TORCH_BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)


def _is_batch_norm_proper(m: Module) -> bool:
    if isinstance(m, BatchNormBase):
        return type(m).normalize is BatchNormBase.normalize
    return isinstance(m, _TORCH_BATCH_NORMS)


def functional_call(
    module: Module,
    parameters_and_buffers: Mapping[str, Tensor],
    args: Any = (),
    kwargs: Optional[dict] = None,
) -> tuple[Any, dict[str, Tensor]]:
    """``torch.func.functional_call`` that returns the batch norms' new running statistics.

    Runs ``module(*args, **kwargs)`` with its parameters and buffers replaced by
    `parameters_and_buffers` and mutates nothing. Every batch norm in training mode that tracks running
    statistics (bnlab's BatchNorm1d/2d/3d and the chapter's BatchNorm, and torch's BatchNorm layers)
    normalizes with its batch's statistics as usual and, instead
    of updating its buffers, reports ``running_mean``, ``running_var`` and ``num_batches_tracked`` after
    the step, with torch's momentum convention (``momentum=None``: the cumulative average).

    Args:
        module: the model.
        parameters_and_buffers: name -> tensor, as for ``torch.func.functional_call``.
        args, kwargs: the inputs (a single tensor may be passed as `args`).

    Returns:
        ``(output, new_buffers)``: new_buffers maps each updated buffer's name to its new value (other
        buffers are not in it); merge it into the buffers for the next step.

    Raises:
        ValueError: a training-mode layer with running statistics that are not batch norm's (the
            whitening layers, batch renorm, ghost and lite BNs): put it in eval mode or give it
            ``track_running_stats=False``.

    Example:
        >>> import torch, bnlab.nn
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), bnlab.nn.BatchNorm1d(3))
        >>> state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        >>> out, new = bnlab.nn.functional_call(net, state, (torch.randn(8, 4),))
        >>> sorted(new), int(net[1].num_batches_tracked)
        (['1.num_batches_tracked', '1.running_mean', '1.running_var'], 0)
    """
    updates: dict[str, Tensor] = {}
    with _reporting_batch_norms(module, updates):
        output = torch.func.functional_call(module, parameters_and_buffers, args, kwargs)
    return output, updates


@contextmanager
def _reporting_batch_norms(module: Module, updates: dict[str, Tensor]) -> Iterator[None]:
    """Give every training-mode batch norm that tracks statistics a forward that reports its new
    statistics into `updates`."""
    forwards = {}
    for name, m in module.named_modules():
        if not (m.training and getattr(m, "track_running_stats", False) and m.running_mean is not None):
            continue
        if not _is_batch_norm_proper(m):
            raise ValueError(
                f"functional_call: layer {name or type(m).__name__} ({type(m).__name__}) keeps running state "
                "that is not batch norm's statistics, so its new state cannot be returned; put it in eval "
                "mode or build it with track_running_stats=False"
            )
        forwards[m] = _reporting_forward(f"{name}." if name else "", updates)
    with forwards_replaced(forwards):
        yield


def _reporting_forward(prefix: str, updates: dict[str, Tensor]):
    def forward(self, input: Tensor) -> Tensor:
        if isinstance(self, BatchNormBase):
            self.check_input(input)
        else:
            self._check_input_dim(input)
        if input.numel() == 0:  # torch's rule for an empty batch: no statistic moves
            return F.batch_norm_with_stats(input, self.running_mean, self.running_var, self.weight, self.bias)[0]
        tracked = self.num_batches_tracked + 1
        momentum = 1.0 / tracked if self.momentum is None else self.momentum
        y, mean, var = F.batch_norm_with_stats(
            input, self.running_mean, self.running_var, self.weight, self.bias, momentum, self.eps
        )
        updates.update({prefix + "running_mean": mean, prefix + "running_var": var,
                        prefix + "num_batches_tracked": tracked})
        return y

    return forward
