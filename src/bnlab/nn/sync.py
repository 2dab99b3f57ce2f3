"""Synchronized batch normalization for data-parallel training: `SyncBatchNorm` and `convert_sync_batchnorm`.

The layer keeps the bookkeeping of `BatchNormBase` (parameters, running statistics, momentum, state
dict); in training inside a process group of two or more it normalizes with the statistics of the
global batch over all processes (the math and the collectives live in `bnlab.functional.sync`), on CPU with
gloo as on CUDA with NCCL. Run the distributed examples under ``torchrun`` or `bnlab.distributed.launch`;
outside a process group the layer is plain batch norm.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.lazy import LazyModuleMixin

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase, handed_over

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(BatchNormBase):
    r"""Batch normalization over an (N, C, ...) input with the statistics of the batch across all processes.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training within an initialized process group of two or more processes, E and Var (biased) are
    per channel over the concatenation of every process's input: the output, the input gradient and the
    running statistics equal those of single-process batch norm on the concatenated batch, whatever the
    shard sizes; a process with an empty shard (N = 0) still takes part, and gets an empty output (when
    every shard is empty, nothing moves: batch norm's empty batch, as torch's). The
    weight and bias gradients are each process's share, which DDP's averaging turns into the right
    gradient when each process backpropagates ``world_size / global_batch`` times the sum of its
    samples' losses (`bnlab.distributed.ddp_loss`; the module docstring of `bnlab.functional.sync` derives
    it). Every process must run the forward and the backward of every synchronized layer, in the same
    order. Collectives: one all_gather in the forward, one all_reduce in the backward.

    In evaluation the running statistics are used and nothing is communicated (without running
    statistics, each process's own batch statistics, as torch's SyncBatchNorm does). Outside a process
    group, or in a group of one, the layer is `bnlab.nn.BatchNorm` with batch statistics.

    Momentum follows torch: ``running = (1 - momentum) * running + momentum * batch``, the variance
    entering unbiased with the global count; ``momentum=None`` makes a cumulative average.

    Args:
        num_features: C.
        eps: added to the variance for stability. Default 1e-5.
        momentum: the weight of each new batch in the running statistics, or None for a cumulative
            average. Default 0.1.
        affine: learn a per-channel scale `weight` (init 1) and shift `bias` (init 0). Default True.
        track_running_stats: keep running statistics for evaluation. Default True.
        process_group: the processes whose statistics are merged; default None, the whole world.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; False keeps the scale but drops the shift.

    Shape:
        - Input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); N may be 0 (see above).
        - Output: the input's shape.

    Example (single process: plain batch norm):
        >>> import torch, bnlab.nn
        >>> bn = bnlab.nn.SyncBatchNorm(4)
        >>> y = bn(torch.randn(16, 4, 5, 5) * 3 + 1)
        >>> y.shape, bool(y.mean(dim=(0, 2, 3)).abs().max() < 1e-5)
        (torch.Size([16, 4, 5, 5]), True)

    Example (in each process of a process group, e.g. under torchrun)::

        net = bnlab.nn.convert_sync_batchnorm(net)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        x, y = x[start:stop], y[start:stop]             # this process's shard of the global batch
        loss_sum = torch.nn.functional.cross_entropy(ddp(x), y, reduction="sum")
        bnlab.distributed.ddp_loss(loss_sum, global_batch_size, world_size).backward()
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def synchronizes(self) -> bool:
        """Whether a forward pass now merges statistics across processes (training, group of two or more)."""
        return self.training and F.group_size(self.process_group) > 1

    def normalize(
        self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
        use_batch_stats: bool, momentum: float,
    ) -> Tensor:
        if not self.training:  # evaluation never communicates
            return super().normalize(input, running_mean, running_var, use_batch_stats, momentum)
        return F.sync_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, momentum, self.eps, self.process_group
        )


# The layers convert_sync_batchnorm replaces, with the input ranks each accepts (kept by the new layer).
_TORCH_RANKS = {
    torch.nn.BatchNorm1d: (2, 3),
    torch.nn.BatchNorm2d: (4,),
    torch.nn.BatchNorm3d: (5,),
    torch.nn.SyncBatchNorm: (2, 3, 4, 5),
}
_BNLAB_LAYERS = (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNorm)


def _accepted_ranks(module: Module) -> Optional[tuple[int, ...]]:
    """The input ranks of a layer convert_sync_batchnorm replaces; None for any other module."""
    if type(module) in _BNLAB_LAYERS:
        return tuple(module.input_dims)
    return _TORCH_RANKS.get(type(module))


def _to_sync(module: Module, process_group) -> Optional[SyncBatchNorm]:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert the uninitialized lazy layer {type(module).__name__}: its num_features is not "
            "known yet; run one forward pass through the model before convert_sync_batchnorm"
        )
    ranks = _accepted_ranks(module)
    if ranks is None:
        return None
    sync = SyncBatchNorm(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
        process_group, device="meta",
    )
    sync.input_dims = ranks
    return handed_over(module, sync)


def convert_sync_batchnorm(module: Module, process_group=None) -> Module:
    """Replace every batch-norm layer in `module` by a `SyncBatchNorm` holding the same tensors.

    Converted: bnlab's BatchNorm1d/2d/3d and the chapter's `BatchNorm`, torch's BatchNorm1d/2d/3d and
    torch's SyncBatchNorm (which refuses CPU tensors). Parameters and buffers are handed over as the same
    tensors, so optimizers stay valid and the state dict keeps its keys; eps, momentum, affine,
    track_running_stats, train/eval mode and the input ranks the old layer accepted are kept (a
    converted BatchNorm2d still rejects 2D input). Children are replaced in place and the (possibly new)
    root is returned. Uninitialized lazy layers raise ValueError; run a forward pass first.

    Args:
        module: the model, or a single layer.
        process_group: the group the new layers synchronize over; default None, the whole world.

    Example:
        >>> import torch, bnlab.nn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> weight = net[1].weight
        >>> net = bnlab.nn.convert_sync_batchnorm(net)
        >>> type(net[1]).__name__, net[1].weight is weight
        ('SyncBatchNorm', True)
    """
    converted = _to_sync(module, process_group)
    if converted is not None:
        return converted
    for name, child in module.named_children():
        module._modules[name] = convert_sync_batchnorm(child, process_group)
    return module
