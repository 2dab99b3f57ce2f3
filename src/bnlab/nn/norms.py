"""Batch norm's cousins that normalize each sample on its own: layer, group and instance normalization.

Each is a drop-in peer of its torch namesake (same constructor, parameters, buffers, state-dict keys and
results). The math is batch normalization of a reshaped view (`bnlab.functional.layer_norm`,
`group_norm`, `instance_norm`), so these layers share batch norm's hand-derived backward and its
compiled kernels.

The instance norms keep torch's bookkeeping: ``num_batches_tracked`` stays 0 and ``momentum=None``
counts as 0 (the running statistics then never move). An empty input (N = 0, or no positions) gives an
empty output and leaves the running statistics alone, as torch's batch norm does (and its layer and
group norm; its instance norm differs at N = 0, below). Deliberate differences from torch, all in the
instance norms:

- An input whose channel count differs from num_features is a ValueError even with affine=False and
  track_running_stats=False (torch only warns there, and normalizes anyway).
- An empty batch (N = 0) leaves the running statistics alone (torch's averages them over no samples
  and writes NaN into them), and with affine=True gives an empty output (torch's kernel fails there
  with an IndexError).
- No lazy forms, and no special case for pre-0.4 state dicts holding running statistics.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNormBase, document

__all__ = ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _AffineNorm(Module):
    """What LayerNorm and GroupNorm share: eps, and an optional learned scale (initialized to ones) and
    shift (zeros)."""

    def _init_affine(self, eps: float, shape: tuple[int, ...], affine: bool, bias: bool, device, dtype) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = eps
        if affine:
            self.weight = Parameter(torch.empty(shape, device=device, dtype=dtype))
            self.bias = Parameter(torch.empty(shape, device=device, dtype=dtype)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)


class LayerNorm(_AffineNorm):
    r"""Layer normalization (Ba, Kiros & Hinton, 2016) over the trailing `normalized_shape` dims.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and the biased variance are over the last ``len(normalized_shape)`` dims of each leading
    position, in training and evaluation alike (no running statistics). :math:`\gamma` and
    :math:`\beta` are elementwise, of shape `normalized_shape`.

    Args:
        normalized_shape: the trailing shape to normalize over; an int means the last dim.
        eps: added to the variance for stability. Default: 1e-5.
        elementwise_affine: learn `weight` (init 1) and `bias` (init 0). Default: True.
        bias: False keeps `weight` but drops `bias` (only with elementwise_affine). Default: True.
        device, dtype: of the parameters.

    Shape:
        - Input: (*, *normalized_shape)
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> ln = bnlab.nn.LayerNorm(10)
        >>> y = ln(torch.randn(4, 7, 10) * 3 + 2)
        >>> y.shape, bool(y.mean(-1).abs().max() < 1e-5)
        (torch.Size([4, 7, 10]), True)

    Reference::

        @article{ba2016layer,
          title={Layer Normalization},
          author={Ba, Jimmy Lei and Kiros, Jamie Ryan and Hinton, Geoffrey E.},
          journal={arXiv preprint arXiv:1607.06450},
          year={2016}
        }
    """

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int], torch.Size],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(
                f"normalized_shape must be a positive int or a non-empty sequence of them (the trailing "
                f"dims to normalize over), got {normalized_shape!r}"
            )
        self.normalized_shape = shape
        self.elementwise_affine = elementwise_affine
        self._init_affine(eps, shape, elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class GroupNorm(_AffineNorm):
    r"""Group normalization (Wu & He, 2018): per sample, over groups of channels and their positions.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The C channels split into `num_groups` groups of C / num_groups consecutive channels; the mean and
    biased variance are per (sample, group), in training and evaluation alike. :math:`\gamma` and
    :math:`\beta` are per channel. One group is layer norm over (C, ...); C groups is instance norm.

    Args:
        num_groups: G, which must divide num_channels.
        num_channels: C.
        eps: added to the variance. Default: 1e-5.
        affine: learn per-channel `weight` (init 1) and `bias` (init 0). Default: True.
        device, dtype: of the parameters.
        bias: keyword-only; False drops the shift. Default: True.

    Shape:
        - Input: (N, C, *)
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> gn = bnlab.nn.GroupNorm(2, 6)
        >>> y = gn(torch.randn(4, 6, 5, 5))
        >>> bool(y.reshape(4, 2, -1).mean(-1).abs().max() < 1e-5)
        True

    Reference::

        @inproceedings{wu2018group,
          title={Group Normalization},
          author={Wu, Yuxin and He, Kaiming},
          booktitle={European Conference on Computer Vision (ECCV)},
          year={2018}
        }
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("num_groups", num_groups), ("num_channels", num_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_channels % num_groups:
            divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
                f"choose num_groups among {divisors}"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.affine = affine
        self._init_affine(eps, (num_channels,), affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        F.check_input(input, self.num_channels)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class InstanceNormBase(BatchNormBase):
    """The instance norms: BatchNormBase's state and bookkeeping, per-instance statistics, and an
    unbatched input form (no N dim) as torch accepts."""

    batched_dims: int  # the rank of batched input; one less is unbatched
    eval_is_batch_norm = False  # training normalizes each sample by its own statistics

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    @property
    def input_dims(self) -> tuple[int, ...]:
        return (self.batched_dims - 1, self.batched_dims)

    def check_rank(self, input: Tensor) -> None:
        if isinstance(input, Tensor) and input.dim() not in self.input_dims:
            spatial = {3: "L", 4: "H, W", 5: "D, H, W"}[self.batched_dims]
            raise ValueError(
                f"{type(self).__name__} expected {self.batched_dims - 1}D (C, {spatial}) unbatched or "
                f"{self.batched_dims}D (N, C, {spatial}) batched input, got {input.dim()}D input of shape "
                f"{tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self.check_rank(input)
        if input.dim() == self.batched_dims - 1:
            return self.forward(input.unsqueeze(0)).squeeze(0)
        self.check_input(input)
        # torch's InstanceNorm: instance statistics unless evaluating with tracked running statistics;
        # momentum None counts as 0, and num_batches_tracked never counts (so no cumulative average).
        use_input_stats = self.training or not self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        return self.normalize(input, self.running_mean, self.running_var, use_input_stats, momentum)

    def normalize(self, input, running_mean, running_var, use_batch_stats, momentum):
        return F.instance_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps
        )


_INSTANCE_DOC = r"""Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016) of $shape input.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and biased variance are per (sample, channel), over the positions. With
    ``track_running_stats=True`` training also moves running statistics towards the batch average of
    the per-instance statistics (variance unbiased) and evaluation normalizes with them; otherwise
    evaluation uses the instance statistics too (torch's defaults: affine=False,
    track_running_stats=False).

    Momentum follows torch: ``running = (1 - momentum) * running + momentum * batch``; None counts as
    0, and ``num_batches_tracked`` stays 0, as in torch's InstanceNorm.

    Args:
        num_features: C.
        eps: added to the variance. Default: 1e-5.
        momentum: the weight of each batch in the running statistics, or None (as 0). Default: 0.1.
        affine: learn per-channel `weight` and `bias`. Default: False.
        track_running_stats: keep running statistics for evaluation. Default: False.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; False drops the shift. Default: True.

    Shape:
        - Input: $shape or unbatched $unbatched
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> norm = bnlab.nn.$name(3, affine=True)
        >>> norm(torch.randn($example)).shape
        torch.Size([$example])

    Reference::

        @article{ulyanov2016instance,
          title={Instance Normalization: The Missing Ingredient for Fast Stylization},
          author={Ulyanov, Dmitry and Vedaldi, Andrea and Lempitsky, Victor},
          journal={arXiv preprint arXiv:1607.08022},
          year={2016}
        }
    """


class InstanceNorm1d(InstanceNormBase):
    batched_dims = 3


class InstanceNorm2d(InstanceNormBase):
    batched_dims = 4


class InstanceNorm3d(InstanceNormBase):
    batched_dims = 5


document(_INSTANCE_DOC, {
    InstanceNorm1d: dict(shape="(N, C, L)", unbatched="(C, L)", example="2, 3, 8"),
    InstanceNorm2d: dict(shape="(N, C, H, W)", unbatched="(C, H, W)", example="2, 3, 4, 4"),
    InstanceNorm3d: dict(shape="(N, C, D, H, W)", unbatched="(C, D, H, W)", example="2, 3, 2, 4, 4"),
})
