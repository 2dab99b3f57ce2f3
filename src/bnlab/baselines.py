"""The D2L chapter's from-scratch batch norm, as the chapter writes it: the baseline bnlab is measured against.

The algorithm is the chapter's (our own code): statistics by elementwise tensor ops, gradients by
autograd through every one of them, mode chosen by ``torch.is_grad_enabled()``, and the chapter's
momentum convention (``moving = momentum * moving + (1 - momentum) * batch`` with momentum 0.9). Only
(N, C) and (N, C, H, W) inputs, as in the chapter. It exists to be benchmarked, not used: see
`bnlab.nn` for the real layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def naive_batch_norm(x: Tensor, gamma: Tensor, beta: Tensor, moving_mean: Tensor, moving_var: Tensor,
                     eps: float = 1e-5, momentum: float = 0.9) -> tuple[Tensor, Tensor, Tensor]:
    """Return (y, new moving mean, new moving var); gamma/beta/moving stats shaped (1, C[, 1, 1])."""
    if not torch.is_grad_enabled():
        x_hat = (x - moving_mean) / torch.sqrt(moving_var + eps)
        return gamma * x_hat + beta, moving_mean, moving_var
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
    moving_var = momentum * moving_var + (1.0 - momentum) * var
    return gamma * x_hat + beta, moving_mean.detach(), moving_var.detach()


class NaiveBatchNorm(nn.Module):
    """The chapter's layer: parameters shaped (1, C) or (1, C, 1, 1), moving statistics as attributes."""

    def __init__(self, num_features: int, num_dims: int):
        super().__init__()
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.moving_mean.device != x.device:
            self.moving_mean = self.moving_mean.to(x.device)
            self.moving_var = self.moving_var.to(x.device)
        y, self.moving_mean, self.moving_var = naive_batch_norm(
            x, self.gamma, self.beta, self.moving_mean, self.moving_var
        )
        return y
