"""bnlab in the PyTorch 2 stack: one table of layer x mode x {train, eval} x {compiled kernels, pure PyTorch}.

Each case runs a layer through one of torch's graph tools and compares what comes out — outputs, input
and parameter gradients, running statistics and num_batches_tracked, step after step — with torch's
layer where torch has one and with eager bnlab otherwise:

- compile: ``torch.compile(layer, fullgraph=True)`` with the aot_eager backend: Dynamo, fake tensors,
  functionalization and AOTAutograd, everything but inductor's code generation (the expensive part on
  two cores, exercised by the ``inductor`` rows and the BN-LeNet training test). The table's inputs
  are small, so training batch norm is handed to torch's own op there, as it is for any input below
  ``INDUCTOR_FUSES_BELOW`` elements; compile-own-ops runs the same case with the hand-over off: the
  kernels' operator, or plain tensor ops under ``BNLAB_KERNELS=torch``;
- export: ``torch.export.export(layer, (x,)).module()``;
- onnx (eval): ``torch.onnx.export`` then onnxruntime;
- grad: ``torch.func.grad`` through ``functional_call`` (train mode without running statistics);
- vmap (eval): ``torch.func.vmap`` over a stack of inputs;
- the rest of the stack a swapped-in layer meets: autocast, the meta device, deepcopy/pickle/torch.save.

A case that cannot work is not skipped: it is in `LIMITATIONS`, and a test pins the error it raises.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import pickle
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import bnlab.nn
from bnlab import functional as bF
from bnlab.models import build_model

TOL = dict(rtol=1e-4, atol=1e-5)


@dataclass(frozen=True)
class LayerCase:
    make: Callable[..., torch.nn.Module]  # bnlab's layer; keyword arguments override the case's
    shape: tuple
    peer: Optional[Callable[..., torch.nn.Module]] = None  # torch's layer, when torch has one
    tracks_state: bool = True  # training updates running state (torch.func then needs it switched off)


def _bn(cls, *args, **kwargs):
    return lambda **overrides: cls(*args, **{**kwargs, **overrides})


LAYERS = {
    "BatchNorm1d": LayerCase(_bn(bnlab.nn.BatchNorm1d, 3), (6, 3), _bn(torch.nn.BatchNorm1d, 3)),
    "BatchNorm1d-NCL": LayerCase(_bn(bnlab.nn.BatchNorm1d, 3), (4, 3, 5), _bn(torch.nn.BatchNorm1d, 3)),
    "BatchNorm2d": LayerCase(_bn(bnlab.nn.BatchNorm2d, 3), (4, 3, 3, 3), _bn(torch.nn.BatchNorm2d, 3)),
    "BatchNorm2d-cumulative": LayerCase(
        _bn(bnlab.nn.BatchNorm2d, 3, momentum=None), (4, 3, 3, 3), _bn(torch.nn.BatchNorm2d, 3, momentum=None)
    ),
    "BatchNorm2d-no-stats": LayerCase(
        _bn(bnlab.nn.BatchNorm2d, 3, track_running_stats=False), (4, 3, 3, 3),
        _bn(torch.nn.BatchNorm2d, 3, track_running_stats=False), tracks_state=False,
    ),
    "BatchNorm2d-no-affine": LayerCase(
        _bn(bnlab.nn.BatchNorm2d, 3, affine=False), (4, 3, 3, 3), _bn(torch.nn.BatchNorm2d, 3, affine=False)
    ),
    "BatchNorm3d": LayerCase(_bn(bnlab.nn.BatchNorm3d, 2), (2, 2, 2, 3, 3), _bn(torch.nn.BatchNorm3d, 2)),
    "BatchNorm-chapter": LayerCase(_bn(bnlab.nn.BatchNorm, 3, num_dims=4), (4, 3, 3, 3), _bn(torch.nn.BatchNorm2d, 3)),
    "SyncBatchNorm": LayerCase(_bn(bnlab.nn.SyncBatchNorm, 3), (4, 3, 3, 3), _bn(torch.nn.BatchNorm2d, 3)),
    "LayerNorm": LayerCase(_bn(bnlab.nn.LayerNorm, [3, 3]), (4, 3, 3, 3), _bn(torch.nn.LayerNorm, [3, 3]), False),
    "GroupNorm": LayerCase(_bn(bnlab.nn.GroupNorm, 2, 4), (4, 4, 3, 3), _bn(torch.nn.GroupNorm, 2, 4), False),
    "InstanceNorm2d": LayerCase(
        _bn(bnlab.nn.InstanceNorm2d, 3, affine=True, track_running_stats=True), (4, 3, 3, 3),
        _bn(torch.nn.InstanceNorm2d, 3, affine=True, track_running_stats=True),
    ),
    "MeanOnlyBatchNorm2d": LayerCase(_bn(bnlab.nn.MeanOnlyBatchNorm2d, 3), (4, 3, 3, 3)),
    "VarianceOnlyBatchNorm2d": LayerCase(_bn(bnlab.nn.VarianceOnlyBatchNorm2d, 3), (4, 3, 3, 3)),
    "FrozenBatchNorm2d": LayerCase(_bn(bnlab.nn.FrozenBatchNorm2d, 3), (4, 3, 3, 3), tracks_state=False),
    "BatchRenorm2d": LayerCase(_bn(bnlab.nn.BatchRenorm2d, 3, warmup_steps=0, r_max_steps=4, d_max_steps=4),
                               (4, 3, 3, 3)),
    "GhostBatchNorm2d": LayerCase(_bn(bnlab.nn.GhostBatchNorm2d, 3, ghost_batch_size=2), (4, 3, 3, 3)),
    "DecorrelatedBatchNorm2d": LayerCase(_bn(bnlab.nn.DecorrelatedBatchNorm2d, 4, group_size=2), (4, 4, 3, 3)),
    "IterNorm2d": LayerCase(_bn(bnlab.nn.IterNorm2d, 4, group_size=2), (4, 4, 3, 3)),
    "PITNorm2d": LayerCase(_bn(bnlab.nn.PITNorm2d, 3, num_quantiles=8), (4, 3, 3, 3)),
}

# (layer, mode, training) cases that cannot work, each with the error it raises and why. Pinned by
# test_limitations; the table test refuses to run them, so an entry that starts working fails loudly.
LIMITATIONS = {
    ("PITNorm2d", "onnx", False): (
        Exception, "ndtri",
        "PIT maps ranks through the inverse normal CDF; ONNX has no such operator (nor erfinv). "
        "Deploy PIT models with torch.export instead.",
    ),
    ("BatchRenorm2d", "grad", True): (
        ValueError, "needs track_running_stats=True",
        "batch renorm corrects the batch statistics towards the running ones, so it has no training "
        "mode without them; under torch.func train it in eval mode or use batch norm.",
    ),
}

MODES = ("compile", "compile-own-ops", "export", "onnx", "grad", "vmap")
EVAL_ONLY = {"onnx", "vmap"}


def _cases():
    for name in LAYERS:
        for mode in MODES:
            for training in (True, False):
                if training and mode in EVAL_ONLY or (name, mode, training) in LIMITATIONS:
                    continue
                yield pytest.param(name, mode, training, id=f"{name}-{mode}-{'train' if training else 'eval'}")


def _input(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 2 + 1


def _pair(name: str, training: bool, without_stats: bool = False):
    """(bnlab's layer, the reference: torch's layer or an eager twin), with the same state and mode;
    the state is moved off its initial values so that eval mode is not the identity. torch.func's
    training cases ask `without_stats`: torch.func refuses in-place buffer updates, torch's layer's as
    ours (`test_functional_call_trains_with_statistics` shows bnlab's way around)."""
    case = LAYERS[name]
    overrides = {"track_running_stats": False} if without_stats and case.tracks_state else {}
    torch.manual_seed(0)
    ours = case.make(**overrides)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
        ours.train()(_input(case.shape, 99))
    reference = case.peer(**overrides) if case.peer else copy.deepcopy(ours)
    reference.load_state_dict(ours.state_dict())
    return ours.train(training), reference.train(training)


def _compare_state(ours, reference, what: str, tol=TOL):
    for (key, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {key} differs\n{m}")


def _compare_steps(run_ours, ours, reference, shape, steps: int, tol=TOL):
    """`steps` forward + backward steps of `run_ours` against the reference layer, all compared."""
    for step in range(steps):
        x = _input(shape, step)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_ref = run_ours(x_ours), reference(x_ref)
        torch.testing.assert_close(y_ours, y_ref, **tol)
        weights = torch.linspace(-1, 1, y_ref.numel()).reshape(y_ref.shape)  # a non-uniform upstream grad
        (y_ours * weights).sum().backward()
        (y_ref * weights).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)
        for (key, p), (_, q) in zip(ours.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"grad of {key}, step {step}\n{m}")
        _compare_state(ours, reference, f"step {step}", tol)


def _run_compile(ours, reference, shape, training, tol=TOL):
    torch._dynamo.reset()  # every case traces afresh, under the backend the fixture chose
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    _compare_steps(compiled, ours, reference, shape, steps=2, tol=tol)


@contextlib.contextmanager
def _own_graph_ops(enabled: bool = True):
    """Compile bnlab's own graph forms at every input size: no hand-over of small training inputs to
    torch's batch norm (see `bnlab.functional.batch_norm._batch_norm_in_graph`). Does nothing when not
    `enabled`, for tests parametrized both ways."""
    module = importlib.import_module("bnlab.functional.batch_norm")
    threshold = module.INDUCTOR_FUSES_BELOW
    module.INDUCTOR_FUSES_BELOW = 0 if enabled else threshold
    try:
        yield
    finally:
        module.INDUCTOR_FUSES_BELOW = threshold


def _run_compile_own_ops(ours, reference, shape, training, tol=TOL):
    with _own_graph_ops():
        _run_compile(ours, reference, shape, training, tol)


def _run_export(ours, reference, shape, training):
    program = torch.export.export(ours, (_input(shape, 7),))
    module = program.module()
    for step in range(2):
        x = _input(shape, step)
        torch.testing.assert_close(module(x), reference(x), **TOL)
        for key, value in reference.state_dict().items():  # the exported module's own copy of the state
            torch.testing.assert_close(module.state_dict()[key], value, **TOL, msg=lambda m: f"{key}\n{m}")


def _run_onnx(ours, reference, shape, training):
    import onnxruntime

    x = _input(shape, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(ours, (x,), dynamo=True, verbose=False)
    domains = {op.domain for op in program.model_proto.opset_import}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), reference(x).detach(), **TOL)


def _run_grad(ours, reference, shape, training):
    params = {k: v.detach() for k, v in ours.named_parameters()}
    buffers = dict(ours.named_buffers())
    x = _input(shape, 5)
    weights = torch.linspace(-1, 1, x.numel()).reshape(x.shape)

    def loss(params, x):
        return (torch.func.functional_call(ours, {**params, **buffers}, (x,)) * weights).sum()

    grads, grad_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    x_ref = x.clone().requires_grad_()
    (reference(x_ref) * weights).sum().backward()
    torch.testing.assert_close(grad_x, x_ref.grad, **TOL)
    for key, p in reference.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, **TOL)


def _run_vmap(ours, reference, shape, training):
    xs = torch.stack([_input(shape, 1), _input(shape, 2)])
    expected = torch.stack([reference(x) for x in xs])
    torch.testing.assert_close(torch.func.vmap(ours)(xs), expected, **TOL)


RUNNERS = {"compile": _run_compile, "compile-own-ops": _run_compile_own_ops, "export": _run_export, "onnx": _run_onnx, "grad": _run_grad, "vmap": _run_vmap}


@pytest.mark.parametrize("name, mode, training", list(_cases()))
def test_layer_in_graph(name, mode, training, backend):
    ours, reference = _pair(name, training, without_stats=mode == "grad" and training)
    RUNNERS[mode](ours, reference, LAYERS[name].shape, training)


# ---- what cannot work: pinned errors, and the list cannot rot ------------------------------------------


@pytest.mark.parametrize("key", list(LIMITATIONS), ids=lambda k: "-".join(map(str, k)))
def test_limitations(key):
    name, mode, training = key
    error, match, _why = LIMITATIONS[key]
    with pytest.raises(error, match=match):
        ours, reference = _pair(name, training, without_stats=mode == "grad" and training)
        RUNNERS[mode](ours, reference, LAYERS[name].shape, training)


def test_onnx_export_writes_standard_batch_normalization():
    layer = bnlab.nn.BatchNorm2d(3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(layer, (torch.randn(2, 3, 4, 4),), dynamo=True, verbose=False, optimize=False)
    assert [node.op_type for node in program.model_proto.graph.node] == ["BatchNormalization"]


# ---- inductor, double backward, the other torch.func transforms --------------------------------------

INDUCTOR_CASES = [("BatchNorm2d", True), ("BatchNorm2d-cumulative", True), ("BatchNorm1d", False)]


@pytest.mark.parametrize("own_ops", [False, True], ids=["", "own-ops"])
@pytest.mark.parametrize("name, training", INDUCTOR_CASES, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in INDUCTOR_CASES])
def test_layer_under_inductor(name, training, own_ops, backend):
    """torch.compile's default backend, code generation included, on the batch-norm rows; with and
    without the hand-over of small training inputs to torch's op."""
    ours, reference = _pair(name, training)
    torch._dynamo.reset()
    with _own_graph_ops(own_ops):
        _compare_steps(torch.compile(ours), ours, reference, LAYERS[name].shape, steps=2)


def _second_derivative(layer, x):
    (grad,) = torch.autograd.grad((layer(x) ** 3).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad((grad ** 2).sum(), x)
    return second


@pytest.mark.parametrize("own_ops", [False, True], ids=["", "own-ops"])
def test_double_backward_through_compile(own_ops, backend):
    """Dynamo's graph keeps autograd eager, so double backward works; AOTAutograd (the aot_eager and
    inductor backends) refuses double backward for every module, torch's batch norm included, and
    bnlab's raises the same error."""
    ours, reference = _pair("BatchNorm2d", True)
    x = _input(LAYERS["BatchNorm2d"].shape, 0)
    torch._dynamo.reset()
    expected = _second_derivative(reference, x.clone().requires_grad_())
    with _own_graph_ops(own_ops):
        compiled = torch.compile(ours, fullgraph=True, backend="eager")
        torch.testing.assert_close(_second_derivative(compiled, x.clone().requires_grad_()), expected, **TOL)
        for layer in (ours, reference):
            torch._dynamo.reset()
            with pytest.raises(RuntimeError, match="does not currently support double backward"):
                _second_derivative(torch.compile(layer, backend="aot_eager"), x.clone().requires_grad_())


def _traced_operators(layer, x) -> list:
    """The functions called in the graph Dynamo hands its backend for one training call of `layer`."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend=record)(x)
    return seen


@pytest.mark.parametrize("size, own_ops", [("small", False), ("small", True), ("threshold", False)],
                         ids=["small", "small-own-ops", "threshold"])
def test_compile_hands_small_training_inputs_to_torch(size, own_ops, backend):
    """Below INDUCTOR_FUSES_BELOW elements a compiled training graph holds torch's batch norm, which
    inductor fuses; from there up (or with the hand-over off) bnlab's own form: the kernels' operator,
    or plain tensor ops under BNLAB_KERNELS=torch."""
    threshold = importlib.import_module("bnlab.functional.batch_norm").INDUCTOR_FUSES_BELOW
    elements = 48 if size == "small" else threshold
    x = torch.randn(elements // 4, 4)
    with _own_graph_ops(own_ops):
        operators = _traced_operators(bnlab.nn.BatchNorm1d(4), x)
    handed_over = size == "small" and not own_ops
    assert (torch.nn.functional.batch_norm in operators) == handed_over, operators
    kernels_operator = torch.ops.bnlab.batch_norm_forward in operators
    assert kernels_operator == (not handed_over and backend == "compiled"), operators


@pytest.mark.parametrize("transform", ["vjp", "jacrev", "jacfwd"])
@pytest.mark.parametrize("training", [True, False], ids=["train-no-stats", "eval"])
def test_func_transforms(transform, training, backend):
    ours, reference = _pair("BatchNorm2d", training, without_stats=training)
    x = _input((3, 3, 2, 2), 4)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    buffers = dict(ours.named_buffers())

    def f(weight, x):
        return torch.func.functional_call(ours, {**params, "weight": weight, **buffers}, (x,))

    def f_ref(weight, x):
        return torch.func.functional_call(reference, {**params, "weight": weight, **buffers}, (x,))

    if transform == "vjp":
        cotangent = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
        ours_out = torch.func.vjp(f, params["weight"], x)[1](cotangent)
        ref_out = torch.func.vjp(f_ref, params["weight"], x)[1](cotangent)
    else:
        jac = getattr(torch.func, transform)
        ours_out = jac(f, argnums=(0, 1))(params["weight"], x)
        ref_out = jac(f_ref, argnums=(0, 1))(params["weight"], x)
    torch.testing.assert_close(ours_out, ref_out, **TOL)


# ---- pure training steps under torch.func keep their running statistics ------------------------------


def _pure_sgd_steps(model, batches, lr=0.1):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss_fn(params, buffers, x, y):
        out, new_buffers = bnlab.nn.functional_call(model, {**params, **buffers}, (x,))
        return torch.nn.functional.cross_entropy(out, y), new_buffers

    for x, y in batches:
        grads, new_buffers = torch.func.grad(loss_fn, has_aux=True)(params, buffers, x, y)
        params = {k: p - lr * grads[k] for k, p in params.items()}
        buffers = {**buffers, **new_buffers}
    return params, buffers


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("implementation", ["bnlab", "torch"])
def test_functional_call_trains_with_statistics(implementation, momentum, backend):
    """Three pure SGD steps under torch.func.grad end where three eager steps of torch's layers do:
    the same parameters, running statistics and batch counts, and the model itself is untouched."""
    norm = {"bnlab": bnlab.nn.BatchNorm1d, "torch": torch.nn.BatchNorm1d}[implementation]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), norm(5, momentum=momentum), torch.nn.ReLU(),
                                torch.nn.Linear(5, 3))
    eager = copy.deepcopy(model) if implementation == "torch" else bnlab.nn.convert(copy.deepcopy(model), to="torch")
    before = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    params, buffers = _pure_sgd_steps(model, batches)
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(eager(x), y).backward()
        optimizer.step()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close((params | buffers)[key], value, **TOL, msg=lambda m: f"{key}\n{m}")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"functional_call changed the model's {key}"


def test_functional_call_refuses_state_it_cannot_return():
    model = torch.nn.Sequential(bnlab.nn.BatchRenorm1d(3))
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with pytest.raises(ValueError, match="BatchRenorm1d.*eval mode or build it with track_running_stats=False"):
        bnlab.nn.functional_call(model, state, (torch.randn(4, 3),))


# ---- whole models ----------------------------------------------------------------------------------------


def _resnet_style():
    """A small residual CNN built with torch's layers, then converted to bnlab's."""

    class Block(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(channels)
            self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(channels)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), Block(4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 10))
    return bnlab.nn.convert(net, to="bnlab")


MODELS = {"bn-lenet": lambda: build_model("bn-lenet"), "resnet-style": _resnet_style}
MODEL_INPUT = (4, 1, 28, 28)


def _model_pair(name, training):
    torch.manual_seed(0)
    ours = MODELS[name]()
    with torch.no_grad():
        ours.train()(_input(MODEL_INPUT, 99))
    return ours.train(training), bnlab.nn.convert(copy.deepcopy(ours), to="torch").train(training)


MODEL_CASES = [(mode, training) for mode in ("compile", "compile-own-ops", "export", "onnx", "vmap")
               for training in (True, False) if not (training and mode in EVAL_ONLY)]


@pytest.mark.parametrize("mode, training", MODEL_CASES, ids=[f"{m}-{'train' if t else 'eval'}" for m, t in MODEL_CASES])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_in_graph(name, mode, training, backend):
    ours, reference = _model_pair(name, training)
    if mode.startswith("compile"):  # gradients of whole networks sum over more terms than one layer's
        RUNNERS[mode](ours, reference, MODEL_INPUT, training, tol=dict(rtol=1e-3, atol=1e-4))
    else:
        RUNNERS[mode](ours, reference, MODEL_INPUT, training)


@pytest.mark.parametrize("own_ops", [False, True], ids=["", "own-ops"])
def test_compiled_bn_lenet_trains_as_eager(own_ops, backend):
    """A whole BN-LeNet training step (forward, loss, backward, SGD) under torch.compile's default
    backend ends five steps where eager bnlab does: losses, parameters and running statistics; with
    and without the hand-over of small training inputs to torch's op."""
    torch.manual_seed(0)
    eager = build_model("bn-lenet")
    compiled = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.rand(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)) for _ in range(5)]
    torch._dynamo.reset()

    def step_fn(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        forward = torch.compile(model) if model is compiled else model

        def step(x, y):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            return loss.item()

        return step

    eager_step, compiled_step = step_fn(eager), step_fn(compiled)
    with _own_graph_ops(own_ops):
        for x, y in batches:
            assert compiled_step(x, y) == pytest.approx(eager_step(x, y), rel=1e-4, abs=1e-5)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{key}\n{m}")


# ---- the operators' contract, and saved programs -----------------------------------------------------


@pytest.mark.parametrize("shape, layout", [((6, 3), "contiguous"), ((4, 3, 3, 3), "contiguous"),
                                           ((4, 3, 3, 3), "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operator_contract(shape, layout, dtype, switch_backend):
    """torch.library.opcheck: schema, fake kernel, autograd registration and AOT dispatch of the
    functional operators, on their sample inputs (the compiled kernels' operators, whatever
    BNLAB_KERNELS the suite runs under; a failed build fails the test)."""
    switch_backend("compiled")
    x = _input(shape, 0).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight, bias = torch.rand(c, dtype=dtype) + 0.5, torch.rand(c, dtype=dtype)
    running = (torch.rand(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5)
    for training in (True, False):
        args = (x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_(),
                *running, training, 1e-5)
        torch.library.opcheck(torch.ops.bnlab.batch_norm_forward.default, args)
        y, stats = torch.ops.bnlab.batch_norm_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        torch.library.opcheck(torch.ops.bnlab.batch_norm_backward.default,
                              (torch.randn_like(y), x, weight, stats, training, True))


_LOAD_SCRIPT = """
import sys, torch
if sys.argv[2] == "with-bnlab":
    import bnlab.kernels
    bnlab.kernels.library()
program = torch.export.load(sys.argv[1])
x = torch.load(sys.argv[1] + ".input")
torch.testing.assert_close(program.module()(x), torch.load(sys.argv[1] + ".output"), rtol=1e-5, atol=1e-6)
print("loaded and matched")
"""


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_save_load_in_a_new_process(training, tmp_path, backend):
    """torch.export.save / load round-trip in a fresh process. An eval-mode program holds only torch's
    operators and loads without bnlab; a training program made with the compiled kernels holds
    bnlab's operator, which the loading process registers with bnlab.kernels.library()."""
    import subprocess
    import sys

    model, _ = _model_pair("bn-lenet", training)
    x = _input(MODEL_INPUT, 3)
    program = torch.export.export(model, (x,))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    torch.save(x, f"{path}.input")
    torch.save(copy.deepcopy(program).module()(x), f"{path}.output")
    needs_bnlab = training and backend == "compiled"
    mode = "with-bnlab" if needs_bnlab else "torch-only"
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path), mode], capture_output=True, text=True)
    assert done.returncode == 0 and "loaded and matched" in done.stdout, done.stderr[-2000:]
    if needs_bnlab:
        bare = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path), "torch-only"], capture_output=True, text=True)
        assert bare.returncode != 0 and "bnlab.batch_norm_forward" in bare.stderr


# ---- the rest of the stack a swapped-in layer meets ------------------------------------------------------


def _state_equal(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)


def _roundtrip_pickle(layer):
    return pickle.loads(pickle.dumps(layer))


def _roundtrip_torch_save(layer):
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, _roundtrip_pickle, _roundtrip_torch_save],
                         ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_copies_keep_state_and_outputs(name, copier):
    ours, _ = _pair(name, False)
    twin = copier(ours)
    _state_equal(ours, twin)
    x = _input(LAYERS[name].shape, 8)
    torch.testing.assert_close(twin(x), ours(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n, case in LAYERS.items() if case.peer is not None])
def test_autocast_output_dtype_as_torch(name, backend):
    ours, reference = _pair(name, True)
    x = _input(LAYERS[name].shape, 0).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == reference(x).dtype


@pytest.mark.parametrize("name", list(LAYERS))
def test_meta_device_and_to_empty(name):
    case = LAYERS[name]
    with torch.device("meta"):
        layer = case.make()
    assert all(t.is_meta for t in layer.state_dict().values())
    layer = layer.to_empty(device="cpu")
    for module in [layer]:
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    reference = case.make()
    reference.load_state_dict(layer.state_dict())
    x = _input(case.shape, 1)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


def test_fuse_conv_bn_eval_with_bnlab_layer():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3).eval(), bnlab.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn(conv(torch.randn(8, 3, 6, 6)))
    bn.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in LAYERS if n.startswith("BatchNorm")])
def test_old_state_dict_without_num_batches_tracked(name):
    """A state dict saved before torch 0.4.1 has no num_batches_tracked; torch's layers load it as 0."""
    ours, _ = _pair(name, False)
    state = ours.state_dict()
    state.pop("num_batches_tracked", None)
    state._metadata[""]["version"] = 1  # how torch marks a state dict from before the counter existed
    fresh = LAYERS[name].make()
    fresh.load_state_dict(state)
    if fresh.num_batches_tracked is not None:
        assert int(fresh.num_batches_tracked) == 0


# ---- the benchmarks' compiled columns run (their figures are reported, never asserted) ------------------


def test_bench_op_compile_columns():
    from bnlab import bench

    (result,) = bench.bench_op([(16, 3, 4, 4)], repeats=1, compile=True)
    assert result.compiled_native_ms > 0 and result.compiled_bnlab_ms > 0
    assert result.compiled_speedup == pytest.approx(result.compiled_native_ms / result.compiled_bnlab_ms)
    assert result.compiled_twin_ratio > 0
    assert "compiled bnlab vs compiled native" in bench.op_markdown([result])
    assert "(A/A)" in bench.op_markdown([result])


def test_compiled_summary_reads_gaps_against_the_twins():
    from bnlab import bench

    def result(shape, speedup, twins):
        return bench.OpResult(shape, "contiguous", *[1.0] * 13, compiled_speedup=speedup, compiled_twin_ratio=twins)

    ahead = [result((4, 3), 1.30, 0.97), result((8, 3), 1.01, 1.04)]
    assert bench.compiled_summary(ahead) == ("compiled bnlab is at least as fast as compiled native on every "
                                             "shape; the identical twins (A/A) came out 0.97x to 1.04x apart in this run")
    behind = ahead + [result((2, 5, 3), 0.96, 1.02)]
    assert bench.compiled_summary(behind) == ("compiled bnlab is behind compiled native on: 2x5x3 (0.96x); the "
                                              "identical twins (A/A) came out 0.97x to 1.04x apart in this run")


def test_bench_train_compiled_models_and_best_mode():
    from types import SimpleNamespace

    from bnlab import bench

    gen = torch.Generator().manual_seed(0)
    dataset = SimpleNamespace(train_images=torch.randint(0, 256, (64, 28, 28), generator=gen, dtype=torch.uint8),
                              train_labels=torch.randint(0, 10, (64,), generator=gen))
    torch._dynamo.reset()
    results = bench.bench_train(dataset, ("bn-lenet", "bn-lenet+compile"), batch_size=16, rounds=1,
                                batches_per_round=1)
    assert [r.model for r in results] == ["bn-lenet", "bn-lenet+compile"]
    assert all(r.examples_per_sec > 0 and r.final_loss == r.final_loss for r in results)
    assert set(bench.best_modes(results)) == {"bn-lenet"}


# ---- SyncBatchNorm compiled with fullgraph in a two-process gloo group ------------------------------------

SYNC_SHARDS = (5, 3)  # unequal shards of a global batch of 8
SYNC_SHAPE = (3, 2, 2)  # (C, H, W) of one sample


def _sync_global_batches():
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(sum(SYNC_SHARDS), *SYNC_SHAPE, generator=gen) * 2 + 1 for _ in range(2)]


def _sync_upstream(shape):
    return torch.linspace(-1, 1, shape[0] * 12).reshape(shape[0], *SYNC_SHAPE)


def _compiled_sync_in_each_process(momentum):
    rank = torch.distributed.get_rank()
    start = sum(SYNC_SHARDS[:rank])
    layer = bnlab.nn.SyncBatchNorm(3, momentum=momentum)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    steps = []
    for batch in _sync_global_batches():
        x = batch[start:start + SYNC_SHARDS[rank]].clone().requires_grad_()
        y = compiled(x)
        (y * _sync_upstream(batch.shape)[start:start + SYNC_SHARDS[rank]]).sum().backward()
        steps.append({"y": y.detach(), "x_grad": x.grad, "w_grad": layer.weight.grad.clone(),
                      "b_grad": layer.bias.grad.clone(), **{k: v.clone() for k, v in layer.state_dict().items()}})
        layer.zero_grad()
    return steps


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_sync_batch_norm_compiled_fullgraph_two_processes(momentum):
    """torch.compile(SyncBatchNorm, fullgraph=True) in each of two gloo processes (torch's own
    SyncBatchNorm breaks the graph there): outputs, input gradients, the summed weight and bias
    gradients and the running statistics equal single-process batch norm on the concatenated batch."""
    from bnlab.distributed import launch

    per_rank = launch(_compiled_sync_in_each_process, 2, args=(momentum,), timeout=300)
    reference = torch.nn.BatchNorm2d(3, momentum=momentum)
    for step, batch in enumerate(_sync_global_batches()):
        x = batch.clone().requires_grad_()
        y = reference(x)
        (y * _sync_upstream(batch.shape)).sum().backward()
        shards = [r[step] for r in per_rank]
        torch.testing.assert_close(torch.cat([s["y"] for s in shards]), y.detach(), **TOL)
        torch.testing.assert_close(torch.cat([s["x_grad"] for s in shards]), x.grad, **TOL)
        torch.testing.assert_close(sum(s["w_grad"] for s in shards), reference.weight.grad, **TOL)
        torch.testing.assert_close(sum(s["b_grad"] for s in shards), reference.bias.grad, **TOL)
        for key, value in reference.state_dict().items():
            for s in shards:
                torch.testing.assert_close(s[key], value, **TOL, msg=lambda m: f"{key}, step {step}\n{m}")
        reference.zero_grad()


def test_bench_turns_shuffle_each_round_reproducibly():
    """Every name once per round, in orders that vary (no name always follows the same one), and the
    same sequence on every run."""
    from bnlab import bench

    names = ["a", "b", "c", "d"]
    sequence = list(bench.turns(names, 30))
    rounds = [sequence[i:i + 4] for i in range(0, len(sequence), 4)]
    assert all(sorted(r) == names for r in rounds)
    assert len({tuple(r) for r in rounds}) > 5
    predecessors = {name: {r[r.index(name) - 1] for r in rounds if r.index(name) > 0} for name in names}
    assert all(len(before) > 1 for before in predecessors.values()), predecessors
    assert list(bench.turns(names, 30)) == sequence
