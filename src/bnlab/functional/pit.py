"""Normalization by the probability integral transform: each channel's batch ranks mapped through
the inverse normal CDF, with running quantiles for evaluation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab.functional.batch_norm import batch_norm
from bnlab.functional.core import check_batch_size, check_arguments, compute_dtype, empty_batch, grouped, in_graph, per_channel_affine, ungrouped, update_running

__all__ = ["gaussian_levels", "pit_norm"]


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
    check_arguments(input, running_mean, running_var, weight, bias)
    if running_quantiles is not None and (running_quantiles.dim() != 2 or running_quantiles.shape[0] != input.shape[1]):
        raise ValueError(
            f"running_quantiles must have shape (C, K) with C = {input.shape[1]} channels, got "
            f"{tuple(running_quantiles.shape)}"
        )
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    x = input.to(compute_dtype(input.dtype))
    rows = grouped(x, x.shape[1])[0]
    if not training:
        if running_quantiles is None or running_var is None:
            raise ValueError("pit_norm needs running_var and running_quantiles when training=False")
        knots = running_quantiles.to(x.dtype).contiguous()
        levels = gaussian_levels(knots.shape[1], x.dtype, x.device)
        max_gain = torch.rsqrt(running_var.to(x.dtype) + eps).unsqueeze(1)
        z = ungrouped(_quantile_map(rows.contiguous(), knots, levels, max_gain), x)
        return per_channel_affine(z, weight, bias).to(input.dtype)
    check_batch_size(input)
    surrogate = batch_norm(input, running_mean, running_var, None, None, True, momentum, eps)
    with torch.no_grad():
        sorted_rows, order = rows.sort(dim=1)
        u = (_mid_ranks(sorted_rows) - 0.5) / rows.shape[1]
        z = torch.empty_like(u).scatter_(1, order, torch.special.ndtri(u))
        if running_quantiles is not None:
            batch_knots = _batch_quantiles(sorted_rows, running_quantiles.shape[1])
            update_running(running_quantiles, batch_knots, momentum)
        z = ungrouped(z, x).to(input.dtype)
    return per_channel_affine(_straight_through(surrogate, z), weight, bias)


def _straight_through(surrogate: Tensor, value: Tensor) -> Tensor:
    """`value`, with `surrogate`'s gradient. In a graph (torch.compile, torch.func) as the plain-ops
    identity ``surrogate + (value - surrogate).detach()``, which every transform goes through (equal to
    `value` up to one rounding); eagerly the exact `_StraightThrough`."""
    if in_graph(value):
        return surrogate + (value - surrogate).detach()
    return _StraightThrough.apply(surrogate, value)
