"""Layer behaviour against torch: momentum=None, train/eval, track_running_stats, state dicts, dtype
moves, the chapter's BatchNorm, the lazy layers, convert(), convert_momentum, and every layer's constructor
signature."""

from __future__ import annotations

import copy
import inspect
import itertools

import pytest
import torch

import bnlab.nn as bnn
from bnlab.functional import convert_momentum
from cases import generator

FAMILIES = {
    "1d": (bnn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 4)),
    "2d": (bnn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 3, 3)),
    "3d": (bnn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 3, 3)),
}
LAZY = {"1d": (bnn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d), "2d": (bnn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d),
        "3d": (bnn.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d)}
CONFIGS = [
    pytest.param(dict(affine=a, track_running_stats=t, bias=b), id=f"affine{a}-track{t}-bias{b}")
    for a, t, b in itertools.product((True, False), (True, False), (True, False))
    if a or b  # bias=False only changes something with affine=True
]


def batches(shape, steps, seed):
    gen = generator(seed)
    c = shape[1]
    out = []
    for _ in range(steps):
        shift = torch.randn(c, generator=gen) * 3
        scale = torch.rand(c, generator=gen) * 2 + 0.5
        x = torch.randn(shape, generator=gen) * scale.reshape(1, -1, *[1] * (len(shape) - 2))
        out.append(x + shift.reshape(1, -1, *[1] * (len(shape) - 2)))
    return out


def reduce_dims(x):
    return [0, *range(2, x.dim())]


# ---- running statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_momentum_none_is_the_plain_average_of_batch_statistics(backend, family):
    ours_cls, theirs_cls, shape = FAMILIES[family]
    ours, theirs = ours_cls(3, momentum=None, dtype=torch.float64), theirs_cls(3, momentum=None, dtype=torch.float64)
    xs = [x.double() for x in batches(shape, 5, f"cma/{family}")]
    for k, x in enumerate(xs, start=1):
        ours(x)
        theirs(x)
        means = torch.stack([b.mean(reduce_dims(b)) for b in xs[:k]])
        variances = torch.stack([b.var(reduce_dims(b), unbiased=True) for b in xs[:k]])
        torch.testing.assert_close(ours.running_mean, means.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_var, variances.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)
        assert int(ours.num_batches_tracked) == k


@pytest.mark.parametrize("family", FAMILIES)
def test_momentum_follows_torch_convention(backend, family):
    """running = (1 - m) running + m batch, variance unbiased."""
    ours_cls, _, shape = FAMILIES[family]
    layer = ours_cls(3, momentum=0.3, dtype=torch.float64)
    expected_mean, expected_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for x in batches(shape, 3, f"mom/{family}"):
        x = x.double()
        layer(x)
        expected_mean = 0.7 * expected_mean + 0.3 * x.mean(reduce_dims(x))
        expected_var = 0.7 * expected_var + 0.3 * x.var(reduce_dims(x), unbiased=True)
    torch.testing.assert_close(layer.running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_mode_uses_running_statistics_and_leaves_them_alone(backend, family):
    ours_cls, theirs_cls, shape = FAMILIES[family]
    ours, theirs = ours_cls(3).eval(), theirs_cls(3).eval()
    rm, rv = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 0.25, 2.0])
    w, b = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([0.1, 0.2, 0.3])
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.running_mean.copy_(rm), layer.running_var.copy_(rv)
            layer.weight.copy_(w), layer.bias.copy_(b)
    x = batches(shape, 1, f"eval/{family}")[0]
    view = (1, -1, *[1] * (len(shape) - 2))
    expected = (x - rm.reshape(view)) / torch.sqrt(rv.reshape(view) + 1e-5) * w.reshape(view) + b.reshape(view)
    y = ours(x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, theirs(x))
    assert torch.equal(ours.running_mean, rm) and torch.equal(ours.running_var, rv)
    assert int(ours.num_batches_tracked) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_without_running_stats_eval_mode_uses_batch_statistics_like_torch(backend, family):
    ours_cls, theirs_cls, shape = FAMILIES[family]
    ours, theirs = ours_cls(3, track_running_stats=False), theirs_cls(3, track_running_stats=False)
    assert ours.running_mean is None and ours.running_var is None and ours.num_batches_tracked is None
    x = batches(shape, 1, f"notrack/{family}")[0]
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        y = ours(x)
        torch.testing.assert_close(y, theirs(x))
        dims = reduce_dims(x)
        torch.testing.assert_close(y.mean(dims), torch.zeros(3), rtol=0, atol=1e-5)  # batch statistics
    assert ours.running_mean is None and "running_mean" not in ours.state_dict()


# ---- state dicts and dtypes --------------------------------------------------------------------------------


def _chapter_and_torch_pairs():
    """(bnlab layer factory, torch layer factory) pairs, each taking the config keywords."""
    pairs = []
    for family, (ours_cls, theirs_cls, _) in FAMILIES.items():
        pairs.append(pytest.param(lambda kw, c=ours_cls: c(5, **kw), lambda kw, c=theirs_cls: c(5, **kw),
                                  id=f"BatchNorm{family}"))
    for num_dims, theirs_cls in ((2, torch.nn.BatchNorm1d), (3, torch.nn.BatchNorm1d), (4, torch.nn.BatchNorm2d),
                                 (5, torch.nn.BatchNorm3d)):
        pairs.append(pytest.param(lambda kw, n=num_dims: bnn.BatchNorm(5, n, **kw), lambda kw, c=theirs_cls: c(5, **kw),
                                  id=f"chapter-BatchNorm-num_dims{num_dims}"))
    pairs.append(pytest.param(lambda kw: bnn.BatchNorm(5, **kw), lambda kw: torch.nn.BatchNorm2d(5, **kw),
                              id="chapter-BatchNorm-num_dims-None"))
    return pairs


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("make_ours,make_theirs", _chapter_and_torch_pairs())
def test_state_dict_keys_match_torch(make_ours, make_theirs, config):
    ours, theirs = make_ours(config), make_theirs(config)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for key in sd_theirs:
        assert sd_ours[key].shape == sd_theirs[key].shape and sd_ours[key].dtype == sd_theirs[key].dtype, key
    assert sd_ours._metadata[""].get("version") == sd_theirs._metadata[""].get("version")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_match_torch_for_every_config(backend, family, config):
    ours_cls, theirs_cls, shape = FAMILIES[family]
    ours, theirs = ours_cls(3, **config), theirs_cls(3, **config)
    if ours.weight is not None:
        with torch.no_grad():
            for layer in (ours, theirs):
                layer.weight.copy_(torch.tensor([0.5, 2.0, 1.5]))
    for x in batches(shape, 2, f"config/{family}"):
        for mode in (True, False):
            ours.train(mode), theirs.train(mode)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = ours(x1), theirs(x2)
            torch.testing.assert_close(y1, y2)
            (y1 * x).sum().backward()
            (y2 * x).sum().backward()
            torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_old_state_dict_without_num_batches_tracked_loads(backend, family):
    ours_cls, theirs_cls, shape = FAMILIES[family]
    trained = theirs_cls(3)
    for x in batches(shape, 2, f"old/{family}"):
        trained(x)
    # A version-1 state dict (before num_batches_tracked existed), nested in a model.
    old = torch.nn.Sequential(torch.nn.Identity(), trained).state_dict()
    del old["1.num_batches_tracked"]
    old._metadata["1"]["version"] = 1
    ours = torch.nn.Sequential(torch.nn.Identity(), ours_cls(3))
    theirs = torch.nn.Sequential(torch.nn.Identity(), theirs_cls(3))
    ours.load_state_dict(copy.deepcopy(old), strict=True)
    theirs.load_state_dict(copy.deepcopy(old), strict=True)
    assert int(ours[1].num_batches_tracked) == 0 == int(theirs[1].num_batches_tracked)
    torch.testing.assert_close(ours[1].running_mean, trained.running_mean)
    torch.testing.assert_close(ours[1].running_var, trained.running_var)
    # Without the old version number the key is genuinely missing: strict loading must say so, as torch.
    current = trained.state_dict()
    del current["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        theirs_cls(3).load_state_dict(current)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        ours_cls(3).load_state_dict(current)


@pytest.mark.parametrize("family", FAMILIES)
def test_to_float64_moves_parameters_and_buffers(backend, family):
    ours_cls, theirs_cls, shape = FAMILIES[family]
    ours, theirs = ours_cls(3).to(torch.float64), theirs_cls(3).to(torch.float64)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(ours, name).dtype == torch.float64, name
    assert ours.num_batches_tracked.dtype == torch.long
    x = batches(shape, 1, f"to/{family}")[0].double()
    y = ours(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, theirs(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)


# ---- the chapter's BatchNorm ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_features,num_dims,accepted", [(6, 4, (4,)), (120, 2, (2,)), (4, 3, (3,)), (4, 5, (5,)), (4, None, (2, 3, 4, 5))]
)
def test_chapter_batchnorm_accepts_only_its_rank(backend, num_features, num_dims, accepted):
    layer = bnn.BatchNorm(num_features, num_dims=num_dims)
    for rank in (2, 3, 4, 5):
        x = torch.randn(4, num_features, *[2] * (rank - 2))
        if rank in accepted:
            theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                      5: torch.nn.BatchNorm3d}[rank](num_features)
            torch.testing.assert_close(layer(x), theirs(x))
        else:
            with pytest.raises(ValueError, match=f"got {rank}D"):
                layer(x)


def test_chapter_batchnorm_aliases_are_the_torch_named_tensors():
    layer = bnn.BatchNorm(6, num_dims=4)
    assert layer.gamma is layer.weight and layer.beta is layer.bias
    assert layer.moving_mean is layer.running_mean and layer.moving_var is layer.running_var
    assert isinstance(layer.gamma, torch.nn.Parameter)
    assert layer.gamma.shape == (6,) and bool((layer.gamma == 1).all()) and bool((layer.beta == 0).all())
    # The aliases follow the tensors: after .to() and load_state_dict they still name the live ones.
    layer = layer.to(torch.float64)
    assert layer.gamma is layer.weight and layer.moving_var.dtype == torch.float64
    # The chapter's defaults are torch's: momentum 0.1 (the chapter's 0.9), eps 1e-5.
    assert layer.momentum == pytest.approx(convert_momentum(0.9, "d2l")) and layer.eps == 1e-5


@pytest.mark.parametrize("make", [lambda: bnn.BatchNorm(3, num_dims=4), lambda: bnn.BatchNorm2d(3)],
                         ids=["chapter-BatchNorm", "BatchNorm2d"])
def test_prediction_follows_eval_not_no_grad(backend, make):
    layer, reference = make(), torch.nn.BatchNorm2d(3)
    x = batches((4, 3, 3, 3), 1, "nograd")[0]
    # Train mode under no_grad: batch statistics, and the running statistics move (as torch).
    with torch.no_grad():
        y, y_ref = layer(x), reference(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    assert not torch.equal(layer.running_mean, torch.zeros(3))
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert int(layer.num_batches_tracked) == 1
    # Eval mode with gradients on: running statistics, nothing updated.
    layer.eval(), reference.eval()
    before = layer.running_mean.clone()
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(layer(xg), reference(x))
    assert torch.equal(layer.running_mean, before) and int(layer.num_batches_tracked) == 1


# ---- lazy layers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", LAZY)
def test_lazy_layer_infers_num_features_and_matches_torch(backend, family, config):
    ours_lazy, theirs_lazy = LAZY[family]
    target = FAMILIES[family][0]
    shape = (4, 5, *FAMILIES[family][2][2:])
    ours, theirs = ours_lazy(**config), theirs_lazy(**config)
    assert ours.has_uninitialized_params() == theirs.has_uninitialized_params()
    for step, x in enumerate(batches(shape, 2, f"lazy/{family}")):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2, msg=lambda m: f"step {step} output: {m}")
        y1.pow(2).sum().backward()
        y2.pow(2).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert type(ours) is target, f"became {type(ours).__name__}, expected {target.__name__}"
    assert ours.num_features == 5
    assert list(ours.state_dict()) == list(theirs.state_dict())
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-5, atol=1e-5)


def test_lazy_layer_rejects_wrong_rank_before_materializing():
    layer = bnn.LazyBatchNorm2d()
    with pytest.raises(ValueError, match="got 3D"):
        layer(torch.randn(2, 3, 4))
    assert layer.has_uninitialized_params()
    layer(torch.randn(2, 3, 4, 4))
    assert type(layer) is bnn.BatchNorm2d and layer.weight.shape == (3,)


# ---- convert ------------------------------------------------------------------------------------------------------


def _torch_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5), torch.nn.BatchNorm1d(5, momentum=None), torch.nn.ReLU(),
        torch.nn.Linear(5, 2),
    )


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, (bnn.BatchNormBase, torch.nn.modules.batchnorm._BatchNorm))]


def _train_step(model, opt, x):
    opt.zero_grad()
    out = model(x)
    out.pow(2).sum().backward()
    opt.step()
    return out.detach()


def test_convert_torch_model_to_bnlab_and_back(backend):
    model = _torch_model()
    data = batches((8, 2, 6, 6), 4, "convert")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train_step(model, opt, data[0])  # non-trivial state
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)

    params_before = [id(p) for p in model.parameters()]
    buffers_before = [id(b) for b in model.buffers()]
    converted = bnn.convert(model, to="bnlab")
    assert converted is model  # children replaced in place
    assert [type(m) for m in _bn_layers(converted)] == [bnn.BatchNorm2d, bnn.BatchNorm1d]
    assert not any(type(m).__module__.startswith("torch.nn") for m in _bn_layers(converted))
    assert [id(p) for p in converted.parameters()] == params_before, "parameters must be the same objects"
    assert [id(b) for b in converted.buffers()] == buffers_before, "buffers must be the same tensors"
    assert converted[5].momentum is None and converted[5].training
    torch.testing.assert_close(converted.state_dict(), reference.state_dict())

    # Train with the optimizer built before the conversion: it still drives the converted model.
    for x in data[1:3]:
        torch.testing.assert_close(_train_step(converted, opt, x), _train_step(reference, ref_opt, x),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted.state_dict(), reference.state_dict(), rtol=1e-5, atol=1e-5)
    converted.eval(), reference.eval()
    torch.testing.assert_close(converted(data[3]), reference(data[3]), rtol=1e-5, atol=1e-5)

    back = bnn.convert(converted, to="torch")
    assert [type(m) for m in _bn_layers(back)] == [torch.nn.BatchNorm2d, torch.nn.BatchNorm1d]
    assert [id(p) for p in back.parameters()] == params_before
    assert not back[1].training
    torch.testing.assert_close(back(data[3]), reference(data[3]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_dims,expected", [(2, torch.nn.BatchNorm1d), (3, torch.nn.BatchNorm1d),
                                               (4, torch.nn.BatchNorm2d), (5, torch.nn.BatchNorm3d)])
def test_convert_chapter_batchnorm_to_torch(num_dims, expected):
    layer = bnn.BatchNorm(3, num_dims=num_dims, momentum=0.2, eps=1e-3)
    root = bnn.convert(layer, to="torch")
    assert type(root) is expected and root.weight is layer.weight and root.running_var is layer.running_var
    assert root.momentum == 0.2 and root.eps == 1e-3


def test_convert_chapter_batchnorm_without_num_dims_to_torch_raises():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), bnn.BatchNorm(3))
    with pytest.raises(ValueError, match="num_dims"):
        bnn.convert(model, to="torch")


@pytest.mark.parametrize("config", CONFIGS)
def test_convert_keeps_configuration(backend, config):
    torch_layer = torch.nn.BatchNorm1d(3, eps=1e-3, momentum=0.3, **config)
    ours = bnn.convert(torch_layer, to="bnlab")
    assert type(ours) is bnn.BatchNorm1d
    for attr in ("eps", "momentum", "affine", "track_running_stats", "num_features"):
        assert getattr(ours, attr) == getattr(torch_layer, attr), attr
    assert (ours.bias is None) == (torch_layer.bias is None)
    x = torch.randn(6, 3)
    torch.testing.assert_close(ours(x), copy.deepcopy(torch_layer)(x))


def test_convert_lazy_layers_both_ways():
    model = torch.nn.Sequential(torch.nn.LazyBatchNorm2d())
    converted = bnn.convert(model, to="bnlab")
    assert type(converted[0]) is bnn.LazyBatchNorm2d
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(converted(x), torch.nn.LazyBatchNorm2d()(x))
    assert type(converted[0]) is bnn.BatchNorm2d
    back = bnn.convert(torch.nn.Sequential(bnn.LazyBatchNorm1d()), to="torch")
    assert type(back[0]) is torch.nn.LazyBatchNorm1d


# ---- convert_momentum ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "momentum,source,target,expected",
    [(0.99, "keras", "torch", 0.01), (0.9, "d2l", "torch", 0.1), (0.9, "mxnet", "torch", 0.1),
     (0.99, "flax", "torch", 0.01), (0.1, "torch", "torch", 0.1), (0.3, "pytorch", "bnlab", 0.3),
     (0.1, "torch", "mxnet", 0.9), (0.99, "keras", "d2l", 0.99), (0.9, "Keras", "TORCH", 0.1),
     (0.0, "keras", "torch", 1.0), (1.0, "torch", "keras", 0.0)],
)
def test_convert_momentum(momentum, source, target, expected):
    assert convert_momentum(momentum, source, target) == pytest.approx(expected, abs=1e-12)


def test_convert_momentum_defaults_to_torch_and_drives_a_keras_style_average():
    momentum = convert_momentum(0.99, "keras")
    assert momentum == pytest.approx(0.01)
    layer = bnn.BatchNorm1d(2, momentum=momentum, dtype=torch.float64)
    keras_mean = torch.zeros(2, dtype=torch.float64)
    for x in batches((16, 2), 3, "keras"):
        x = x.double()
        layer(x)
        keras_mean = 0.99 * keras_mean + (1 - 0.99) * x.mean(0)  # Keras' own update rule
    torch.testing.assert_close(layer.running_mean, keras_mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args,fragments", [
    ((0.9, "caffe"), ["unknown momentum convention", "'caffe'", "keras"]),
    ((0.9, "torch", "theano"), ["unknown momentum convention", "'theano'"]),
    ((1.5, "keras"), ["[0, 1]", "1.5"]),
    ((-0.1, "torch"), ["[0, 1]", "-0.1"]),
])
def test_convert_momentum_rejects_bad_input(args, fragments):
    with pytest.raises(ValueError) as info:
        convert_momentum(*args)
    for f in fragments:
        assert f in str(info.value)


# The constructor signature of every public layer class in bnlab.nn: (name, kind, default), recorded from
# the explicit signatures before the layers that only add options took batch norm's arguments through
# (BatchNormBase.__init_subclass__ now builds theirs); help() and inspect.signature must not change.
_REQUIRED = inspect.Parameter.empty
_POS, _KW = "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY"
_BN_AFTER_C = [("eps", _POS, 1e-5), ("momentum", _POS, 0.1), ("affine", _POS, True),
               ("track_running_stats", _POS, True), ("device", _POS, None), ("dtype", _POS, None),
               ("bias", _KW, True)]
_BN = [("num_features", _POS, _REQUIRED), *_BN_AFTER_C]
_INSTANCE = [("num_features", _POS, _REQUIRED), ("eps", _POS, 1e-5), ("momentum", _POS, 0.1),
             ("affine", _POS, False), ("track_running_stats", _POS, False), ("device", _POS, None),
             ("dtype", _POS, None), ("bias", _KW, True)]
_FROZEN = [("num_features", _POS, _REQUIRED), ("eps", _POS, 1e-5), ("device", _POS, None), ("dtype", _POS, None)]
_RENORM = [*_BN, ("r_max", _KW, 3.0), ("d_max", _KW, 5.0), ("warmup_steps", _KW, 5000),
           ("r_max_steps", _KW, 40000), ("d_max_steps", _KW, 25000)]
SIGNATURES = {
    "BatchNormBase": _BN, "BatchNorm1d": _BN, "BatchNorm2d": _BN, "BatchNorm3d": _BN,
    "BatchNorm": [("num_features", _POS, _REQUIRED), ("num_dims", _POS, None), ("args", "VAR_POSITIONAL", _REQUIRED),
                  ("kwargs", "VAR_KEYWORD", _REQUIRED)],
    "LazyBatchNorm1d": _BN_AFTER_C, "LazyBatchNorm2d": _BN_AFTER_C, "LazyBatchNorm3d": _BN_AFTER_C,
    "SyncBatchNorm": [*_BN[:5], ("process_group", _POS, None), *_BN[5:]],
    "LayerNorm": [("normalized_shape", _POS, _REQUIRED), ("eps", _POS, 1e-5), ("elementwise_affine", _POS, True),
                  ("bias", _POS, True), ("device", _POS, None), ("dtype", _POS, None)],
    "GroupNorm": [("num_groups", _POS, _REQUIRED), ("num_channels", _POS, _REQUIRED), ("eps", _POS, 1e-5),
                  ("affine", _POS, True), ("device", _POS, None), ("dtype", _POS, None), ("bias", _KW, True)],
    "InstanceNorm1d": _INSTANCE, "InstanceNorm2d": _INSTANCE, "InstanceNorm3d": _INSTANCE,
    "MeanOnlyBatchNorm1d": _BN, "MeanOnlyBatchNorm2d": _BN,
    "VarianceOnlyBatchNorm1d": _BN, "VarianceOnlyBatchNorm2d": _BN,
    "FrozenBatchNorm": _FROZEN, "FrozenBatchNorm1d": _FROZEN, "FrozenBatchNorm2d": _FROZEN,
    "FrozenBatchNorm3d": _FROZEN,
    "BatchRenorm1d": _RENORM, "BatchRenorm2d": _RENORM,
    "GhostBatchNorm1d": [*_BN, ("ghost_batch_size", _KW, 32)],
    "GhostBatchNorm2d": [*_BN, ("ghost_batch_size", _KW, 32)],
    "DecorrelatedBatchNorm2d": [*_BN, ("group_size", _KW, 16)],
    "IterNorm2d": [*_BN, ("group_size", _KW, 64), ("iterations", _KW, 5)],
    "PITNorm1d": [*_BN, ("num_quantiles", _KW, 64)], "PITNorm2d": [*_BN, ("num_quantiles", _KW, 64)],
}


def test_the_signature_table_covers_every_public_layer():
    layers = {name for name in bnn.__all__ if isinstance(getattr(bnn, name), type)
              and issubclass(getattr(bnn, name), torch.nn.Module)}
    assert layers == set(SIGNATURES)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_layer_signature_lists_every_argument_with_its_default(name):
    params = inspect.signature(getattr(bnn, name)).parameters.values()
    assert [(p.name, p.kind.name, p.default) for p in params] == SIGNATURES[name]


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_layer_rejects_an_unknown_keyword_argument(name):
    required = [4 for n, kind, default in SIGNATURES[name] if kind == _POS and default is _REQUIRED]
    getattr(bnn, name)(*required)  # the required arguments alone build it
    with pytest.raises(TypeError, match="no_such_option"):
        getattr(bnn, name)(*required, no_such_option=1)
