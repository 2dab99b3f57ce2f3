"""Batch normalization, the math: the transform, its hand-derived backward, and the momentum conventions.

The transform (Ioffe & Szegedy, 2015), per channel c over the batch and every spatial position:

    mean_c = E[x_c],  var_c = E[(x_c - mean_c)^2]           (biased: divided by n, not n - 1)
    y      = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

In training the batch's own statistics are used and the running statistics move towards them; in
evaluation the running statistics replace them. The backward, with x_hat = (x - mean) * invstd and
n values per channel, is derived by hand rather than by autograd through the elementwise ops:

    d bias   = sum(dy)
    d weight = sum(dy * x_hat)
    dx       = weight * invstd * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n)    (training)
    dx       = weight * invstd * dy                                               (evaluation)

Two implementations compute it: the compiled CPU kernels (`bnlab.kernels`, float32 and float64) and
a pure-PyTorch path (any device and floating dtype); `BNLAB_KERNELS` chooses, and the tests hold them
to each other. Double backward goes through the pure-PyTorch formula above, which autograd can
differentiate.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from bnlab import kernels

__all__ = ["batch_norm", "BatchNormFunction", "convert_momentum", "MOMENTUM_CONVENTIONS", "check_input"]

# How each framework spells the momentum of the running statistics. "new": the weight of the batch,
# running = (1 - m) * running + m * batch (torch, default 0.1). "old": the weight of the running value,
# running = m * running + (1 - m) * batch (Keras and Flax default 0.99, MXNet and the D2L chapter 0.9).
MOMENTUM_CONVENTIONS = {
    "torch": "new",
    "pytorch": "new",
    "bnlab": "new",
    "keras": "old",
    "tensorflow": "old",
    "flax": "old",
    "jax": "old",
    "mxnet": "old",
    "d2l": "old",
    "chapter": "old",
}

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = frozenset(kernels.KernelLibrary.DTYPES)


def convert_momentum(momentum: float, source: str, target: str = "torch") -> float:
    """Translate a batch-norm momentum between frameworks' conventions.

    torch's ``momentum=0.1`` means "take 10% of the new batch statistic"; Keras' and Flax's ``0.99`` and
    MXNet's and the D2L chapter's ``0.9`` mean "keep 99% (90%) of the old running value". Porting the
    number unchanged is a classic bug: the running statistics then barely move, or forget at once.

    Args:
        momentum: the value in the `source` convention, in [0, 1].
        source: the framework it comes from, one of ``MOMENTUM_CONVENTIONS`` (e.g. "keras", "d2l").
        target: the framework it is for; default "torch" (bnlab uses torch's convention).

    Example:
        >>> round(convert_momentum(0.99, "keras"), 6)
        0.01
        >>> round(convert_momentum(0.1, "torch", "mxnet"), 6)
        0.9
    """
    for name in (source, target):
        if name.lower() not in MOMENTUM_CONVENTIONS:
            raise ValueError(
                f"unknown momentum convention {name!r}; expected one of {', '.join(MOMENTUM_CONVENTIONS)}"
            )
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    same = MOMENTUM_CONVENTIONS[source.lower()] == MOMENTUM_CONVENTIONS[target.lower()]
    return float(momentum) if same else 1.0 - float(momentum)


def check_input(
    input: Tensor,
    num_features: Optional[int] = None,
    tensors: Sequence[tuple[str, Optional[Tensor]]] = (),
) -> None:
    """Raise ValueError unless `input` is a non-empty floating (N, C, ...) tensor whose C matches.

    `num_features` is the expected C (a layer's); `tensors` are (name, per-channel tensor) pairs that
    must each hold C values.
    """
    if not isinstance(input, Tensor):
        raise ValueError(f"expected a torch.Tensor input, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(
            f"expected an input of shape (N, C, ...) with at least 2 dimensions, got {input.dim()}D input "
            f"of shape {tuple(input.shape)}; add a batch dimension with input.unsqueeze(0)"
        )
    if input.dtype not in _FLOATING:
        raise ValueError(
            f"expected a floating-point input (float16, bfloat16, float32 or float64), got {input.dtype}; "
            "convert it first, e.g. input.float()"
        )
    if input.numel() == 0:
        raise ValueError(
            f"got an empty batch of shape {tuple(input.shape)}; batch normalization needs at least one "
            "value per channel: skip empty batches before the model"
        )
    channels = input.shape[1]
    if num_features is not None and channels != num_features:
        raise ValueError(
            f"expected {num_features} channels in dim 1 of the input, got {channels} "
            f"(input shape {tuple(input.shape)}); build the layer with num_features={channels} "
            "or feed it the right tensor"
        )
    for name, t in tensors:
        if t is not None and t.numel() != channels:
            raise ValueError(
                f"{name} has {t.numel()} values but the input has {channels} channels "
                f"(input shape {tuple(input.shape)}); they must match"
            )


def check_batch_size(input: Tensor) -> None:
    """Training needs two or more values per channel (torch's condition), or the variance is 0/0."""
    if input.numel() // input.shape[1] == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}; "
            "use a batch of at least 2 samples, or call .eval() to normalize with the running statistics"
        )


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch normalization of an (N, C, ...) tensor over every dim but C; a peer of ``F.batch_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training the statistics are the batch's (biased variance); if `running_mean` and `running_var`
    are given they are updated in place with torch's momentum convention,
    ``running = (1 - momentum) * running + momentum * batch``, the variance entering unbiased
    (times n / (n - 1)). See `convert_momentum` for Keras/Flax/MXNet values. In evaluation the
    running statistics are used.

    Args:
        input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); float16, bfloat16, float32 or float64,
            contiguous or channels-last. Half-precision statistics accumulate in float32.
        running_mean, running_var: (C,) running statistics, or None (training only).
        weight, bias: (C,) scale gamma and shift beta, or None (1 and 0).
        training: use batch statistics (and update the running ones).
        momentum: the weight of the batch statistics in the running update.
        eps: added to the variance for stability.

    Returns:
        A tensor of the input's shape, dtype and memory format.

    Example:
        >>> import torch
        >>> from bnlab.functional import batch_norm
        >>> x = torch.randn(8, 3, 5, 5) * 4 + 2
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, mean, var, training=True)
        >>> bool(y.mean(dim=(0, 2, 3)).abs().max() < 1e-5), bool((mean != 0).all())
        (True, True)
    """
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    if training:
        check_batch_size(input)
    elif running_mean is None or running_var is None:
        raise ValueError(
            "running_mean and running_var are required when training=False; pass training=True to "
            "normalize with the batch statistics"
        )
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum, eps)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) tensor to broadcast over x: (1, C, 1, ...)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- pure-PyTorch path ------------------------------------------------------------------------------


def _update_running(running: Optional[Tensor], batch: Tensor, momentum: float) -> None:
    if running is not None:
        with torch.no_grad():
            running.mul_(1.0 - momentum).add_(batch.to(running.dtype), alpha=momentum)


def _forward_torch(input, weight, bias, running_mean, running_var, training, momentum, eps):
    x = input.to(_compute_dtype(input.dtype))
    if training:
        # var_mean reduces with Welford's algorithm: no E[x^2] - E[x]^2 cancellation.
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
        count = x.numel() // x.shape[1]
        _update_running(running_mean, mean, momentum)
        _update_running(running_var, var * (count / max(count - 1, 1)), momentum)
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(x.dtype)
    y = (x - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(x.dtype), x)
    return y.to(input.dtype), mean, invstd


def _backward_torch(x, dy, weight, mean, invstd, training, eps, needs):
    """The hand-derived backward in tensor ops; with grad mode on, autograd differentiates it again."""
    x_in_dtype = x.dtype
    x = x.to(_compute_dtype(x.dtype))
    dy = dy.to(x.dtype)
    dims = _reduce_dims(x)
    if training and torch.is_grad_enabled():
        # Double backward: the statistics are functions of x, so recompute them where autograd sees it.
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    x_hat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * x_hat).sum(dims)
    dx = None
    if needs[0]:
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        if training:
            count = x.numel() // x.shape[1]
            dy = dy - _per_channel(sum_dy / count, x) - x_hat * _per_channel(sum_dy_xhat / count, x)
        dx = (dy * _per_channel(scale, x)).to(x_in_dtype)
    param_dtype = weight.dtype if weight is not None else x_in_dtype
    dw = sum_dy_xhat.to(param_dtype) if needs[1] else None
    db = sum_dy.to(param_dtype) if needs[2] else None
    return dx, dw, db


# ---- compiled path ----------------------------------------------------------------------------------


def _kernel_view(x: Tensor) -> tuple[Tensor, int, int, int]:
    """The kernels' view of x: (x, N, C, S) for planar (N, C, S) memory, (x, M, C, 0) for interleaved
    (M, C) memory (2D input and channels-last); any other layout is copied to contiguous first."""
    n, c = x.shape[0], x.shape[1]
    if not x.is_contiguous():
        if x.dim() > 2 and x.movedim(1, -1).is_contiguous():
            return x, x.numel() // c, c, 0
        x = x.contiguous()
    spatial = x.numel() // (n * c)
    return (x, n, c, spatial) if spatial > 1 else (x, n, c, 0)


def _compiled_supported(input: Tensor, *per_channel: Optional[Tensor]) -> bool:
    # Written as plain loops over cheap attributes: this runs on every call, and for small layers the
    # Python overhead is most of the cost (t.device would build a device object each time).
    dtype = input.dtype
    if not input.is_cpu or dtype not in _KERNEL_DTYPES:
        return False
    for t in per_channel:
        if t is not None and (t.dtype != dtype or not t.is_cpu or not t.is_contiguous()):
            return False
    return True


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _forward_compiled(lib, input, weight, bias, running_mean, running_var, training, momentum, eps):
    x, n, c, s = _kernel_view(input)
    y = torch.empty_like(x)
    invstd = x.new_empty(c)
    if training:
        mean = x.new_empty(c)
        lib.forward_train[x.dtype](
            x.data_ptr(), y.data_ptr(), n, c, s, _ptr(weight), _ptr(bias), mean.data_ptr(),
            invstd.data_ptr(), _ptr(running_mean), _ptr(running_var), momentum, eps,
        )
        updated = [t for t in (running_mean, running_var) if t is not None]
        if updated:  # written through a pointer: tell autograd, as an in-place op would
            torch.autograd.graph.increment_version(updated)
    else:
        mean = running_mean
        lib.forward_eval[x.dtype](
            x.data_ptr(), y.data_ptr(), n, c, s, _ptr(weight), _ptr(bias), mean.data_ptr(),
            running_var.data_ptr(), invstd.data_ptr(), eps,
        )
    return y, mean, invstd


def _backward_compiled(lib, x, dy, weight, mean, invstd, training, needs):
    x, n, c, s = _kernel_view(x)
    if dy.stride() != x.stride():  # e.g. an expanded gradient, or another memory format
        dy = torch.empty_like(x).copy_(dy)
    dx = torch.empty_like(x) if needs[0] else None
    dw = mean.new_empty(c) if needs[1] else None
    db = mean.new_empty(c) if needs[2] else None
    lib.backward[x.dtype](
        x.data_ptr(), dy.data_ptr(), _ptr(dx), n, c, s, mean.data_ptr(), invstd.data_ptr(),
        _ptr(weight), _ptr(dw), _ptr(db), int(training),
    )
    return dx, dw, db


class BatchNormFunction(torch.autograd.Function):
    """Batch normalization with a hand-derived backward (see the module docstring for the formulas).

    Saves the input, the weight and the per-channel mean and inverse standard deviation: nothing of
    input size beyond the input itself.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        lib = kernels.library()
        ctx.compiled = lib is not None and _compiled_supported(input, weight, bias, running_mean, running_var)
        if ctx.compiled:
            y, mean, invstd = _forward_compiled(
                lib, input, weight, bias, running_mean, running_var, training, momentum, eps
            )
        else:
            y, mean, invstd = _forward_torch(input, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training, ctx.eps = training, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if ctx.compiled and not torch.is_grad_enabled():
            grads = _backward_compiled(kernels.library(), x, dy, weight, mean, invstd, ctx.training, needs)
        else:
            grads = _backward_torch(x, dy, weight, mean, invstd, ctx.training, ctx.eps, needs)
        return (*grads, None, None, None, None, None)
