"""`bnlab.adapt`: adapt a trained BN model to unlabeled target data whose distribution has shifted.

`bnlab.adapt(model, batches, method=...)` returns an adapted copy and leaves `model` unchanged;
`bnlab.adapt.predict(model, batches, method=...)` returns the adapted predictions for those batches as
the method makes them (online for tent). Both torch's batch norms and bnlab's are adapted.

Methods (every one uses the target batches only, never their labels):

- "adabn" — Adaptive Batch Normalization (Li, Wang, Shi, Liu & Hou, "Revisiting Batch Normalization
  for Practical Domain Adaptation", 2016): every BN's running statistics are replaced by the exact mean
  and unbiased variance of its input over all the target batches (`bnlab.nn.recompute_stats`); the
  weights are untouched. Assumes the target set is large enough for exact statistics and that all of
  it shares one shift; the batch size does not matter, since statistics are pooled over all batches.
- "batch-stats" — prediction-time BN (Nado et al., "Evaluating Prediction-Time Batch Normalization for
  Robustness under Covariate Shift", 2020): each test batch is normalized by its own statistics.
  Assumes batches large enough for stable statistics (the batch-size study: under about 8 they
  collapse) and class-balanced: a batch of one class has its class signal normalized away.
- "tent" — Test entropy minimization (Wang, Shelhamer, Liu, Olshausen & Darrell, "Tent: Fully
  Test-Time Adaptation by Entropy Minimization", ICLR 2021): BN normalizes by each batch's statistics,
  and only the BN scales and shifts γ, β are trained, online, to minimize the mean prediction entropy
  H(p) = -Σ_c p_c log p_c of every target batch, with SGD (momentum 0.9) for `steps` steps per batch
  at learning rate `lr`; with `reset` γ, β and the optimizer return to the source model's before each
  batch (Tent's episodic mode). Shares batch-stats' assumptions (batch size, class balance), and
  entropy minimization can collapse onto few classes at high learning rates or over long streams.
  The default learning rate scales with the target batch: `TENT_LR_PER_128` × B / 128 = 0.1 × B / 128
  (the linear scaling rule, as in Tent's successors EATA and SAR), because a sweep on BN-LeNet (a
  `bnlab train` run, 10,000 corrupted training images, not the test set) found the best fixed rate
  moving with B: 0.1 at B = 128 (noise, blur, contrast), about 0.03 at B = 32 and 0.01 or less at
  B = 8, where 0.1 collapses (contrast: 0.453 against 0.729 with batch statistics), while the earlier
  default 1e-3 barely moves γ, β (at B = 128 within 0.003 of batch statistics on every condition);
  pass `lr` for a fixed rate.

Example:
    >>> import torch, bnlab.adapt
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).eval()
    >>> target = [torch.randn(32, 4) * 3 + 2 for _ in range(4)]
    >>> adapted = bnlab.adapt(net, target, method="adabn")
    >>> bool(torch.allclose(adapted[1].running_mean, net[0](torch.cat(target)).mean(0).detach(), atol=1e-5))
    True
    >>> bool(torch.equal(net[1].running_mean, torch.zeros(8)))  # the original is unchanged
    True
"""

from __future__ import annotations

import copy
import sys
import types
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from bnlab.nn import recompute_stats
from bnlab.nn.inference import _is_batch_norm

METHODS = ("adabn", "tent", "batch-stats")
TENT_LR_PER_128 = 0.1  # tent's default learning rate for a target batch of 128; B / 128 times that for B


def _inputs(batches) -> list[Tensor]:
    listed = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not listed:
        raise ValueError("batches yielded nothing; pass the unlabeled target batches to adapt to")
    return listed


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if _is_batch_norm(m)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no batch-norm layer with running statistics, so there are no "
                         "statistics to adapt; adapt works on torch's and bnlab's BatchNorm1d/2d/3d")
    return layers


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BN of `model` (in place) normalize by each batch's own statistics, in eval mode too, and
    drop its running statistics (as Tent's `configure_model` does); every other module in eval mode."""
    model.eval()
    for bn in _batch_norms(model):
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
    return model


def _entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of H(softmax(logits)) = -Σ_c p_c log p_c."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def tent_lr(batch_size: int) -> float:
    """Tent's default learning rate for target batches of `batch_size`: `TENT_LR_PER_128` × batch_size / 128."""
    return TENT_LR_PER_128 * batch_size / 128


def _tent(model: nn.Module, inputs: list[Tensor], steps: int, lr: Optional[float],
          reset: bool) -> tuple[nn.Module, Tensor]:
    """(the adapted copy, the online predictions: each batch's logits before its own update steps)."""
    net = copy.deepcopy(model)
    affine = [p for bn in _batch_norms(net) for p in (bn.weight, bn.bias) if p is not None]
    use_batch_statistics(net)
    if not affine:
        raise ValueError("tent trains the BN scales and shifts, but the model's batch norms have affine=False; "
                         "use method='batch-stats' or 'adabn'")
    for p in net.parameters():
        p.requires_grad_(False)
    for p in affine:
        p.requires_grad_(True)
    source = [p.detach().clone() for p in affine]

    def rate(x: Tensor) -> float:  # a fixed lr, or the default scaled to this batch's size
        return lr if lr is not None else tent_lr(len(x))

    optimizer = torch.optim.SGD(affine, lr=rate(inputs[0]), momentum=0.9)
    outputs = []
    for x in inputs:
        if reset:
            with torch.no_grad():
                for p, original in zip(affine, source):
                    p.copy_(original)
            optimizer = torch.optim.SGD(affine, lr=rate(x), momentum=0.9)
        for group in optimizer.param_groups:
            group["lr"] = rate(x)
        for step in range(steps):
            logits = net(x)
            if step == 0:
                outputs.append(logits.detach())
            optimizer.zero_grad()
            _entropy(logits).backward()
            optimizer.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, torch.cat(outputs)


def _check(method: str, steps: int, lr: Optional[float]) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; valid: {', '.join(METHODS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (gradient steps per target batch), got {steps!r}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")


def adapt(model: nn.Module, batches: Iterable, method: str = "adabn", *, steps: int = 1,
          lr: Optional[float] = None, reset: bool = False) -> nn.Module:
    """An eval-mode copy of `model` adapted to the unlabeled target `batches`; `model` is left unchanged.

    Args:
        model: a trained model with batch norms (torch's or bnlab's).
        batches: an iterable of target inputs, or of (input, ...) tuples whose labels are ignored.
        method: "adabn" (exact target statistics), "tent" (entropy minimization over γ, β) or
            "batch-stats" (each batch normalized by its own statistics); see the module docstring for
            the citations and assumptions.
        steps, lr, reset: tent's gradient steps per batch (default 1), SGD learning rate (momentum 0.9;
            default None: `tent_lr(B)` = 0.1 × B / 128 for a batch of B, see the module docstring) and
            episodic reset before each batch (default False); ignored by the others.

    Returns:
        The adapted copy, in eval mode. With "tent" and "batch-stats" it normalizes every batch it is
        given by that batch's statistics.
    """
    _check(method, steps, lr)
    inputs = _inputs(batches)
    _batch_norms(model)
    if method == "adabn":
        return recompute_stats(copy.deepcopy(model), inputs).eval()
    if method == "batch-stats":
        return use_batch_statistics(copy.deepcopy(model))
    return _tent(model, inputs, steps, lr, reset)[0]


def predict(model: nn.Module, batches: Iterable, method: str = "adabn", *, steps: int = 1,
            lr: Optional[float] = None, reset: bool = False) -> Tensor:
    """The adapted model's outputs on `batches`, concatenated: after adapting to all of them (adabn), with
    each batch's own statistics (batch-stats), or online (tent: each batch predicted by the model
    adapted on the batches before it, before its own steps, as Tent reports). `model` is unchanged.

    Example:
        >>> import torch, bnlab.adapt
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).eval()
        >>> bnlab.adapt.predict(net, [torch.randn(16, 4)] * 2, method="tent").shape
        torch.Size([32, 3])
    """
    _check(method, steps, lr)
    inputs = _inputs(batches)
    _batch_norms(model)
    if method == "tent":
        return _tent(model, inputs, steps, lr, reset)[1]
    adapted = adapt(model, inputs, method)
    with torch.no_grad():
        return torch.cat([adapted(x) for x in inputs])


class _CallableModule(types.ModuleType):
    """`bnlab.adapt(model, batches, method=...)` calls `adapt`, while `bnlab.adapt.predict` etc. stay reachable."""

    def __call__(self, *args, **kwargs) -> nn.Module:
        return adapt(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["METHODS", "TENT_LR_PER_128", "adapt", "predict", "tent_lr", "use_batch_statistics"]
