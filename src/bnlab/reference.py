"""A plain NumPy float64 batch normalization, forward and backward, derived by hand: the tests' oracle.

Written for clarity, not speed, and independently of `bnlab.functional`: no torch, no shared code.
Arrays are (N, C, ...); statistics are per channel over every other axis.

Forward (training), with n = number of values per channel:
    mean = sum(x) / n,  var = sum((x - mean)^2) / n,  x_hat = (x - mean) / sqrt(var + eps)
    y = gamma * x_hat + beta
    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * n / (n - 1)

Backward (training). y depends on x directly and through mean and var:
    dx_hat = dy * gamma
    dvar   = sum(dx_hat * (x - mean)) * -1/2 * (var + eps)^(-3/2)
    dmean  = -sum(dx_hat) / sqrt(var + eps) + dvar * sum(-2 (x - mean)) / n      (the second sum is 0)
    dx     = dx_hat / sqrt(var + eps) + dvar * 2 (x - mean) / n + dmean / n
    dgamma = sum(dy * x_hat),  dbeta = sum(dy)
In evaluation mean and var are constants (the running statistics), so dx = dx_hat / sqrt(var + eps).

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(16, 4, 5, 5))
    >>> out = forward(x, np.ones(4), np.zeros(4), training=True)
    >>> bool(np.allclose(out.y.mean(axis=(0, 2, 3)), 0.0))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def _channel(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


@dataclass
class Forward:
    """Output of `forward`: y, the statistics used, and the updated running statistics."""

    y: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    running_mean: Optional[np.ndarray]
    running_var: Optional[np.ndarray]


def forward(
    x,
    gamma=None,
    beta=None,
    running_mean=None,
    running_var=None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Forward:
    """Batch normalization forward in float64; returns new running statistics instead of mutating."""
    x = np.asarray(x, dtype=np.float64)
    channels = x.shape[1]
    gamma = np.ones(channels) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(channels) if beta is None else np.asarray(beta, dtype=np.float64)
    if training:
        n = x.size // channels
        mean = x.mean(axis=_axes(x))
        var = ((x - _channel(mean, x)) ** 2).mean(axis=_axes(x))
        if running_mean is not None:
            running_mean = (1 - momentum) * np.asarray(running_mean, dtype=np.float64) + momentum * mean
        if running_var is not None:
            running_var = (1 - momentum) * np.asarray(running_var, dtype=np.float64) + momentum * var * n / (n - 1)
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    x_hat = (x - _channel(mean, x)) / np.sqrt(_channel(var, x) + eps)
    y = _channel(gamma, x) * x_hat + _channel(beta, x)
    return Forward(y, mean, var, running_mean, running_var)


def backward(dy, x, gamma=None, mean=None, var=None, training: bool = True, eps: float = 1e-5):
    """Gradients (dx, dgamma, dbeta) of batch normalization, by the chain rule written out above.

    `mean` and `var` are the statistics the forward used: the batch's in training (computed here when
    not given), the running ones in evaluation.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    channels = x.shape[1]
    n = x.size // channels
    axes = _axes(x)
    gamma = np.ones(channels) if gamma is None else np.asarray(gamma, dtype=np.float64)
    if mean is None or var is None:
        mean = x.mean(axis=axes)
        var = ((x - _channel(mean, x)) ** 2).mean(axis=axes)
    xmu = x - _channel(mean, x)
    std = np.sqrt(_channel(var, x) + eps)
    x_hat = xmu / std
    dx_hat = dy * _channel(gamma, x)
    if training:
        dvar = (dx_hat * xmu).sum(axis=axes, keepdims=True) * -0.5 * std**-3
        dmean = -dx_hat.sum(axis=axes, keepdims=True) / std + dvar * (-2.0 * xmu).sum(axis=axes, keepdims=True) / n
        dx = dx_hat / std + dvar * 2.0 * xmu / n + dmean / n
    else:
        dx = dx_hat / std
    dgamma = (dy * x_hat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return dx, dgamma, dbeta
