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
    mean, var, running_mean, running_var = _moments_and_running(x, running_mean, running_var, training, momentum)
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


# =====================================================================================================
# Oracles of the normalization family, each the paper's formula written out plainly in float64.
# =====================================================================================================

from statistics import NormalDist  # noqa: E402  (the standard normal inverse CDF, without SciPy)

_STANDARD_NORMAL = NormalDist()


def _batch_moments(x):
    mean = x.mean(axis=_axes(x))
    var = ((x - _channel(mean, x)) ** 2).mean(axis=_axes(x))
    return mean, var


def _ema(running, batch, momentum):
    return (1 - momentum) * np.asarray(running, dtype=np.float64) + momentum * batch


def _updated_running(running_mean, running_var, mean, var, x, momentum):
    """The running statistics after a training step on x: a momentum step towards the batch mean and the
    unbiased batch variance, var * n / (n - 1) (torch's convention). A missing one stays None."""
    n = x.size // x.shape[1]
    if running_mean is not None:
        running_mean = _ema(running_mean, mean, momentum)
    if running_var is not None:
        running_var = _ema(running_var, var * n / (n - 1), momentum)
    return running_mean, running_var


def _moments_and_running(x, running_mean, running_var, training, momentum):
    """(mean, var, running_mean, running_var) of a forward: the batch's (biased) moments and the running
    statistics after the step (training), or the running statistics, which then stay (evaluation)."""
    if training:
        mean, var = _batch_moments(x)
        return (mean, var, *_updated_running(running_mean, running_var, mean, var, x, momentum))
    mean, var = (np.asarray(r, dtype=np.float64) for r in (running_mean, running_var))
    return mean, var, running_mean, running_var


def mean_only_forward(x, gamma, beta, running_mean=None, running_var=None, training=True, momentum=0.1):
    """Mean-only BN: y = (x - mean) * gamma + beta. Returns (y, running_mean, running_var), the running
    statistics updated as batch norm's (training) or unchanged."""
    x = np.asarray(x, dtype=np.float64)
    mean, _, running_mean, running_var = _moments_and_running(x, running_mean, running_var, training, momentum)
    return _channel(gamma, x) * (x - _channel(mean, x)) + _channel(beta, x), running_mean, running_var


def mean_only_backward(dy, x, gamma, training=True, mean=None):
    """(dx, dgamma, dbeta) of mean-only BN by the chain rule: d mean / d x_i = 1/n."""
    x, dy = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    axes, n = _axes(x), x.size // x.shape[1]
    if training:
        mean = x.mean(axis=axes)
    dmean = -(dy * _channel(gamma, x)).sum(axis=axes, keepdims=True)
    dx = dy * _channel(gamma, x) + (dmean / n if training else 0.0)
    return dx, (dy * (x - _channel(mean, x))).sum(axis=axes), dy.sum(axis=axes)


def variance_only_forward(x, gamma, beta, running_mean=None, running_var=None, training=True, momentum=0.1,
                          eps=1e-5):
    """Variance-only BN: y = x / sqrt(var + eps) * gamma + beta, var the centered batch variance."""
    x = np.asarray(x, dtype=np.float64)
    _, var, running_mean, running_var = _moments_and_running(x, running_mean, running_var, training, momentum)
    y = _channel(gamma, x) * x / np.sqrt(_channel(var, x) + eps) + _channel(beta, x)
    return y, running_mean, running_var


def variance_only_backward(dy, x, gamma, training=True, var=None, eps=1e-5):
    """(dx, dgamma, dbeta) of variance-only BN: y = gamma x s, s = (var + eps)^(-1/2),
    d var / d x_i = 2 (x_i - mean) / n, d s / d var = -s^3 / 2."""
    x, dy = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    axes, n = _axes(x), x.size // x.shape[1]
    if training:
        mean, var = _batch_moments(x)
    s = 1.0 / np.sqrt(_channel(var, x) + eps)
    dz = dy * _channel(gamma, x)
    dx = dz * s
    if training:
        ds = (dz * x).sum(axis=axes, keepdims=True)
        dvar = ds * -0.5 * s**3
        dx = dx + dvar * 2.0 * (x - _channel(mean, x)) / n
    return dx, (dy * x * s).sum(axis=axes), dy.sum(axis=axes)


def batch_renorm_forward(x, gamma, beta, running_mean, running_var, r_max, d_max, momentum=0.1, eps=1e-5):
    """Batch renormalization in training (Ioffe 2017, Algorithm 1, with sigma = sqrt(running_var + eps)).
    Returns (y, r, d, running_mean, running_var)."""
    x = np.asarray(x, dtype=np.float64)
    mean_b, var_b = _batch_moments(x)
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mean_b - running_mean) / sigma, -d_max, d_max)
    x_hat = (x - _channel(mean_b, x)) / _channel(sigma_b, x) * _channel(r, x) + _channel(d, x)
    y = _channel(gamma, x) * x_hat + _channel(beta, x)
    return (y, r, d, *_updated_running(running_mean, running_var, mean_b, var_b, x, momentum))


def ghost_batch_norm_forward(x, gamma, beta, running_mean, running_var, ghost_batch_size, momentum=0.1, eps=1e-5):
    """Ghost batch norm in training: each ghost batch (the last one taking the remainder) normalized by
    its own statistics; the running statistics by the closed form of one EMA step per ghost batch,
    (1 - m)^k run + sum_l m (1 - m)^(k - l) stat_l. Returns (y, running_mean, running_var)."""
    x = np.asarray(x, dtype=np.float64)
    k = max(1, x.shape[0] // ghost_batch_size)
    bounds = [l * ghost_batch_size for l in range(k)] + [x.shape[0]]
    y = np.empty_like(x)
    new_mean = (1 - momentum) ** k * np.asarray(running_mean, dtype=np.float64)
    new_var = (1 - momentum) ** k * np.asarray(running_var, dtype=np.float64)
    for l in range(k):
        ghost = x[bounds[l]:bounds[l + 1]]
        mean, var = _batch_moments(ghost)
        y[bounds[l]:bounds[l + 1]] = (
            _channel(gamma, ghost) * (ghost - _channel(mean, ghost)) / np.sqrt(_channel(var, ghost) + eps)
            + _channel(beta, ghost)
        )
        n = ghost.size // ghost.shape[1]
        weight = momentum * (1 - momentum) ** (k - 1 - l)
        new_mean = new_mean + weight * mean
        new_var = new_var + weight * var * n / (n - 1)
    return y, new_mean, new_var


def _group_columns(x, group_size):
    """(N, C, ...) -> list over groups of (group_size, n) matrices: channels as rows."""
    x = np.asarray(x, dtype=np.float64)
    columns = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return [columns[g:g + group_size] for g in range(0, x.shape[1], group_size)]


def _ungroup_columns(rows, shape):
    channels_first = np.concatenate(rows, axis=0).reshape((shape[1], shape[0]) + tuple(shape[2:]))
    return np.moveaxis(channels_first, 0, 1)


def whitening_forward(x, gamma, beta, group_size, method="zca", iterations=5, eps=1e-5, training=True,
                      running_mean=None, running_whitening=None, momentum=0.1):
    """Decorrelated BN (method="zca", Huang et al. 2018) or IterNorm (method="newton-schulz", Huang et al.
    2019) per group of channels. Returns (y, running_mean, running_whitening): the updated running
    statistics in training, the given ones in evaluation.

    ZCA: Sigma = Xc Xc^T / n + eps I = D diag(lam) D^T, W = D diag(lam^-1/2) D^T.
    Newton-Schulz: Sigma_N = Sigma / tr(Sigma), P_0 = I, P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2,
    W = P_T / sqrt(tr(Sigma)).
    """
    x = np.asarray(x, dtype=np.float64)
    groups = _group_columns(x, group_size)
    out, means, matrices = [], [], []
    for g, rows in enumerate(groups):
        if training:
            mean = rows.mean(axis=1, keepdims=True)
            centered = rows - mean
            sigma = centered @ centered.T / rows.shape[1] + eps * np.eye(group_size)
            if method == "zca":
                lam, d = np.linalg.eigh(sigma)
                w = d @ np.diag(lam**-0.5) @ d.T
            else:
                trace = np.trace(sigma)
                p = np.eye(group_size)
                for _ in range(iterations):
                    p = 0.5 * (3 * p - np.linalg.matrix_power(p, 3) @ (sigma / trace))
                w = p / np.sqrt(trace)
            means.append(mean[:, 0])
            matrices.append(w)
        else:
            mean = np.asarray(running_mean, dtype=np.float64)[g * group_size:(g + 1) * group_size, None]
            w = np.asarray(running_whitening, dtype=np.float64)[g]
            centered = rows - mean
        out.append(w @ centered)
    y = _channel(gamma, x) * _ungroup_columns(out, x.shape) + _channel(beta, x)
    if training and running_mean is not None:
        running_mean = _ema(running_mean, np.concatenate(means), momentum)
        running_whitening = _ema(running_whitening, np.stack(matrices), momentum)
    return y, running_mean, running_whitening


def pit_forward(x, gamma, beta):
    """Probability-integral-transform normalization in training: per channel,
    z_i = Phi^{-1}((R_i - 1/2) / n), R_i = #{x_j < x_i} + (#{x_j = x_i} + 1) / 2 (mid-ranks)."""
    x = np.asarray(x, dtype=np.float64)
    columns = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    z = np.empty_like(columns)
    n = columns.shape[1]
    for c, values in enumerate(columns):
        below = (values[None, :] < values[:, None]).sum(axis=1)
        equal = (values[None, :] == values[:, None]).sum(axis=1)
        ranks = below + (equal + 1) / 2
        z[c] = [_STANDARD_NORMAL.inv_cdf((r - 0.5) / n) for r in ranks]
    return _channel(gamma, x) * _ungroup_columns([z], x.shape) + _channel(beta, x)


def pit_batch_quantiles(x, num_quantiles):
    """Per channel, the batch's values at the plotting positions (j - 1/2) / K: the sorted values read at
    the 0-based position n (j - 1/2) / K - 1/2, linearly interpolated, clamped to the sample."""
    x = np.asarray(x, dtype=np.float64)
    columns = np.sort(np.moveaxis(x, 1, 0).reshape(x.shape[1], -1), axis=1)
    n = columns.shape[1]
    positions = np.clip(n * (np.arange(num_quantiles) + 0.5) / num_quantiles - 0.5, 0, n - 1)
    return np.stack([np.interp(positions, np.arange(n), row) for row in columns])


def pit_eval(x, gamma, beta, knots, running_var, eps=1e-5):
    """Evaluation of the PIT normalization: per channel, the piecewise-linear map through
    (knots[j], Phi^{-1}((j - 1/2) / K)); at a value equal to a run of tied knots, the midpoint of the
    run's first and last level; beyond the outer knots, lines with the outer segment's slope, but no
    steeper than 1 / sqrt(running_var + eps)."""
    x = np.asarray(x, dtype=np.float64)
    knots = np.asarray(knots, dtype=np.float64)
    k = knots.shape[1]
    levels = np.array([_STANDARD_NORMAL.inv_cdf((j + 0.5) / k) for j in range(k)])
    columns = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    z = np.empty_like(columns)
    for c, values in enumerate(columns):
        q, max_slope = knots[c], 1.0 / np.sqrt(running_var[c] + eps)
        for i, v in enumerate(values):
            tied = np.nonzero(q == v)[0]
            if v < q[0]:
                width = q[1] - q[0]
                slope = max_slope if width == 0 else min((levels[1] - levels[0]) / width, max_slope)
                z[c, i] = levels[0] + (v - q[0]) * slope
            elif v > q[-1]:
                width = q[-1] - q[-2]
                slope = max_slope if width == 0 else min((levels[-1] - levels[-2]) / width, max_slope)
                z[c, i] = levels[-1] + (v - q[-1]) * slope
            elif tied.size:
                z[c, i] = (levels[tied[0]] + levels[tied[-1]]) / 2
            else:
                j = np.nonzero(q < v)[0][-1]
                z[c, i] = levels[j] + (v - q[j]) / (q[j + 1] - q[j]) * (levels[j + 1] - levels[j])
    return _channel(gamma, x) * _ungroup_columns([z], x.shape) + _channel(beta, x)
