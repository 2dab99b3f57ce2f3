"""Batch renormalization (Ioffe, 2017): batch norm whose batch statistics are corrected towards the
running ones by r and d, clipped to ramped bounds.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab.functional.batch_norm import batch_norm
from bnlab.functional.core import check_batch_size, check_arguments, compute_dtype, in_graph, reduce_dims

__all__ = ["batch_renorm", "renorm_corrections"]


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 1.0,
    d_max: float = 0.0,
) -> Tensor:
    r"""Batch renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

    In training, with the batch's :math:`\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and the running
    :math:`\mu, \sigma = \sqrt{\mathrm{running\_var} + \epsilon}` (before this batch's update),

    .. math::
        r = \mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max}), \quad
        d = \mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max}), \quad
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta

    r and d are constants for the backward (stop-gradient). Since :math:`\gamma (\hat x r + d) + \beta`
    is batch norm with scale :math:`\gamma r` and shift :math:`\beta + \gamma d`, that is how it is
    computed: one `batch_norm` call, its hand-derived backward giving exactly the paper's gradients.
    With r_max = 1 and d_max = 0 it is batch norm. The running statistics then move as batch norm's. In
    evaluation it is batch norm with the running statistics.

    Example:
        >>> import torch
        >>> x = torch.randn(32, 3) * 2 + 1
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_renorm(x, mean.clone(), var.clone(), training=True, r_max=1.0, d_max=0.0)
        >>> bool(torch.allclose(y, batch_norm(x, mean, var, training=True)))
        True
    """
    check_arguments(input, running_mean, running_var, weight, bias)
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_renorm needs running_mean and running_var: r and d correct the batch statistics towards "
            "them (use batch_norm for batch statistics alone)"
        )
    if not isinstance(r_max, Tensor) and (r_max < 1 or d_max < 0):  # a layer's ramped bounds are valid
        raise ValueError(f"batch_renorm needs r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
    if not training or input.numel() == 0:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_batch_size(input)
    with torch.no_grad():
        x = input.to(compute_dtype(input.dtype))
        batch_var, batch_mean = torch.var_mean(x, dim=reduce_dims(x), correction=0)
        if in_graph(input):
            r, d = renorm_corrections(batch_mean, batch_var, running_mean.to(x.dtype), running_var.to(x.dtype),
                                      torch.as_tensor(r_max, dtype=x.dtype), torch.as_tensor(d_max, dtype=x.dtype), eps)
        else:
            r, d = _renorm_corrections(batch_mean, batch_var, running_mean.to(x.dtype), running_var.to(x.dtype),
                                       r_max, d_max, eps)
    param_dtype = weight.dtype if weight is not None else input.dtype
    r, d = r.to(param_dtype), d.to(param_dtype)
    scale = r if weight is None else weight * r
    shift = d if weight is None else weight * d
    shift = shift if bias is None else bias + shift
    return batch_norm(input, running_mean, running_var, scale, shift, True, momentum, eps)


def _renorm_corrections(batch_mean, batch_var, running_mean, running_var, r_max, d_max, eps):
    """Batch renorm's r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max, d_max)."""
    sigma = torch.sqrt(running_var + eps)
    r = (torch.sqrt(batch_var + eps) / sigma).clamp(1.0 / r_max, r_max)
    d = ((batch_mean - running_mean) / sigma).clamp(-d_max, d_max)
    return r, d


@torch.library.custom_op("bnlab::renorm_corrections", mutates_args=())
def renorm_corrections(batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor,
                       r_max: Tensor, d_max: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`_renorm_corrections` as one operator, for graphs. The corrections read the running statistics
    that the same training step then updates; as separate ops AOTAutograd's partitioner (torch 2.13)
    may recompute them in the backward from the already updated buffers, and the weight gradient comes
    out wrong. An operator's outputs are saved, never recomputed."""
    return _renorm_corrections(batch_mean, batch_var, running_mean, running_var, r_max, d_max, eps)


@renorm_corrections.register_fake
def _(batch_mean, batch_var, running_mean, running_var, r_max, d_max, eps):
    return torch.empty_like(batch_mean), torch.empty_like(batch_mean)
