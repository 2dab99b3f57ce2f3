"""Properties of batch normalization, checked with hypothesis over shapes, scales and offsets, under both
kernel backends.

(a) training with identity affine: every channel of the output has mean 0 and biased variance
    v / (v + eps), where v is the channel's input variance (1 once v >> eps);
(b) invariance: BN(a * x + b) == BN(x) for per-channel a > 0 and any b;
(c) a bias added before BN gets no gradient in training (the chapter's first exercise): BN subtracts
    the channel mean, so a per-channel shift cannot change the output.

The data of each example comes from a seeded generator; hypothesis chooses the seed, the shape, the
per-channel scales and offsets (and shrinks them on failure).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bnlab.functional import batch_norm

# The backend fixture is function-scoped but fixed for the whole run of a @given test: sharing it
# between examples is what we want.
SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def shapes(draw, min_values_per_channel: int = 2):
    """(N, C, *spatial) with 0 to 3 spatial dims and at least `min_values_per_channel` values per C."""
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    assume(n * math.prod(spatial) >= min_values_per_channel)
    return (n, c, *spatial)


def channel_lists(shape, elements):
    return st.lists(elements, min_size=shape[1], max_size=shape[1])


channels_last = st.booleans()


def _layout(x: torch.Tensor, use_channels_last: bool) -> torch.Tensor:
    if use_channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if use_channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _per_channel(v, x):
    return torch.as_tensor(v, dtype=x.dtype).reshape(1, -1, *[1] * (x.dim() - 2))


def _reduce_dims(x):
    return [0, *range(2, x.dim())]


@st.composite
def scaled_inputs(draw, dtype, min_values_per_channel=2, scale_range=(1e-2, 1e2), offset_range=(-1e3, 1e3)):
    shape = draw(shapes(min_values_per_channel))
    scale = draw(channel_lists(shape, st.floats(*scale_range)))
    offset = draw(channel_lists(shape, st.floats(*offset_range)))
    seed = draw(st.integers(0, 2**32 - 1))
    cl = draw(channels_last)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * _per_channel(scale, x) + _per_channel(offset, x)
    return _layout(x.to(dtype), cl)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@SETTINGS
@given(data=st.data())
def test_training_output_has_zero_mean_and_unit_variance_per_channel(backend, dtype, data):
    if dtype == torch.float64:
        x = data.draw(scaled_inputs(dtype, scale_range=(1e-3, 1e3), offset_range=(-1e3, 1e3)))
    else:  # offsets within 100 standard deviations: float32 resolves x - mean to ~1e-5
        x = data.draw(scaled_inputs(dtype, scale_range=(0.1, 10.0), offset_range=(-10.0, 10.0)))
    eps = 1e-5
    y = batch_norm(x, None, None, training=True, eps=eps).double()
    x64 = x.double()
    dims = _reduce_dims(x)
    v = x64.var(dim=dims, unbiased=False)
    expected_var = v / (v + eps)
    mean = y.mean(dim=dims)
    var = y.var(dim=dims, unbiased=False)
    # Rounding of x - mean is relative to |x|, so the tolerance grows with |x| / std.
    scale = x64.abs().amax(dim=dims) / torch.sqrt(v + eps)
    tol = (1e-13 if dtype == torch.float64 else 1e-6) * (1 + scale)
    assert bool((mean.abs() <= tol).all()), f"channel means {mean.tolist()}, allowed {tol.tolist()}"
    assert bool(((var - expected_var).abs() <= 2 * tol).all()), (
        f"channel variances {var.tolist()}, expected {expected_var.tolist()}"
    )


@SETTINGS
@given(data=st.data())
def test_normalization_is_invariant_to_per_channel_positive_scale_and_shift(backend, data):
    x = data.draw(scaled_inputs(torch.float64, min_values_per_channel=4, scale_range=(0.5, 2.0),
                                offset_range=(-3.0, 3.0)))
    a = torch.tensor(data.draw(channel_lists(x.shape, st.floats(1e-2, 1e2))), dtype=torch.float64)
    b = torch.tensor(data.draw(channel_lists(x.shape, st.floats(-1e3, 1e3))), dtype=torch.float64)
    dims = _reduce_dims(x)
    v = x.var(dim=dims, unbiased=False)
    assume(bool((v > 1e-3).all()))  # a near-constant channel: eps would no longer be negligible
    # BN(a x + b) = (x - m) / sqrt(v + eps / a^2): with eps=1e-20, eps / a^2 <= 1e-16 is lost against v.
    eps = 1e-20
    y = batch_norm(x, None, None, training=True, eps=eps)
    y_scaled = batch_norm(x * _per_channel(a, x) + _per_channel(b, x), None, None, training=True, eps=eps)
    # Rounding a x + b loses |b| / (a std) ulps of the signal: the tolerance scales with that ratio.
    cond = (b.abs() / (a * v.sqrt()) + 1).max().item()
    torch.testing.assert_close(y_scaled, y, rtol=0, atol=1e-13 * cond + 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@SETTINGS
@given(data=st.data())
def test_bias_before_batch_norm_gets_zero_gradient_in_training(backend, dtype, data):
    x = data.draw(scaled_inputs(dtype, scale_range=(0.1, 10.0), offset_range=(-10.0, 10.0)))
    c = x.shape[1]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    pre_bias = (torch.randn(c, generator=gen, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    y = batch_norm(x + _per_channel(pre_bias, x), torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype),
                   weight, bias, training=True)
    y.backward(dy)
    # What "zero up to rounding" means: the gradient is a sum of per-element terms that cancel, so it is
    # held to eps(dtype) times the sum of their magnitudes, times the conditioning |mean| / std of the
    # channel (rounding the mean by one ulp shifts every x_hat by ulp(mean) / std).
    dims = _reduce_dims(x)
    shifted = x.double() + _per_channel(pre_bias.detach().double(), x)
    var, mean = torch.var_mean(shifted, dim=dims, correction=0)
    invstd = 1.0 / torch.sqrt(var + 1e-5)
    magnitude = (dy.double().abs().sum(dims) + 1) * weight.detach().double() * invstd
    conditioning = 1 + mean.abs() * invstd
    unit = 1e-13 if dtype == torch.float64 else 1e-5
    allowed = unit * magnitude * conditioning
    assert pre_bias.grad is not None
    assert bool((pre_bias.grad.double().abs() <= allowed).all()), (
        f"bias before BN got gradient {pre_bias.grad.tolist()}; allowed {allowed.tolist()}"
    )
    # ...while the bias after BN does get the full gradient, sum(dy): the test can tell the two apart.
    torch.testing.assert_close(bias.grad.double(), dy.double().sum(dims), rtol=1e-5, atol=1e-5)
