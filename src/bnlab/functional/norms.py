"""Layer, group and instance normalization as batch normalization of a reshaped view, so they share
its hand-derived backward and its compiled kernels; peers of torch's ``F.layer_norm``,
``F.group_norm`` and ``F.instance_norm``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from bnlab.functional.batch_norm import batch_norm, batch_norm_unchecked, standardize
from bnlab.functional.core import check_floating, check_arguments, empty_batch, per_channel_affine, upcast

__all__ = ["layer_norm", "group_norm", "instance_norm"]


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
    check_floating(input, "layer_norm")
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
    x = upcast(input)
    if input.numel() == 0:  # as torch: an empty output, zero gradients for weight and bias
        y = x.clone()
    else:
        y = standardize(x.reshape(1, input.numel() // size, size), eps).reshape(input.shape)
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
    check_arguments(input, weight=weight, bias=bias)
    channels = input.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"group_norm needs num_groups to divide the channel count: got num_groups={num_groups!r} for "
            f"{channels} channels (input shape {tuple(input.shape)}); use a divisor of {channels}"
        )
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    view = upcast(input).reshape(1, input.shape[0] * num_groups, -1)
    return per_channel_affine(standardize(view, eps).reshape(input.shape), weight, bias).to(input.dtype)


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
    check_arguments(input, running_mean, running_var, weight, bias)
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
    replicas = [None if t is None else upcast(t.detach()).repeat(n) for t in (running_mean, running_var)]
    y = batch_norm_unchecked(upcast(input).reshape(1, n * c, -1), *replicas, None, None, True, momentum, eps)
    with torch.no_grad():
        for running, replica in zip((running_mean, running_var), replicas):
            if running is not None:
                running.copy_(replica.view(n, c).mean(0))
    return per_channel_affine(y.reshape(input.shape), weight, bias).to(input.dtype)
