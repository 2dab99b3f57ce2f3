"""Numerics: half precision, a large mean, a constant channel, memory formats; under both backends."""

from __future__ import annotations

import pytest
import torch

import bnlab.functional
import bnlab.nn
from cases import MEMORY_FORMATS, generator

HALF_DTYPES = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]
# One rounding of the output to the half type, relative to |y| <~ 4: 2^-11 and 2^-8.
HALF_TOL = {torch.float16: dict(rtol=2e-3, atol=4e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2)}


def _bn_layer(dim: int):
    return {2: bnlab.nn.BatchNorm1d, 3: bnlab.nn.BatchNorm1d, 4: bnlab.nn.BatchNorm2d, 5: bnlab.nn.BatchNorm3d}[dim]


def _torch_layer(dim: int):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[dim]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 6), (4, 4, 5, 5), (2, 4, 3, 4, 4)], ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("params", ["half-params", "float32-params"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision_input_keeps_its_dtype_and_matches_float32(backend, dtype, shape, params, training):
    gen = generator(f"half/{dtype}/{shape}")
    c = shape[1]
    x32 = torch.randn(shape, generator=gen) * 2 + 3
    x = x32.to(dtype)
    x32 = x.float()  # the same values: only the arithmetic differs
    dy = torch.randn(shape, generator=gen).to(dtype)
    weight, bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    rm, rv = torch.randn(c, generator=gen) + 3, torch.rand(c, generator=gen) * 3 + 2

    ours = _bn_layer(len(shape))(c)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.bias.copy_(bias)
        ours.running_mean.copy_(rm)
        ours.running_var.copy_(rv)
    if params == "half-params":
        ours = ours.to(dtype)
    ours.train(training)
    # The float32 result: torch's layer on the same values.
    theirs = _torch_layer(len(shape))(c)
    theirs.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ours.state_dict().items()})
    theirs.train(training)

    xin = x.clone().requires_grad_()
    y = ours(xin)
    assert y.dtype == dtype, f"output dtype {y.dtype} for {dtype} input"
    y.backward(dy)
    assert xin.grad.dtype == dtype

    x32 = x32.requires_grad_()
    y32 = theirs(x32)
    y32.backward(dy.float())
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(y.float(), y32.detach(), **tol)
    torch.testing.assert_close(xin.grad.float(), x32.grad, **tol)
    # Statistics in float32: the running statistics are those of the float32 computation.
    stat_tol = tol if params == "half-params" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean.float(), theirs.running_mean, **stat_tol)
    torch.testing.assert_close(ours.running_var.float(), theirs.running_var, **stat_tol)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_statistics_accumulate_in_float32(backend, dtype):
    """8192 values of about 100 per channel sum to ~8e5, past float16's largest finite value (65504), and
    bfloat16 would round every partial sum to 3 significant digits: the statistics must be accumulated in
    float32 for the output to be finite and normalized."""
    gen = generator(f"accumulate/{dtype}")
    x = (torch.randn(8192, 2, generator=gen) * 4 + 100).to(dtype)
    y = bnlab.functional.batch_norm(x, None, None, training=True)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    y = y.double()
    assert abs(float(y.mean(0).abs().max())) < 2e-2
    assert float((y.var(0, unbiased=False) - 1).abs().max()) < 2e-2
    torch.testing.assert_close(
        y, bnlab.functional.batch_norm(x.double(), None, None, training=True), **HALF_TOL[dtype]
    )


@pytest.mark.parametrize(
    "shape,layout",
    [((4096, 3), "contiguous"), ((32, 3, 12, 12), "contiguous"), ((32, 3, 12, 12), "channels_last"),
     ((16, 3, 300), "contiguous")],
    ids=["2D", "4D", "4D-channels_last", "3D-long-rows"],
)
def test_large_mean_small_std_normalizes_to_unit_variance_in_float32(backend, shape, layout):
    """Mean 1e4, std 1, float32. The one-pass formula var = E[x^2] - E[x]^2 fails here: E[x^2] ~ 1e8,
    where float32 values are 8 apart (24-bit significand), so the difference of the two ~1e8 terms is a
    multiple of 8 -- it cannot come out near the true variance 1 (it is typically 0 or +-8, giving
    invstd 316 or NaN). A shifted or Welford-style reduction is needed."""
    gen = generator(f"largemean/{shape}/{layout}")
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) + 1e4).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dims = [0, *range(2, x.dim())]

    # The naive formula in float32, to show that this input really defeats it.
    naive = (x * x).mean(dims) - x.mean(dims) ** 2
    assert float((naive - 1).abs().min()) > 0.5, f"E[x^2]-E[x]^2 should fail here, got {naive.tolist()}"

    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    y = bnlab.functional.batch_norm(x, rm, rv, training=True).double()
    mean, var = y.mean(dims), y.var(dims, unbiased=False)
    assert float(mean.abs().max()) < 1e-3, f"output channel means {mean.tolist()}"
    assert float((var - 1).abs().max()) < 1e-3, f"output channel variances {var.tolist()}"
    # The running statistics too: the unbiased batch variance, not the cancelled one.
    true_var = x.double().var(dims, unbiased=True)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * true_var, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm.double(), 0.1 * x.double().mean(dims), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 3)], ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_constant_channel_gives_bias_and_finite_gradients(backend, shape, dtype):
    """Variance 0: x_hat = 0 / sqrt(eps) = 0, so the output is 0 * weight + bias, finite, as in torch."""
    gen = generator(f"constant/{shape}/{dtype}")
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=dtype)
    x[:, 1] = 3.7
    weight = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(c, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)

    def run(fn):
        xin, w, b = x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
        rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
        y = fn(xin, rm, rv, w, b, True, 0.1, 1e-5)
        y.backward(dy)
        return y.detach(), xin.grad, w.grad, b.grad, rm, rv

    ours = run(bnlab.functional.batch_norm)
    theirs = run(torch.nn.functional.batch_norm)
    y, dx, dw, db = ours[:4]
    for name, t in zip(["output", "input grad", "weight grad", "bias grad", "running_mean", "running_var"], ours):
        assert bool(torch.isfinite(t).all()), f"{name} is not finite"
    # Exact answers for the constant channel: x_hat = 0, so y = bias and d weight = sum(dy * x_hat) = 0.
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], float(bias[1])), rtol=0, atol=1e-6)
    torch.testing.assert_close(dw[1], torch.zeros((), dtype=dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(db[1], dy[:, 1].sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[5][1], torch.tensor(0.9, dtype=dtype), rtol=1e-6, atol=1e-6)  # var 0
    # Everything against torch. In the constant channel, x - mean is rounding noise divided by
    # sqrt(eps) ~ 3e-3, so there the tolerance is ulp(3.7) / sqrt(eps) (torch's own mean is not exact).
    noisy = 4 * torch.finfo(dtype).eps * 3.7 / 1e-5**0.5  # a few ulps of 3.7, amplified by 1 / sqrt(eps)
    for name, a, b in zip(["output", "input grad", "weight grad", "bias grad", "running_mean", "running_var"],
                          ours, theirs):
        if a.dim() > 1:
            keep = [0, 2]
            torch.testing.assert_close(a[:, keep], b[:, keep], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
            torch.testing.assert_close(a[:, 1], b[:, 1], rtol=noisy, atol=noisy, msg=lambda m, n=name: f"{n}: {m}")
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=max(1e-5, noisy), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous", "expanded"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_input_gives_channels_last_output_and_gradient(backend, dim, grad_layout, training):
    """As torch: a channels-last input gives a channels-last output and a channels-last input gradient,
    whatever the layout of the incoming gradient (y.sum().backward() sends an expanded one)."""
    fmt = MEMORY_FORMATS[dim]
    shape = (3, 4, 3, 5) if dim == 4 else (2, 4, 2, 3, 3)
    gen = generator(f"cl/{dim}")
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.rand(4, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(4, generator=gen).requires_grad_()
    rm, rv = torch.zeros(4), torch.ones(4)
    y = bnlab.functional.batch_norm(x, rm, rv, w, b, training)
    y_t = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    assert y.is_contiguous(memory_format=fmt), f"output strides {y.stride()}"
    dy = {
        "channels_last": torch.randn(shape, generator=gen).contiguous(memory_format=fmt),
        "contiguous": torch.randn(shape, generator=gen),
        "expanded": torch.ones(()).expand(shape),
    }[grad_layout]
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    (dx_t,) = torch.autograd.grad(y_t, x, dy)
    assert dx_t.is_contiguous(memory_format=fmt)  # torch's own behaviour, the one to match
    torch.testing.assert_close(dx, dx_t, rtol=1e-5, atol=1e-5)
    assert dx.is_contiguous(memory_format=fmt), (
        f"input gradient of a channels-last input has strides {dx.stride()} (incoming gradient "
        f"{grad_layout}, strides {dy.stride()}); torch gives {dx_t.stride()}"
    )
    # A leaf's .grad: AccumulateGrad would hide a wrong layout by copying, so check values there only.
    y.backward(dy)
    assert x.grad.is_contiguous(memory_format=fmt)
