"""Whitening, the chapter's "full-rank covariance estimate": decorrelated batch norm (ZCA, Huang et
al., 2018) and iterative normalization (Newton-Schulz, Huang et al., 2019), per group of channels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab.functional.core import check_arguments, compute_dtype, empty_batch, grouped, per_channel_affine, ungrouped, update_running

__all__ = [
    "zca_whitening_matrix", "newton_schulz_whitening_matrix", "decorrelated_batch_norm",
    "iterative_normalization",
]


def zca_whitening_matrix(covariance: Tensor) -> Tensor:
    r"""ZCA whitening matrix :math:`\Sigma^{-1/2} = D \Lambda^{-1/2} D^T` of a batch of symmetric
    positive definite (..., m, m) matrices, by eigendecomposition (``torch.linalg.eigh``).

    Example:
        >>> import torch
        >>> w = zca_whitening_matrix(torch.tensor([[4.0, 0.0], [0.0, 9.0]]))
        >>> w.diagonal().tolist()
        [0.5, 0.3333333432674408]
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return (eigenvectors * eigenvalues.rsqrt().unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)


def newton_schulz_whitening_matrix(covariance: Tensor, iterations: int = 5) -> Tensor:
    r"""Approximate :math:`\Sigma^{-1/2}` by Newton–Schulz iterations (Huang et al., 2019, Algorithm 1).

    .. math::
        \Sigma_N = \Sigma / \mathrm{tr}(\Sigma), \quad P_0 = I, \quad
        P_k = \tfrac{1}{2} (3 P_{k-1} - P_{k-1}^3 \Sigma_N), \quad
        \Sigma^{-1/2} \approx P_T / \sqrt{\mathrm{tr}(\Sigma)}

    The trace normalization puts the eigenvalues of :math:`\Sigma_N` in (0, 1], where the iteration
    converges; stopping after T steps whitens only partly along small-eigenvalue directions (the
    paper's point: a controlled, cheap, differentiable whitening made of matrix products alone).

    Computed in the coupled form :math:`Y_0 = \Sigma_N, Z_0 = I, T_k = \tfrac12 (3I - Z_{k-1} Y_{k-1}),
    Y_k = Y_{k-1} T_k, Z_k = T_k Z_{k-1}`: every term is a polynomial in :math:`\Sigma_N`, so
    :math:`Y_k = \Sigma_N Z_k` and :math:`Z_k = P_k` exactly, at the same three matrix products per
    step. The paper's single-sequence form amplifies rounding errors once the covariance is
    ill-conditioned (for T around 10 or more it diverges; Higham, *Functions of Matrices*, 2008, §6.7);
    the coupled form keeps converging, to ZCA whitening as T grows.

    Example:
        >>> import torch
        >>> cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> w = newton_schulz_whitening_matrix(cov, iterations=30)
        >>> bool(torch.allclose(w @ cov @ w, torch.eye(2, dtype=torch.float64)))
        True
    """
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    trace = covariance.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
    y, z = covariance / trace, eye.expand_as(covariance)
    for _ in range(iterations):
        step = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ step, step @ z
    return z * trace.rsqrt()


def _whiten(input, running_mean, running_whitening, weight, bias, training, momentum, eps, group_size,
            whitening_matrix, name):
    check_arguments(input, running_mean, None, weight, bias)
    channels = input.shape[1]
    if not isinstance(group_size, int) or group_size < 1 or channels % group_size:
        raise ValueError(
            f"{name} whitens groups of group_size channels, so group_size must divide the {channels} "
            f"channels; got group_size={group_size!r}"
        )
    groups = channels // group_size
    if running_whitening is not None and tuple(running_whitening.shape) != (groups, group_size, group_size):
        raise ValueError(
            f"running_whitening must have shape {(groups, group_size, group_size)} (groups, group_size, "
            f"group_size), got {tuple(running_whitening.shape)}"
        )
    if input.numel() == 0:
        return empty_batch(input, weight, bias)
    x = input.to(compute_dtype(input.dtype))
    xg = grouped(x, group_size)
    if training:
        if xg.shape[-1] < 2:
            raise ValueError(
                f"{name} needs more than 1 value per channel when training, got input size "
                f"{tuple(input.shape)}; use a larger batch or call .eval()"
            )
        mean = xg.mean(-1, keepdim=True)
        centered = xg - mean
        eye = torch.eye(group_size, dtype=x.dtype, device=x.device)
        covariance = centered @ centered.transpose(-1, -2) / xg.shape[-1] + eps * eye
        wm = whitening_matrix(covariance)
        update_running(running_mean, mean.reshape(-1), momentum)
        update_running(running_whitening, wm, momentum)
    else:
        if running_mean is None or running_whitening is None:
            raise ValueError(f"{name} needs running_mean and running_whitening when training=False")
        centered = xg - running_mean.to(x.dtype).reshape(groups, group_size, 1)
        wm = running_whitening.to(x.dtype)
    y = ungrouped(wm @ centered, x)
    return per_channel_affine(y, weight, bias).to(input.dtype)


def decorrelated_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_whitening: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group_size: int = 16,
) -> Tensor:
    r"""Decorrelated batch normalization (Huang et al., 2018): ZCA whitening per group of channels.

    Per group of `group_size` channels, X (group_size x n, n = N * positions):

    .. math::
        \mu = \tfrac{1}{n} X 1, \quad \Sigma = \tfrac{1}{n} (X - \mu)(X - \mu)^T + \epsilon I
        = D \Lambda D^T, \quad \hat X = D \Lambda^{-1/2} D^T (X - \mu), \quad y = \gamma \hat x + \beta

    In training the running mean and the running whitening matrix take a momentum step towards the
    batch's (torch's convention); evaluation uses them. The gradient is autograd's through
    ``torch.linalg.eigh``, which needs distinct eigenvalues (true for real data almost surely).

    Example:
        >>> import torch
        >>> mixing = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0],
        ...                        [0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
        >>> x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0)) @ mixing
        >>> y = decorrelated_batch_norm(x, None, None, training=True, group_size=4)
        >>> bool(torch.allclose(y.T.cov(correction=0), torch.eye(4), atol=1e-3))
        True
    """
    return _whiten(input, running_mean, running_whitening, weight, bias, training, momentum, eps, group_size,
                   zca_whitening_matrix, "decorrelated_batch_norm")


def iterative_normalization(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_whitening: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group_size: int = 64,
    iterations: int = 5,
) -> Tensor:
    r"""Iterative normalization (Huang et al., 2019): Newton–Schulz whitening per group of channels.

    As `decorrelated_batch_norm`, with :math:`\Sigma^{-1/2}` replaced by
    `newton_schulz_whitening_matrix` after `iterations` steps (T in the paper, default 5). Autograd
    differentiates the matrix products.

    Example:
        >>> import torch
        >>> x = torch.randn(64, 4) @ torch.randn(4, 4)
        >>> y = iterative_normalization(x, None, None, training=True, group_size=4, iterations=5)
        >>> y.shape
        torch.Size([64, 4])
    """
    return _whiten(input, running_mean, running_whitening, weight, bias, training, momentum, eps, group_size,
                   lambda cov: newton_schulz_whitening_matrix(cov, iterations), "iterative_normalization")
