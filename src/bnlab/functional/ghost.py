"""Ghost batch normalization (Hoffer et al., 2017): batch norm over small virtual batches.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab.functional.batch_norm import batch_norm
from bnlab.functional.core import check_arguments

__all__ = ["ghost_batch_sizes", "ghost_batch_norm"]


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
    check_arguments(input, running_mean, running_var, weight, bias)
    ghosts = torch.split(input, ghost_batch_sizes(input.shape[0], ghost_batch_size))
    outputs = []
    for index, ghost in enumerate(ghosts):
        step = momentum if momentum is not None else 1.0 / (ghost_batches_tracked + index + 1)
        # Each call moves the running statistics one step: the sequential rule above.
        outputs.append(batch_norm(ghost, running_mean, running_var, weight, bias, True, step, eps))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
