"""The batch-norm variants: mean-only and variance-only BN, FrozenBatchNorm and freeze, BatchRenorm and
GhostBatchNorm.

Oracle tests against the NumPy float64 formulas in `bnlab.reference` (forward, backward, running
statistics over several steps), gradcheck/gradgradcheck in float64, the behaviours that define each
layer (renorm is batch norm during warm-up, a ghost batch of the whole batch is batch norm, frozen is
eval-mode batch norm), state dicts, and the errors.
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


def _x(shape, seed, dtype=torch.float64, scale=2.0, offset=1.0):
    gen = generator(seed)
    c = shape[1]
    per_channel = (1, c) + (1,) * (len(shape) - 2)
    shift = (torch.rand(c, generator=gen, dtype=torch.float64) * 4 - 2).reshape(per_channel)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset + shift).to(dtype)


def _load_random_state(layer, seed):
    gen = generator(seed)
    c = layer.num_features
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    return layer


def _numpy(t):
    return None if t is None else t.detach().double().numpy().copy()


def _ones_if_none(t, c):
    return np.ones(c) if t is None else _numpy(t)


def _zeros_if_none(t, c):
    return np.zeros(c) if t is None else _numpy(t)


# ---- mean-only and variance-only batch norm ----------------------------------------------------------

LITE = {
    "mean-only": (bnlab.nn.MeanOnlyBatchNorm1d, bnlab.nn.MeanOnlyBatchNorm2d, reference.mean_only_forward,
                  reference.mean_only_backward),
    "variance-only": (bnlab.nn.VarianceOnlyBatchNorm1d, bnlab.nn.VarianceOnlyBatchNorm2d,
                      reference.variance_only_forward, reference.variance_only_backward),
}
LITE_SHAPES = [(8, 3), (4, 3, 5), (3, 3, 4, 4)]
LITE_CASES = [
    pytest.param(kind, shape, training, affine, id=f"{kind}-{'x'.join(map(str, shape))}-"
                 f"{'train' if training else 'eval'}-{affine}")
    for kind, shape, training, affine in itertools.product(LITE, LITE_SHAPES, (True, False),
                                                           ("affine", "weight-only", "none"))
]


def _lite_layer(kind, shape, affine, dtype=torch.float64):
    one_d, two_d = LITE[kind][:2]
    cls = two_d if len(shape) == 4 else one_d
    config = dict(affine=affine != "none", bias=affine != "weight-only")
    return cls(shape[1], dtype=dtype, **config)


@pytest.mark.parametrize("kind,shape,training,affine", LITE_CASES)
def test_lite_batch_norm_matches_oracle_over_steps(kind, shape, training, affine, request):
    forward, backward = LITE[kind][2:]
    layer = _load_random_state(_lite_layer(kind, shape, affine), request.node.name).train(training)
    c = shape[1]
    for step in range(3):
        gamma, beta = _ones_if_none(layer.weight, c), _zeros_if_none(layer.bias, c)
        rm, rv = _numpy(layer.running_mean), _numpy(layer.running_var)
        x = _x(shape, f"{request.node.name}/{step}").requires_grad_()
        dy = torch.randn(shape, generator=generator(f"dy{step}"), dtype=torch.float64)
        y = layer(x)
        y.backward(dy)

        expected, new_rm, new_rv = forward(_numpy(x), gamma, beta, rm, rv, training, momentum=0.1)
        assert_close(y, torch.from_numpy(expected), f"step {step}: output", **F64)
        stat = {"mean": rm} if kind == "mean-only" else {"var": rv}
        dx, dgamma, dbeta = backward(_numpy(dy), _numpy(x), gamma, training, **({} if training else stat))
        assert_close(x.grad, torch.from_numpy(dx), f"step {step}: input gradient", **F64)
        if layer.weight is not None:
            assert_close(layer.weight.grad, torch.from_numpy(dgamma), f"step {step}: weight gradient", **F64)
            layer.weight.grad = None
        if layer.bias is not None:
            assert_close(layer.bias.grad, torch.from_numpy(dbeta), f"step {step}: bias gradient", **F64)
            layer.bias.grad = None
        assert_close(layer.running_mean, torch.from_numpy(new_rm), f"step {step}: running_mean", **F64)
        assert_close(layer.running_var, torch.from_numpy(new_rv), f"step {step}: running_var", **F64)


@pytest.mark.parametrize("kind", LITE)
def test_lite_batch_norm_in_float32_matches_float64(kind):
    x = _x((16, 3, 4, 4), kind)
    layer64 = _lite_layer(kind, x.shape, "affine")
    layer32 = _lite_layer(kind, x.shape, "affine", torch.float32)
    y64, y32 = layer64(x), layer32(x.float())
    assert y32.dtype == torch.float32
    assert_close(y32.double(), y64, "float32 output", rtol=1e-5, atol=1e-5)
    assert_close(layer32.running_var.double(), layer64.running_var, "running_var", rtol=1e-5, atol=1e-5)


LITE_GRAD_CASES = [
    pytest.param(fn, training, params, id=f"{name}-{'train' if training else 'eval'}-{params}")
    for (name, fn), training, params in itertools.product(
        (("mean-only", F.mean_only_batch_norm), ("variance-only", F.variance_only_batch_norm)),
        (True, False), ("weight+bias", "weight", "none"),
    )
]


@pytest.mark.parametrize("fn,training,params", LITE_GRAD_CASES)
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 2, 2)], ids=["2D", "4D"])
def test_lite_gradcheck_and_gradgradcheck(fn, training, params, shape, request):
    gen = generator(request.node.name)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_() if params != "none" else None
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_() if params == "weight+bias" else None
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    inputs = [t for t in (x, w, b) if t is not None]

    def call(*args):
        it = iter(args)
        x_, w_ = next(it), next(it) if w is not None else None
        b_ = next(it) if b is not None else None
        return fn(x_, rm.clone(), rv.clone(), w_, b_, training)

    assert gradcheck(call, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(call, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_lite_state_dict_is_batch_norms():
    bn = _load_random_state(bnlab.nn.BatchNorm2d(3), "lite-sd")
    for cls in (bnlab.nn.MeanOnlyBatchNorm2d, bnlab.nn.VarianceOnlyBatchNorm2d):
        lite = cls(3)
        lite.load_state_dict(bn.state_dict())
        torch.nn.BatchNorm2d(3).load_state_dict(lite.state_dict())
        assert torch.equal(lite.running_var, bn.running_var)


def test_lite_eval_uses_only_its_statistic():
    x = _x((4, 3), "lite-eval")
    mean_only = _load_random_state(bnlab.nn.MeanOnlyBatchNorm1d(3, affine=False).double(), "m").eval()
    var_only = _load_random_state(bnlab.nn.VarianceOnlyBatchNorm1d(3, affine=False).double(), "v").eval()
    assert_close(mean_only(x), x - mean_only.running_mean, "mean-only eval", **F64)
    assert_close(var_only(x), x / torch.sqrt(var_only.running_var + 1e-5), "variance-only eval", **F64)


# ---- FrozenBatchNorm and freeze ------------------------------------------------------------------------

FROZEN_FOR = [
    (torch.nn.BatchNorm1d, bnlab.nn.FrozenBatchNorm1d, (6, 3)),
    (torch.nn.BatchNorm1d, bnlab.nn.FrozenBatchNorm1d, (4, 3, 5)),
    (torch.nn.BatchNorm2d, bnlab.nn.FrozenBatchNorm2d, (4, 3, 5, 5)),
    (torch.nn.BatchNorm3d, bnlab.nn.FrozenBatchNorm3d, (2, 3, 2, 3, 3)),
    (bnlab.nn.BatchNorm1d, bnlab.nn.FrozenBatchNorm1d, (6, 3)),
    (bnlab.nn.BatchNorm2d, bnlab.nn.FrozenBatchNorm2d, (4, 3, 5, 5)),
]


@pytest.mark.parametrize("bn_cls,frozen_cls,shape", FROZEN_FOR,
                         ids=[f"{b.__module__.split('.')[0]}-{len(s)}D" for b, _, s in FROZEN_FOR])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_frozen_equals_eval_mode_batch_norm(bn_cls, frozen_cls, shape, affine, backend):
    bn = _load_random_state(bn_cls(3, affine=affine).double(), f"frozen{shape}").eval()
    frozen = frozen_cls(3).double()
    frozen.load_state_dict(bn.state_dict(), strict=affine)  # num_batches_tracked is dropped
    assert list(frozen.parameters()) == []
    x, x_bn = _x(shape, "frozen-x").requires_grad_(), _x(shape, "frozen-x").requires_grad_()
    dy = torch.randn(shape, generator=generator("frozen-dy"), dtype=torch.float64)
    y = frozen.train()(x)  # train mode changes nothing
    y_bn = bn(x_bn)
    assert_close(y, y_bn, "output", **F64)
    y.backward(dy)
    y_bn.backward(dy)
    assert_close(x.grad, x_bn.grad, "input gradient", **F64)


def test_frozen_state_dict_is_torchvisions():
    frozen = bnlab.nn.FrozenBatchNorm2d(4)
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert dict(frozen.named_buffers()).keys() == frozen.state_dict().keys()
    bn_state = torch.nn.BatchNorm2d(4).state_dict()
    assert "num_batches_tracked" in bn_state
    frozen.load_state_dict(bn_state)  # strict: the extra key is dropped, not rejected
    back = bnlab.nn.FrozenBatchNorm2d(4)
    back.load_state_dict(frozen.state_dict())


def _model_with_every_kind():
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.BatchNorm2d(4),
        bnlab.nn.BatchNorm2d(4),
        bnlab.nn.BatchRenorm2d(4, warmup_steps=0, r_max_steps=1, d_max_steps=1),
        bnlab.nn.GhostBatchNorm2d(4, ghost_batch_size=2),
        bnlab.nn.BatchNorm(4),  # the chapter's layer, any rank
        bnlab.nn.GroupNorm(2, 4),
        bnlab.nn.InstanceNorm2d(4, affine=True),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 5),
        torch.nn.Sequential(torch.nn.BatchNorm1d(5), bnlab.nn.LayerNorm(5)),
    ).double()


def test_freeze_gives_the_eval_mode_outputs():
    model = _model_with_every_kind()
    with torch.no_grad():  # a few training batches, so that the running statistics are not the defaults
        for step in range(3):
            model(_x((8, 2, 5, 5), f"warm{step}"))
    x = _x((4, 2, 5, 5), "freeze-x")
    expected = model.eval()(x)
    frozen = bnlab.nn.freeze(model.train())
    kinds = [type(m).__name__ for m in frozen.modules()]
    assert kinds.count("FrozenBatchNorm2d") == 4 and kinds.count("FrozenBatchNorm1d") == 1
    assert kinds.count("FrozenBatchNorm") == 1  # the rank-generic chapter layer
    assert {"GroupNorm", "InstanceNorm2d", "LayerNorm"} <= set(kinds)
    assert_close(frozen.train()(x), expected, "frozen model in train mode", **F64)
    assert frozen is model  # children replaced in place


@pytest.mark.parametrize(
    "layer,match",
    [
        (bnlab.nn.MeanOnlyBatchNorm2d(3), r"cannot freeze 0 \(MeanOnlyBatchNorm2d\): its evaluation mode"),
        (bnlab.nn.VarianceOnlyBatchNorm1d(3), "VarianceOnlyBatchNorm1d"),
        (bnlab.nn.PITNorm2d(3), "PITNorm2d"),
        (bnlab.nn.DecorrelatedBatchNorm2d(4), "DecorrelatedBatchNorm2d"),
        (torch.nn.BatchNorm2d(3, track_running_stats=False), "no running statistics"),
        (bnlab.nn.LazyBatchNorm2d(), "lazy"),
    ],
    ids=["mean-only", "variance-only", "pit", "dbn", "untracked", "lazy"],
)
def test_freeze_refuses_what_it_cannot_reproduce(layer, match):
    with pytest.raises(ValueError, match=match):
        bnlab.nn.freeze(torch.nn.Sequential(layer))


# ---- BatchRenorm ---------------------------------------------------------------------------------------

RENORM_SHAPES = [(8, 3), (4, 3, 5), (4, 3, 3, 3)]


def _renorm_and_bn(shape, momentum=0.1, **renorm_kwargs):
    renorm_cls = bnlab.nn.BatchRenorm2d if len(shape) == 4 else bnlab.nn.BatchRenorm1d
    bn_cls = bnlab.nn.BatchNorm2d if len(shape) == 4 else bnlab.nn.BatchNorm1d
    renorm = _load_random_state(renorm_cls(shape[1], momentum=momentum, **renorm_kwargs).double(), "renorm")
    bn = bn_cls(shape[1], momentum=momentum).double()
    bn.load_state_dict(renorm.state_dict())
    return renorm, bn


@pytest.mark.parametrize("shape", RENORM_SHAPES, ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
def test_batch_renorm_is_batch_norm_during_warmup(shape, momentum, backend):
    """r_max = 1 and d_max = 0: r = 1 and d = 0, the very same batch_norm call, bit for bit."""
    renorm, bn = _renorm_and_bn(shape, momentum, warmup_steps=3)
    for step in range(3):
        assert renorm.training and renorm.clipping_bounds(step + 1) == (1.0, 0.0)
        x, x_bn = _x(shape, f"warm{step}").requires_grad_(), _x(shape, f"warm{step}").requires_grad_()
        y, y_bn = renorm(x), bn(x_bn)
        assert torch.equal(y, y_bn), f"step {step}: output"
        dy = torch.randn(shape, generator=generator(f"dy{step}"), dtype=torch.float64)
        y.backward(dy)
        y_bn.backward(dy)
        assert torch.equal(x.grad, x_bn.grad), f"step {step}: input gradient"
        assert torch.equal(renorm.weight.grad, bn.weight.grad) and torch.equal(renorm.bias.grad, bn.bias.grad)
        assert torch.equal(renorm.running_mean, bn.running_mean) and torch.equal(renorm.running_var, bn.running_var)
    renorm.eval()
    bn.eval()
    x = _x(shape, "eval")
    assert torch.equal(renorm(x), bn(x))


@pytest.mark.parametrize("shape", RENORM_SHAPES, ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (6.0, 4.0), (-4.0, 0.3)], ids=["mild", "clip-high", "clip-low"])
def test_batch_renorm_matches_oracle_after_warmup(shape, offset, scale):
    renorm, _ = _renorm_and_bn(shape, warmup_steps=0, r_max_steps=0, d_max_steps=0, r_max=2.0, d_max=1.5)
    for step in range(3):
        rm, rv = _numpy(renorm.running_mean), _numpy(renorm.running_var)
        gamma, beta = _numpy(renorm.weight), _numpy(renorm.bias)
        x = _x(shape, f"renorm{offset}/{step}", scale=scale, offset=offset).requires_grad_()
        y = renorm(x)
        expected, r, d, new_rm, new_rv = reference.batch_renorm_forward(_numpy(x), gamma, beta, rm, rv, 2.0, 1.5)
        assert_close(y, torch.from_numpy(expected), f"step {step}: output", **F64)
        assert_close(renorm.running_mean, torch.from_numpy(new_rm), f"step {step}: running_mean", **F64)
        assert_close(renorm.running_var, torch.from_numpy(new_rv), f"step {step}: running_var", **F64)
        # Stop-gradient: the input gradient is batch norm's backward with the scale gamma * r.
        dy = torch.randn(shape, generator=generator(f"renorm-dy{step}"), dtype=torch.float64)
        y.backward(dy)
        dx, _, _ = reference.backward(_numpy(dy), _numpy(x), gamma * r, training=True)
        assert_close(x.grad, torch.from_numpy(dx), f"step {step}: input gradient", **F64)
        x_hat = (_numpy(x) - _numpy(x).mean(axis=reference._axes(_numpy(x)), keepdims=True))
        x_hat = x_hat / np.sqrt(_numpy(x).var(axis=reference._axes(_numpy(x)), keepdims=True) + 1e-5)
        per_channel = (1, -1) + (1,) * (len(shape) - 2)
        dgamma = (_numpy(dy) * (x_hat * r.reshape(per_channel) + d.reshape(per_channel))).sum(
            axis=reference._axes(x_hat))
        assert_close(renorm.weight.grad, torch.from_numpy(dgamma), f"step {step}: weight gradient", **F64)
        renorm.weight.grad = renorm.bias.grad = None
    if offset != 0.0:
        assert (np.abs(r) == 2.0).any() or (np.abs(r) == 0.5).any() or (np.abs(d) == 1.5).any(), "no clipping tested"


def test_batch_renorm_gradcheck_where_r_and_d_are_clipped():
    """Where r and d sit at their bounds they are locally constant, so finite differences see the
    stop-gradient function itself."""
    gen = generator("renorm-gradcheck")
    x = (torch.randn(6, 3, 2, generator=gen, dtype=torch.float64) * 3 + 4).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.full((3,), 0.1, dtype=torch.float64)

    def fn(x_, w_, b_):
        return F.batch_renorm(x_, rm.clone(), rv.clone(), w_, b_, True, 0.1, 1e-5, r_max=1.5, d_max=0.5)

    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_batch_renorm_schedule_and_its_step_count_survive_state_dict():
    renorm = bnlab.nn.BatchRenorm1d(2, warmup_steps=2, r_max_steps=6, d_max_steps=4, r_max=3.0, d_max=5.0)
    bounds = [renorm.clipping_bounds(step) for step in range(1, 8)]
    assert bounds == [(1.0, 0.0), (1.0, 0.0), (1.5, 2.5), (2.0, 5.0), (2.5, 5.0), (3.0, 5.0), (3.0, 5.0)]
    for _ in range(4):
        renorm(torch.randn(4, 2))
    assert renorm.clipping_bounds() == (2.0, 5.0)
    restored = bnlab.nn.BatchRenorm1d(2, warmup_steps=2, r_max_steps=6, d_max_steps=4)
    restored.load_state_dict(renorm.state_dict())
    assert restored.clipping_bounds() == (2.0, 5.0)


# ---- GhostBatchNorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", RENORM_SHAPES, ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("ghost", ["equal", "larger"])
def test_ghost_batch_of_the_whole_batch_is_batch_norm(shape, ghost, backend):
    cls = bnlab.nn.GhostBatchNorm2d if len(shape) == 4 else bnlab.nn.GhostBatchNorm1d
    size = shape[0] if ghost == "equal" else shape[0] + 5
    ghost_bn = _load_random_state(cls(3, ghost_batch_size=size).double(), "ghost-bn")
    bn = (bnlab.nn.BatchNorm2d if len(shape) == 4 else bnlab.nn.BatchNorm1d)(3).double()
    bn.load_state_dict(ghost_bn.state_dict())
    for step in range(2):
        x, x_bn = _x(shape, f"g{step}").requires_grad_(), _x(shape, f"g{step}").requires_grad_()
        y, y_bn = ghost_bn(x), bn(x_bn)
        assert torch.equal(y, y_bn)
        y.sum().backward()
        y_bn.sum().backward()
        assert torch.equal(x.grad, x_bn.grad)
        assert torch.equal(ghost_bn.running_var, bn.running_var)
    assert torch.equal(ghost_bn.eval()(x), bn.eval()(x))


@pytest.mark.parametrize("batch,ghost_size", [(12, 4), (10, 4), (9, 3), (7, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("spatial", [(), (3,), (2, 2)], ids=["2D", "3D", "4D"])
def test_ghost_batch_norm_matches_oracle_over_steps(batch, ghost_size, spatial):
    shape = (batch, 3, *spatial)
    cls = bnlab.nn.GhostBatchNorm2d if len(shape) == 4 else bnlab.nn.GhostBatchNorm1d
    layer = _load_random_state(cls(3, ghost_batch_size=ghost_size).double(), "ghost")
    for step in range(2):
        gamma, beta = _numpy(layer.weight), _numpy(layer.bias)
        rm, rv = _numpy(layer.running_mean), _numpy(layer.running_var)
        x = _x(shape, f"ghost/{batch}/{step}")
        expected, new_rm, new_rv = reference.ghost_batch_norm_forward(_numpy(x), gamma, beta, rm, rv, ghost_size)
        assert_close(layer(x), torch.from_numpy(expected), f"step {step}: output", **F64)
        assert_close(layer.running_mean, torch.from_numpy(new_rm), f"step {step}: running_mean", **F64)
        assert_close(layer.running_var, torch.from_numpy(new_rv), f"step {step}: running_var", **F64)


def test_ghost_batch_norm_cumulative_average_weighs_every_ghost_batch_equally():
    layer = bnlab.nn.GhostBatchNorm1d(2, momentum=None, ghost_batch_size=3).double()
    means, variances = [], []
    for step in range(3):
        x = _x((9, 2), f"ghost-cma{step}")
        layer(x)
        for ghost in x.split(3):
            means.append(ghost.mean(0))
            variances.append(ghost.var(0, correction=1))
    assert_close(layer.running_mean, torch.stack(means).mean(0), "running_mean", **F64)
    assert_close(layer.running_var, torch.stack(variances).mean(0), "running_var", **F64)


def test_ghost_batch_norm_remainder_goes_to_the_last_ghost_batch():
    assert F.ghost_batch_sizes(10, 4) == [4, 6]
    assert F.ghost_batch_sizes(12, 4) == [4, 4, 4]
    assert F.ghost_batch_sizes(3, 4) == [3]
    y = bnlab.nn.GhostBatchNorm1d(2, ghost_batch_size=4)(_x((10, 2), "rem", torch.float32))
    for part in (y[:4], y[4:]):
        assert part.mean(0).abs().max() < 1e-5


def test_ghost_batch_norm_gradcheck():
    gen = generator("ghost-gradcheck")
    x = (torch.randn(7, 2, 2, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_()

    def fn(x_, w_, b_):
        return F.ghost_batch_norm(x_, None, None, w_, b_, True, ghost_batch_size=3)

    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: bnlab.nn.GhostBatchNorm1d(3, ghost_batch_size=1), "ghost_batch_size must be an int >= 2"),
        (lambda: bnlab.nn.BatchRenorm2d(3, track_running_stats=False), "needs track_running_stats=True"),
        (lambda: bnlab.nn.BatchRenorm2d(3, r_max=0.5), "r_max must be >= 1"),
        (lambda: bnlab.nn.BatchRenorm2d(3, warmup_steps=10, r_max_steps=5), "warmup_steps <= r_max_steps"),
        (lambda: bnlab.nn.FrozenBatchNorm2d(0), "num_features must be a positive int"),
        (lambda: bnlab.nn.MeanOnlyBatchNorm1d(3, momentum=-1), "momentum must be in"),
    ],
    ids=["ghost-size", "renorm-untracked", "renorm-rmax", "renorm-schedule", "frozen-features", "lite-momentum"],
)
def test_bad_configuration_is_a_clear_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "layer,x,match",
    [
        (bnlab.nn.MeanOnlyBatchNorm2d(3), torch.randn(4, 3), r"use MeanOnlyBatchNorm1d for \(N, C\) input"),
        (bnlab.nn.VarianceOnlyBatchNorm1d(3), torch.randn(2, 3, 4, 4), "use VarianceOnlyBatchNorm2d"),
        (bnlab.nn.VarianceOnlyBatchNorm1d(3), torch.randn(4, 5), "expected 3 channels"),
        (bnlab.nn.MeanOnlyBatchNorm1d(3), torch.randn(1, 3), "more than 1 value per channel"),
        (bnlab.nn.FrozenBatchNorm2d(3), torch.randn(4, 3), r"use FrozenBatchNorm1d"),
        (bnlab.nn.FrozenBatchNorm1d(3), torch.randn(4, 2), "expected 3 channels"),
        (bnlab.nn.BatchRenorm1d(3), torch.randn(2, 3, 4, 4), "use BatchRenorm2d"),
        (bnlab.nn.GhostBatchNorm2d(3), torch.randn(2, 3, 4, 4, 4), r"expected 4D \(N, C, H, W\) input, got 5D"),
        (bnlab.nn.GhostBatchNorm1d(3), torch.randn(4, 3).long(), "floating-point"),
    ],
    ids=["mean-only-rank", "variance-only-rank", "channels", "one-sample", "frozen-rank", "frozen-channels",
         "renorm-rank", "ghost-rank", "ghost-dtype"],
)
def test_bad_input_is_a_clear_value_error(layer, x, match):
    with pytest.raises(ValueError, match=match):
        layer(x)
