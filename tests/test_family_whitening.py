"""Whitening (DecorrelatedBatchNorm2d, IterNorm2d) and the probability-integral-transform normalization
(PITNorm1d/2d).

Oracle tests against the papers' formulas in `bnlab.reference` (training output, running statistics,
evaluation), the defining properties (per-group output covariance is the identity for DBN, approaches
it as T grows for IterNorm; PIT's outputs are exactly Gaussian quantiles, its gradient is batch
norm's), gradcheck in float64, state dicts and errors.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bnlab.functional as F
import bnlab.nn
from bnlab import reference
from cases import assert_close, generator, tolerance

F64 = tolerance(torch.float64)
# Eigendecompositions and matrix powers round differently in LAPACK and in NumPy: 1e-9, not 1e-10.
WHITENING_TOL = dict(rtol=1e-9, atol=1e-9)


def _numpy(t):
    return None if t is None else t.detach().double().numpy().copy()


def _correlated(shape, seed, condition=4.0):
    """(N, C, H, W) float64 input whose channels are correlated within and across groups, with
    per-channel offsets; `condition` stretches one direction of each 4-channel block."""
    gen = generator(seed)
    n, c = shape[0], shape[1]
    z = torch.randn(n, *shape[2:], c, generator=gen, dtype=torch.float64)
    mixing = torch.eye(c, dtype=torch.float64) + 0.5 * torch.randn(c, c, generator=gen, dtype=torch.float64)
    mixing[:, 0] *= condition
    offset = torch.randn(c, generator=gen, dtype=torch.float64) * 2
    return (z @ mixing + offset).movedim(-1, 1).contiguous()


def _group_covariances(y, group_size):
    groups = y.detach().transpose(0, 1).reshape(y.shape[1] // group_size, group_size, -1)
    centered = groups - groups.mean(-1, keepdim=True)
    return centered @ centered.transpose(-1, -2) / groups.shape[-1]


# ---- DecorrelatedBatchNorm2d and IterNorm2d -------------------------------------------------------------

WHITENERS = {
    "dbn": (lambda c, **kw: bnlab.nn.DecorrelatedBatchNorm2d(c, **kw), dict(method="zca")),
    "iternorm-T3": (lambda c, **kw: bnlab.nn.IterNorm2d(c, iterations=3, **kw),
                    dict(method="newton-schulz", iterations=3)),
    "iternorm-T5": (lambda c, **kw: bnlab.nn.IterNorm2d(c, **kw), dict(method="newton-schulz", iterations=5)),
}
WHITENING_CASES = [
    pytest.param(kind, group_size, affine, id=f"{kind}-g{group_size}-{'affine' if affine else 'noaffine'}")
    for kind, group_size, affine in itertools.product(WHITENERS, (2, 4), (True, False))
]


def _whitener(kind, channels, group_size, affine=True, **kwargs):
    make, _ = WHITENERS[kind]
    layer = make(channels, group_size=group_size, affine=affine, **kwargs).double()
    if affine:
        with torch.no_grad():
            layer.weight.copy_(torch.rand(channels, generator=generator("w"), dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(channels, generator=generator("b"), dtype=torch.float64))
    return layer


@pytest.mark.parametrize("kind,group_size,affine", WHITENING_CASES)
def test_whitening_matches_oracle_in_training_and_evaluation(kind, group_size, affine):
    layer = _whitener(kind, 4, group_size, affine)
    oracle = WHITENERS[kind][1]
    gamma = _numpy(layer.weight) if affine else np.ones(4)
    beta = _numpy(layer.bias) if affine else np.zeros(4)
    for step in range(2):
        x = _correlated((6, 4, 3, 3), f"{kind}/{step}")
        rm, rw = _numpy(layer.running_mean), _numpy(layer.running_whitening)
        expected, new_rm, new_rw = reference.whitening_forward(
            _numpy(x), gamma, beta, group_size, training=True, running_mean=rm, running_whitening=rw, **oracle
        )
        assert_close(layer(x), torch.from_numpy(expected), f"step {step}: output", **WHITENING_TOL)
        assert_close(layer.running_mean, torch.from_numpy(new_rm), f"step {step}: running_mean", **WHITENING_TOL)
        assert_close(layer.running_whitening, torch.from_numpy(new_rw), f"step {step}: running_whitening",
                     **WHITENING_TOL)
    layer.eval()
    x = _correlated((3, 4, 2, 2), f"{kind}/eval")
    expected, _, _ = reference.whitening_forward(
        _numpy(x), gamma, beta, group_size, training=False, running_mean=_numpy(layer.running_mean),
        running_whitening=_numpy(layer.running_whitening), **oracle,
    )
    assert_close(layer(x), torch.from_numpy(expected), "evaluation output", **WHITENING_TOL)


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_decorrelated_batch_norm_whitens_each_group(group_size):
    layer = bnlab.nn.DecorrelatedBatchNorm2d(8, group_size=group_size, affine=False).double()
    y = layer(_correlated((16, 8, 4, 4), f"dbn-white{group_size}"))
    covariances = _group_covariances(y, group_size)
    eye = torch.eye(group_size, dtype=torch.float64).expand_as(covariances)
    assert_close(covariances, eye, "per-group output covariance", rtol=0, atol=1e-4)
    # Across groups nothing is decorrelated: the full covariance is not the identity unless one group.
    full = _group_covariances(y, 8)[0]
    off_group = (full - torch.block_diag(*covariances)).abs().max()
    assert (off_group > 1e-2) == (group_size < 8)


def test_iternorm_covariance_approaches_identity_as_iterations_grow():
    """IterNorm's output covariance tends, as T grows, to ZCA's: I - eps Sigma^-1, the identity but for
    the eps regularization."""
    x = _correlated((32, 4, 4, 4), "iternorm-T", condition=6.0)
    dbn = bnlab.nn.DecorrelatedBatchNorm2d(4, group_size=4, affine=False).double()(x)
    eye = torch.eye(4, dtype=torch.float64)
    limit = float((_group_covariances(dbn, 4)[0] - eye).norm())
    distances = []
    for t in (1, 2, 3, 5, 8, 12, 20, 30):
        y = bnlab.nn.IterNorm2d(4, group_size=4, iterations=t, affine=False).double()(x)
        distances.append(float((_group_covariances(y, 4)[0] - eye).norm()))
    assert all(later < earlier for earlier, later in zip(distances[:6], distances[1:7])), distances
    assert distances[0] > 1.0, "one iteration should whiten only partly"
    assert abs(distances[-1] - limit) < 1e-6 and limit < 1e-2, (distances, limit)
    # The paper's single-sequence iteration diverges here by T = 20; the coupled form reaches ZCA.
    assert_close(bnlab.nn.IterNorm2d(4, group_size=4, iterations=40, affine=False).double()(x), dbn,
                 "IterNorm with many iterations is ZCA", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", WHITENERS)
def test_eval_with_the_batchs_own_running_state_reproduces_training(kind):
    """momentum=1 stores exactly the batch's mean and whitening matrix."""
    layer = _whitener(kind, 4, 2, momentum=1.0)
    x = _correlated((5, 4, 3, 3), f"{kind}-m1")
    y_train = layer(x)
    assert_close(layer.eval()(x), y_train, "evaluation with the batch's statistics", **WHITENING_TOL)


@pytest.mark.parametrize("kind", WHITENERS)
def test_whitening_without_running_stats_whitens_each_batch_in_eval(kind):
    layer = _whitener(kind, 4, 4, track_running_stats=False)
    assert layer.running_mean is None and "running_whitening" not in layer.state_dict()
    x = _correlated((5, 4, 3, 3), f"{kind}-untracked")
    assert_close(layer.eval()(x), layer.train()(x), "eval without running statistics", **F64)


@pytest.mark.parametrize("kind", WHITENERS)
def test_whitening_gradcheck(kind):
    layer = _whitener(kind, 4, 2)
    x = _correlated((3, 4, 2, 2), f"{kind}-grad").requires_grad_()
    weight, bias = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    fn = F.decorrelated_batch_norm if kind == "dbn" else F.iterative_normalization
    extra = {} if kind == "dbn" else {"iterations": WHITENERS[kind][1]["iterations"]}

    def call(x_, w_, b_):
        return fn(x_, None, None, w_, b_, True, group_size=2, **extra)

    assert gradcheck(call, (x, weight, bias), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(call, (x, weight, bias), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_whitening_state_dict_round_trip_and_group_size_cap():
    layer = bnlab.nn.DecorrelatedBatchNorm2d(6, group_size=16)  # capped at C = 6: one group
    assert layer.group_size == 6
    assert layer.running_whitening.shape == (1, 6, 6)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_whitening", "num_batches_tracked"}
    layer(torch.randn(4, 6, 3, 3))
    restored = bnlab.nn.DecorrelatedBatchNorm2d(6)
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(restored.eval()(x), layer.eval()(x))
    layer.reset_running_stats()
    assert torch.equal(layer.running_whitening[0], torch.eye(6)) and int(layer.num_batches_tracked) == 0


def test_whitening_float32_agrees_with_float64():
    x = _correlated((8, 4, 3, 3), "f32")
    for kind in WHITENERS:
        y64 = _whitener(kind, 4, 4)(x)
        layer32 = _whitener(kind, 4, 4).float()
        y32 = layer32(x.float())
        assert y32.dtype == torch.float32
        assert_close(y32.double(), y64, f"{kind} in float32", rtol=1e-3, atol=1e-3)


# ---- PITNorm --------------------------------------------------------------------------------------------


def _skewed(shape, seed, ties=False):
    x = torch.randn(shape, generator=generator(seed), dtype=torch.float64).exp()
    if ties:
        x = torch.relu(x - 1.0)  # about half exactly 0, as after a ReLU
    return x


def _gaussian_quantiles(n):
    return torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)


@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 6), (4, 3, 4, 4)], ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_pit_training_matches_oracle(shape, ties):
    layer = (bnlab.nn.PITNorm2d if len(shape) == 4 else bnlab.nn.PITNorm1d)(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    x = _skewed(shape, f"pit{shape}{ties}", ties)
    expected = reference.pit_forward(_numpy(x), _numpy(layer.weight), _numpy(layer.bias))
    assert_close(layer(x), torch.from_numpy(expected), "training output", **F64)


def test_pit_output_is_exactly_gaussian_quantiled_and_monotone():
    x = _skewed((50, 2, 3), "pit-exact")
    y = F.pit_norm(x, None, None, None, training=True)
    n = 150
    for c in range(2):
        values, order = y[:, c].reshape(-1).sort()
        assert torch.equal(values, _gaussian_quantiles(n)), "the outputs are the Gaussian quantiles, exactly"
        assert torch.equal(order, x[:, c].reshape(-1).argsort()), "the map preserves order"


def test_pit_ties_share_a_value_and_a_constant_channel_gives_zero():
    x = torch.tensor([[0.0, 5.0], [0.0, 5.0], [0.0, 5.0], [1.0, 5.0], [2.0, 5.0]], dtype=torch.float64)
    y = F.pit_norm(x, None, None, None, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 3.0],
                   dtype=torch.float64), training=True)
    mid_rank_of_zeros = torch.special.ndtri(torch.tensor((2.0 - 0.5) / 5, dtype=torch.float64))
    assert torch.equal(y[:3, 0], mid_rank_of_zeros.expand(3))
    assert torch.equal(y[:, 1], torch.full((5,), 3.0, dtype=torch.float64)), "constant channel -> the bias"


def test_pit_gradient_is_batch_norms_and_the_affine_gradients_are_exact():
    x = _skewed((16, 3, 2), "pit-grad").requires_grad_()
    x_bn = x.detach().clone().requires_grad_()
    weight = (torch.rand(3, generator=generator("pw"), dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, generator=generator("pb"), dtype=torch.float64).requires_grad_()
    weight_bn, bias_bn = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    dy = torch.randn(x.shape, generator=generator("pit-dy"), dtype=torch.float64)

    y = F.pit_norm(x, None, None, None, weight, bias, training=True)
    y.backward(dy)
    F.batch_norm(x_bn, None, None, weight_bn, bias_bn, training=True).backward(dy)
    assert_close(x.grad, x_bn.grad, "input gradient: batch norm's", **F64)
    z = F.pit_norm(x.detach(), None, None, None, training=True)
    assert_close(weight.grad, (dy * z).sum((0, 2)), "weight gradient: sum(dy * z)", **F64)
    assert_close(bias.grad, dy.sum((0, 2)), "bias gradient", **F64)


def test_pit_tends_to_batch_norm_for_gaussian_input():
    """The justification of the surrogate gradient: for Gaussian input PIT is close to BN."""
    x = torch.randn(4000, 2, generator=generator("pit-gauss"), dtype=torch.float64) * 3 + 1
    gap = (F.pit_norm(x, None, None, None, training=True) - F.batch_norm(x, None, None, training=True)).abs()
    assert float(gap.mean()) < 0.03 and float(gap.quantile(0.99)) < 0.1, (float(gap.mean()), float(gap.max()))


def test_pit_running_quantiles_match_oracle_over_steps():
    layer = bnlab.nn.PITNorm1d(2, num_quantiles=8, momentum=0.3, dtype=torch.float64)
    expected = reference._STANDARD_NORMAL  # only to show the oracle's levels are the same
    knots = np.tile([expected.inv_cdf((j + 0.5) / 8) for j in range(8)], (2, 1))
    assert_close(layer.running_quantiles, torch.from_numpy(knots), "initial knots", **F64)
    for step in range(3):
        x = _skewed((20, 2, 3), f"pit-knots{step}", ties=step == 1)
        layer(x)
        knots = 0.7 * knots + 0.3 * reference.pit_batch_quantiles(_numpy(x), 8)
        assert_close(layer.running_quantiles, torch.from_numpy(knots), f"step {step}: running_quantiles", **F64)


def test_pit_evaluation_matches_oracle_with_tied_knots_and_tails():
    layer = bnlab.nn.PITNorm1d(2, num_quantiles=6).double().eval()
    # Row 0: a tie at the low end (its tail takes batch norm's slope) and in the middle; row 1: distinct.
    knots = torch.tensor([[-2.0, -2.0, 0.0, 0.0, 0.0, 3.0], [-1.0, -0.5, 0.0, 0.5, 1.0, 4.0]], dtype=torch.float64)
    with torch.no_grad():
        layer.running_quantiles.copy_(knots)
        layer.running_var.copy_(torch.tensor([4.0, 0.25]))
        layer.weight.copy_(torch.tensor([1.5, 0.5]))
        layer.bias.copy_(torch.tensor([0.1, -0.2]))
    values = torch.tensor([-5.0, -2.0, -1.5, -1.0, -0.2, 0.0, 0.7, 3.0, 6.0], dtype=torch.float64)
    x = torch.stack([values, values], dim=1)
    expected = reference.pit_eval(_numpy(x), _numpy(layer.weight), _numpy(layer.bias), _numpy(knots),
                                  _numpy(layer.running_var))
    assert_close(layer(x), torch.from_numpy(expected), "evaluation output", **F64)


def test_pit_evaluation_reproduces_training_on_the_batch_that_set_its_knots():
    n = 16  # one value per knot: the knots are the sorted batch
    layer = bnlab.nn.PITNorm1d(3, momentum=1.0, num_quantiles=n).double()
    x = _skewed((n, 3), "pit-m1")
    y_train = layer(x)
    assert_close(layer.eval()(x), y_train, "evaluation on the same batch", rtol=1e-9, atol=1e-9)


def test_pit_evaluation_gaussianizes_unseen_skewed_data_where_batch_norm_does_not():
    pit = bnlab.nn.PITNorm1d(1, affine=False).double()
    bn = bnlab.nn.BatchNorm1d(1, affine=False).double()
    for step in range(60):
        x = _skewed((256, 1), f"pit-train{step}")
        pit(x)
        bn(x)
    x = _skewed((20000, 1), "pit-test")
    y_pit, y_bn = pit.eval()(x).squeeze(1), bn.eval()(x).squeeze(1)

    def skew(t):
        return float(((t - t.mean()) ** 3).mean() / t.std(correction=0) ** 3)

    assert abs(float(y_pit.mean())) < 0.05 and abs(float(y_pit.std()) - 1) < 0.05
    assert abs(skew(y_pit)) < 0.2, skew(y_pit)
    assert skew(y_bn) > 3, "the test data must be skewed enough to tell"


def test_pit_evaluation_gradcheck():
    layer = bnlab.nn.PITNorm1d(2, num_quantiles=8).double()
    for step in range(3):
        layer(_skewed((30, 2), f"pit-gc{step}"))
    x = _skewed((6, 2), "pit-gc-x") * 3 - 1  # some values beyond the outer knots
    x = x.requires_grad_()
    weight, bias = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()

    def call(x_, w_, b_):
        return F.pit_norm(x_, layer.running_mean, layer.running_var, layer.running_quantiles, w_, b_, False)

    assert gradcheck(call, (x, weight, bias), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_pit_state_dict_and_untracked_evaluation():
    layer = bnlab.nn.PITNorm2d(3, num_quantiles=5)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "running_quantiles",
                                       "num_batches_tracked"}
    layer(torch.randn(4, 3, 2, 2))
    restored = bnlab.nn.PITNorm2d(3, num_quantiles=5)
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(restored.eval()(x), layer.eval()(x))
    untracked = bnlab.nn.PITNorm2d(3, track_running_stats=False).eval()
    assert torch.equal(untracked(x), F.pit_norm(x, None, None, None, untracked.weight, untracked.bias, True))


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: bnlab.nn.DecorrelatedBatchNorm2d(6, group_size=4),
         r"group_size=4 does not divide 6; choose one of \[1, 2, 3, 6\]"),
        (lambda: bnlab.nn.IterNorm2d(8, group_size=0), "group_size must be a positive int"),
        (lambda: bnlab.nn.IterNorm2d(8, iterations=0), "iterations must be a positive int"),
        (lambda: bnlab.nn.PITNorm1d(3, num_quantiles=1), "num_quantiles must be an int >= 2"),
    ],
    ids=["dbn-groups", "iternorm-group-size", "iternorm-iterations", "pit-quantiles"],
)
def test_bad_configuration_is_a_clear_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "layer,x,match",
    [
        (bnlab.nn.DecorrelatedBatchNorm2d(4), torch.randn(8, 4), r"expected 4D \(N, C, H, W\) input, got 2D"),
        (bnlab.nn.IterNorm2d(4), torch.randn(2, 6, 3, 3), "expected 4 channels"),
        (bnlab.nn.DecorrelatedBatchNorm2d(4), torch.randn(1, 4, 1, 1), "more than 1 value per channel"),
        (bnlab.nn.PITNorm2d(3), torch.randn(4, 3), r"use PITNorm1d for \(N, C\) input"),
        (bnlab.nn.PITNorm1d(3), torch.randn(1, 3), "more than 1 value per channel"),
        (bnlab.nn.PITNorm1d(3), torch.ones(4, 3, dtype=torch.int32), "floating-point"),
    ],
    ids=["dbn-rank", "iternorm-channels", "dbn-one-value", "pit-rank", "pit-one-value", "pit-dtype"],
)
def test_bad_input_is_a_clear_value_error(layer, x, match):
    with pytest.raises(ValueError, match=match):
        layer(x)
