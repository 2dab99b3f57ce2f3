"""The LeNet family of the D2L chapter, built from one configurable definition, and a registry of names.

    lenet            the chapter's plain LeNet: sigmoid, average pooling, padded first convolution
    bn-lenet         batch norm from bnlab after every convolution and linear layer, before the sigmoid
                     (the chapter's from-scratch BN LeNet; first convolution unpadded, as there)
    bn-lenet-torch   the same with torch's built-in BatchNorm (the chapter's concise version)
    bn-lenet-chapter the same with the chapter's own naive layer (autograd through elementwise ops),
                     kept to measure against

Every name takes the same options: pooling ``avg`` (the current edition, default) or ``max`` (the
older edition), and the knobs the studies turn (which layers get a norm, the bias before it, dropout,
fixed affine parameters). Conv and linear weights get Xavier-uniform initialization, as in the chapter.

Example:
    >>> import torch
    >>> from bnlab.models import build_model
    >>> net = build_model("bn-lenet")
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from torch import nn

from bnlab import nn as bnlab_nn
from bnlab.baselines import NaiveBatchNorm

NormFactory = Callable[[int, int], nn.Module]  # (num_features, input rank) -> layer


def _by_rank(for_linear: Callable[[int], nn.Module], for_conv: Callable[[int], nn.Module]) -> NormFactory:
    return lambda c, dims: for_conv(c) if dims == 4 else for_linear(c)


def _largest_divisor(c: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if c % d == 0)


class As4d(nn.Module):
    """Runs a layer made for (N, C, H, W) on (N, C) features, as (N, C, 1, 1)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x[:, :, None, None]).flatten(1)


def _whitening(layer_class) -> NormFactory:
    # Groups of at most 16 channels, the decorrelated-BN paper's usual size: 6 -> 6, 16 -> 16, 120 -> 15, 84 -> 14.
    def make(c: int, dims: int) -> nn.Module:
        layer = layer_class(c, group_size=_largest_divisor(c, 16))
        return layer if dims == 4 else As4d(layer)

    return make


# Norm layers by name, for LeNetConfig.norm. Layer norm on a convolution normalizes each sample over
# (C, H, W), i.e. GroupNorm with one group; instance norm of a feature vector would normalize single
# values, so the fully connected layers of "instancenorm" get layer norm.
NORM_LAYERS: dict[str, NormFactory] = {
    "batchnorm": lambda c, dims: bnlab_nn.BatchNorm(c, num_dims=dims),
    "batchnorm-torch": _by_rank(nn.BatchNorm1d, nn.BatchNorm2d),
    "batchnorm-chapter": lambda c, dims: NaiveBatchNorm(c, dims),
    "mean-only": _by_rank(bnlab_nn.MeanOnlyBatchNorm1d, bnlab_nn.MeanOnlyBatchNorm2d),
    "variance-only": _by_rank(bnlab_nn.VarianceOnlyBatchNorm1d, bnlab_nn.VarianceOnlyBatchNorm2d),
    "batchrenorm": _by_rank(bnlab_nn.BatchRenorm1d, bnlab_nn.BatchRenorm2d),
    "ghost": _by_rank(lambda c: bnlab_nn.GhostBatchNorm1d(c, ghost_batch_size=32),
                      lambda c: bnlab_nn.GhostBatchNorm2d(c, ghost_batch_size=32)),
    "layernorm": _by_rank(bnlab_nn.LayerNorm, lambda c: bnlab_nn.GroupNorm(1, c)),
    "groupnorm": lambda c, dims: bnlab_nn.GroupNorm(_largest_divisor(c, 4), c),
    "instancenorm": _by_rank(bnlab_nn.LayerNorm, lambda c: bnlab_nn.InstanceNorm2d(c, affine=True)),
    "decorrelated": _whitening(bnlab_nn.DecorrelatedBatchNorm2d),
    "iternorm": _whitening(bnlab_nn.IterNorm2d),
    "pit": _by_rank(bnlab_nn.PITNorm1d, bnlab_nn.PITNorm2d),
}

# Where a LeNet may carry a norm layer, in order: after conv1, conv2, fc1, fc2.
NORM_SITES = ("conv1", "conv2", "fc1", "fc2")
PLACEMENTS = {
    "all": NORM_SITES,
    "conv": ("conv1", "conv2"),
    "linear": ("fc1", "fc2"),
    "first": ("conv1",),
}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


@dataclass(frozen=True)
class LeNetConfig:
    """Everything that distinguishes one LeNet of the family from another.

    norm: a key of NORM_LAYERS, or None for no normalization.
    placement: a key of PLACEMENTS, or a tuple of NORM_SITES, where the norm layers go.
    pool: "avg" or "max".
    padding: of the first convolution (the plain LeNet pads 2; the chapter's BN-LeNet does not).
    bias_before_norm: keep the bias of a conv/linear layer that a norm follows (it is redundant: the
        norm subtracts the mean, and its own shift takes the bias's role).
    dropout: probability of dropout after each hidden sigmoid of the fully connected part, 0 for none.
    learn_affine: learn the norm's scale and shift; False fixes them at 1 and 0.
    """

    norm: Optional[str] = None
    placement: object = "all"
    pool: str = "avg"
    padding: int = 2
    bias_before_norm: bool = True
    dropout: float = 0.0
    learn_affine: bool = True
    num_classes: int = 10

    def sites(self) -> tuple[str, ...]:
        if self.norm is None:
            return ()
        if isinstance(self.placement, str):
            return _lookup(PLACEMENTS, "placement", self.placement)
        unknown = set(self.placement) - set(NORM_SITES)
        if unknown:
            raise ValueError(f"unknown norm sites {sorted(unknown)}; valid: {', '.join(NORM_SITES)}")
        return tuple(self.placement)


def lenet(config: LeNetConfig = LeNetConfig()) -> nn.Sequential:
    """Build a LeNet for 1x28x28 input from `config`; see LeNetConfig."""
    pool = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}.get(config.pool)
    if pool is None:
        raise ValueError(f"pool must be 'avg' or 'max', got {config.pool!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    sites = config.sites()
    make_norm = _lookup(NORM_LAYERS, "norm", config.norm) if config.norm else None
    side = (28 + 2 * config.padding - 4) // 2  # after conv1 (5x5) and the first 2x2 pooling
    side = (side - 4) // 2  # after conv2 and the second pooling
    layers: list[nn.Module] = []

    def block(site: str, affine_layer: nn.Module, channels: int, dims: int) -> None:
        normed = site in sites
        if normed and not config.bias_before_norm:
            affine_layer.bias = None
        layers.append(affine_layer)
        if normed:
            layers.append(make_norm(channels, dims))
        layers.append(nn.Sigmoid())

    block("conv1", nn.Conv2d(1, 6, kernel_size=5, padding=config.padding), 6, 4)
    layers.append(pool(kernel_size=2, stride=2))
    block("conv2", nn.Conv2d(6, 16, kernel_size=5), 16, 4)
    layers += [pool(kernel_size=2, stride=2), nn.Flatten()]
    block("fc1", nn.Linear(16 * side * side, 120), 120, 2)
    if config.dropout:
        layers.append(nn.Dropout(config.dropout))
    block("fc2", nn.Linear(120, 84), 84, 2)
    if config.dropout:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(84, config.num_classes))
    net = nn.Sequential(*layers)
    init_weights(net)
    if not config.learn_affine:
        fix_affine(net)
    return net


def init_weights(net: nn.Module) -> None:
    """Xavier-uniform weights for every conv and linear layer, as the chapter initializes its CNNs."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)


def norm_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every normalization layer in `net`, in order."""
    kinds = (bnlab_nn.BatchNormBase, nn.modules.batchnorm._NormBase, NaiveBatchNorm, bnlab_nn.LayerNorm,
             bnlab_nn.GroupNorm, bnlab_nn.FrozenBatchNorm)
    return [(name, m) for name, m in net.named_modules() if isinstance(m, kinds)]


def fix_affine(net: nn.Module) -> None:
    """Freeze every norm layer's scale at 1 and shift at 0 (the chapter's fifth exercise)."""
    for _, layer in norm_layers(net):
        for p in layer.parameters(recurse=False):
            p.requires_grad_(False)


# ---- registry ---------------------------------------------------------------------------------------

_CHAPTER_BN = LeNetConfig(norm="batchnorm", padding=0)
MODELS: dict[str, LeNetConfig] = {
    "lenet": LeNetConfig(),
    "bn-lenet": _CHAPTER_BN,
    "bn-lenet-torch": replace(_CHAPTER_BN, norm="batchnorm-torch"),
    "bn-lenet-chapter": replace(_CHAPTER_BN, norm="batchnorm-chapter"),
}


def model_config(name: str, **overrides) -> LeNetConfig:
    """The registered configuration `name` with `overrides` (LeNetConfig fields) applied."""
    config = _lookup(MODELS, "model", name)
    unknown = set(overrides) - set(LeNetConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}; valid: {', '.join(LeNetConfig.__dataclass_fields__)}")
    return replace(config, **overrides)


def build_model(name: str, **overrides) -> nn.Sequential:
    """Build the registered model `name`; keyword arguments override LeNetConfig fields (e.g. pool="max")."""
    return lenet(model_config(name, **overrides))
