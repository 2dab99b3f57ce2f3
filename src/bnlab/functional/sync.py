"""Batch statistics over every process of a torch.distributed group: SyncBatchNorm's math.

Synchronized batch normalization. In data-parallel training each process sees only its shard of the
global batch; plain batch norm would normalize every shard by its own statistics. `sync_batch_norm`
(and the layer `bnlab.nn.SyncBatchNorm` built on it) normalizes by the statistics of the whole global
batch, so the result equals single-process batch norm on the concatenated batch, for shards of any
size, an empty one included. Per channel, with process p holding n_p values, mean_p and
M2_p = sum (x - mean_p)^2:

    n    = sum_p n_p
    mean = sum_p n_p * mean_p / n
    M2   = sum_p M2_p + sum_p n_p * (mean_p - mean)^2      (Chan et al.; every term >= 0)
    var  = M2 / n                                           (the running variance gets M2 / (n - 1))

merged in float64 by Chan's pairwise update, process after process in rank order
(`bnlab.functional.core.chan_merge_all`, the merge `accumulate_stats` pools batches with), so there is
no E[x^2] - E[x]^2 cancellation. With xc = x - mean, invstd =
1 / sqrt(var + eps) and the sums over all processes, the hand-derived backward is

    dx          = weight * invstd * (dy - sum(dy) / n - xc * invstd^2 * sum(dy * xc) / n)
    d weight_p  = invstd * sum_p(dy * xc)        (this process's share: see below)
    d bias_p    = sum_p(dy)

Collectives per training step and layer: one all_gather of the packed (n_p, mean_p, M2_p), 2C + 1
float64 values, in the forward; one all_reduce of (sum dy, sum dy * xc), 2C float64 values, in the
backward (none if the input needs no gradient). Evaluation mode uses the running statistics and
communicates nothing.

The gradient convention. Let every process p backpropagate its own loss L_p, and S = sum_p L_p. The
backward all-reduces the sums of dy, so each process's input gradient is dS/dx_p, the coupling through
the global statistics included; the weight and bias gradients are this process's share of dS/dweight
and dS/dbias (the shares sum to them), exactly as every other parameter's gradient is its share. DDP
averages over the W processes: every parameter gets dS/dtheta / W. The gradient of the global mean
loss L = (1 / B) sum_i loss_i over a global batch of B samples is therefore what DDP produces when
S = W * L, i.e. when process p backpropagates

    L_p = (W / B) * sum over its own samples of loss_i            (`ddp_loss`)

With equal shards of B / W samples that is the usual per-process mean loss; with unequal shards the
per-process mean would weight the samples of a small shard more, and is wrong. (Returning all-reduced
weight and bias gradients instead of shares would make DDP's average W times too large for them.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnlab.functional.batch_norm import batch_norm
from bnlab.functional.core import (chan_merge_all, check_arguments, compute_dtype, in_graph, moved, per_channel,
                                   per_channel_affine, reduce_dims, update_running)

__all__ = ["sync_batch_norm", "SyncBatchNormFunction", "group_size"]


def group_size(process_group=None) -> int:
    """The number of processes in `process_group` (default: the whole world); 1 outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    size = dist.get_world_size(process_group)
    if size < 1:  # torch answers -1 to a process outside the group
        raise ValueError(
            f"this process (rank {dist.get_rank()}) is not a member of the process group it was given; "
            "pass a group it belongs to (every rank calls torch.distributed.new_group for every group)"
        )
    return size


def _check_backend(input: Tensor, process_group) -> None:
    backend = dist.get_backend(process_group)
    if backend == "nccl" and not input.is_cuda:
        raise ValueError(
            f"the process group's backend is NCCL, which reduces CUDA tensors only, but the input is on "
            f"{input.device}; move the model and data to the GPU, or use a gloo process group for CPU"
        )


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> Tensor:
    r"""Training-mode batch normalization with the statistics of the batch over every process of the group.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    where E and Var (biased) run over the concatenation of every process's input. The running
    statistics, if given, are updated in place with torch's momentum convention,
    ``running = (1 - momentum) * running + momentum * batch``, the variance entering unbiased with the
    global count. Every process of the group must call this (in the same order as its other
    collectives), also with an empty input (0 samples), which then contributes nothing; when every
    process's input is empty, each gets an empty output and the running statistics stay, as batch
    norm's on an empty batch (`bnlab.functional.empty_batch`). Outside an initialized process group, or
    in a group of one, this is `bnlab.functional.batch_norm` in training.

    See the module docstring for the backward and the gradient convention under DDP.

    Args:
        input: (N, C, ...) with 2 to 5 dims, floating; N may be 0.
        running_mean, running_var: (C,) running statistics, or None.
        weight, bias: (C,) scale and shift, or None.
        momentum: the weight of the batch statistics in the running update.
        eps: added to the variance for stability.
        process_group: the processes to synchronize over; default the whole world.

    Returns:
        A tensor of the input's shape and dtype.

    Example::

        # in every process of an initialized process group
        y = sync_batch_norm(x_shard, running_mean, running_var, weight, bias)
    """
    if group_size(process_group) == 1:
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    check_arguments(input, running_mean, running_var, weight, bias)
    _check_backend(input, process_group)
    if in_graph(input):
        return _sync_batch_norm_in_graph(input, running_mean, running_var, weight, bias, momentum, eps, process_group)
    return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps, process_group)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the processes, by functional collectives that torch.compile puts in its
    graph: the gradient of a sum over processes is the sum over processes of the gradient."""

    @staticmethod
    def forward(ctx, local, process_group):
        ctx.process_group = process_group
        return funcol.all_reduce(local, "sum", process_group or dist.group.WORLD)

    @staticmethod
    def backward(ctx, grad):
        return funcol.all_reduce(grad.contiguous(), "sum", ctx.process_group or dist.group.WORLD), None


def _sync_batch_norm_in_graph(input, running_mean, running_var, weight, bias, momentum, eps, process_group):
    """`sync_batch_norm` for torch.compile (fullgraph included): the global statistics by two
    differentiable all_reduces — count and sum, then the sum of squares about the global mean (an exact
    two-pass variance) — and the rest in tensor ops, which autograd differentiates into the module
    docstring's backward. The eager path's single-value check reads the count back from the tensor,
    which a graph cannot; every shard empty leaves the running statistics as they are, as eagerly."""
    x = input.to(compute_dtype(input.dtype))
    dims, channels = reduce_dims(x), x.shape[1]
    count = x.new_full((1,), x.numel() // channels)
    sums = _AllReduceSum.apply(torch.cat([count, x.sum(dims)]), process_group)
    total = sums[0]
    mean = sums[1:] / total.clamp(min=1)
    centered = x - per_channel(mean, x)
    m2 = _AllReduceSum.apply((centered * centered).sum(dims), process_group)
    var = m2 / total.clamp(min=1)
    if running_mean is not None:
        seen = total > 0
        running_mean.copy_(torch.where(seen, moved(running_mean, mean, momentum), running_mean))
        running_var.copy_(torch.where(seen, moved(running_var, m2 / (total - 1).clamp(min=1), momentum),
                                      running_var))
    y = per_channel_affine(centered * per_channel(torch.rsqrt(var + eps), x), weight, bias)
    return y.to(input.dtype)


def _all_gather_rows(local: Tensor, process_group) -> Tensor:
    """(world, len(local)): every process's `local`, in rank order, from one all_gather."""
    world = group_size(process_group)
    if world == 1:
        return local.unsqueeze(0)
    rows = local.new_empty(world, local.numel())
    # The list form of all_gather: gloo, NCCL and older torch versions all support it.
    dist.all_gather(list(rows.unbind(0)), local, group=process_group)
    return rows


def _all_reduce_sum(local: Tensor, process_group) -> Tensor:
    if group_size(process_group) > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    return local


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the processes of a group, with the hand-derived backward of the module
    docstring. Arguments as `sync_batch_norm` (weight and bias may be None). Without a process group it
    computes plain training-mode batch norm, which gradcheck can hold it to.

    Saves the input, the weight and the per-channel global mean and inverse standard deviation. First
    derivatives only: a double backward raises.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, process_group):
        x = input.to(compute_dtype(input.dtype))
        dims, channels = reduce_dims(x), x.shape[1]
        count = x.numel() // channels
        local = torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device)
        local[0] = count
        if count:
            # var_mean reduces with Welford's algorithm; the merge below is in float64.
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            local[1 : channels + 1] = mean
            local[channels + 1 :] = var.double() * count
        gathered = _all_gather_rows(local, process_group)
        counts = [int(count) for count in gathered[:, 0].tolist()]
        total, mean, m2 = chan_merge_all(counts, gathered[:, 1 : channels + 1], gathered[:, channels + 1 :],
                                         lambda delta: delta * delta)
        if total == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {total} over all "
                f"{gathered.shape[0]} processes (this process's input size {tuple(input.shape)}); use a larger "
                "global batch, or call .eval() to normalize with the running statistics"
            )
        if total:
            var = m2 / total
            update_running(running_mean, mean, momentum)
            update_running(running_var, m2 / (total - 1), momentum)
        else:
            # Every shard empty (seen by every process alike): torch's empty batch. The output is empty,
            # the running statistics stay, and mean 0 and var 1 keep the weight gradient 0, not NaN.
            mean, var = local.new_zeros(channels), local.new_ones(channels)

        mean, invstd = mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        y = (x - per_channel(mean, x)) * per_channel(scale, x)
        if bias is not None:
            y = y + per_channel(bias.to(x.dtype), x)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total, ctx.process_group = total, process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        input, weight, mean, invstd = ctx.saved_tensors
        x = input.to(mean.dtype)
        dy = dy.to(mean.dtype)
        dims, channels = reduce_dims(x), x.shape[1]
        xc = x - per_channel(mean, x)
        sum_dy = dy.sum(dims)
        sum_dy_xc = (dy * xc).sum(dims)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            totals = _all_reduce_sum(torch.cat([sum_dy, sum_dy_xc]).double(), ctx.process_group)
            total_dy, total_dy_xc = totals.to(x.dtype).split(channels)
            scale = invstd if weight is None else invstd * weight.to(x.dtype)
            count = max(ctx.total, 1)  # 0 only when every shard is empty, and dy with them
            centered = dy - per_channel(total_dy / count, x)
            centered = centered - xc * per_channel(invstd.square() * total_dy_xc / count, x)
            grad_input = (centered * per_channel(scale, x)).to(input.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xc * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None
