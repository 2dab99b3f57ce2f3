"""`check_finite`: an opt-in guard that stops a non-finite input before it poisons running statistics.

What torch does without it (torch 2.x, checked for torch.nn.BatchNorm2d and bnlab.nn.BatchNorm2d alike):
one training-mode forward whose input holds a single NaN in a channel sets that channel's
`running_mean` and `running_var` to NaN, silently, and they stay NaN forever, because every later
update mixes the old value in (``(1 - momentum) * NaN + momentum * batch`` is NaN): after a hundred
finite batches they are still NaN, and every eval-mode output of that channel is NaN. An inf makes the
channel's mean inf or NaN and its variance NaN, with the same effect. Nothing warns; the damage shows
up later as a NaN evaluation or a checkpoint that cannot be used.

With the guard active, every normalization layer of the model (bnlab's, and torch's batch, instance,
group and layer norms) checks its input in training mode before it runs, and raises ValueError naming
the layer (its qualified name in the model and its class), how many values were NaN or inf, and what to
do; the layer's parameters and running statistics are left exactly as they were. Eval mode and finite
inputs are untouched (the outputs are bitwise those of the unguarded model); the price is one
`isfinite` reduction per layer per training step (and a host sync on GPU).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import Module

__all__ = ["check_finite", "FiniteGuard"]


def _norm_types() -> tuple[type, ...]:
    import bnlab.nn as bnn  # the package imports this module: look its classes up when used

    types = [torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm]
    if hasattr(torch.nn, "RMSNorm"):
        types.append(torch.nn.RMSNorm)
    for name in ("BatchNormBase", "LayerNorm", "GroupNorm", "FrozenBatchNorm"):
        if hasattr(bnn, name):
            types.append(getattr(bnn, name))
    return tuple(types)


class FiniteGuard:
    """The hooks that `check_finite` installed; `remove()` (or leaving the with-block) takes them out."""

    def __init__(self, model: Module):
        if not isinstance(model, Module):
            raise TypeError(f"check_finite expects a torch.nn.Module, got {type(model).__name__}")
        types = _norm_types()
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, types)]
        self._handles = [
            m.register_forward_pre_hook(_hook(name or "the model itself", m), with_kwargs=True)
            for name, m in self.layers
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FiniteGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def check_finite(model: Module) -> FiniteGuard:
    """Make every normalization layer of `model` raise ValueError, naming the layer, when a training-mode
    forward gets a NaN or inf input, before the layer can update its running statistics.

    As a context manager the check holds inside the block and its hooks are removed on exit, even when
    the block raises::

        with bnlab.nn.check_finite(model):
            loss = criterion(model(x), y)

    Called alone it guards until `.remove()`: ``guard = bnlab.nn.check_finite(model)``.
    See the module's docstring for what torch does without it.
    """
    return FiniteGuard(model)


def _hook(name: str, layer: Module):
    label = f"{name} ({type(layer).__name__})"

    def check(module: Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        if not module.training:
            return None
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
                _check_tensor(label, value)
        return None

    return check


def _check_tensor(label: str, value: Tensor) -> None:
    with torch.no_grad():
        if bool(torch.isfinite(value).all()):
            return
        nan = int(torch.isnan(value).sum())
        inf = int(torch.isinf(value).sum())
    found = " and ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if part)
    raise ValueError(
        f"{label} got a non-finite input in training mode: {found} of {value.numel()} values; the layer "
        "stopped before running, so its running statistics (if any) are unchanged, where this step would "
        "have made them non-finite for good. Find where the NaN/inf comes from: the data, or an earlier "
        "layer diverging (lower the learning rate, clip gradients, or run under "
        "torch.autograd.detect_anomaly())"
    )
