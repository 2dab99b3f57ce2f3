"""Batch-normalization layers (bnlab.nn re-exports them): bookkeeping only, the math lives in `bnlab.functional`.

Every layer here is a drop-in peer of its torch namesake: same constructor, parameters (`weight`,
`bias`), buffers (`running_mean`, `running_var` stored unbiased, `num_batches_tracked`), train/eval
behaviour and state-dict keys, so a state dict loads in either direction and the outputs agree.

Momentum follows torch: ``running = (1 - momentum) * running + momentum * batch``; ``momentum=None``
makes the running statistics a cumulative (equal-weight) average of every batch seen. Keras/Flax
(0.99) and MXNet/the D2L chapter (0.9) count the other way: see `bnlab.functional.convert_momentum`.
"""

from __future__ import annotations

import inspect
import string
import types
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from bnlab import functional as F

__all__ = [
    "BatchNormBase",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "convert",
    "accumulate_stats",
]

SHAPES = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def document(template: str, layers: dict, **shared: str) -> None:
    """Give each layer of a family its docstring from the family's one `template`: the one way layer
    docstrings are generated in `bnlab.nn`.

    `template` is a `string.Template` (``$name`` or ``${name}`` placeholders, so LaTeX braces stay as
    written); each layer gets it filled with its own class name (``$name``), its fields (`layers` maps
    each class to a dict of them, e.g. its input shape and example) and the `shared` fields (e.g. the
    constructor's argument list). A missing field is a KeyError at import.
    """
    for layer, fields in layers.items():
        layer.__doc__ = string.Template(template).substitute(shared, name=layer.__name__, **fields)


class BatchNormBase(Module):
    """State shared by the batch-norm family: affine parameters, running statistics, momentum.

    Subclasses set `input_dims` (the input ranks they accept) and may override `normalize`, which gets
    the running statistics to use or update and whether to use the batch's statistics; one whose
    normalization is not batch norm's sets `eval_is_batch_norm = False`.
    """

    _version = 2  # version 2 added num_batches_tracked; older state dicts load with it set to 0
    input_dims: tuple[int, ...] = (2, 3, 4, 5)
    # True when eval mode is batch norm's per-channel affine map with the running statistics and
    # training normalizes by batch statistics: what fold_batchnorm and recompute_stats rely on.
    eval_is_batch_norm: bool = True
    # The subclass's own constructor options, shown after batch norm's in the repr, in this order.
    repr_options: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        # A subclass that only adds options takes batch norm's arguments through, as
        # ``__init__(self, num_features, *args, <keyword-only options>, **kwargs)``, rather than restating
        # them; its signature is then batch norm's followed by its options, so inspect.signature and
        # help() still show every argument and its default.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and _passes_batch_norm_arguments_through(init):
            batch_norm = inspect.signature(BatchNormBase.__init__)
            options = [p for p in inspect.signature(init).parameters.values() if p.kind is p.KEYWORD_ONLY]
            init.__signature__ = batch_norm.replace(parameters=[*batch_norm.parameters.values(), *options])

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 0:
            raise ValueError(f"num_features must be a non-negative int (the channel count C), got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"momentum must be in [0, 1] or None (cumulative average), got {momentum}; torch's "
                "convention: 0.1 takes 10% of each new batch (convert Keras/MXNet values with "
                "bnlab.functional.convert_momentum)"
            )
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = Parameter(torch.empty(num_features, **factory))
            self.register_parameter("bias", Parameter(torch.empty(num_features, **factory)) if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def extra_repr(self) -> str:
        options = "".join(f", {name}={getattr(self, name)}" for name in self.repr_options)
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}{options}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def check_input(self, input: Tensor) -> None:
        """ValueError unless the input's rank is one this layer takes and its C is num_features."""
        self.check_rank(input)
        F.check_input(input, self.num_features)

    def check_rank(self, input: Tensor) -> None:
        if isinstance(input, Tensor) and input.dim() not in self.input_dims:
            wanted = " or ".join(f"{d}D {SHAPES[d]}" for d in self.input_dims)
            hint = _rank_hint(input.dim())
            raise ValueError(
                f"{type(self).__name__} expected {wanted} input, got {input.dim()}D input of shape "
                f"{tuple(input.shape)}" + (f"; {hint}" if hint else "")
            )

    def forward(self, input: Tensor) -> Tensor:
        self.check_input(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = cumulative_factor(self.num_batches_tracked, input)
        # Without running statistics the batch's are used in eval mode too, as torch does.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update = not self.training or self.track_running_stats
        return self.normalize(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            use_batch_stats,
            factor,
        )

    def _apply_pooled(self, pooled: "PooledMoments") -> None:
        """One running-statistics step towards the pooled statistics (see `accumulate_stats`)."""
        if pooled.count < 2:
            return
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        F.update_running(self.running_mean, pooled.mean, factor)
        F.update_running(self.running_var, pooled.m2 / (pooled.count - 1), factor)

    def normalize(
        self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
        use_batch_stats: bool, momentum: float,
    ) -> Tensor:
        return F.batch_norm_checked(  # forward() ran check_input
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps
        )


def _passes_batch_norm_arguments_through(init) -> bool:
    """Whether `init` is ``(self, [num_features,] *args, <keyword-only options>, **kwargs)``."""
    params = list(inspect.signature(init).parameters.values())[1:]  # after self
    if params and params[0].name == "num_features":
        params = params[1:]
    kinds = [p.kind for p in params]
    return (
        kinds[:1] == [inspect.Parameter.VAR_POSITIONAL] and kinds[-1:] == [inspect.Parameter.VAR_KEYWORD]
        and all(kind is inspect.Parameter.KEYWORD_ONLY for kind in kinds[1:-1])
    )


def batch_norm_arguments(*args, **kwargs) -> dict:
    """BatchNormBase's constructor arguments by name, defaults filled in: for a subclass that takes them
    through (see `BatchNormBase.__init_subclass__`) but needs one itself before or besides batch norm.
    A TypeError for arguments batch norm does not take, as the constructor's own call would raise."""
    bound = inspect.signature(BatchNormBase).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def cumulative_factor(num_batches_tracked: Tensor, input: Tensor):
    """The momentum of the cumulative average after num_batches_tracked batches, 1 / n: a Python float
    eagerly (what the kernels take), a 0-dim tensor in a graph, where a Python number would be read
    back from the tensor and make a data-dependent graph (torch's own layer fails fullgraph there)."""
    return 1.0 / num_batches_tracked if F.in_graph(input) else 1.0 / float(num_batches_tracked)


class PooledMoments:
    """Exact per-channel count, mean and M2 over several batches (Chan's merge, in float64); an empty
    batch adds nothing, as it moves no running statistic."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach().double(), dim=[0, *range(2, x.dim())], correction=0)
        self.count, self.mean, self.m2 = F.chan_merge(self.count, self.mean, self.m2, n, mean, var * n,
                                                      lambda delta: delta * delta)


@contextmanager
def accumulate_stats(model: Module) -> Iterator[None]:
    """Gradient accumulation with correct running statistics: one update per optimizer step.

    With k micro-batches per optimizer step, each batch-norm layer would otherwise move its running
    statistics k times, each towards a small, noisy micro-batch statistic, and count k batches. Inside
    this context every micro-batch is still normalized by its own statistics (the forward and the
    gradients are unchanged), but the layers pool the micro-batches' exact statistics and, on leaving
    the context, make a single update with the statistics of the whole accumulated batch — the
    running mean and variance a single forward of the concatenated batch would give — and count one
    batch. If the block raises, nothing is updated. Applies to bnlab's BatchNorm1d/2d/3d and the
    chapter's BatchNorm (layers that keep the default `normalize`); other norm layers are an error.

    Example:
        >>> import torch, bnlab.nn
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), bnlab.nn.BatchNorm1d(3))
        >>> batch = torch.randn(32, 4)
        >>> with bnlab.nn.accumulate_stats(net):
        ...     for micro in batch.chunk(4):
        ...         net(micro).sum().backward()
        >>> whole = bnlab.nn.BatchNorm1d(3)
        >>> _ = whole(net[0](batch))
        >>> torch.allclose(net[1].running_var, whole.running_var), int(net[1].num_batches_tracked)
        (True, 1)
    """
    layers = [m for m in model.modules() if isinstance(m, BatchNormBase)]
    unsupported = [type(m).__name__ for m in layers if type(m).normalize is not BatchNormBase.normalize]
    if unsupported:
        raise ValueError(
            f"accumulate_stats supports batch norm proper; {', '.join(sorted(set(unsupported)))} normalizes "
            "differently (its running state is not batch statistics): leave it out of the accumulated model"
        )
    pooled = {m: PooledMoments() for m in layers if m.track_running_stats}
    with forwards_replaced({m: _pooling_forward(moments) for m, moments in pooled.items()}):
        yield
        for m, moments in pooled.items():
            m._apply_pooled(moments)


@contextmanager
def forwards_replaced(forwards: dict) -> Iterator[None]:
    """For the block, each module in `forwards` runs the function it maps to as its forward (bound to
    the module). An instance attribute, removed on leaving: the class's hot forward carries no branch
    for the context managers that use this (`accumulate_stats`, `functional_call`)."""
    for m, forward in forwards.items():
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in forwards:
            del m.forward


def _pooling_forward(moments: PooledMoments):
    """A layer's forward inside `accumulate_stats`: a training batch is pooled into `moments` and
    normalized by its own statistics, with no running update; evaluation is the class's forward."""

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return type(self).forward(self, input)
        self.check_input(input)
        moments.add(input)
        return self.normalize(input, None, None, True, 0.0)

    return forward


def _rank_hint(dims: int) -> str:
    layer = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}.get(dims)
    return f"use {layer} for {SHAPES[dims]} input" if layer else ""


_SUFFIX_FOR_RANK = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}


class RankFamily:
    """A rank check whose hint names the sibling layer for the input's rank (MeanOnlyBatchNorm1d for a
    2D input to MeanOnlyBatchNorm2d), rather than plain batch norm's."""

    family: str = ""
    family_suffixes: tuple[str, ...] = ("1d", "2d")
    input_dims: tuple[int, ...]

    def check_rank(self, input: Tensor) -> None:
        if not isinstance(input, Tensor) or input.dim() in self.input_dims:
            return
        wanted = " or ".join(f"{d}D {SHAPES[d]}" for d in self.input_dims)
        suffix = _SUFFIX_FOR_RANK.get(input.dim())
        hint = (
            f"; use {self.family}{suffix} for {SHAPES[input.dim()]} input" if suffix in self.family_suffixes else ""
        )
        raise ValueError(
            f"{type(self).__name__} expected {wanted} input, got {input.dim()}D input of shape "
            f"{tuple(input.shape)}{hint}"
        )


class BatchNorm1d(BatchNormBase):
    """Batch normalization over (N, C) or (N, C, L) input: statistics per channel over N (and L).

    Args:
        num_features: C.
        eps: added to the variance for stability. Default 1e-5.
        momentum: torch convention, the weight of each new batch in the running statistics; None for a
            cumulative average. Default 0.1.
        affine: learn a per-channel scale `weight` (gamma, init 1) and shift `bias` (beta, init 0).
        track_running_stats: keep running statistics for eval mode; without them eval mode uses the
            batch's statistics.
        bias: keyword-only; False keeps the scale but drops the shift.

    Shape: input (N, C) or (N, C, L); output the same.

    Example:
        >>> import torch, bnlab.nn
        >>> bn = bnlab.nn.BatchNorm1d(4)
        >>> bn(torch.randn(16, 4)).shape
        torch.Size([16, 4])
    """

    input_dims = (2, 3)


class BatchNorm2d(BatchNormBase):
    """Batch normalization over (N, C, H, W) input: statistics per channel over N, H and W.

    Arguments as `BatchNorm1d`. Channels-last input is supported and keeps its layout.

    Example:
        >>> import torch, bnlab.nn
        >>> bn = bnlab.nn.BatchNorm2d(6)
        >>> bn(torch.randn(8, 6, 24, 24)).shape
        torch.Size([8, 6, 24, 24])
    """

    input_dims = (4,)


class BatchNorm3d(BatchNormBase):
    """Batch normalization over (N, C, D, H, W) input: statistics per channel over N, D, H and W.

    Arguments as `BatchNorm1d`.

    Example:
        >>> import torch, bnlab.nn
        >>> bnlab.nn.BatchNorm3d(2)(torch.randn(4, 2, 3, 5, 5)).shape
        torch.Size([4, 2, 3, 5, 5])
    """

    input_dims = (5,)


class BatchNorm(BatchNormBase):
    """The D2L chapter's layer, ``BatchNorm(num_features, num_dims)``, done properly.

    ``num_dims`` is the input rank the layer accepts (the chapter's 2 for fully connected layers, 4 for
    convolutions); None accepts any rank from 2 to 5. Unlike the chapter's code, prediction mode follows
    ``module.eval()`` rather than ``torch.is_grad_enabled()``, and the moving statistics are buffers, so
    ``state_dict()`` and ``.to()`` see them. Parameters and buffers carry torch's names; the chapter's
    names are aliases: ``gamma`` is ``weight``, ``beta`` is ``bias``, ``moving_mean`` and ``moving_var``
    are ``running_mean`` and ``running_var``. Momentum is torch's convention (the chapter's 0.9 is
    torch's 0.1, the default).

    Example:
        >>> import torch, bnlab.nn
        >>> bn = bnlab.nn.BatchNorm(6, num_dims=4)
        >>> bn(torch.randn(8, 6, 24, 24)).shape, bn.gamma.shape
        (torch.Size([8, 6, 24, 24]), torch.Size([6]))
    """

    repr_options = ("num_dims",)

    def __init__(self, num_features: int, num_dims: Optional[int] = None, *args, **kwargs) -> None:
        if num_dims is not None and num_dims not in SHAPES:
            raise ValueError(f"num_dims must be 2, 3, 4 or 5 (the input rank) or None, got {num_dims!r}")
        super().__init__(num_features, *args, **kwargs)
        self.num_dims = num_dims
        if num_dims is not None:
            self.input_dims = (num_dims,)

    gamma = property(lambda self: self.weight, doc="The chapter's name for the scale `weight`.")
    beta = property(lambda self: self.bias, doc="The chapter's name for the shift `bias`.")
    moving_mean = property(lambda self: self.running_mean, doc="The chapter's name for `running_mean`.")
    moving_var = property(lambda self: self.running_var, doc="The chapter's name for `running_var`.")


class _LazyBatchNormBase(LazyModuleMixin, BatchNormBase):
    """Infers num_features from the first input's dim 1, as torch's LazyBatchNorm layers do."""

    cls_to_become: type = BatchNormBase

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, bias=True) -> None:
        factory = {"device": device, "dtype": dtype}
        # Build with no state, then install uninitialized placeholders that the first input sizes.
        super().__init__(0, eps, momentum, False, False, **factory)
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            self.register_parameter("bias", UninitializedParameter(**factory) if bias else None)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor) -> None:
        if self.num_features:  # sized already (loaded from a state dict)
            return
        self.check_rank(input)
        F.check_input(input)
        # Sized even with nothing to materialize (affine=False, track_running_stats=False): the channel
        # count is still checked on every later input.
        self.num_features = input.shape[1]
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(self, name)
            if t is not None and is_lazy(t):
                t.materialize((self.num_features,))
        self.reset_parameters()


class LazyBatchNorm1d(_LazyBatchNormBase, BatchNorm1d):
    """`BatchNorm1d` whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNormBase, BatchNorm2d):
    """`BatchNorm2d` whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNormBase, BatchNorm3d):
    """`BatchNorm3d` whose num_features is inferred from the first input."""

    cls_to_become = BatchNorm3d


# ---- conversion between bnlab and torch -------------------------------------------------------------

_TO_BNLAB = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.LazyBatchNorm1d: LazyBatchNorm1d,
    torch.nn.LazyBatchNorm2d: LazyBatchNorm2d,
    torch.nn.LazyBatchNorm3d: LazyBatchNorm3d,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_BNLAB.items()}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def handed_over(old: Module, new: Module) -> Module:
    """`new` (built without tensors of its own, e.g. on the meta device) given `old`'s very parameters and
    buffers, in `old`'s train/eval mode: the tensors themselves, so an optimizer holding `old`'s
    parameters keeps working. How `convert` and `convert_sync_batchnorm` swap one layer for another."""
    for name in _STATE:
        value = getattr(old, name, None)
        if name in ("weight", "bias"):
            new.register_parameter(name, value)
        else:
            new.register_buffer(name, value)
    return new.train(old.training)


def _torch_class_for_chapter_layer(m: BatchNorm) -> type:
    if m.num_dims is None:
        raise ValueError(
            "cannot convert bnlab.nn.BatchNorm with num_dims=None to torch: torch's layers are "
            "rank-specific; build it with num_dims (2 or 3 -> BatchNorm1d, 4 -> 2d, 5 -> 3d)"
        )
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[
        m.num_dims
    ]


def _replacement(m: Module, to: str) -> Optional[Module]:
    """The other implementation's layer holding m's very tensors, or None if m is not a batch norm."""
    if to == "bnlab":
        target = _TO_BNLAB.get(type(m))
    else:
        target = _torch_class_for_chapter_layer(m) if type(m) is BatchNorm else _TO_TORCH.get(type(m))
    if target is None:
        return None
    lazy = getattr(m, "has_uninitialized_params", lambda: False)()
    config = dict(eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats)
    return handed_over(m, target(**config) if lazy else target(m.num_features, device="meta", **config))


def convert(module: Module, to: str = "bnlab") -> Module:
    """Replace every batch-norm layer in `module` by the other implementation, state preserved.

    ``to="bnlab"`` swaps torch.nn.BatchNorm1d/2d/3d (and their lazy forms) for bnlab's; ``to="torch"``
    swaps back (the chapter's `BatchNorm` needs its num_dims). Parameters and buffers are handed over
    as the same tensors, so optimizers stay valid; train/eval mode is kept. Children are replaced in
    place and the (possibly new) root is returned, like torch's ``convert_sync_batchnorm``.

    Example:
        >>> import torch, bnlab.nn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> isinstance(bnlab.nn.convert(net, to="bnlab")[1], bnlab.nn.BatchNorm2d)
        True
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"to must be 'bnlab' or 'torch', got {to!r}")
    replaced = _replacement(module, to)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        module._modules[name] = convert(child, to)
    return module
