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

from typing import Optional, Sequence

import torch
from torch import Tensor

from bnlab import kernels

__all__ = [
    "batch_norm", "batch_norm_with_stats", "BatchNormFunction", "convert_momentum", "MOMENTUM_CONVENTIONS",
    "check_input", "in_graph",
]

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
_KERNEL_DTYPES = frozenset(kernels.DTYPES)


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
    """Raise ValueError unless `input` is a floating (N, C, ...) tensor whose C matches.

    `num_features` is the expected C (a layer's); `tensors` are (name, per-channel tensor) pairs that
    must each hold C values. An empty input passes (torch normalizes it to an empty output), and so does
    torch's 1-D empty batch ``(0,)``, whose C is 0.
    """
    if not isinstance(input, Tensor):
        raise ValueError(f"expected a torch.Tensor input, got {type(input).__name__}")
    if input.dim() < 2 and input.numel():
        raise ValueError(
            f"expected an input of shape (N, C, ...) with at least 2 dimensions, got {input.dim()}D input "
            f"of shape {tuple(input.shape)}; add a batch dimension with input.unsqueeze(0)"
        )
    if input.dtype not in _FLOATING:
        raise ValueError(
            f"expected a floating-point input (float16, bfloat16, float32 or float64), got {input.dtype}; "
            "convert it first, e.g. input.float()"
        )
    channels = input.shape[1] if input.dim() > 1 else 0
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
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    return batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps)


def check_mode(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool) -> None:
    """Training needs two or more values per channel; evaluation needs the running statistics."""
    if training:
        check_batch_size(input)
    elif running_mean is None or running_var is None:
        raise ValueError(
            "running_mean and running_var are required when training=False; pass training=True to "
            "normalize with the batch statistics"
        )


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
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    if input.numel() == 0:
        return empty_batch(input, weight, bias), running_mean, running_var
    check_batch_size(input)
    y, mean, _, var = _forward_torch(input, weight, bias, None, None, True, 0.0, eps)
    return y, _moved(running_mean, mean, momentum), _moved(running_var, _unbiased(var, input), momentum)


def batch_norm_checked(input, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
    """`batch_norm` for callers that have run `check_input` already (the layers): each check once."""
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    check_mode(input, running_mean, running_var, training)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def empty_batch(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """torch's answer to an empty input (N = 0, or an empty spatial dim): nothing to normalize.

    An empty output of the input's shape, dtype and memory format, still in the autograd graph, so the
    input's gradient is empty and weight's and bias's are zeros (sums over no values); no running
    statistic moves, and no check on the batch size or the mode applies, as in torch. Empty data
    parallel shards and detection batches without boxes are ordinary, which is why torch allows this.
    """
    y = input.clone()
    if input.dim() < 2:  # torch's 1-D empty batch (0,): no channel dim, C = 0
        return per_channel_affine(y.reshape(0, 0), weight, bias).reshape(input.shape)
    return per_channel_affine(y, weight, bias)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
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


def in_graph(input: Tensor) -> bool:
    """True while torch builds a graph rather than running eagerly: torch.compile (Dynamo), torch.export,
    fake or functional tensors, and torch.func transforms (grad, vmap, ...).

    There every call must be traceable: the eager path's C++ autograd node reads data pointers and
    updates the running statistics behind the graph's back. Checked on every call, so the cheapest test
    comes first (about half a microsecond in all).
    """
    return (
        type(input) is not Tensor
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    )


def _batch_norm_in_graph(input, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
    """The transform for a graph, in three forms by where it runs:

    - evaluation, and ONNX export: torch's ``F.batch_norm``. With the running statistics the transform
      is a per-channel affine map, which compilers fold into the neighbouring convolution and fuse
      with the activation; as torch's own operator it keeps an exported program loadable without
      bnlab, and the ONNX exporter writes it as ONNX's standard BatchNormalization;
    - training with compiled kernels that take the input (CPU, float32/float64), outside torch.func:
      the functional operator ``bnlab::batch_norm_forward`` (fake kernel and autograd registered by
      `bnlab.kernels`), an opaque node holding the hand-derived kernels and backward; the running
      statistics are updated from the batch statistics it returns, with tensor ops the graph records;
    - otherwise (torch.func, GPUs, half precision, BNLAB_KERNELS=torch): the forward in plain tensor
      ops, which autograd (and, compiled, inductor) differentiates and fuses.

    `momentum` may be a 0-dim tensor (the cumulative average's 1 / n under compile).
    """
    if not training or torch.onnx.is_in_onnx_export():
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
                                              momentum, eps)
    if (kernels.available() and not torch._C._are_functorch_transforms_active()
            and _compiled_supported(input, weight, bias, running_mean, running_var)):
        if not (input.is_contiguous() or (input.dim() > 2 and input.movedim(1, -1).is_contiguous())):
            input = input.contiguous()  # the layouts the kernels read in place (the fake kernel assumes it)
        y, stats = torch.ops.bnlab.batch_norm_forward(input, weight, bias, None, None, True, eps)
        mean, unbiased_var = stats[0], stats[2]
    else:
        y, mean, _, var = _forward_torch(input, weight, bias, None, None, True, 0.0, eps)
        unbiased_var = _unbiased(var, input)
    # The running statistics move after y is computed: AOTAutograd (torch 2.13) differentiates a graph
    # that mutates a buffer halfway through with the buffer's new value, where an input of the
    # normalization (batch renorm's r and d) was computed from the old one.
    _update_running(running_mean, mean, momentum)
    _update_running(running_var, unbiased_var, momentum)
    return y


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) tensor to broadcast over x: (1, C, 1, ...)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- pure-PyTorch path ------------------------------------------------------------------------------


def _moved(running: Tensor, batch: Tensor, momentum) -> Tensor:
    """The running statistic after one step, ``(1 - momentum) * running + momentum * batch``, as a new
    tensor; `momentum` a float or a 0-dim tensor (in a graph, the cumulative average's 1 / n, which must
    not become a Python number). The batch statistic is detached: no gradient flows into the state."""
    batch = batch.detach().to(running.dtype)
    if isinstance(momentum, Tensor):
        return torch.lerp(running, batch, momentum.to(running.dtype))
    return running.mul(1.0 - momentum).add(batch, alpha=momentum)


def _update_running(running: Optional[Tensor], batch: Tensor, momentum) -> None:
    """`_moved`, in place. Not under no_grad(): in a training graph that becomes a higher-order op that
    torch.export cannot save and load back; the detached batch statistic is enough."""
    if running is not None:
        running.copy_(_moved(running, batch, momentum))


def _unbiased(var: Tensor, x: Tensor) -> Tensor:
    """The biased variance of n values per channel of x made unbiased (times n / (n - 1)), as running
    variances are kept."""
    count = x.numel() // x.shape[1]
    return var * (count / max(count - 1, 1))


def _forward_torch(input, weight, bias, running_mean, running_var, training, momentum, eps):
    x = input.to(_compute_dtype(input.dtype))
    if training:
        # var_mean reduces with Welford's algorithm: no E[x^2] - E[x]^2 cancellation.
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
        _update_running(running_mean, mean, momentum)
        _update_running(running_var, _unbiased(var, x), momentum)
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(x.dtype)
    y = (x - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(x.dtype), x)
    return y.to(input.dtype), mean, invstd, var


def _in_layout_of(like: Tensor, t: Tensor) -> Tensor:
    """`t` with `like`'s strides (e.g. a contiguous or expanded gradient for a channels-last input), so
    results come out in the input's memory format, as torch's do."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def _backward_torch(x, dy, weight, mean, invstd, training, eps, needs):
    """The hand-derived backward in tensor ops; with grad mode on, autograd differentiates it again."""
    dy = _in_layout_of(x, dy)
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


# ---- which path -------------------------------------------------------------------------------------


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
        grads = _backward_torch(x, dy, weight, mean, invstd, ctx.training, ctx.eps, ctx.needs_input_grad[:3])
        return (*grads, None)


# =====================================================================================================
# The normalization family: layer, group and instance normalization as batch normalization of a
# reshaped view (so they share the hand-derived backward and the compiled kernels), the "lite" batch
# norms, batch renormalization, ghost batches, whitening and the probability integral transform.
# =====================================================================================================

__all__ += [
    "per_channel_affine",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "mean_only_batch_norm",
    "variance_only_batch_norm",
    "MeanOnlyBatchNormFunction",
    "VarianceOnlyBatchNormFunction",
    "batch_renorm",
    "ghost_batch_norm",
    "ghost_batch_sizes",
    "zca_whitening_matrix",
    "newton_schulz_whitening_matrix",
    "decorrelated_batch_norm",
    "iterative_normalization",
    "gaussian_levels",
    "pit_norm",
]


def per_channel_affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``weight_c * y + bias_c`` for an (N, C, ...) tensor and (C,) weight and bias (either may be None).

    The one "then the per-channel affine" step of every layer that normalizes first and scales after.
    """
    if weight is not None:
        y = y * _per_channel(weight.to(y.dtype), y)
    if bias is not None:
        y = y + _per_channel(bias.to(y.dtype), y)
    return y


def _standardize(view: Tensor, eps: float) -> Tensor:
    """Zero mean and unit variance per dim-1 slice of an (N, C, ...) view, over every other dim.

    Calls `_batch_norm` directly: no running statistics, no affine, and no "more than one value"
    check (a single value normalizes to 0, as torch's layer and group norm give).
    """
    return _batch_norm(view, None, None, None, None, True, 0.0, eps)


def _upcast(input: Tensor) -> Tensor:
    """The input in its compute dtype (float32 for half precision): the layers that standardize a view
    and scale after round once, at the end, as torch's do, not after each step."""
    return input.to(_compute_dtype(input.dtype))


def _check_floating(input: Tensor, what: str) -> None:
    if not isinstance(input, Tensor):
        raise ValueError(f"{what} expected a torch.Tensor input, got {type(input).__name__}")
    if input.dtype not in _FLOATING:
        raise ValueError(
            f"{what} expected a floating-point input (float16, bfloat16, float32 or float64), got "
            f"{input.dtype}; convert it first, e.g. input.float()"
        )


# ---- layer, group and instance normalization --------------------------------------------------------


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Layer normalization over the trailing `normalized_shape` dims; a peer of ``F.layer_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the statistics (biased variance) over the last ``len(normalized_shape)`` dims of each leading
    position. Computed as batch normalization of the (1, M, K) view, M the leading positions and K the
    normalized size, then the elementwise affine: the hand-derived backward and the kernels come along.
    An empty input gives an empty output, as torch's does.

    Args:
        input: (*, *normalized_shape), floating.
        normalized_shape: the trailing shape to normalize over (an int is one dim).
        weight, bias: tensors of `normalized_shape`, or None (1 and 0).
        eps: added to the variance.

    Example:
        >>> import torch
        >>> y = layer_norm(torch.randn(4, 10) * 3 + 1, (10,))
        >>> bool(y.mean(-1).abs().max() < 1e-5)
        True
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    _check_floating(input, "layer_norm")
    if len(shape) == 0 or input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"layer_norm normalizes over the trailing dims {list(shape)}, so the input must have shape "
            f"(*, {', '.join(map(str, shape))}); got {tuple(input.shape)}. Build the layer with "
            f"normalized_shape={list(input.shape[-len(shape):]) if shape else '...'} or feed it the right tensor"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the normalized shape {list(shape)}, got {list(t.shape)}")
    size = torch.Size(shape).numel()
    x = _upcast(input)
    if input.numel() == 0:  # as torch: an empty output, zero gradients for weight and bias
        y = x.clone()
    else:
        y = _standardize(x.reshape(1, input.numel() // size, size), eps).reshape(input.shape)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


def group_norm(
    input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5
) -> Tensor:
    r"""Group normalization of an (N, C, ...) tensor; a peer of ``F.group_norm``.

    The C channels of each sample form `num_groups` groups of C / num_groups consecutive channels; each
    (sample, group) is standardized over its channels and positions, then the per-channel affine
    applies. Computed as batch normalization of the (1, N * G, rest) view. An empty input gives an
    empty output (`empty_batch`), as torch's does.

    Example:
        >>> import torch
        >>> y = group_norm(torch.randn(2, 6, 5), 3)
        >>> bool(y.reshape(2, 3, -1).mean(-1).abs().max() < 1e-5)
        True
    """
    check_input(input, tensors=(("weight", weight), ("bias", bias)))
    channels = input.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"group_norm needs num_groups to divide the channel count: got num_groups={num_groups!r} for "
            f"{channels} channels (input shape {tuple(input.shape)}); use a divisor of {channels}"
        )
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    view = _upcast(input).reshape(1, input.shape[0] * num_groups, -1)
    return per_channel_affine(_standardize(view, eps).reshape(input.shape), weight, bias).to(input.dtype)


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Instance normalization of an (N, C, ...) tensor; a peer of ``F.instance_norm``.

    Each (sample, channel) is standardized over its positions: batch normalization of the (1, N * C, ...)
    view. With `use_input_stats` the running statistics (if given) move towards the average over the
    batch of the per-instance statistics, ``running = (1 - momentum) * running + momentum * mean_n(stat)``,
    the variance unbiased over the positions (torch's rule). Without it the running statistics
    normalize, which is batch normalization in evaluation. An empty input (N = 0 or no positions) gives
    an empty output and leaves the running statistics alone (`empty_batch`); torch does the same, except
    at N = 0, where it writes NaN into the running statistics and, with a weight, fails with an
    IndexError.

    Example:
        >>> import torch
        >>> y = instance_norm(torch.randn(2, 3, 8) * 5)
        >>> bool(y.mean(-1).abs().max() < 1e-5)
        True
    """
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm needs running_mean and running_var when use_input_stats=False")
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    n, c = input.shape[:2]
    if input.numel() // (n * c) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {tuple(input.shape)}; "
            "instance normalization standardizes each sample's channel over its positions"
        )
    # One copy of the running statistics per sample, updated by the kernel, then averaged back: the
    # average over the batch of the per-instance updates (in float32 for half precision: one rounding).
    replicas = [None if t is None else _upcast(t.detach()).repeat(n) for t in (running_mean, running_var)]
    y = _batch_norm(_upcast(input).reshape(1, n * c, -1), *replicas, None, None, True, momentum, eps)
    with torch.no_grad():
        for running, replica in zip((running_mean, running_var), replicas):
            if running is not None:
                running.copy_(replica.view(n, c).mean(0))
    return per_channel_affine(y.reshape(input.shape), weight, bias).to(input.dtype)


# ---- the "lite" batch norms: centering only, scaling only ---------------------------------------------


def _channel_moments(x: Tensor, running_mean, running_var, training: bool, momentum: float):
    """Per-channel (mean, biased var): the batch's, with the running statistics updated as batch_norm
    updates them (variance entering unbiased), or the running ones in evaluation."""
    if not training:
        return running_mean.to(x.dtype), running_var.to(x.dtype)
    var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    _update_running(running_mean, mean, momentum)
    _update_running(running_var, _unbiased(var, x), momentum)
    return mean, var


def _check_lite_arguments(input, running_mean, running_var, weight, bias, training) -> None:
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    if input.numel():  # an empty batch is batch norm's empty batch, in either mode
        check_mode(input, running_mean, running_var, training)


def _mean_only_forward(input, weight, bias, running_mean, running_var, training, momentum):
    """(y, mean) of mean-only batch norm in plain tensor ops: the Function's forward, and in a graph the
    whole computation (autograd, and torch.func's transforms, differentiate it there)."""
    x = input.to(_compute_dtype(input.dtype))
    mean, _ = _channel_moments(x, running_mean, running_var, training, momentum)
    return per_channel_affine(x - _per_channel(mean, x), weight, bias).to(input.dtype), mean


def _variance_only_forward(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """(y, invstd) of variance-only batch norm in plain tensor ops (see `_mean_only_forward`)."""
    x = input.to(_compute_dtype(input.dtype))
    _, var = _channel_moments(x, running_mean, running_var, training, momentum)
    invstd = torch.rsqrt(var + eps)
    return per_channel_affine(x * _per_channel(invstd, x), weight, bias).to(input.dtype), invstd


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
        input, weight, mean = ctx.saved_tensors
        x = input.to(_compute_dtype(input.dtype))
        dy = dy.to(x.dtype)
        dims = _reduce_dims(x)
        if ctx.training:
            mean = x.mean(dims)  # a function of x, for double backward
        centered = x - _per_channel(mean, x)
        sum_dy = dy.sum(dims)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                dy_centered = dy - _per_channel(sum_dy / (x.numel() // x.shape[1]), x)
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
        input, weight, invstd = ctx.saved_tensors
        x = input.to(_compute_dtype(input.dtype))
        dy = dy.to(x.dtype)
        dims = _reduce_dims(x)
        if ctx.training:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            invstd = torch.rsqrt(var + ctx.eps)  # a function of x, for double backward
        scale = _per_channel(invstd, x)
        sum_dy_z = (dy * x * scale).sum(dims)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dy_projected = dy
            if ctx.training:
                x_hat = (x - _per_channel(mean, x)) * scale
                dy_projected = dy - x_hat * _per_channel(sum_dy_z / (x.numel() // x.shape[1]), x)
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
    _check_lite_arguments(input, running_mean, running_var, weight, bias, training)
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    if in_graph(input):
        return _mean_only_forward(input, weight, bias, running_mean, running_var, training, momentum)[0]
    return MeanOnlyBatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum)


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
    _check_lite_arguments(input, running_mean, running_var, weight, bias, training)
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    if in_graph(input):
        return _variance_only_forward(input, weight, bias, running_mean, running_var, training, momentum, eps)[0]
    return VarianceOnlyBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )


# ---- batch renormalization --------------------------------------------------------------------------


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 1.0,
    d_max: float = 0.0,
) -> Tensor:
    r"""Batch renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

    In training, with the batch's :math:`\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and the running
    :math:`\mu, \sigma = \sqrt{\mathrm{running\_var} + \epsilon}` (before this batch's update),

    .. math::
        r = \mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max}), \quad
        d = \mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max}), \quad
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta

    r and d are constants for the backward (stop-gradient). Since :math:`\gamma (\hat x r + d) + \beta`
    is batch norm with scale :math:`\gamma r` and shift :math:`\beta + \gamma d`, that is how it is
    computed: one `batch_norm` call, its hand-derived backward giving exactly the paper's gradients.
    With r_max = 1 and d_max = 0 it is batch norm. The running statistics then move as batch norm's. In
    evaluation it is batch norm with the running statistics.

    Example:
        >>> import torch
        >>> x = torch.randn(32, 3) * 2 + 1
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_renorm(x, mean.clone(), var.clone(), training=True, r_max=1.0, d_max=0.0)
        >>> bool(torch.allclose(y, batch_norm(x, mean, var, training=True)))
        True
    """
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_renorm needs running_mean and running_var: r and d correct the batch statistics towards "
            "them (use batch_norm for batch statistics alone)"
        )
    if not isinstance(r_max, Tensor) and (r_max < 1 or d_max < 0):  # a layer's ramped bounds are valid
        raise ValueError(f"batch_renorm needs r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
    if not training or input.numel() == 0:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_batch_size(input)
    with torch.no_grad():
        x = input.to(_compute_dtype(input.dtype))
        batch_var, batch_mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
        if in_graph(input):
            r, d = renorm_corrections(batch_mean, batch_var, running_mean.to(x.dtype), running_var.to(x.dtype),
                                      torch.as_tensor(r_max, dtype=x.dtype), torch.as_tensor(d_max, dtype=x.dtype), eps)
        else:
            r, d = _renorm_corrections(batch_mean, batch_var, running_mean.to(x.dtype), running_var.to(x.dtype),
                                       r_max, d_max, eps)
    param_dtype = weight.dtype if weight is not None else input.dtype
    r, d = r.to(param_dtype), d.to(param_dtype)
    scale = r if weight is None else weight * r
    shift = d if weight is None else weight * d
    shift = shift if bias is None else bias + shift
    return batch_norm(input, running_mean, running_var, scale, shift, True, momentum, eps)


def _renorm_corrections(batch_mean, batch_var, running_mean, running_var, r_max, d_max, eps):
    """Batch renorm's r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max, d_max)."""
    sigma = torch.sqrt(running_var + eps)
    r = (torch.sqrt(batch_var + eps) / sigma).clamp(1.0 / r_max, r_max)
    d = ((batch_mean - running_mean) / sigma).clamp(-d_max, d_max)
    return r, d


@torch.library.custom_op("bnlab::renorm_corrections", mutates_args=())
def renorm_corrections(batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor,
                       r_max: Tensor, d_max: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`_renorm_corrections` as one operator, for graphs. The corrections read the running statistics
    that the same training step then updates; as separate ops AOTAutograd's partitioner (torch 2.13)
    may recompute them in the backward from the already updated buffers, and the weight gradient comes
    out wrong. An operator's outputs are saved, never recomputed."""
    return _renorm_corrections(batch_mean, batch_var, running_mean, running_var, r_max, d_max, eps)


@renorm_corrections.register_fake
def _(batch_mean, batch_var, running_mean, running_var, r_max, d_max, eps):
    return torch.empty_like(batch_mean), torch.empty_like(batch_mean)


# ---- ghost batch normalization ------------------------------------------------------------------------


def ghost_batch_sizes(batch_size: int, ghost_batch_size: int) -> list[int]:
    """How a batch splits into ghost batches: consecutive runs of `ghost_batch_size` samples, the last
    one absorbing the remainder (so none is smaller than the ghost size, or than the batch).

    Example:
        >>> ghost_batch_sizes(10, 4), ghost_batch_sizes(8, 4), ghost_batch_sizes(3, 4)
        ([4, 6], [4, 4], [3])
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be positive, got {ghost_batch_size}")
    count = max(1, batch_size // ghost_batch_size)
    return [ghost_batch_size] * (count - 1) + [batch_size - ghost_batch_size * (count - 1)]


def ghost_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    ghost_batch_size: int = 32,
    ghost_batches_tracked: int = 0,
) -> Tensor:
    r"""Ghost batch normalization (Hoffer, Hubara & Soudry, 2017): batch norm over virtual batches.

    In training the batch splits along dim 0 into ghost batches (`ghost_batch_sizes`: runs of
    `ghost_batch_size` samples, the last one taking the remainder), each normalized with its own
    statistics. The running statistics take one batch-norm step per ghost batch, in order; for k ghost
    batches with statistics :math:`\mu^1 \dots \mu^k` that is

    .. math:: \mu_{run} \leftarrow (1 - \eta)^k \mu_{run} + \sum_{l=1}^{k} \eta (1 - \eta)^{k - l} \mu^l

    and the same for the (unbiased) variance. `momentum=None` makes them a cumulative average over
    every ghost batch: `ghost_batches_tracked` says how many were averaged before this batch. In
    evaluation it is batch norm with the running statistics.

    Example:
        >>> import torch
        >>> x = torch.randn(8, 2) * 3 + 1
        >>> y = ghost_batch_norm(x, None, None, training=True, ghost_batch_size=4)
        >>> bool(y[:4].mean(0).abs().max() < 1e-5 and y[4:].mean(0).abs().max() < 1e-5)
        True
    """
    if ghost_batch_size < 2:
        raise ValueError(
            f"ghost_batch_size must be at least 2 (a ghost batch of one sample has no variance), "
            f"got {ghost_batch_size}"
        )
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    ghosts = torch.split(input, ghost_batch_sizes(input.shape[0], ghost_batch_size))
    outputs = []
    for index, ghost in enumerate(ghosts):
        step = momentum if momentum is not None else 1.0 / (ghost_batches_tracked + index + 1)
        # Each call moves the running statistics one step: the sequential rule above.
        outputs.append(batch_norm(ghost, running_mean, running_var, weight, bias, True, step, eps))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


# ---- whitening: decorrelated batch norm and iterative normalization ------------------------------------


def zca_whitening_matrix(covariance: Tensor) -> Tensor:
    r"""ZCA whitening matrix :math:`\Sigma^{-1/2} = D \Lambda^{-1/2} D^T` of a batch of symmetric
    positive definite (..., m, m) matrices, by eigendecomposition (``torch.linalg.eigh``).

    Example:
        >>> import torch
        >>> w = zca_whitening_matrix(torch.tensor([[4.0, 0.0], [0.0, 9.0]]))
        >>> w.diagonal().tolist()
        [0.5, 0.3333333432674408]
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return (eigenvectors * eigenvalues.rsqrt().unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)


def newton_schulz_whitening_matrix(covariance: Tensor, iterations: int = 5) -> Tensor:
    r"""Approximate :math:`\Sigma^{-1/2}` by Newton–Schulz iterations (Huang et al., 2019, Algorithm 1).

    .. math::
        \Sigma_N = \Sigma / \mathrm{tr}(\Sigma), \quad P_0 = I, \quad
        P_k = \tfrac{1}{2} (3 P_{k-1} - P_{k-1}^3 \Sigma_N), \quad
        \Sigma^{-1/2} \approx P_T / \sqrt{\mathrm{tr}(\Sigma)}

    The trace normalization puts the eigenvalues of :math:`\Sigma_N` in (0, 1], where the iteration
    converges; stopping after T steps whitens only partly along small-eigenvalue directions (the
    paper's point: a controlled, cheap, differentiable whitening made of matrix products alone).

    Computed in the coupled form :math:`Y_0 = \Sigma_N, Z_0 = I, T_k = \tfrac12 (3I - Z_{k-1} Y_{k-1}),
    Y_k = Y_{k-1} T_k, Z_k = T_k Z_{k-1}`: every term is a polynomial in :math:`\Sigma_N`, so
    :math:`Y_k = \Sigma_N Z_k` and :math:`Z_k = P_k` exactly, at the same three matrix products per
    step. The paper's single-sequence form amplifies rounding errors once the covariance is
    ill-conditioned (for T around 10 or more it diverges; Higham, *Functions of Matrices*, 2008, §6.7);
    the coupled form keeps converging, to ZCA whitening as T grows.

    Example:
        >>> import torch
        >>> cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> w = newton_schulz_whitening_matrix(cov, iterations=30)
        >>> bool(torch.allclose(w @ cov @ w, torch.eye(2, dtype=torch.float64)))
        True
    """
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    trace = covariance.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
    y, z = covariance / trace, eye.expand_as(covariance)
    for _ in range(iterations):
        step = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ step, step @ z
    return z * trace.rsqrt()


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """(N, C, ...) -> (G, group_size, N * ...): each group's channels as rows, every value a column."""
    return x.transpose(0, 1).reshape(x.shape[1] // group_size, group_size, -1)


def _ungrouped(xg: Tensor, like: Tensor) -> Tensor:
    shape = (like.shape[1], like.shape[0], *like.shape[2:])
    return xg.reshape(shape).transpose(0, 1)


def _whiten(input, running_mean, running_whitening, weight, bias, training, momentum, eps, group_size,
            whitening_matrix, name):
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("weight", weight), ("bias", bias)),
    )
    channels = input.shape[1]
    if not isinstance(group_size, int) or group_size < 1 or channels % group_size:
        raise ValueError(
            f"{name} whitens groups of group_size channels, so group_size must divide the {channels} "
            f"channels; got group_size={group_size!r}"
        )
    groups = channels // group_size
    if running_whitening is not None and tuple(running_whitening.shape) != (groups, group_size, group_size):
        raise ValueError(
            f"running_whitening must have shape {(groups, group_size, group_size)} (groups, group_size, "
            f"group_size), got {tuple(running_whitening.shape)}"
        )
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    x = input.to(_compute_dtype(input.dtype))
    xg = _grouped(x, group_size)
    if training:
        if xg.shape[-1] < 2:
            raise ValueError(
                f"{name} needs more than 1 value per channel when training, got input size "
                f"{tuple(input.shape)}; use a larger batch or call .eval()"
            )
        mean = xg.mean(-1, keepdim=True)
        centered = xg - mean
        eye = torch.eye(group_size, dtype=x.dtype, device=x.device)
        covariance = centered @ centered.transpose(-1, -2) / xg.shape[-1] + eps * eye
        wm = whitening_matrix(covariance)
        _update_running(running_mean, mean.reshape(-1), momentum)
        _update_running(running_whitening, wm, momentum)
    else:
        if running_mean is None or running_whitening is None:
            raise ValueError(f"{name} needs running_mean and running_whitening when training=False")
        centered = xg - running_mean.to(x.dtype).reshape(groups, group_size, 1)
        wm = running_whitening.to(x.dtype)
    y = _ungrouped(wm @ centered, x)
    return per_channel_affine(y, weight, bias).to(input.dtype)


def decorrelated_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_whitening: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group_size: int = 16,
) -> Tensor:
    r"""Decorrelated batch normalization (Huang et al., 2018): ZCA whitening per group of channels.

    Per group of `group_size` channels, X (group_size x n, n = N * positions):

    .. math::
        \mu = \tfrac{1}{n} X 1, \quad \Sigma = \tfrac{1}{n} (X - \mu)(X - \mu)^T + \epsilon I
        = D \Lambda D^T, \quad \hat X = D \Lambda^{-1/2} D^T (X - \mu), \quad y = \gamma \hat x + \beta

    In training the running mean and the running whitening matrix take a momentum step towards the
    batch's (torch's convention); evaluation uses them. The gradient is autograd's through
    ``torch.linalg.eigh``, which needs distinct eigenvalues (true for real data almost surely).

    Example:
        >>> import torch
        >>> mixing = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0],
        ...                        [0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
        >>> x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0)) @ mixing
        >>> y = decorrelated_batch_norm(x, None, None, training=True, group_size=4)
        >>> bool(torch.allclose(y.T.cov(correction=0), torch.eye(4), atol=1e-3))
        True
    """
    return _whiten(input, running_mean, running_whitening, weight, bias, training, momentum, eps, group_size,
                   zca_whitening_matrix, "decorrelated_batch_norm")


def iterative_normalization(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_whitening: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group_size: int = 64,
    iterations: int = 5,
) -> Tensor:
    r"""Iterative normalization (Huang et al., 2019): Newton–Schulz whitening per group of channels.

    As `decorrelated_batch_norm`, with :math:`\Sigma^{-1/2}` replaced by
    `newton_schulz_whitening_matrix` after `iterations` steps (T in the paper, default 5). Autograd
    differentiates the matrix products.

    Example:
        >>> import torch
        >>> x = torch.randn(64, 4) @ torch.randn(4, 4)
        >>> y = iterative_normalization(x, None, None, training=True, group_size=4, iterations=5)
        >>> y.shape
        torch.Size([64, 4])
    """
    return _whiten(input, running_mean, running_whitening, weight, bias, training, momentum, eps, group_size,
                   lambda cov: newton_schulz_whitening_matrix(cov, iterations), "iterative_normalization")


# ---- normalization by the probability integral transform -----------------------------------------------


def gaussian_levels(num_quantiles: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    r"""The K standard-normal quantiles :math:`\Phi^{-1}((j - \frac12) / K)`, j = 1..K: where `pit_norm`
    puts its running quantile knots.

    Example:
        >>> [round(v, 4) for v in gaussian_levels(4).tolist()]
        [-1.1503, -0.3186, 0.3186, 1.1503]
    """
    if not isinstance(num_quantiles, int) or num_quantiles < 2:
        raise ValueError(f"num_quantiles must be an int >= 2, got {num_quantiles!r}")
    levels = (torch.arange(num_quantiles, dtype=torch.float64) + 0.5) / num_quantiles
    return torch.special.ndtri(levels).to(dtype=dtype, device=device)


def _mid_ranks(sorted_rows: Tensor) -> Tensor:
    """1-based ranks of the values of each sorted row, tied values sharing the average of their ranks."""
    n = sorted_rows.shape[1]
    position = torch.arange(1, n + 1, dtype=sorted_rows.dtype, device=sorted_rows.device).expand_as(sorted_rows)
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    # The first position of a run is the running maximum of the run starts; its last, read backwards,
    # the running minimum of the run ends.
    first = torch.where(starts, position, 0).cummax(dim=1).values
    last = torch.where(ends, position, n + 1).flip(1).cummin(dim=1).values.flip(1)
    return (first + last) / 2


def _batch_quantiles(sorted_rows: Tensor, num_quantiles: int) -> Tensor:
    """Each row's quantiles at the plotting positions (j - 1/2) / K: linear interpolation of the sorted
    values at the 0-based position n (j - 1/2) / K - 1/2, the position where `_pit_transform` puts the
    level's value (clamped to the sample)."""
    n = sorted_rows.shape[1]
    levels = (torch.arange(num_quantiles, dtype=sorted_rows.dtype, device=sorted_rows.device) + 0.5) / num_quantiles
    position = (n * levels - 0.5).clamp(0, n - 1)
    lower = position.floor().long()
    upper = (lower + 1).clamp(max=n - 1)
    fraction = position - lower
    return sorted_rows[:, lower] * (1 - fraction) + sorted_rows[:, upper] * fraction


def _interpolate(rows: Tensor, knots: Tensor, levels: Tensor, right: bool) -> Tensor:
    """The piecewise-linear map through (knots[c, j], levels[j]) at each value of row c; at a run of tied
    knots it takes the first level of the run (right=False) or the last (right=True)."""
    k = knots.shape[1]
    index = torch.searchsorted(knots, rows, right=right)
    lower = (index - 1).clamp(0, k - 2)
    upper = lower + 1
    knot_lo, knot_hi = knots.gather(1, lower), knots.gather(1, upper)
    width = knot_hi - knot_lo
    flat = width <= 0  # only where a clamped segment is a tie; the tails are replaced by the caller
    t = torch.where(flat, float(right), (rows - knot_lo) / torch.where(flat, 1.0, width))
    return levels[lower] + t * (levels[upper] - levels[lower])


def _quantile_map(rows: Tensor, knots: Tensor, levels: Tensor, max_gain: Tensor) -> Tensor:
    """Evaluation's estimate of Phi^{-1}(F(x)): through the knots, tied knots meeting halfway (the
    mid-rank rule of training); beyond the outer knots, straight on with the outer segment's slope,
    capped at `max_gain` (a tie at the end would make it infinite, a light tail needlessly steep)."""
    z = (_interpolate(rows, knots, levels, False) + _interpolate(rows, knots, levels, True)) / 2
    first, last = knots[:, :1], knots[:, -1:]
    tiny = torch.finfo(knots.dtype).tiny
    low_gain = torch.minimum((levels[1] - levels[0]) / (knots[:, 1:2] - first).clamp_min(tiny), max_gain)
    high_gain = torch.minimum((levels[-1] - levels[-2]) / (last - knots[:, -2:-1]).clamp_min(tiny), max_gain)
    z = torch.where(rows < first, levels[0] + (rows - first) * low_gain, z)
    return torch.where(rows > last, levels[-1] + (rows - last) * high_gain, z)


class _StraightThrough(torch.autograd.Function):
    """Returns `value`; the gradient flows to `surrogate` unchanged (the value has none of its own)."""

    @staticmethod
    def forward(ctx, surrogate, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def pit_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    running_quantiles: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Normalization by the probability integral transform: per channel, the batch's ranks mapped
    through the standard normal inverse CDF, so each channel's output is exactly Gaussian-quantiled.

    **Training**, per channel over its n values (batch and positions): with :math:`R_i` the rank of
    :math:`x_i` (tied values share the average of their ranks),

    .. math:: z_i = \Phi^{-1}\left(\frac{R_i - 1/2}{n}\right), \qquad y = \gamma z + \beta

    so the n outputs of a channel without ties are exactly the n Gaussian quantiles
    :math:`\Phi^{-1}((k - 1/2)/n)`, whatever the input's distribution; a constant channel gives 0.

    **Gradient.** Ranks are piecewise constant, so the true derivative of z is 0 almost everywhere. The
    gradient used for x is batch normalization's (a straight-through surrogate): z is computed but the
    backward is that of :math:`\hat x = (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon}`, the map z tends to
    when the input is Gaussian. The gradients of :math:`\gamma` and :math:`\beta` are exact:
    :math:`\sum dy \cdot z` and :math:`\sum dy`.

    **Evaluation** maps x through running quantile knots. In training the batch's quantiles at the K
    levels :math:`p_j = (j - 1/2)/K` (`running_quantiles` is (C, K)) take a momentum step, and so do
    running_mean and running_var as in batch norm. In evaluation
    :math:`z = \Phi^{-1}(\hat F(x))` is the piecewise-linear map through the points
    :math:`(q_j, \Phi^{-1}(p_j))`; beyond the outer knots it continues straight with the outer
    segment's slope, capped at batch norm's :math:`1/\sqrt{\mathrm{running\_var} + \epsilon}`.
    Knots initialised at the standard normal quantiles
    make the map the identity, as batch norm's initial running statistics do. Autograd differentiates
    the piecewise-linear map.

    Example:
        >>> import torch
        >>> x = torch.rand(1000, 1) ** 4          # far from Gaussian
        >>> y = pit_norm(x, None, None, None, training=True)
        >>> ranks_gaussian = torch.special.ndtri((torch.arange(1000.0) + 0.5) / 1000)
        >>> torch.equal(y.sort(0).values.squeeze(1), ranks_gaussian)
        True
    """
    check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    if running_quantiles is not None and (running_quantiles.dim() != 2 or running_quantiles.shape[0] != input.shape[1]):
        raise ValueError(
            f"running_quantiles must have shape (C, K) with C = {input.shape[1]} channels, got "
            f"{tuple(running_quantiles.shape)}"
        )
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    x = input.to(_compute_dtype(input.dtype))
    rows = _grouped(x, x.shape[1])[0]
    if not training:
        if running_quantiles is None or running_var is None:
            raise ValueError("pit_norm needs running_var and running_quantiles when training=False")
        knots = running_quantiles.to(x.dtype).contiguous()
        levels = gaussian_levels(knots.shape[1], x.dtype, x.device)
        max_gain = torch.rsqrt(running_var.to(x.dtype) + eps).unsqueeze(1)
        z = _ungrouped(_quantile_map(rows.contiguous(), knots, levels, max_gain), x)
        return per_channel_affine(z, weight, bias).to(input.dtype)
    check_batch_size(input)
    surrogate = batch_norm(input, running_mean, running_var, None, None, True, momentum, eps)
    with torch.no_grad():
        sorted_rows, order = rows.sort(dim=1)
        u = (_mid_ranks(sorted_rows) - 0.5) / rows.shape[1]
        z = torch.empty_like(u).scatter_(1, order, torch.special.ndtri(u))
        if running_quantiles is not None:
            batch_knots = _batch_quantiles(sorted_rows, running_quantiles.shape[1])
            _update_running(running_quantiles, batch_knots, momentum)
        z = _ungrouped(z, x).to(input.dtype)
    return per_channel_affine(_straight_through(surrogate, z), weight, bias)


def _straight_through(surrogate: Tensor, value: Tensor) -> Tensor:
    """`value`, with `surrogate`'s gradient. In a graph (torch.compile, torch.func) as the plain-ops
    identity ``surrogate + (value - surrogate).detach()``, which every transform goes through (equal to
    `value` up to one rounding); eagerly the exact `_StraightThrough`."""
    if in_graph(value):
        return surrogate + (value - surrogate).detach()
    return _StraightThrough.apply(surrogate, value)
