"""What every normalization function shares: the momentum conventions, the input checks, torch's
empty-batch rule, the graph test, the per-channel helpers and the one running-average update.

The running statistics move by torch's convention, ``running = (1 - momentum) * running + momentum *
batch`` (`moved`, `update_running`), the variance entering unbiased (`unbiased`); Keras/Flax and
MXNet/the D2L chapter count the other way (`convert_momentum`). Chan's merge of pooled moments
(`chan_merge`, and `chan_merge_all` over many sets at once) serves the exact statistics over several
batches, and over the processes of a group.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
# By name, not through `torch.`: when two modules' traced code reach one object through their own
# globals, Dynamo guards that they still agree with a check that runs in Python on every compiled call.
from torch._C import _are_functorch_transforms_active as functorch_transforms_active
from torch.compiler import is_compiling


__all__ = [
    "convert_momentum", "check_input", "check_arguments", "check_batch_size", "check_mode", "empty_batch", "in_graph",
    "reduce_dims", "per_channel", "compute_dtype", "moved", "update_running", "unbiased", "in_layout_of",
    "per_channel_affine", "upcast", "check_floating", "grouped", "ungrouped", "MOMENTUM_CONVENTIONS",
    "FLOATING", "is_floating", "chan_merge", "chan_merge_all",
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


FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_floating(dtype: torch.dtype) -> bool:
    """``dtype in FLOATING``, from the dtype's own attributes (float8 types hold one byte): under
    torch.compile a dtype is a constant, so this adds no guard, where a lookup in the global tuple adds
    one per member, checked on every compiled call."""
    return dtype.is_floating_point and dtype.itemsize >= 2


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
    if not is_floating(input.dtype):
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


def check_arguments(input: Tensor, running_mean=None, running_var=None, weight=None, bias=None) -> None:
    """`check_input` for the torch-style argument list ``(input, running_mean, running_var, weight, bias,
    ...)`` that the family's functions share: the input, and each per-channel tensor given (not None)
    against its C, named as the argument is in the error."""
    check_input(  # every argument passed: a default read under torch.compile is one more guard
        input,
        None,
        (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )


def check_batch_size(input: Tensor) -> None:
    """Training needs two or more values per channel (torch's condition), or the variance is 0/0."""
    if input.numel() // input.shape[1] == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}; "
            "use a batch of at least 2 samples, or call .eval() to normalize with the running statistics"
        )


def check_mode(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool) -> None:
    """Training needs two or more values per channel; evaluation needs the running statistics."""
    if training:
        check_batch_size(input)
    elif running_mean is None or running_var is None:
        raise ValueError(
            "running_mean and running_var are required when training=False; pass training=True to "
            "normalize with the batch statistics"
        )


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


def in_graph(input: Tensor) -> bool:
    """True while torch builds a graph rather than running eagerly: torch.compile (Dynamo), torch.export,
    fake or functional tensors, and torch.func transforms (grad, vmap, ...).

    There every call must be traceable: the eager path's C++ autograd node reads data pointers and
    updates the running statistics behind the graph's back. Checked on every call (about half a
    microsecond in all). Dynamo's test comes first: traced, it is a constant, and the input's type is
    never compared with ``Tensor`` (another guard that would run in Python on every compiled call).
    """
    return is_compiling() or type(input) is not Tensor or functorch_transforms_active()


def reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def per_channel(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) tensor to broadcast over x: (1, C, 1, ...)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def moved(running: Tensor, batch: Tensor, momentum) -> Tensor:
    """The running statistic after one step, ``(1 - momentum) * running + momentum * batch``, as a new
    tensor; `momentum` a float or a 0-dim tensor (in a graph, the cumulative average's 1 / n, which must
    not become a Python number). The batch statistic is detached: no gradient flows into the state."""
    batch = batch.detach().to(running.dtype)
    if isinstance(momentum, Tensor):
        return torch.lerp(running, batch, momentum.to(running.dtype))
    return running.mul(1.0 - momentum).add(batch, alpha=momentum)


def update_running(running: Optional[Tensor], batch: Tensor, momentum) -> None:
    """`moved`, in place. Not under no_grad(): in a training graph that becomes a higher-order op that
    torch.export cannot save and load back; the detached batch statistic is enough."""
    if running is not None:
        running.copy_(moved(running, batch, momentum))


def unbiased(var: Tensor, x: Tensor) -> Tensor:
    """The biased variance of n values per channel of x made unbiased (times n / (n - 1)), as running
    variances are kept."""
    count = x.numel() // x.shape[1]
    return var * (count / max(count - 1, 1))


def in_layout_of(like: Tensor, t: Tensor) -> Tensor:
    """`t` with `like`'s strides (e.g. a contiguous or expanded gradient for a channels-last input), so
    results come out in the input's memory format, as torch's do."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def per_channel_affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``weight_c * y + bias_c`` for an (N, C, ...) tensor and (C,) weight and bias (either may be None).

    The one "then the per-channel affine" step of every layer that normalizes first and scales after.
    """
    if weight is not None:
        y = y * per_channel(weight.to(y.dtype), y)
    if bias is not None:
        y = y + per_channel(bias.to(y.dtype), y)
    return y


def upcast(input: Tensor) -> Tensor:
    """The input in its compute dtype (float32 for half precision): the layers that standardize a view
    and scale after round once, at the end, as torch's do, not after each step."""
    return input.to(compute_dtype(input.dtype))


def check_floating(input: Tensor, what: str) -> None:
    if not isinstance(input, Tensor):
        raise ValueError(f"{what} expected a torch.Tensor input, got {type(input).__name__}")
    if not is_floating(input.dtype):
        raise ValueError(
            f"{what} expected a floating-point input (float16, bfloat16, float32 or float64), got "
            f"{input.dtype}; convert it first, e.g. input.float()"
        )


def grouped(x: Tensor, group_size: int) -> Tensor:
    """(N, C, ...) -> (G, group_size, N * ...): each group's channels as rows, every value a column."""
    return x.transpose(0, 1).reshape(x.shape[1] // group_size, group_size, -1)


def ungrouped(xg: Tensor, like: Tensor) -> Tensor:
    shape = (like.shape[1], like.shape[0], *like.shape[2:])
    return xg.reshape(shape).transpose(0, 1)


def chan_merge(count: int, mean, second, n: int, batch_mean, batch_second, outer):
    """Chan's merge of pooled (count, mean, second moment about the mean) with a batch's; `outer` turns
    the difference of the means into the correction of the second moment (delta², or delta deltaᵀ):

        total = count + n,  delta = batch_mean - mean
        mean' = mean + delta * n / total
        second' = second + batch_second + outer(delta) * count * n / total
    """
    if count == 0:
        return n, batch_mean, batch_second
    total = count + n
    delta = batch_mean - mean
    return total, mean + delta * (n / total), second + batch_second + outer(delta) * (count * n / total)


def chan_merge_all(counts: Sequence[int], means, seconds, outer):
    """`chan_merge` folded over several sets, in order: (total count, mean, second moment) of the sets
    together, from each one's count, mean and second moment about its mean (``means[i]``,
    ``seconds[i]``); sets with no values are passed over. (0, None, None) when every set is empty."""
    total, mean, second = 0, None, None
    for count, set_mean, set_second in zip(counts, means, seconds):
        if count:
            total, mean, second = chan_merge(total, mean, second, count, set_mean, set_second, outer)
    return total, mean, second
