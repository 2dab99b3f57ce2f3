"""The chapter's "lite" batch norms: mean-only (centering only) and variance-only (scaling only),
each with a hand-derived backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab.functional.core import check_arguments, check_mode, compute_dtype, empty_batch, in_graph, per_channel, per_channel_affine, reduce_dims, unbiased, update_running

__all__ = [
    "MeanOnlyBatchNormFunction", "VarianceOnlyBatchNormFunction", "mean_only_batch_norm",
    "variance_only_batch_norm",
]


def _channel_moments(x: Tensor, running_mean, running_var, training: bool, momentum: float):
    """Per-channel (mean, biased var): the batch's, with the running statistics updated as batch_norm
    updates them (variance entering unbiased), or the running ones in evaluation."""
    if not training:
        return running_mean.to(x.dtype), running_var.to(x.dtype)
    var, mean = torch.var_mean(x, dim=reduce_dims(x), correction=0)
    update_running(running_mean, mean, momentum)
    update_running(running_var, unbiased(var, x), momentum)
    return mean, var


def _lite_batch_norm(function, forward, input, running_mean, running_var, weight, bias, training, *rest):
    """What the two lite norms share around their math: the checks, the empty batch (batch norm's, in
    either mode), and the choice between the plain-ops `forward` (in a graph, where autograd and
    torch.func differentiate it) and the hand-differentiated `function`."""
    check_arguments(input, running_mean, running_var, weight, bias)
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    check_mode(input, running_mean, running_var, training)
    if in_graph(input):
        return forward(input, weight, bias, running_mean, running_var, training, *rest)[0]
    return function.apply(input, weight, bias, running_mean, running_var, training, *rest)


def _saved_for_backward(ctx, dy):
    """The start of both backwards: the saved input, weight and per-channel statistic; the input and dy
    in the compute dtype; the dims the statistics reduce over."""
    input, weight, statistic = ctx.saved_tensors
    x = input.to(compute_dtype(input.dtype))
    return input, weight, statistic, x, dy.to(x.dtype), reduce_dims(x)


def _mean_only_forward(input, weight, bias, running_mean, running_var, training, momentum):
    """(y, mean) of mean-only batch norm in plain tensor ops: the Function's forward, and in a graph the
    whole computation (autograd, and torch.func's transforms, differentiate it there)."""
    x = input.to(compute_dtype(input.dtype))
    mean, _ = _channel_moments(x, running_mean, running_var, training, momentum)
    return per_channel_affine(x - per_channel(mean, x), weight, bias).to(input.dtype), mean


def _variance_only_forward(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """(y, invstd) of variance-only batch norm in plain tensor ops (see `_mean_only_forward`)."""
    x = input.to(compute_dtype(input.dtype))
    _, var = _channel_moments(x, running_mean, running_var, training, momentum)
    invstd = torch.rsqrt(var + eps)
    return per_channel_affine(x * per_channel(invstd, x), weight, bias).to(input.dtype), invstd


class MeanOnlyBatchNormFunction(torch.autograd.Function):
    r"""``y = (x - mean) * weight + bias``: batch normalization without the division, hand-differentiated.

    Derivation, per channel over its n values, with the batch mean ``mean = sum(x) / n``: y_i depends on
    x_i directly and on every x_j through the mean, ``d mean / d x_i = 1 / n``, so

        dx_i     = weight * (dy_i - sum_j dy_j / n)          (training; the mean is the batch's)
        dx_i     = weight * dy_i                             (evaluation; the mean is a constant)
        d weight = sum_i dy_i * (x_i - mean),   d bias = sum_i dy_i

    The backward is written in tensor ops on the saved input (the mean recomputed from it), so autograd
    differentiates it again for double backward.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum):
        y, mean = _mean_only_forward(input, weight, bias, running_mean, running_var, training, momentum)
        ctx.save_for_backward(input, weight, mean)
        ctx.training = training
        return y

    @staticmethod
    def backward(ctx, dy):
        input, weight, mean, x, dy, dims = _saved_for_backward(ctx, dy)
        if ctx.training:
            mean = x.mean(dims)  # a function of x, for double backward
        centered = x - per_channel(mean, x)
        sum_dy = dy.sum(dims)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                dy_centered = dy - per_channel(sum_dy / (x.numel() // x.shape[1]), x)
            else:
                dy_centered = dy
            dx = per_channel_affine(dy_centered, weight, None).to(input.dtype)
        param_dtype = weight.dtype if weight is not None else input.dtype
        if ctx.needs_input_grad[1]:
            dw = (dy * centered).sum(dims).to(param_dtype)
        if ctx.needs_input_grad[2]:
            db = sum_dy.to(param_dtype)
        return dx, dw, db, None, None, None, None


class VarianceOnlyBatchNormFunction(torch.autograd.Function):
    r"""``y = x / sqrt(var + eps) * weight + bias``: batch normalization without the centering.

    `var` is the batch's centered (biased) variance; the mean is subtracted inside the variance only.
    Derivation, per channel over its n values, with ``s = (var + eps)^(-1/2)``, ``z = x * s`` (what is
    returned before the affine) and ``x_hat = (x - mean) * s``: y_i = weight * x_i * s, and
    ``d var / d x_i = 2 (x_i - mean) / n`` (the mean's own term sums to zero), so
    ``d s / d x_i = -s^3 (x_i - mean) / n`` and

        dx_i     = weight * s * (dy_i - x_hat_i * sum_j dy_j z_j / n)    (training)
        dx_i     = weight * s * dy_i                                    (evaluation, s from running_var)
        d weight = sum_i dy_i z_i,   d bias = sum_i dy_i

    Written in tensor ops on the saved input, so double backward works.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        y, invstd = _variance_only_forward(input, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(input, weight, invstd)
        ctx.training, ctx.eps = training, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        input, weight, invstd, x, dy, dims = _saved_for_backward(ctx, dy)
        if ctx.training:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            invstd = torch.rsqrt(var + ctx.eps)  # a function of x, for double backward
        scale = per_channel(invstd, x)
        sum_dy_z = (dy * x * scale).sum(dims)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dy_projected = dy
            if ctx.training:
                x_hat = (x - per_channel(mean, x)) * scale
                dy_projected = dy - x_hat * per_channel(sum_dy_z / (x.numel() // x.shape[1]), x)
            dx = per_channel_affine(dy_projected * scale, weight, None).to(input.dtype)
        param_dtype = weight.dtype if weight is not None else input.dtype
        if ctx.needs_input_grad[1]:
            dw = sum_dy_z.to(param_dtype)
        if ctx.needs_input_grad[2]:
            db = dy.sum(dims).to(param_dtype)
        return dx, dw, db, None, None, None, None, None


def mean_only_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
) -> Tensor:
    r"""Mean-only batch normalization, the chapter's "lite" BN that only centers.

    .. math:: y = (x - \mathrm{E}[x]) \cdot \gamma + \beta

    Arguments, running-statistics updates and empty batches as `batch_norm` (both running statistics
    are tracked, so the state is batch norm's; evaluation uses running_mean only). Backward:
    `MeanOnlyBatchNormFunction`.

    Example:
        >>> import torch
        >>> x = torch.randn(16, 3) * 4 + 2
        >>> y = mean_only_batch_norm(x, None, None, training=True)
        >>> bool(y.mean(0).abs().max() < 1e-5), bool(torch.allclose(y.std(0), x.std(0)))
        (True, True)
    """
    return _lite_batch_norm(MeanOnlyBatchNormFunction, _mean_only_forward, input, running_mean, running_var, weight,
                            bias, training, momentum)


def variance_only_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Variance-only batch normalization, the chapter's "lite" BN that only divides.

    .. math:: y = \frac{x}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the batch's centered (biased) variance; arguments, updates and empty batches as `batch_norm`;
    evaluation uses running_var only. Backward: `VarianceOnlyBatchNormFunction`.

    Example:
        >>> import torch
        >>> x = torch.randn(64, 3) * 4 + 2
        >>> y = variance_only_batch_norm(x, None, None, training=True)
        >>> bool(torch.allclose(y.var(0, correction=0), torch.ones(3), atol=1e-4))
        True
    """
    return _lite_batch_norm(VarianceOnlyBatchNormFunction, _variance_only_forward, input, running_mean, running_var,
                            weight, bias, training, momentum, eps)
