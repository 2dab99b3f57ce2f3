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

Two implementations compute it: the compiled operator `bnlab::batch_norm` (`bnlab.kernels`: CPU
kernels and an autograd function in C++, float32 and float64) and a pure-PyTorch path
(`BatchNormFunction`, any device and floating dtype); `BNLAB_KERNELS` chooses, and the tests hold them
to each other. Double backward goes through the backward formula above written in tensor ops, which
autograd can differentiate (both implementations do this when the graph is being recorded).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
# By name, not through torch's modules: under torch.compile every attribute on the way to a function
# is a guard checked on each call, and the graph path below is traced on every compiled call of a layer.
from torch._C import _are_functorch_transforms_active as functorch_transforms_active
from torch.compiler import is_compiling, is_exporting
from torch.nn.functional import batch_norm as torch_batch_norm
from torch.onnx import is_in_onnx_export

from bnlab import kernels
from bnlab.functional.core import check_batch_size, check_arguments, check_mode, compute_dtype, empty_batch, in_graph, in_layout_of, moved, per_channel, reduce_dims, unbiased, update_running

__all__ = [
    "batch_norm", "batch_norm_with_stats", "batch_norm_checked", "batch_norm_unchecked", "backward_torch",
    "BatchNormFunction", "standardize",
]


_KERNEL_DTYPES = frozenset(kernels.DTYPES)


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
    running statistics are used. An empty input (N = 0, or torch's 1-D ``(0,)``) gives an empty
    output and leaves the running statistics alone, as torch's does (`empty_batch`).

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
    check_arguments(input, running_mean, running_var, weight, bias)
    return batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_with_stats(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum=0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Training-mode batch normalization as a pure function: ``(y, new_running_mean, new_running_var)``.

    The running statistics are returned, not updated in place, as Flax's ``mutable=["batch_stats"]``
    does: the form torch.func's transforms (grad, vmap) accept, where mutating a buffer is refused. ``y``
    is `batch_norm`'s training output; the new statistics are torch's momentum update
    ``(1 - momentum) * running + momentum * batch`` (the variance entering unbiased), detached. Written
    in plain tensor ops, which torch.func differentiates and vectorizes; `bnlab.nn.functional_call`
    applies it to every batch norm of a model.

    Args:
        input: (N, C, ...) floating tensor with two or more values per channel.
        running_mean, running_var: (C,) current running statistics, left unchanged.
        weight, bias: (C,) scale and shift, or None.
        momentum: a float, or a 0-dim tensor (1 / n for the cumulative average).
        eps: added to the variance.

    Example:
        >>> import torch
        >>> from bnlab.functional import batch_norm_with_stats
        >>> x = torch.randn(32, 3) * 2 + 5
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y, new_mean, new_var = batch_norm_with_stats(x, mean, var, momentum=1.0)
        >>> torch.allclose(new_mean, x.mean(0)), torch.allclose(new_var, x.var(0)), bool((mean == 0).all())
        (True, True, True)
    """
    check_arguments(input, running_mean, running_var, weight, bias)
    if input.numel() == 0:
        return empty_batch(input, weight, bias), running_mean, running_var
    check_batch_size(input)
    y, mean, _, var = _forward_torch(input, weight, bias, None, None, True, 0.0, eps)
    return y, moved(running_mean, mean, momentum), moved(running_var, unbiased(var, input), momentum)


def batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
    """`batch_norm` for callers that have run `check_input` already (the layers): each check once."""
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    check_mode(input, running_mean, running_var, training)
    return batch_norm_unchecked(input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_unchecked(input, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
    """The transform, arguments unchecked: the compiled operator when it applies, else PyTorch ops."""
    if in_graph(input):
        return _batch_norm_in_graph(input, running_mean, running_var, weight, bias, training, momentum, eps)
    lib = kernels.library()
    if lib is not None and _compiled_supported(input, weight, bias, running_mean, running_var):
        return lib.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
    if torch.is_grad_enabled() and (
        input.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
    ):
        return BatchNormFunction.apply(input, weight, bias, (running_mean, running_var, training, momentum, eps))
    # Nothing to differentiate (inference, or under no_grad): skip autograd's bookkeeping.
    return _forward_torch(input, weight, bias, running_mean, running_var, training, momentum, eps)[0]


def _batch_norm_in_graph(input, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
    """The transform for a graph, in four forms by where it runs:

    - evaluation, and ONNX export: torch's ``F.batch_norm``. With the running statistics the transform
      is a per-channel affine map, which compilers fold into the neighbouring convolution and fuse
      with the activation; as torch's own operator it keeps an exported program loadable without
      bnlab, and the ONNX exporter writes it as ONNX's standard BatchNormalization;
    - training under torch.compile on an input below `INDUCTOR_FUSES_BELOW` elements (with a float
      momentum): torch's ``F.batch_norm`` too, which inductor fuses into one kernel each way. There an
      opaque operator's fixed cost (a Python call from the compiled graph, argument parsing, its own
      allocations) is more than the whole fused kernel, so bnlab's compiled layer is torch's graph;
    - training with compiled kernels that take the input (CPU, float32/float64), outside torch.func:
      the functional operator ``bnlab::batch_norm_forward`` (fake kernel registered by `bnlab.kernels`,
      autograd in C++), an opaque node holding the hand-derived kernels and backward; the running
      statistics are updated from the batch statistics it returns, with tensor ops the graph records;
    - otherwise (torch.func, GPUs, half precision, BNLAB_KERNELS=torch, a tensor momentum): the forward
      in plain tensor ops, which autograd (and, compiled, inductor) differentiates and fuses.

    `momentum` may be a 0-dim tensor (the cumulative average's 1 / n under compile).
    """
    plain_ops_only = functorch_transforms_active()
    inductor_fuses = (input.numel() < INDUCTOR_FUSES_BELOW and isinstance(momentum, (int, float))
                      and not plain_ops_only and is_compiling() and not is_exporting())
    if not training or is_in_onnx_export() or inductor_fuses:
        return torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not plain_ops_only and kernels.available() and _compiled_supported(input, weight, bias, running_mean, running_var):
        if not (input.is_contiguous() or (input.dim() > 2 and input.movedim(1, -1).is_contiguous())):
            input = input.contiguous()  # the layouts the kernels read in place (the fake kernel assumes it)
        y, stats = torch.ops.bnlab.batch_norm_forward(input, weight, bias, None, None, True, eps)
        mean, unbiased_var = stats[0], stats[2]
    else:
        y, mean, _, var = _forward_torch(input, weight, bias, None, None, True, 0.0, eps)
        unbiased_var = unbiased(var, input)
    # The running statistics move after y is computed: AOTAutograd (torch 2.13) differentiates a graph
    # that mutates a buffer halfway through with the buffer's new value, where an input of the
    # normalization (batch renorm's r and d) was computed from the old one.
    update_running(running_mean, mean, momentum)
    update_running(running_var, unbiased_var, momentum)
    return y


# Below this many input elements torch.compile gets torch's training batch norm to fuse, not the
# kernels' operator. Measured with `bnlab bench op --compile` on 2 CPU threads (the figures are in the
# commit that set it): the operator is 0.89x compiled native at 128x84 (10,752 elements), even at
# 256x120 (30,720) and ahead from 64x16x8x8 (65,536) up; and a compiled BN-LeNet trains faster with
# the operator on its convolutions than with torch's op everywhere.
INDUCTOR_FUSES_BELOW = 1 << 16


def _forward_torch(input, weight, bias, running_mean, running_var, training, momentum, eps):
    x = input.to(compute_dtype(input.dtype))
    if training:
        # var_mean reduces with Welford's algorithm: no E[x^2] - E[x]^2 cancellation.
        var, mean = torch.var_mean(x, dim=reduce_dims(x), correction=0)
        update_running(running_mean, mean, momentum)
        update_running(running_var, unbiased(var, x), momentum)
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(x.dtype)
    y = (x - per_channel(mean, x)) * per_channel(scale, x)
    if bias is not None:
        y = y + per_channel(bias.to(x.dtype), x)
    return y.to(input.dtype), mean, invstd, var


def backward_torch(x, dy, weight, mean, invstd, training, eps, needs):
    """The hand-derived backward in tensor ops; with grad mode on, autograd differentiates it again."""
    dy = in_layout_of(x, dy)
    x_in_dtype = x.dtype
    x = x.to(compute_dtype(x.dtype))
    dy = dy.to(x.dtype)
    dims = reduce_dims(x)
    if training and torch.is_grad_enabled():
        # Double backward: the statistics are functions of x, so recompute them where autograd sees it.
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    x_hat = (x - per_channel(mean, x)) * per_channel(invstd, x)
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * x_hat).sum(dims)
    dx = None
    if needs[0]:
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        if training:
            count = x.numel() // x.shape[1]
            dy = dy - per_channel(sum_dy / count, x) - x_hat * per_channel(sum_dy_xhat / count, x)
        dx = (dy * per_channel(scale, x)).to(x_in_dtype)
    param_dtype = weight.dtype if weight is not None else x_in_dtype
    dw = sum_dy_xhat.to(param_dtype) if needs[1] else None
    db = sum_dy.to(param_dtype) if needs[2] else None
    return dx, dw, db


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


class BatchNormFunction(torch.autograd.Function):
    """Batch normalization with a hand-derived backward, in PyTorch tensor ops (see the module docstring
    for the formulas): the path for devices and dtypes the compiled operator does not take. Its twin
    for CPU float32/float64 is the C++ autograd function behind `bnlab::batch_norm`.

    ``BatchNormFunction.apply(input, weight, bias, state)`` with ``state = (running_mean, running_var,
    training, momentum, eps)``: the arguments autograd never differentiates travel in one tuple, which
    makes each call measurably cheaper. Saves the input, the weight and the per-channel mean and inverse
    standard deviation: nothing of input size beyond the input itself.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, state):
        running_mean, running_var, training, momentum, eps = state
        y, mean, invstd, _ = _forward_torch(input, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training, ctx.eps = training, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        grads = backward_torch(x, dy, weight, mean, invstd, ctx.training, ctx.eps, ctx.needs_input_grad[:3])
        return (*grads, None)


def standardize(view: Tensor, eps: float) -> Tensor:
    """Zero mean and unit variance per dim-1 slice of an (N, C, ...) view, over every other dim.

    Calls `batch_norm_unchecked` directly: no running statistics, no affine, and no "more than one value"
    check (a single value normalizes to 0, as torch's layer and group norm give).
    """
    return batch_norm_unchecked(view, None, None, None, None, True, 0.0, eps)
