"""torch.autograd.gradcheck and gradgradcheck of bnlab.functional.batch_norm in float64.

Train and eval, with and without weight/bias (and weight only), 2D/3D/4D/5D input, contiguous and
channels-last, under both kernel backends. gradcheck holds the hand-derived backward (compiled kernels
or PyTorch formula) to finite differences; gradgradcheck does the same for the double backward.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from bnlab.functional import batch_norm
from cases import MEMORY_FORMATS, generator

SHAPES = [
    ((5, 3), "contiguous"),
    ((3, 2, 3), "contiguous"),
    ((2, 3, 2, 2), "contiguous"),
    ((2, 3, 2, 2), "channels_last"),
    ((2, 2, 2, 2, 2), "contiguous"),
    ((2, 2, 2, 2, 2), "channels_last"),
]
PARAMS = ("weight+bias", "weight", "none")

GRAD_CASES = [
    pytest.param(shape, layout, training, params,
                 id=f"{len(shape)}D-{layout}-{'train' if training else 'eval'}-{params}")
    for (shape, layout), training, params in itertools.product(SHAPES, (True, False), PARAMS)
]


def _inputs(shape, layout, params, seed):
    gen = generator(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=MEMORY_FORMATS[len(shape)])
    x.requires_grad_()
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_() if params != "none" else None
    bias = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_() if params == "weight+bias" else None
    running_mean = torch.randn(c, generator=gen, dtype=torch.float64)
    running_var = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    return x, weight, bias, running_mean, running_var


@pytest.mark.parametrize("shape,layout,training,params", GRAD_CASES)
def test_gradcheck_and_gradgradcheck(shape, layout, training, params, backend, request):
    x, weight, bias, running_mean, running_var = _inputs(shape, layout, params, request.node.name)
    differentiable = [t for t in (x, weight, bias) if t is not None]

    def fn(*args):
        it = iter(args)
        x_ = next(it)
        w_ = next(it) if weight is not None else None
        b_ = next(it) if bias is not None else None
        # Fresh copies: in training the running statistics are updated in place at every call.
        return batch_norm(x_, running_mean.clone(), running_var.clone(), w_, b_, training, 0.1, 1e-5)

    assert gradcheck(fn, differentiable, eps=1e-6, atol=1e-6, rtol=1e-5), "first derivatives"
    assert gradgradcheck(fn, differentiable, eps=1e-6, atol=1e-6, rtol=1e-5), "second derivatives"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_without_running_stats_in_training(backend, training):
    """training=True with running_mean=running_var=None (track_running_stats=False)."""
    x, weight, bias, _, _ = _inputs((4, 3, 2), "contiguous", "weight+bias", "norunning")
    if training:
        fn = lambda x_, w_, b_: batch_norm(x_, None, None, w_, b_, True)  # noqa: E731
        assert gradcheck(fn, (x, weight, bias))
        assert gradgradcheck(fn, (x, weight, bias))
    else:
        with pytest.raises(ValueError, match="running_mean and running_var are required"):
            batch_norm(x, None, None, weight, bias, False)
