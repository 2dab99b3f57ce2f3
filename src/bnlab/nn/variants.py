"""Batch-norm variants: the chapter's "lite" batch norms, frozen batch norm, batch renormalization and
ghost batch normalization. Bookkeeping only; the math lives in `bnlab.functional`.

All but the frozen layers are `BatchNormBase` subclasses: batch norm's constructor, parameters
(`weight`, `bias`), buffers (`running_mean`, `running_var`, `num_batches_tracked`), momentum
convention (torch's; None for a cumulative average) and state-dict keys, so a batch norm's state dict
loads into them and back. `FrozenBatchNorm2d` keeps everything as buffers, as torchvision's does.

``eval_is_batch_norm`` says whether a layer's evaluation mode is batch norm's affine map with its running
statistics (what `freeze` and BN folding rely on); the mean-only and variance-only layers set it False.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import Module

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNormBase, RankFamily, batch_norm_arguments, document
from bnlab.nn.norms import InstanceNormBase

__all__ = [
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
    "VarianceOnlyBatchNorm1d",
    "VarianceOnlyBatchNorm2d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
]

_ONE_D = dict(shape="(N, C) or (N, C, L)", example_shape="16, 4", channels=4)
_TWO_D = dict(shape="(N, C, H, W)", example_shape="8, 4, 5, 5", channels=4)

_BN_ARGS = """num_features: C.
        eps: added to the variance for stability. Default: 1e-5.
        momentum: torch's convention, the weight of each new batch in the running statistics; None for a
            cumulative average. Default: 0.1.
        affine: learn a per-channel scale `weight` (init 1) and shift `bias` (init 0). Default: True.
        track_running_stats: keep running statistics for evaluation; without them evaluation uses the
            batch's statistics. Default: True.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; False keeps the scale but drops the shift. Default: True."""


# ---- the "lite" batch norms ------------------------------------------------------------------------------


class _MeanOnlyBatchNorm(RankFamily, BatchNormBase):
    family = "MeanOnlyBatchNorm"
    eval_is_batch_norm = False

    def normalize(self, input, running_mean, running_var, use_batch_stats, momentum):
        return F.mean_only_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum
        )


class MeanOnlyBatchNorm1d(_MeanOnlyBatchNorm):
    input_dims = (2, 3)


class MeanOnlyBatchNorm2d(_MeanOnlyBatchNorm):
    input_dims = (4,)


document(
    r"""Mean-only batch normalization of $shape input: the chapter's "lite" BN that centers only.

    .. math:: y = (x - \mathrm{E}[x]) \cdot \gamma + \beta

    E per channel over the batch (and positions) in training, the running mean in evaluation. Both
    running statistics are tracked exactly as batch norm tracks them (the state dict is batch norm's),
    though only the mean is used. The backward is hand-derived
    (`bnlab.functional.MeanOnlyBatchNormFunction`).

    Args:
        $bn_args
        (eps is unused here: nothing is divided; it is kept for batch norm's signature.)

    Shape:
        - Input: $shape
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> norm = bnlab.nn.$name($channels)
        >>> x = torch.randn($example_shape) * 3 + 5
        >>> y = norm(x)
        >>> bool(y.mean(dim=[d for d in range(y.dim()) if d != 1]).abs().max() < 1e-5)
        True
    """,
    {MeanOnlyBatchNorm1d: _ONE_D, MeanOnlyBatchNorm2d: _TWO_D},
    bn_args=_BN_ARGS,
)


class _VarianceOnlyBatchNorm(RankFamily, BatchNormBase):
    family = "VarianceOnlyBatchNorm"
    eval_is_batch_norm = False

    def normalize(self, input, running_mean, running_var, use_batch_stats, momentum):
        return F.variance_only_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps
        )


class VarianceOnlyBatchNorm1d(_VarianceOnlyBatchNorm):
    input_dims = (2, 3)


class VarianceOnlyBatchNorm2d(_VarianceOnlyBatchNorm):
    input_dims = (4,)


document(
    r"""Variance-only batch normalization of $shape input: the chapter's "lite" BN that divides only.

    .. math:: y = \frac{x}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Var is the batch's centered (biased) variance per channel in training, the running variance in
    evaluation; the input is not centered. Running statistics are tracked exactly as batch norm tracks
    them. The backward is hand-derived (`bnlab.functional.VarianceOnlyBatchNormFunction`).

    Args:
        $bn_args

    Shape:
        - Input: $shape
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> norm = bnlab.nn.$name($channels)
        >>> y = norm(torch.randn($example_shape) * 3)
        >>> dims = [d for d in range(y.dim()) if d != 1]
        >>> bool(torch.allclose(y.var(dim=dims, correction=0), torch.ones($channels), atol=1e-3))
        True
    """,
    {VarianceOnlyBatchNorm1d: _ONE_D, VarianceOnlyBatchNorm2d: _TWO_D},
    bn_args=_BN_ARGS,
)


# ---- frozen batch norm ---------------------------------------------------------------------------------


class FrozenBatchNorm(RankFamily, Module):
    r"""Batch normalization with fixed statistics and affine: every tensor is a buffer.

    .. math:: y = \frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}} \cdot
              \mathrm{weight} + \mathrm{bias}

    in training and evaluation alike: batch norm's evaluation mode, made permanent (for fine-tuning with
    small batches, or detection backbones). The state dict is torchvision's ``FrozenBatchNorm2d``'s:
    buffers ``weight``, ``bias``, ``running_mean``, ``running_var``; a batch norm's state dict loads too,
    its ``num_batches_tracked`` dropped as torchvision drops it. The input gradient is batch norm's in
    evaluation. This form takes any rank 2 to 5; the 1d/2d/3d forms check the rank.

    Args:
        num_features: C.
        eps: added to the variance. Default: 1e-5 (torchvision's).
        device, dtype: of the buffers.

    Shape:
        - Input: (N, C, *) with the rank of the form.
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> frozen = bnlab.nn.FrozenBatchNorm2d(3)
        >>> sorted(frozen.state_dict())
        ['bias', 'running_mean', 'running_var', 'weight']
        >>> x = torch.randn(2, 3, 4, 4)
        >>> bool(torch.allclose(frozen(x), x / (1 + 1e-5) ** 0.5))
        True
    """

    family = "FrozenBatchNorm"
    family_suffixes = ("1d", "2d", "3d")
    input_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int (the channel count C), got {num_features!r}")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity transform: weight and running variance 1, bias and running mean 0. As torch's
        layers do, this re-initializes a layer built on the meta device after `to_empty`, whose buffers
        would otherwise hold whatever the memory held."""
        with torch.no_grad():
            for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                getattr(self, name).fill_(value)

    @classmethod
    def from_batch_norm(cls, bn: Module) -> "FrozenBatchNorm":
        """A frozen copy of a batch norm's evaluation mode (bnlab's or torch's): its statistics, its affine
        (1 and 0 where it has none) and its eps; same device and dtype."""
        mean, var = bn.running_mean, bn.running_var
        frozen = cls(bn.num_features, bn.eps, device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(mean)
            frozen.running_var.copy_(var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        self.check_rank(input)
        F.check_input(input, self.num_features)
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """`FrozenBatchNorm` of (N, C) or (N, C, L) input."""

    input_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """`FrozenBatchNorm` of (N, C, H, W) input; torchvision.ops.FrozenBatchNorm2d's state dict."""

    input_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """`FrozenBatchNorm` of (N, C, D, H, W) input."""

    input_dims = (5,)


_FROZEN_FOR_RANKS = {(2, 3): FrozenBatchNorm1d, (4,): FrozenBatchNorm2d, (5,): FrozenBatchNorm3d}
_TORCH_RANKS = {torch.nn.BatchNorm1d: (2, 3), torch.nn.BatchNorm2d: (4,), torch.nn.BatchNorm3d: (5,)}


def _frozen_replacement(m: Module, path: str) -> Optional[Module]:
    """The frozen form of m if it is a batch norm, None if m normalizes otherwise (or not at all)."""
    if isinstance(m, InstanceNormBase) or not isinstance(m, (BatchNormBase, torch.nn.modules.batchnorm._BatchNorm)):
        return None  # not batch statistics: layer, group and instance norms keep their behaviour
    where = f"{path or 'the model'} ({type(m).__name__})"
    if not getattr(m, "eval_is_batch_norm", True):
        raise ValueError(
            f"cannot freeze {where}: its evaluation mode is not batch norm's affine map, so no "
            "FrozenBatchNorm reproduces it; call .eval() on that layer instead"
        )
    if getattr(m, "has_uninitialized_params", lambda: False)():
        raise ValueError(f"cannot freeze {where}: it is lazy and has not seen an input yet; run one batch first")
    if m.running_mean is None or m.running_var is None:
        raise ValueError(
            f"cannot freeze {where}: it has no running statistics (track_running_stats=False), so its "
            "evaluation uses each batch's statistics and there is nothing to freeze"
        )
    ranks = _TORCH_RANKS.get(type(m))
    if ranks is None and isinstance(m, BatchNormBase):
        ranks = tuple(m.input_dims)
    return _FROZEN_FOR_RANKS.get(ranks, FrozenBatchNorm).from_batch_norm(m)


def freeze(module: Module) -> Module:
    """Replace every batch norm in `module` by a `FrozenBatchNorm` of its evaluation mode.

    Batch norms are bnlab's and torch's (BatchNorm1d/2d/3d and their kin: the chapter's `BatchNorm`,
    SyncBatchNorm, BatchRenorm, GhostBatchNorm, whose evaluation is batch norm's): 1d layers become
    `FrozenBatchNorm1d`, 2d `FrozenBatchNorm2d`, 3d `FrozenBatchNorm3d`, rank-generic ones the generic
    `FrozenBatchNorm`. The model's outputs then equal the original's in eval mode, in either mode.
    Layer, group and instance norms are left as they are (they use no batch statistics). A ValueError
    names any layer that cannot be frozen: one without running statistics, an uninitialized lazy one,
    or one whose evaluation is not batch norm's (mean-only, variance-only, whitening, PIT).

    Children are replaced in place and the (possibly new) root is returned, as `bnlab.nn.convert` does.
    The frozen layers hold copies: the original parameters are no longer part of the model.

    Example:
        >>> import torch, bnlab.nn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> net = bnlab.nn.freeze(net)
        >>> type(net[1]).__name__
        'FrozenBatchNorm2d'
    """
    return _freeze(module, "")


def _freeze(module: Module, path: str) -> Module:
    frozen = _frozen_replacement(module, path)
    if frozen is not None:
        return frozen
    for name, child in module.named_children():
        module._modules[name] = _freeze(child, f"{path}.{name}" if path else name)
    return module


# ---- batch renormalization -------------------------------------------------------------------------------


class _BatchRenorm(RankFamily, BatchNormBase):
    family = "BatchRenorm"
    repr_options = ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps")

    def __init__(
        self,
        num_features: int,
        *args,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        **kwargs,
    ) -> None:
        arguments = batch_norm_arguments(num_features, *args, **kwargs)
        if not arguments["track_running_stats"]:
            raise ValueError(
                f"{type(self).__name__} corrects the batch statistics towards the running ones, so it needs "
                "track_running_stats=True; without running statistics use BatchNorm"
            )
        if r_max < 1 or d_max < 0:
            raise ValueError(f"r_max must be >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        for name, end in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            if not 0 <= warmup_steps <= end:
                raise ValueError(
                    f"need 0 <= warmup_steps <= {name} (the step where the bound is fully relaxed), got "
                    f"warmup_steps={warmup_steps}, {name}={end}"
                )
        super().__init__(**arguments)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps

    def clipping_bounds(self, step: Optional[int] = None) -> tuple[float, float]:
        """(r_max, d_max) in force at a training step (1 for the first batch; default: the batch being
        trained on, num_batches_tracked): 1 and 0 up to warmup_steps, then linear ramps reaching r_max at
        r_max_steps and d_max at d_max_steps."""
        if step is None:  # in a graph the step stays a tensor: reading it back would break the graph
            step = self.num_batches_tracked if F.in_graph(self.num_batches_tracked) else int(self.num_batches_tracked)
        return (
            1.0 + (self.r_max - 1.0) * _ramp(step, self.warmup_steps, self.r_max_steps),
            self.d_max * _ramp(step, self.warmup_steps, self.d_max_steps),
        )

    def normalize(self, input, running_mean, running_var, use_batch_stats, momentum):
        r_max, d_max = self.clipping_bounds() if use_batch_stats else (1.0, 0.0)
        return F.batch_renorm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps,
            r_max, d_max,
        )


def _ramp(step, start: int, end: int):
    """0 up to `start`, 1 from `end`, linear between; `step` an int, or a 0-dim tensor in a graph."""
    if isinstance(step, torch.Tensor):
        if end == start:
            return (step > start).float()
        return ((step - start) / (end - start)).clamp(0.0, 1.0)
    if step <= start:
        return 0.0
    return 1.0 if step >= end else (step - start) / (end - start)


class BatchRenorm1d(_BatchRenorm):
    input_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    input_dims = (4,)


document(
    r"""Batch renormalization (Ioffe, 2017) of $shape input.

    In training, with the batch's mean and :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and the
    running :math:`\mu` and :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`,

    .. math::
        r = \mathrm{clip}\left(\frac{\sigma_B}{\sigma}, \frac{1}{r_{max}}, r_{max}\right), \quad
        d = \mathrm{clip}\left(\frac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\right), \quad
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta

    with r and d constants in the backward (stop-gradient). Evaluation is batch norm with the running
    statistics, which training already approaches: the output depends on each example, not on its
    batch, as far as the clipping allows. The running statistics move as batch norm's (torch momentum,
    None for a cumulative average). Deviation from the paper: it moves :math:`\sigma` itself; here the
    running variance moves (as batch norm's), so state dicts interchange with BatchNorm.

    The bounds follow the paper's schedule: :math:`r_{max} = 1, d_{max} = 0` (plain batch norm) for the
    first `warmup_steps` training batches, then linear ramps reaching `r_max` at step `r_max_steps` and
    `d_max` at step `d_max_steps` (the paper: 5000, 40k and 25k steps to 3 and 5). The step count is
    ``num_batches_tracked`` (a buffer, so the schedule survives ``state_dict``); `clipping_bounds` tells
    the bounds at a step.

    Args:
        $bn_args
            track_running_stats must stay True (the correction needs running statistics).
        r_max, d_max: keyword-only, the final bounds. Defaults: 3.0 and 5.0.
        warmup_steps: keyword-only, training batches of plain batch norm. Default: 5000.
        r_max_steps, d_max_steps: keyword-only, the steps where the bounds reach r_max and d_max.
            Defaults: 40000 and 25000.

    Shape:
        - Input: $shape
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> norm = bnlab.nn.$name($channels, warmup_steps=0, r_max_steps=100, d_max_steps=50)
        >>> y = norm(torch.randn($example_shape))
        >>> norm.clipping_bounds(), norm.clipping_bounds(step=50)
        ((1.02, 0.1), (2.0, 5.0))

    Reference::

        @inproceedings{ioffe2017batch,
          title={Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models},
          author={Ioffe, Sergey},
          booktitle={Advances in Neural Information Processing Systems},
          year={2017},
          note={arXiv:1702.03275}
        }
    """,
    {BatchRenorm1d: _ONE_D, BatchRenorm2d: _TWO_D},
    bn_args=_BN_ARGS,
)


# ---- ghost batch normalization ---------------------------------------------------------------------------


class _GhostBatchNorm(RankFamily, BatchNormBase):
    family = "GhostBatchNorm"
    repr_options = ("ghost_batch_size",)

    def __init__(self, num_features: int, *args, ghost_batch_size: int = 32, **kwargs) -> None:
        if not isinstance(ghost_batch_size, int) or ghost_batch_size < 2:
            raise ValueError(
                f"ghost_batch_size must be an int >= 2 (a ghost batch of one sample has no variance), got "
                f"{ghost_batch_size!r}"
            )
        super().__init__(num_features, *args, **kwargs)
        self.ghost_batch_size = ghost_batch_size

    def normalize(self, input, running_mean, running_var, use_batch_stats, momentum):
        if not self.training:  # evaluation is batch norm's, over the whole batch if there are no running stats
            return super().normalize(input, running_mean, running_var, use_batch_stats, momentum)
        cumulative = self.momentum is None and running_mean is not None
        tracked = 0
        if cumulative:
            ghosts = len(F.ghost_batch_sizes(input.shape[0], self.ghost_batch_size))
            tracked = (int(self.num_batches_tracked) - 1) * ghosts
        return F.ghost_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, True, None if cumulative else momentum,
            self.eps, self.ghost_batch_size, tracked,
        )


class GhostBatchNorm1d(_GhostBatchNorm):
    input_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    input_dims = (4,)


document(
    r"""Ghost batch normalization (Hoffer, Hubara & Soudry, 2017) of $shape input.

    In training the batch splits along N into ghost (virtual) batches of `ghost_batch_size` samples,
    each normalized with its own statistics as batch norm would; a batch that does not divide evenly
    gives its remainder to the last ghost batch (so a ghost batch has between ghost_batch_size and
    2 * ghost_batch_size - 1 samples, or the whole batch when N < ghost_batch_size), never a tiny
    ghost batch with a noisy variance.

    Running statistics, the paper's Algorithm 1 rule: one momentum step per ghost batch, in order; for
    k ghost batches with means :math:`\mu^1 \dots \mu^k` and momentum :math:`\eta`

    .. math:: \mu_{run} \leftarrow (1 - \eta)^k \mu_{run} + \sum_{l=1}^{k} \eta (1 - \eta)^{k-l} \mu^l

    and the same for the variance (each ghost batch's, unbiased). The paper prints the first factor as
    :math:`(1 - \eta)^{|B_S|}` and moves the standard deviation; here the weights sum to one and the
    variance moves, as batch norm's, so evaluation is exactly batch norm's and state dicts interchange.
    ``momentum=None`` averages all ghost batches equally (exact while the batch size is constant).

    Evaluation is batch norm's (the running statistics, or the whole batch's without them). With
    ghost_batch_size >= N the layer is batch norm.

    Args:
        $bn_args
        ghost_batch_size: keyword-only, samples per ghost batch, at least 2. Default: 32.

    Shape:
        - Input: $shape
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> norm = bnlab.nn.$name($channels, ghost_batch_size=4)
        >>> y = norm(torch.randn($example_shape) * 3 + 1)
        >>> dims = [d for d in range(y.dim()) if d != 1]
        >>> bool(y[:4].mean(dim=dims).abs().max() < 1e-5)
        True

    Reference::

        @inproceedings{hoffer2017train,
          title={Train longer, generalize better: closing the generalization gap in large batch training
                 of neural networks},
          author={Hoffer, Elad and Hubara, Itay and Soudry, Daniel},
          booktitle={Advances in Neural Information Processing Systems},
          year={2017},
          note={arXiv:1705.08741}
        }
    """,
    {GhostBatchNorm1d: _ONE_D, GhostBatchNorm2d: _TWO_D},
    bn_args=_BN_ARGS,
)
