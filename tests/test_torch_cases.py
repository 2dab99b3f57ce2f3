"""torch's own test cases as the parity oracle (issue 14).

torch ships the cases it holds its own layers to in torch/testing/_internal: `common_modules.module_db`
(constructor and forward inputs per layer, for training and evaluation) and
`common_methods_invocations.op_db` (sample inputs per function). Every entry whose layer or function
bnlab also has -- the same name in ``bnlab.nn.__all__`` or ``bnlab.functional.__all__`` -- is selected
by name, so the cases a future torch adds run here without an edit. Each case runs torch's and bnlab's
on copies of the same inputs, for training and evaluation and in every dtype torch lists for CPU
(bfloat16 and float16 included where it does), and compares the outputs, the input and parameter
gradients, the buffers and the running statistics updated in place, with torch's tolerances for the
dtype (`torch.testing.assert_close`'s defaults) on the distance from torch's own float64 result
(see `_check`).

Empty batches torch's cases leave out (instance norms, lazy layers, empty spatial dims) are held to
torch's layers the same way; layers bnlab has and torch lacks are held to torch's BatchNorm cases, of
the ranks they accept, against the NumPy oracle (`bnlab.reference`).

The helpers need `expecttest` (in the test extra, which scripts/setup.sh installs); without it
`test_torch_case_databases_load` fails saying how to install it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

import bnlab.functional
import bnlab.nn
from bnlab import reference
from cases import assert_close, seed_of

try:
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db
    _IMPORT_ERROR: Optional[Exception] = None
except ImportError as exc:  # reported by test_torch_case_databases_load, not skipped
    module_db, op_db, _IMPORT_ERROR = [], [], exc

DEVICE = "cpu"
STEPS = 2  # two steps per module case: momentum=None's average and num_batches_tracked move twice

# The layers and functions torch's databases cover today; the selection must find at least these.
EXPECTED_MODULES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d",
                    "InstanceNorm2d", "InstanceNorm3d"}
EXPECTED_FUNCTIONS = {"batch_norm", "layer_norm", "group_norm", "instance_norm"}

# torch's cases that bnlab deliberately does not follow, by test id, each with the reason. Every entry
# runs as a strict xfail: one that starts passing fails the suite and must be removed, so the list
# cannot rot. Empty: bnlab follows every case torch ships for these layers and functions.
KNOWN_DIFFERENCES: dict[str, str] = {}


# ---- selecting torch's cases ----------------------------------------------------------------------------


def _peer(namespace, name: str):
    """bnlab's namesake of a torch layer or function, or None."""
    return getattr(namespace, name) if name in namespace.__all__ else None


MODULE_INFOS = [mi for mi in module_db if _peer(bnlab.nn, mi.module_cls.__name__) is not None]
OP_INFOS = [
    op for op in op_db
    if op.name.startswith("nn.functional.") and _peer(bnlab.functional, op.name.rsplit(".", 1)[1]) is not None
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _seeded(key: str, make: Callable[[], Any]) -> Any:
    """`make()` under a seed of its own: torch's input functions draw from the global generator."""
    with torch.random.fork_rng():
        torch.manual_seed(seed_of(key))
        return make()


@dataclass(frozen=True)
class ModuleCase:
    info: Any  # a ModuleInfo
    training: bool
    dtype: torch.dtype
    index: int  # which of the ModuleInfo's inputs
    desc: str

    @property
    def id(self) -> str:
        mode = "train" if self.training else "eval"
        return f"{self.info.name}-{self.index}-{self.desc or 'default'}-{mode}-{_dtype_name(self.dtype)}"

    def module_input(self):
        return _module_inputs(self.info, self.training, self.dtype)[self.index]


def _module_inputs(info, training: bool, dtype: torch.dtype) -> list:
    """torch's ModuleInputs of one entry, mode and dtype (the same tensors on every call)."""
    return _seeded(f"{info.name}-{training}-{dtype}", lambda: info.module_inputs_func(
        info, device=DEVICE, dtype=dtype, requires_grad=True, training=training))


def _module_cases(infos) -> list[ModuleCase]:
    return [ModuleCase(info, training, dtype, i, module_input.desc)
            for info in infos for training in (True, False) for dtype in info.supported_dtypes(DEVICE)
            for i, module_input in enumerate(_module_inputs(info, training, dtype))]


@dataclass(frozen=True)
class OpCase:
    info: Any  # an OpInfo
    dtype: torch.dtype
    index: int  # which of the OpInfo's samples
    shape: tuple[int, ...]

    @property
    def id(self) -> str:
        name = self.info.name + (f".{self.info.variant_test_name}" if self.info.variant_test_name else "")
        return f"{name}-{self.index}-{'x'.join(map(str, self.shape)) or 'scalar'}-{_dtype_name(self.dtype)}"

    @property
    def requires_grad(self) -> bool:
        return self.info.supports_autograd and self.dtype in self.info.supported_backward_dtypes(DEVICE)

    def samples(self) -> list:
        key = f"{self.info.name}-{self.info.variant_test_name}-{self.dtype}"
        return _seeded(key, lambda: list(self.info.sample_inputs(DEVICE, self.dtype, requires_grad=self.requires_grad)))

    def sample(self):
        return self.samples()[self.index]


def _op_cases(infos) -> list[OpCase]:
    cases = []
    for info in infos:
        for dtype in info.supported_dtypes(DEVICE):
            proto = OpCase(info, dtype, 0, ())
            cases += [OpCase(info, dtype, i, tuple(s.input.shape)) for i, s in enumerate(proto.samples())]
    return cases


MODULE_CASES = _module_cases(MODULE_INFOS)
OP_CASES = _op_cases(OP_INFOS)


def _params(cases) -> list:
    """pytest params with ids; a case on KNOWN_DIFFERENCES becomes a strict xfail."""
    params = []
    for case in cases:
        reason = KNOWN_DIFFERENCES.get(case.id)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


# ---- running and comparing -------------------------------------------------------------------------------

# torch.testing.assert_close's default (rtol, atol) per dtype: the tolerances torch's own tests use.
TORCH_TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
                    torch.float64: (1e-7, 1e-7)}


def _copy(value, dtype: Optional[torch.dtype] = None):
    """A fresh copy of a (nested) argument: tensors detached and cloned (floating ones converted to
    `dtype` if given), requires_grad kept."""
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        if dtype is not None and copy.is_floating_point():
            copy = copy.to(dtype)
        return copy.requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v, dtype) for k, v in value.items()}
    return value


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a (nested) argument, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    return []


def _backward(y: torch.Tensor, key: str, dtype: torch.dtype) -> None:
    """Backpropagate a fixed random output gradient, rounded to the case's `dtype` (so that the float64
    truth sees the very values bnlab and torch see)."""
    if y.requires_grad:
        gen = torch.Generator().manual_seed(seed_of(key))
        y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).to(y.dtype))


def _argument_record(arguments) -> dict:
    """What a call left in its tensor arguments: the gradients of those that require one, the values of
    the others (running statistics are updated in place)."""
    return {f"{'gradient of ' if t.requires_grad else ''}tensor argument {i}": t.grad if t.requires_grad else t.detach()
            for i, t in enumerate(_tensors(arguments))}


def _check(actual, expected, truth, what: str) -> None:
    """bnlab's value against torch's, with torch's own float64 computation on the same values as the
    truth: bnlab's error may exceed torch's by torch's tolerance for the dtype, |ours - truth| <=
    |torch - truth| + atol + rtol |truth|. In float64 the truth is torch's result and this is
    assert_close with torch's tolerances; in float32 and half precision it asks bnlab to be as accurate
    as torch rather than to round as torch does. Shapes, dtypes, None and NaN (torch's samples include
    a negative eps) must match exactly, and so must integers (num_batches_tracked)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual!r} where torch has {expected!r}"
        return
    assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype), (
        f"{what}: {tuple(actual.shape)} {actual.dtype} where torch has {tuple(expected.shape)} {expected.dtype}"
    )
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} where torch has {expected}"
        return
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN where torch has none, or the reverse"
    ours, torchs, exact = (v.detach().double()[~nan] for v in (actual, expected, truth))
    rtol, atol = TORCH_TOLERANCES[expected.dtype]
    excess = (ours - exact).abs() - ((torchs - exact).abs() + atol + rtol * exact.abs())
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        raise AssertionError(
            f"{what} ({expected.dtype}): bnlab {ours[i].item():.8g}, torch {torchs[i].item():.8g}, float64 "
            f"truth {exact[i].item():.8g}: bnlab's error exceeds torch's by more than rtol={rtol}, atol={atol} "
            f"({int((excess > 0).sum())} of {excess.numel()} values)"
        )


def _check_records(ours: dict, torchs: dict, truth: dict, what: str) -> None:
    assert list(ours) == list(torchs), f"{what}: bnlab gives {list(ours)} where torch gives {list(torchs)}"
    for name in torchs:
        _check(ours[name], torchs[name], truth[name], f"{what}: {name}")


# ---- torch's module cases ----------------------------------------------------------------------------------


def _state(module: torch.nn.Module) -> dict:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _module_steps(module: torch.nn.Module, forward_input, case: ModuleCase, dtype: Optional[torch.dtype] = None) -> list:
    """The initial state, then per step the output, the gradients of the inputs and parameters, and
    the state after it: `STEPS` forward and backward passes of `module` on (copies of) the input."""
    lazy = getattr(module, "has_uninitialized_params", lambda: False)()  # no state before the first input
    records = [] if lazy else [{f"initial {name}": v for name, v in _state(module).items()}]
    for step in range(STEPS):
        arguments = _copy((forward_input.args, forward_input.kwargs), dtype)
        y = module(*arguments[0], **arguments[1])
        _backward(y, f"{case.id}/{step}", case.dtype)
        record = {"output": y.detach(), **_argument_record(arguments)}
        for name, p in module.named_parameters():
            record[f"gradient of {name}"], p.grad = p.grad, None
        records.append({**record, **{f"{name} after": v for name, v in _state(module).items()}})
    return records


@pytest.mark.parametrize("case", _params(MODULE_CASES))
def test_module_case_matches_torch(backend, case: ModuleCase):
    module_input = case.module_input()
    make = module_input.constructor_input
    ours = _peer(bnlab.nn, case.info.module_cls.__name__)(*make.args, **make.kwargs).to(case.dtype)
    theirs = case.info.module_cls(*make.args, **make.kwargs).to(case.dtype)
    truth = case.info.module_cls(*make.args, **make.kwargs).double()
    runs = [_module_steps(m.train(case.training), module_input.forward_input, case, dtype)
            for m, dtype in ((ours, None), (theirs, None), (truth, torch.float64))]
    for step, (mine, torchs, exact) in enumerate(zip(*runs)):
        _check_records(mine, torchs, exact, f"record {step}")


# ---- torch's function cases --------------------------------------------------------------------------------


def _function_call(fn: Callable, sample, case: OpCase, dtype: Optional[torch.dtype] = None) -> dict:
    """The output of `fn` on (copies of) a sample, and what it left in its tensor arguments."""
    arguments = _copy((sample.input, sample.args, sample.kwargs), dtype)
    y = fn(arguments[0], *arguments[1], **arguments[2])
    _backward(y, case.id, case.dtype)
    return {"output": y.detach(), **_argument_record(arguments)}


@pytest.mark.parametrize("case", _params(OP_CASES))
def test_function_case_matches_torch(backend, case: OpCase):
    sample = case.sample()
    ours = _function_call(_peer(bnlab.functional, case.info.name.rsplit(".", 1)[1]), sample, case)
    theirs = _function_call(case.info.op, sample, case)
    truth = _function_call(case.info.op, sample, case, torch.float64)
    _check_records(ours, theirs, truth, "call")


# ---- empty batches beyond torch's cases ---------------------------------------------------------------------
#
# torch's cases hold an empty batch for BatchNorm, LayerNorm, group_norm and layer_norm only. The rest of
# the family that torch also has, and the other empty shapes data-parallel shards and detection heads
# produce, here: (layer, constructor arguments, input shape), run as the module cases are.
EMPTY_CASES = {
    "InstanceNorm1d-N0": ("InstanceNorm1d", (3,), {}, (0, 3, 5)),
    "InstanceNorm2d-W0-tracking": ("InstanceNorm2d", (3,), {"track_running_stats": True}, (2, 3, 4, 0)),
    "InstanceNorm3d-N0": ("InstanceNorm3d", (3,), {}, (0, 3, 2, 2, 2)),
    "InstanceNorm1d-unbatched-L0": ("InstanceNorm1d", (3,), {"affine": True}, (3, 0)),
    "BatchNorm2d-H0": ("BatchNorm2d", (3,), {}, (4, 3, 0, 2)),
    "BatchNorm3d-N0-cumulative": ("BatchNorm3d", (3,), {"momentum": None}, (0, 3, 2, 2, 2)),
    "BatchNorm1d-N0-not-tracking": ("BatchNorm1d", (3,), {"track_running_stats": False}, (0, 3)),
    "LazyBatchNorm2d-N0": ("LazyBatchNorm2d", (), {}, (0, 3, 2, 2)),
    "GroupNorm-N0": ("GroupNorm", (2, 4), {}, (0, 4, 3)),
    "LayerNorm-N0": ("LayerNorm", ((2, 3),), {}, (0, 5, 2, 3)),
}


@dataclass(frozen=True)
class EmptyCase:
    name: str
    training: bool
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        return f"{self.name}-{'train' if self.training else 'eval'}"


@pytest.mark.parametrize("case", _params([EmptyCase(name, training) for name in EMPTY_CASES for training in (True, False)]))
def test_empty_batch_matches_torch(backend, case: EmptyCase):
    layer, args, kwargs, shape = EMPTY_CASES[case.name]
    forward_input = SimpleNamespace(args=(torch.randn(shape, requires_grad=True),), kwargs={})
    ours = getattr(bnlab.nn, layer)(*args, **kwargs)
    theirs, truth = (getattr(torch.nn, layer)(*args, **kwargs).to(dtype) for dtype in (torch.float32, torch.float64))
    runs = [_module_steps(m.train(case.training), forward_input, case, dtype)
            for m, dtype in ((ours, None), (theirs, None), (truth, torch.float64))]
    for step, (mine, torchs, exact) in enumerate(zip(*runs)):
        _check_records(mine, torchs, exact, f"record {step}")


def test_instance_norm_on_an_empty_batch_is_the_familys_where_torchs_is_broken():
    """The deliberate differences (bnlab.nn.norms' docstring): on N = 0 torch's instance norm averages
    the running statistics over no samples, writing NaN into them, and with a weight fails with an
    IndexError from inside ATen; bnlab gives the family's empty batch."""
    x = torch.randn(0, 3, 4, requires_grad=True)
    with pytest.raises(IndexError):
        torch.nn.InstanceNorm1d(3, affine=True)(x)
    theirs = torch.nn.InstanceNorm1d(3, track_running_stats=True)
    theirs(x)
    assert theirs.running_mean.isnan().all() and theirs.running_var.isnan().all()
    ours = bnlab.nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
    y = ours(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(ours.weight.grad, torch.zeros(3)) and torch.equal(ours.bias.grad, torch.zeros(3))
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))
    assert int(ours.num_batches_tracked) == 0


# ---- bnlab's layers that torch lacks, on torch's BatchNorm cases, against the NumPy oracle -----------------
#
# The lite BNs, batch renorm, ghost batches, whitening and PIT norm share batch norm's constructor, so
# each takes the constructor and forward inputs of torch's BatchNorm cases whose input rank it accepts
# (the 2d-only layers the BatchNorm2d cases, none the 3d ones), empty batches included, in training and
# evaluation. The oracle is `bnlab.reference` (float64 NumPy, no torch) plus batch norm's bookkeeping:
# num_batches_tracked counts training batches, momentum=None averages them, without running statistics
# the batch's are used, and an empty batch gives an empty output and moves no statistic. Compared:
# outputs, running buffers, weight and bias gradients (sum dy * z and sum dy, z the output before the
# affine), and in float64 the input gradient where the oracle derives one (all but whitening, and PIT
# in eval). Not in float32: its cancellation (exact, to 0, for a ghost batch of two) leaves rounding
# noise relative to the terms, not to the result, which no fixed tolerance measures.

OUR_LAYERS = [
    bnlab.nn.MeanOnlyBatchNorm1d, bnlab.nn.MeanOnlyBatchNorm2d, bnlab.nn.VarianceOnlyBatchNorm1d,
    bnlab.nn.VarianceOnlyBatchNorm2d, bnlab.nn.BatchRenorm1d, bnlab.nn.BatchRenorm2d, bnlab.nn.GhostBatchNorm1d,
    bnlab.nn.GhostBatchNorm2d, bnlab.nn.DecorrelatedBatchNorm2d, bnlab.nn.IterNorm2d, bnlab.nn.PITNorm1d,
    bnlab.nn.PITNorm2d,
]
# Options beyond batch norm's constructor: ghost batches of 2 split torch's batches of 4 in two.
LAYER_OPTIONS = {bnlab.nn.GhostBatchNorm1d: {"ghost_batch_size": 2}, bnlab.nn.GhostBatchNorm2d: {"ghost_batch_size": 2}}
# Configurations of torch's cases that one of our layers refuses by design, (layer, case desc) -> why.
# The test checks that the refusal is a ValueError naming the setting.
REFUSED_CONFIGURATIONS = {
    ("BatchRenorm1d", "not_tracking_stats"): "track_running_stats: batch renorm corrects towards the running statistics",
    ("BatchRenorm2d", "not_tracking_stats"): "track_running_stats: batch renorm corrects towards the running statistics",
}

BN_INFOS = [mi for mi in module_db if issubclass(mi.module_cls, torch.nn.modules.batchnorm._BatchNorm) and not mi.is_lazy]


@dataclass(frozen=True)
class LayerCase:
    layer: type
    source: ModuleCase  # the torch BatchNorm case it borrows

    @property
    def id(self) -> str:
        return f"{self.layer.__name__}-from-{self.source.id}"

    @property
    def refusal(self) -> Optional[str]:
        return REFUSED_CONFIGURATIONS.get((self.layer.__name__, self.source.desc))


def _layer_cases() -> list[LayerCase]:
    cases = []
    for source in _module_cases(BN_INFOS):
        rank = source.module_input().forward_input.args[0].dim()
        cases += [LayerCase(layer, source) for layer in OUR_LAYERS if rank in layer.input_dims]
    return cases


LAYER_CASES = _layer_cases()


def _numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """A float64 copy (never a view of a buffer the layer updates in place)."""
    return None if t is None else t.detach().double().numpy().copy()


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


@dataclass
class OracleStep:
    z: np.ndarray  # the output before the affine
    running: dict  # the running buffers after the step (only those the layer has)
    dx: Optional[np.ndarray]  # the input gradient, where the oracle derives one


def _batch_norm_eval(x, dy, gamma, running, layer) -> OracleStep:
    z = reference.forward(x, None, None, running["running_mean"], running["running_var"], False, eps=layer.eps).y
    dx = reference.backward(dy, x, gamma, running["running_mean"], running["running_var"], False, layer.eps)[0]
    return OracleStep(z, running, dx)


def _mean_only(x, dy, gamma, running, use_batch, factor, layer) -> OracleStep:
    ones, zeros = np.ones(x.shape[1]), np.zeros(x.shape[1])
    z, mean, var = reference.mean_only_forward(x, ones, zeros, running.get("running_mean"),
                                               running.get("running_var"), use_batch, factor)
    dx = reference.mean_only_backward(dy, x, gamma, use_batch, running.get("running_mean"))[0]
    return OracleStep(z, {"running_mean": mean, "running_var": var} if running else {}, dx)


def _variance_only(x, dy, gamma, running, use_batch, factor, layer) -> OracleStep:
    ones, zeros = np.ones(x.shape[1]), np.zeros(x.shape[1])
    z, mean, var = reference.variance_only_forward(x, ones, zeros, running.get("running_mean"),
                                                   running.get("running_var"), use_batch, factor, layer.eps)
    dx = reference.variance_only_backward(dy, x, gamma, use_batch, running.get("running_var"), layer.eps)[0]
    return OracleStep(z, {"running_mean": mean, "running_var": var} if running else {}, dx)


def _batch_renorm(x, dy, gamma, running, use_batch, factor, layer) -> OracleStep:
    if not use_batch:
        return _batch_norm_eval(x, dy, gamma, running, layer)
    r_max, d_max = layer.clipping_bounds()  # the bounds of the step just taken (num_batches_tracked)
    ones, zeros = np.ones(x.shape[1]), np.zeros(x.shape[1])
    z, r, _, mean, var = reference.batch_renorm_forward(x, ones, zeros, running["running_mean"],
                                                        running["running_var"], r_max, d_max, factor, layer.eps)
    dx = reference.backward(dy, x, gamma * r, eps=layer.eps)[0]  # r and d are constants for the backward
    return OracleStep(z, {"running_mean": mean, "running_var": var}, dx)


def _ghost_batch_norm(x, dy, gamma, running, use_batch, factor, layer) -> OracleStep:
    """One batch-norm step per ghost batch, in order (the last ghost batch takes the remainder); in
    evaluation batch norm's, over the whole batch when there are no running statistics."""
    if not use_batch:
        return _batch_norm_eval(x, dy, gamma, running, layer)
    size = layer.ghost_batch_size if layer.training else x.shape[0]
    k = max(1, x.shape[0] // size)
    bounds = [i * size for i in range(k)] + [x.shape[0]]
    tracked = (int(layer.num_batches_tracked) - 1) * k if layer.momentum is None and running else 0
    z, dx = np.empty_like(x), np.empty_like(x)
    mean, var = running.get("running_mean"), running.get("running_var")
    for i in range(k):
        rows = slice(bounds[i], bounds[i + 1])
        momentum = 1.0 / (tracked + i + 1) if layer.momentum is None and running else factor
        out = reference.forward(x[rows], None, None, mean, var, True, momentum, layer.eps)
        z[rows], mean, var = out.y, out.running_mean, out.running_var
        dx[rows] = reference.backward(dy[rows], x[rows], gamma, eps=layer.eps)[0]
    return OracleStep(z, {"running_mean": mean, "running_var": var} if running else {}, dx)


def _whitening(method: str):
    def oracle(x, dy, gamma, running, use_batch, factor, layer) -> OracleStep:
        ones, zeros = np.ones(x.shape[1]), np.zeros(x.shape[1])
        z, mean, whitening = reference.whitening_forward(
            x, ones, zeros, layer.group_size, method, getattr(layer, "iterations", 5), layer.eps, use_batch,
            running.get("running_mean"), running.get("running_whitening"), factor)
        return OracleStep(z, {"running_mean": mean, "running_whitening": whitening} if running else {}, None)
    return oracle


def _pit_norm(x, dy, gamma, running, use_batch, factor, layer) -> OracleStep:
    ones, zeros = np.ones(x.shape[1]), np.zeros(x.shape[1])
    if not use_batch:
        z = reference.pit_eval(x, ones, zeros, running["running_quantiles"], running["running_var"], layer.eps)
        return OracleStep(z, running, None)  # the gradient of the piecewise-linear map is autograd's
    after = {}
    if running:
        stats = reference.forward(x, None, None, running["running_mean"], running["running_var"], True, factor)
        quantiles = reference.pit_batch_quantiles(x, running["running_quantiles"].shape[1])
        after = {"running_mean": stats.running_mean, "running_var": stats.running_var,
                 "running_quantiles": (1 - factor) * running["running_quantiles"] + factor * quantiles}
    # The gradient for x is batch normalization's (the straight-through surrogate).
    return OracleStep(reference.pit_forward(x, ones, zeros), after, reference.backward(dy, x, gamma, eps=layer.eps)[0])


ORACLES = {
    "MeanOnlyBatchNorm": _mean_only, "VarianceOnlyBatchNorm": _variance_only, "BatchRenorm": _batch_renorm,
    "GhostBatchNorm": _ghost_batch_norm, "DecorrelatedBatchNorm": _whitening("zca"),
    "IterNorm": _whitening("newton-schulz"), "PITNorm": _pit_norm,
}


def _oracle(layer: torch.nn.Module):
    return ORACLES[type(layer).__name__[:-2]]  # the family: the class name without 1d/2d


def _oracle_step(layer, running: dict, x: np.ndarray, dy: np.ndarray) -> tuple[OracleStep, float]:
    """What the layer must do on x, given the running buffers before the step, after its forward has
    counted the step (batch norm's bookkeeping, which the layer shares)."""
    tracking = layer.training and layer.track_running_stats
    factor = layer.momentum if layer.momentum is not None else (1.0 / int(layer.num_batches_tracked) if tracking else 0.0)
    use_batch = layer.training or not layer.track_running_stats
    gamma = _numpy(layer.weight) if layer.weight is not None else np.ones(x.shape[1])
    if x.size == 0:  # torch's empty batch: nothing normalized, nothing moves
        return OracleStep(x.copy(), running, dy.copy()), factor
    step = _oracle(layer)(x, dy, gamma, running if tracking or not use_batch else {}, use_batch, factor, layer)
    return OracleStep(step.z, step.running if tracking else running, step.dx), factor


@pytest.mark.parametrize("case", _params(LAYER_CASES))
def test_our_layer_on_torch_batch_norm_case_matches_the_oracle(backend, case: LayerCase):
    source = case.source
    module_input = source.module_input()
    make = module_input.constructor_input
    options = {**make.kwargs, **LAYER_OPTIONS.get(case.layer, {})}
    if case.refusal:
        with pytest.raises(ValueError, match=case.refusal.split(":")[0]):
            case.layer(*make.args, **options)
        return
    layer = case.layer(*make.args, **options).to(source.dtype).train(source.training)
    tol = dict(rtol=1e-10, atol=1e-10) if source.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    buffers = [name for name, value in layer.named_buffers() if name != "num_batches_tracked"]
    for step in range(STEPS):
        what = f"step {step}"
        running = {name: _numpy(getattr(layer, name)) for name in buffers}
        x = _copy(module_input.forward_input.args[0])
        y = layer(x)
        gen = torch.Generator().manual_seed(seed_of(f"{case.id}/{step}"))
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(source.dtype)
        y.backward(dy)
        expected, _ = _oracle_step(layer, running, _numpy(x), _numpy(dy))
        gamma = _numpy(layer.weight) if layer.weight is not None else 1.0
        beta = _numpy(layer.bias) if layer.bias is not None else 0.0
        shape = (1, -1, *[1] * (x.dim() - 2))
        assert y.shape == x.shape and y.dtype == x.dtype, f"{what}: output {tuple(y.shape)} {y.dtype}"
        assert_close(y.double(), torch.from_numpy(np.reshape(gamma, shape) * expected.z + np.reshape(beta, shape)
                                                  if layer.weight is not None or layer.bias is not None
                                                  else expected.z), f"{what}: output", **tol)
        for name in buffers:
            assert_close(getattr(layer, name).double(), torch.from_numpy(expected.running[name]), f"{what}: {name}", **tol)
        if layer.num_batches_tracked is not None:  # batch norm's count: every training batch, empty ones too
            counted = step + 1 if layer.training else 0
            assert int(layer.num_batches_tracked) == counted, f"{what}: num_batches_tracked {int(layer.num_batches_tracked)}"
        if expected.dx is not None and source.dtype == torch.float64:
            assert_close(x.grad.double(), torch.from_numpy(expected.dx), f"{what}: input gradient", **tol)
        dy64, axes = _numpy(dy), _axes(expected.z)
        for name, grad in (("weight", (dy64 * expected.z).sum(axis=axes)), ("bias", dy64.sum(axis=axes))):
            p = getattr(layer, name)
            if p is not None:
                assert_close(p.grad.double(), torch.from_numpy(np.asarray(grad)), f"{what}: gradient of {name}", **tol)
                p.grad = None


# ---- the selection itself ----------------------------------------------------------------------------------


def test_torch_case_databases_load():
    if _IMPORT_ERROR is not None:
        pytest.fail(
            f"torch's test-case databases did not import ({_IMPORT_ERROR!r}); they need expecttest: "
            "install the test extra, .venv/bin/pip install -e '.[test]' (scripts/setup.sh does)"
        )
    modules = {mi.module_cls.__name__ for mi in MODULE_INFOS}
    functions = {op.name.rsplit(".", 1)[1] for op in OP_INFOS}
    assert EXPECTED_MODULES <= modules, f"module_db selection lost {sorted(EXPECTED_MODULES - modules)}"
    assert EXPECTED_FUNCTIONS <= functions, f"op_db selection lost {sorted(EXPECTED_FUNCTIONS - functions)}"
    assert any(0 in case.module_input().forward_input.args[0].shape for case in MODULE_CASES), (
        "torch's module cases no longer include an empty batch"
    )


def test_exception_lists_name_existing_cases():
    ids = {case.id for case in MODULE_CASES + OP_CASES + LAYER_CASES}
    stale = sorted(set(KNOWN_DIFFERENCES) - ids)
    assert not stale, f"KNOWN_DIFFERENCES names cases torch no longer has: {stale}; remove them"
    refused = {(case.layer.__name__, case.source.desc) for case in LAYER_CASES}
    stale = sorted(set(REFUSED_CONFIGURATIONS) - refused)
    assert not stale, f"REFUSED_CONFIGURATIONS names no case of torch's: {stale}; remove them"
