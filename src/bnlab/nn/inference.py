"""Batch norm at prediction time: fold it into the layer before it, or recompute its statistics exactly.

`fold_batchnorm(model)` returns an eval-mode copy in which every batch norm that directly follows a
convolution or linear layer (whose output feeds nothing else) is folded into that layer. In eval mode
a BN is the per-channel affine map y = (z - mean) * s + beta with s = gamma / sqrt(var + eps), so for
z = W x + b:

    W' = s * W   (row / output channel c scaled by s_c),   b' = (b - mean) * s + beta

and the BN becomes an identity: one pass over the activations fewer at every such layer.

`recompute_stats(model, batches)` replaces the running statistics, an exponential average of noisy
batch statistics taken while the weights were still moving, with the exact mean and unbiased
variance of each BN's input over the given batches ("precise BN", Wu & Johnson 2021): the chapter's
"standard practice" of computing the statistics on the whole training set once training is done. For
the whitening layers it sets the running whitening matrix to that of the exact covariance.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from torch import fx, nn

from bnlab.nn.batchnorm import BatchNormBase, PooledMoments
from bnlab.nn.variants import FrozenBatchNorm
from bnlab.nn.whitening import GroupWhitening, PooledCovariance

__all__ = ["fold_batchnorm", "recomputable", "recompute_stats"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TORCH_BN = nn.modules.batchnorm._BatchNorm


def _is_batch_norm(m: nn.Module) -> bool:
    """A batch norm proper: batch statistics in training, the running ones' affine map in eval mode.

    bnlab's variants whose normalization differs (mean-only, whitening, instance norm, ...) say so with
    `eval_is_batch_norm = False`: folding or recomputing them as batch norm would be wrong."""
    if not isinstance(m, (BatchNormBase, _TORCH_BN)) or getattr(m, "running_mean", None) is None:
        return False
    return getattr(m, "eval_is_batch_norm", True)


def _is_foldable(m: nn.Module) -> bool:
    """A layer that, in eval mode, is a per-channel affine map of stored statistics: BN, or frozen BN."""
    return _is_batch_norm(m) or isinstance(m, FrozenBatchNorm)


class _LeafTracer(fx.Tracer):
    # Norm layers are leaves: their forward is not traced into, it is what we look for.
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return _is_foldable(m) or super().is_leaf_module(m, qualified_name)


def _pairs_from_graph(model: nn.Module) -> Optional[list[tuple[str, str]]]:
    """(affine layer name, BN name) pairs where the BN's only input is the layer's only use; None if
    the model cannot be traced symbolically."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # any tracing failure means: fall back to the Sequential structure
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable(modules[node.target]) or len(node.args) != 1:
            continue
        producer = node.args[0]
        if (isinstance(producer, fx.Node) and producer.op == "call_module"
                and isinstance(modules[producer.target], _FOLDABLE) and len(producer.users) == 1
                and calls[node.target] == 1 and calls[producer.target] == 1):
            pairs.append((producer.target, node.target))
    return pairs


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    """Adjacent (affine layer, BN) children of every nn.Sequential: the fallback for untraceable models."""
    pairs = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (name_a, a), (name_b, b) in zip(children, children[1:]):
                if isinstance(a, _FOLDABLE) and _is_foldable(b):
                    join = f"{prefix}." if prefix else ""
                    pairs.append((join + name_a, join + name_b))
    return pairs


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode `bn` into `layer`'s weight and bias, in place (computed in float64)."""
    with torch.no_grad():
        var = bn.running_var.double()
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        weight = layer.weight.double() * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        bias = shift if layer.bias is None else layer.bias.double() * scale + shift
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


def _replace(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BN (or FrozenBatchNorm) after a Conv or Linear folded into it.

    Pairs are found by symbolic tracing (torch.fx), so a BN is folded only when its input is the
    convolution's output and nothing else reads that output; models fx cannot trace fall back to
    adjacent children of nn.Sequential containers. BNs not folded stay (in eval mode). The original
    model is not modified. The folded model's eval-mode outputs equal the original's up to float
    rounding.

    Example:
        >>> import torch, bnlab.nn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), bnlab.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> _ = net(torch.randn(8, 1, 6, 6))  # train a step so the running statistics move
        >>> folded = bnlab.nn.fold_batchnorm(net)
        >>> folded[1]
        Identity()
        >>> x = torch.randn(2, 1, 6, 6)
        >>> torch.allclose(folded(x), net.eval()(x), atol=1e-6)
        True
    """
    folded = copy.deepcopy(model).eval()
    pairs = _pairs_from_graph(folded)
    if pairs is None:
        pairs = _pairs_from_sequentials(folded)
    for layer_name, bn_name in pairs:
        _fold_into(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
        _replace(folded, bn_name, nn.Identity())
    return folded


def _population_estimator(m: nn.Module):
    """(an accumulator of `m`'s inputs, a function writing its exact statistics into `m`) for a layer whose
    running statistics `recompute_stats` can set exactly; None for any other module."""
    if _is_batch_norm(m):
        def write_moments(moments: PooledMoments) -> None:
            m.running_mean.copy_(moments.mean)
            m.running_var.copy_(moments.m2 / (moments.count - 1))

        return PooledMoments(), write_moments
    if isinstance(m, GroupWhitening) and m.track_running_stats:
        def write_covariance(pooled: PooledCovariance) -> None:
            m.set_population_statistics(pooled.mean.reshape(-1), pooled.scatter / pooled.count)

        return PooledCovariance(m.group_size), write_covariance
    return None


def recomputable(m: nn.Module) -> bool:
    """Whether `recompute_stats` sets `m`'s running statistics: a batch norm proper with running
    statistics (bnlab's or torch's), or a whitening layer (DecorrelatedBatchNorm2d, IterNorm2d) tracking
    its running mean and whitening matrix."""
    return _population_estimator(m) is not None


def recompute_stats(model: nn.Module, batches: Iterable) -> nn.Module:
    """Set every norm layer's running statistics to the exact statistics of its input over `batches`.

    Batch norm: running mean and unbiased variance. Whitening layers (DecorrelatedBatchNorm2d,
    IterNorm2d): running mean, and the running whitening matrix replaced by the layer's whitening
    matrix (ZCA, or its Newton–Schulz iterations) of each group's exact covariance (1/n, as training
    uses, + eps I) — instead of an average of batch whitening matrices, which is not the whitening
    matrix of any covariance. Layers `recomputable` does not accept are left alone.

    One pass over `batches` (tensors, or tuples whose first element is the model input) with every such
    layer normalizing by its batch's statistics, as in training, and every other layer in eval mode (no
    dropout); each layer's input is accumulated exactly (pooled over all values, not an average of batch
    statistics). Then the running statistics are overwritten, `num_batches_tracked` is left as it
    was, and every module's train/eval mode is restored. Returns the model.

    Example:
        >>> import torch, bnlab.nn
        >>> bn = bnlab.nn.BatchNorm1d(3)
        >>> data = [torch.randn(16, 3) * 2 + 1 for _ in range(4)]
        >>> _ = bnlab.nn.recompute_stats(bn, data)
        >>> torch.allclose(bn.running_var, torch.cat(data).var(dim=0), atol=1e-6)
        True
    """
    estimators = {m: estimator for m in model.modules() if (estimator := _population_estimator(m))}
    if not estimators:
        raise ValueError("recompute_stats: the model has no batch-norm or whitening layer with running statistics; "
                         "there is nothing to recompute")
    modes = {m: m.training for m in model.modules()}
    # The forward passes move the running statistics: keep them to put back.
    saved = {m: {name: t.clone() for name, t in m.named_buffers(recurse=False)} for m in estimators}
    hooks = [m.register_forward_pre_hook(lambda m, args: estimators[m][0].add(args[0])) for m in estimators]
    seen = 0
    try:
        model.eval()
        for m in estimators:
            m.train()
        with torch.no_grad():
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
        with torch.no_grad():
            for m, buffers in saved.items():
                for name, original in buffers.items():
                    getattr(m, name).copy_(original)
    if seen == 0:
        raise ValueError("recompute_stats: `batches` yielded nothing; pass the batches to compute the statistics over")
    with torch.no_grad():
        for accumulator, write in estimators.values():
            if accumulator.count > 1:
                write(accumulator)
    return model
