"""LayerNorm, GroupNorm and InstanceNorm1d/2d/3d against torch's, under both kernel backends.

Table-driven: each case builds a bnlab layer and a torch layer with the same (random) state, runs a few
forward/backward steps with fresh inputs, and compares outputs, every gradient and the running
statistics; state dicts load in both directions with equal outputs after. Then gradcheck and
gradgradcheck in float64, the documented deviations from torch, and the errors.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bnlab.functional as F
import bnlab.nn
from cases import assert_close, generator, tolerance

DTYPES = (torch.float32, torch.float64)
DTYPE_ID = {torch.float32: "f32", torch.float64: "f64"}
STEPS = 2


def _randomize(layer: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial parameters and running statistics (the defaults 1 and 0 would hide mix-ups)."""
    with torch.no_grad():
        for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
            if not t.is_floating_point():
                continue
            values = torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5
            if name.endswith("bias") or name.endswith("running_mean"):
                values = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            t.copy_(values)


def _pair(make_ours, make_theirs, dtype, seed):
    theirs = make_theirs().to(dtype)
    _randomize(theirs, generator(seed))
    ours = make_ours().to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _input(shape, dtype, gen, channels_last=False):
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _run_steps(ours, theirs, shape, dtype, seed, training=True, channels_last=False):
    """Forward/backward steps through both layers; compare everything after each."""
    tol = tolerance(dtype)
    if dtype == torch.float32:
        tol = dict(rtol=2e-5, atol=2e-5)
    ours.train(training)
    theirs.train(training)
    for step in range(STEPS):
        gen = generator(f"{seed}/step{step}")
        x = _input(shape, dtype, gen, channels_last)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        assert y_ours.dtype == dtype and y_ours.shape == x.shape
        assert_close(y_ours, y_theirs, f"step {step}: output", **tol)
        y_ours.backward(dy)
        y_theirs.backward(dy)
        assert_close(x_ours.grad, x_theirs.grad, f"step {step}: input gradient", **tol)
        for name, p in theirs.named_parameters():
            assert_close(getattr(ours, name).grad, p.grad, f"step {step}: {name} gradient", **tol)
        for name in ("running_mean", "running_var"):
            theirs_buffer = getattr(theirs, name, None)
            if theirs_buffer is None:
                assert getattr(ours, name, None) is None
            else:
                assert_close(getattr(ours, name), theirs_buffer, f"step {step}: {name}", **tol)


def _check_state_dict_both_ways(ours, theirs, make_ours, make_theirs, shape, dtype):
    """Each layer's state loads into a fresh layer of the other kind, and the outputs then agree."""
    x = _input(shape, dtype, generator("state-dict"))
    tol = tolerance(dtype) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for source, fresh in ((ours, make_theirs().to(dtype)), (theirs, make_ours().to(dtype))):
        assert set(source.state_dict()) == set(fresh.state_dict())
        fresh.load_state_dict(source.state_dict())
        source.eval()
        fresh.eval()
        with torch.no_grad():
            assert_close(fresh(x), source(x), f"{type(fresh).__module__} loaded from the other", **tol)


# ---- LayerNorm ---------------------------------------------------------------------------------------

LN_SHAPES = [
    ((5,), (6, 5)),
    ((5,), (2, 3, 5)),
    ((3, 4), (2, 3, 4)),
    ((3, 4), (3, 4)),  # no leading dims
    ((1,), (4, 1)),  # one value: the output is the bias
]
LN_AFFINE = {"affine": dict(), "weight-only": dict(bias=False), "none": dict(elementwise_affine=False)}
LN_CASES = [
    pytest.param(normalized, shape, affine, dtype,
                 id=f"{'x'.join(map(str, shape))}-over{len(normalized)}-{affine}-{DTYPE_ID[dtype]}")
    for (normalized, shape), affine, dtype in itertools.product(LN_SHAPES, LN_AFFINE, DTYPES)
    # Over one value torch's float32 kernel leaves rounding noise (~1e-5) where ours gives exactly 0.
    if not (normalized == (1,) and dtype == torch.float32)
]


@pytest.mark.parametrize("normalized,shape,affine,dtype", LN_CASES)
def test_layer_norm_matches_torch(normalized, shape, affine, dtype, backend, request):
    make_ours = lambda: bnlab.nn.LayerNorm(normalized, **LN_AFFINE[affine])  # noqa: E731
    make_theirs = lambda: torch.nn.LayerNorm(normalized, **LN_AFFINE[affine])  # noqa: E731
    ours, theirs = _pair(make_ours, make_theirs, dtype, request.node.name)
    for training in (True, False):
        _run_steps(ours, theirs, shape, dtype, request.node.name, training)
    _check_state_dict_both_ways(ours, theirs, make_ours, make_theirs, shape, dtype)


# ---- GroupNorm ---------------------------------------------------------------------------------------

GN_SHAPES = [
    (1, (3, 4, 5), False),  # one group: layer norm over (C, L)
    (2, (3, 4, 5, 5), False),
    (2, (3, 4, 5, 5), True),  # channels-last input
    (4, (3, 4), False),  # C groups of one value each
    (3, (2, 6, 2, 3, 2), False),
]
GN_AFFINE = {"affine": dict(), "weight-only": dict(bias=False), "none": dict(affine=False)}
GN_CASES = [
    pytest.param(groups, shape, channels_last, affine, dtype,
                 id=f"G{groups}-{'x'.join(map(str, shape))}{'-cl' if channels_last else ''}-{affine}-{DTYPE_ID[dtype]}")
    for (groups, shape, channels_last), affine, dtype in itertools.product(GN_SHAPES, GN_AFFINE, DTYPES)
    # One value per group: float64 only, as for layer norm over one value.
    if not (groups == shape[1] and len(shape) == 2 and dtype == torch.float32)
]


@pytest.mark.parametrize("groups,shape,channels_last,affine,dtype", GN_CASES)
def test_group_norm_matches_torch(groups, shape, channels_last, affine, dtype, backend, request):
    make_ours = lambda: bnlab.nn.GroupNorm(groups, shape[1], **GN_AFFINE[affine])  # noqa: E731
    make_theirs = lambda: torch.nn.GroupNorm(groups, shape[1], **GN_AFFINE[affine])  # noqa: E731
    ours, theirs = _pair(make_ours, make_theirs, dtype, request.node.name)
    for training in (True, False):
        _run_steps(ours, theirs, shape, dtype, request.node.name, training, channels_last)
    _check_state_dict_both_ways(ours, theirs, make_ours, make_theirs, shape, dtype)


# ---- InstanceNorm ------------------------------------------------------------------------------------

INSTANCE = {
    "1d": (bnlab.nn.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 4, 6)),
    "2d": (bnlab.nn.InstanceNorm2d, torch.nn.InstanceNorm2d, (3, 4, 3, 3)),
    "3d": (bnlab.nn.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 4, 2, 3, 2)),
}
IN_CASES = [
    pytest.param(kind, batched, affine, track, training, dtype,
                 id=f"{kind}-{'batched' if batched else 'unbatched'}-{'affine' if affine else 'noaffine'}-"
                 f"{'track' if track else 'notrack'}-{'train' if training else 'eval'}-{DTYPE_ID[dtype]}")
    for kind, batched, affine, track, training, dtype in itertools.product(
        INSTANCE, (True, False), (True, False), (True, False), (True, False), DTYPES
    )
]


@pytest.mark.parametrize("kind,batched,affine,track,training,dtype", IN_CASES)
def test_instance_norm_matches_torch(kind, batched, affine, track, training, dtype, backend, request):
    ours_cls, theirs_cls, shape = INSTANCE[kind]
    shape = shape if batched else shape[1:]
    channels = shape[1] if batched else shape[0]
    config = dict(affine=affine, track_running_stats=track)
    make_ours = lambda: ours_cls(channels, **config)  # noqa: E731
    make_theirs = lambda: theirs_cls(channels, **config)  # noqa: E731
    ours, theirs = _pair(make_ours, make_theirs, dtype, request.node.name)
    _run_steps(ours, theirs, shape, dtype, request.node.name, training)
    _check_state_dict_both_ways(ours, theirs, make_ours, make_theirs, shape, dtype)


def test_instance_norm_channels_last_input(backend):
    x = _input((2, 3, 4, 4), torch.float64, generator("in-cl"), channels_last=True)
    ours, theirs = bnlab.nn.InstanceNorm2d(3, affine=True).double(), torch.nn.InstanceNorm2d(3, affine=True).double()
    assert_close(ours(x), theirs(x), "output", **tolerance(torch.float64))


@pytest.mark.parametrize("momentum", [0.3, None], ids=["mom0.3", "momNone"])
def test_instance_norm_bookkeeping_is_torchs(backend, momentum):
    """torch's InstanceNorm never counts num_batches_tracked and treats momentum=None as 0 (issue 14)."""
    ours = bnlab.nn.InstanceNorm1d(3, momentum=momentum, track_running_stats=True).double()
    theirs = torch.nn.InstanceNorm1d(3, momentum=momentum, track_running_stats=True).double()
    for step in range(3):
        x = _input((4, 3, 5), torch.float64, generator(f"in-bookkeeping{step}"))
        assert_close(ours(x), theirs(x), f"step {step}: output", **tolerance(torch.float64))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, name), getattr(theirs, name), name, **tolerance(torch.float64))


# ---- gradcheck ---------------------------------------------------------------------------------------


def _leaf(shape, seed, scale=1.5):
    return (torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale + 0.5).requires_grad_()


def _param(shape, seed):
    return (torch.rand(shape, generator=generator(seed), dtype=torch.float64) + 0.5).requires_grad_()


GRAD_FUNCTIONS = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (3, 2), w, b), (4, 3, 2), (3, 2)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), (2, 4, 3), (4,)),
    "instance_norm": (lambda x, w, b: F.instance_norm(x, torch.zeros(3, dtype=x.dtype),
                                                      torch.ones(3, dtype=x.dtype), w, b), (2, 3, 4), (3,)),
    "instance_norm-eval": (lambda x, w, b: F.instance_norm(x, torch.full((3,), 0.3, dtype=x.dtype),
                                                           torch.full((3,), 1.7, dtype=x.dtype), w, b, False),
                           (2, 3, 4), (3,)),
}


@pytest.mark.parametrize("name", GRAD_FUNCTIONS)
def test_gradcheck_and_gradgradcheck(name, backend):
    fn, shape, param_shape = GRAD_FUNCTIONS[name]
    inputs = (_leaf(shape, name), _param(param_shape, name + "w"), _leaf(param_shape, name + "b"))
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,x,match",
    [
        (lambda: bnlab.nn.LayerNorm(5), torch.randn(3, 4), r"\(\*, 5\); got \(3, 4\)"),
        (lambda: bnlab.nn.LayerNorm((3, 4)), torch.randn(4), r"\(\*, 3, 4\)"),
        (lambda: bnlab.nn.LayerNorm(4), torch.zeros(3, 4, dtype=torch.long), "floating-point"),
        (lambda: bnlab.nn.GroupNorm(2, 4), torch.randn(3, 6, 2), "expected 4 channels"),
        (lambda: bnlab.nn.GroupNorm(2, 4), torch.randn(4), "at least 2 dimensions"),
        (lambda: bnlab.nn.InstanceNorm1d(3), torch.randn(2, 3, 4, 5), r"expected 2D \(C, L\) unbatched or 3D"),
        (lambda: bnlab.nn.InstanceNorm2d(3), torch.randn(2, 3), r"3D \(C, H, W\) unbatched or 4D"),
        (lambda: bnlab.nn.InstanceNorm2d(3), torch.randn(2, 5, 4, 4), "expected 3 channels"),
        (lambda: bnlab.nn.InstanceNorm1d(3), torch.randn(2, 3, 1), "more than 1 spatial element"),
    ],
    ids=["ln-trailing", "ln-too-few-dims", "ln-integer", "gn-channels", "gn-rank", "in1d-rank",
         "in2d-rank", "in-channels-without-affine", "in-one-position"],
)
def test_bad_input_is_a_clear_value_error(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: bnlab.nn.GroupNorm(3, 4), r"num_channels \(4\) must be divisible by num_groups \(3\); choose"),
        (lambda: bnlab.nn.GroupNorm(0, 4), "num_groups must be a positive int"),
        (lambda: bnlab.nn.LayerNorm(()), "non-empty"),
        (lambda: bnlab.nn.LayerNorm(4, eps=0), "eps must be positive"),
        (lambda: bnlab.nn.InstanceNorm2d(3, momentum=2.0), "momentum must be in"),
    ],
    ids=["gn-groups", "gn-zero", "ln-empty-shape", "ln-eps", "in-momentum"],
)
def test_bad_configuration_is_a_clear_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_signatures_match_torch():
    import inspect

    for ours, theirs in ((bnlab.nn.LayerNorm, torch.nn.LayerNorm), (bnlab.nn.GroupNorm, torch.nn.GroupNorm),
                         (bnlab.nn.InstanceNorm1d, torch.nn.InstanceNorm1d),
                         (bnlab.nn.InstanceNorm2d, torch.nn.InstanceNorm2d),
                         (bnlab.nn.InstanceNorm3d, torch.nn.InstanceNorm3d)):
        ours_params = inspect.signature(ours).parameters
        theirs_params = inspect.signature(theirs).parameters
        assert list(ours_params) == list(theirs_params), ours.__name__
        for name, p in theirs_params.items():
            assert ours_params[name].default == p.default and ours_params[name].kind == p.kind, (ours.__name__, name)
