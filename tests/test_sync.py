"""bnlab.nn.SyncBatchNorm and its autograd Function: two gloo processes on 127.0.0.1 against single-process
batch norm on the concatenated batch, plus the single-process paths (fallback, gradcheck, conversion).

Every two-process case runs in one launch of two spawned processes (a module-scoped fixture, bounded by
a timeout); each process returns what its shard produced and the checks run here. A case is a split of
the global batch (equal, unequal, one shard empty), an input shape and layout, a dtype and the layer's
options; over two steps the outputs, input gradients, the sum over processes of the weight and bias
gradients (each process holds its share: see bnlab.distributed), the running statistics and
num_batches_tracked must match. Under DistributedDataParallel, with every process backpropagating
`ddp_loss`, every process's parameter gradients must equal the single-process gradient of the global
mean loss.

Run: python -m pytest tests/test_sync.py (about 15 s on two cores).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from torch.autograd import gradcheck
from torch.nn.parallel import DistributedDataParallel

import bnlab.nn
from bnlab.distributed import ddp_loss, launch, shard_bounds
from bnlab.functional import SyncBatchNormFunction, group_size
from bnlab.functional import batch_norm
from cases import assert_close, generator, tolerance

WORLD = 2
LAUNCH_TIMEOUT = 180  # seconds; a hang in a collective fails the tests instead of blocking them
STEPS = 2


# ---- the two-process cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncCase:
    shards: tuple[int, ...]  # samples per process
    sample_shape: tuple[int, ...]  # (C, ...) of one sample
    dtype: torch.dtype
    momentum: Optional[float] = 0.1
    channels_last: bool = False
    affine: bool = True
    bias: bool = True
    track_running_stats: bool = True
    input_requires_grad: bool = True
    param_dtype: Optional[torch.dtype] = None  # of the parameters and buffers; default the input's

    @property
    def id(self) -> str:
        parts = [
            "x".join(map(str, self.shards)),
            f"{len(self.sample_shape) + 1}D",
            str(self.dtype).replace("torch.", ""),
            f"mom{self.momentum}",
        ]
        if self.param_dtype is not None:
            parts.append("params-" + str(self.param_dtype).replace("torch.", ""))
        flags = {"channels_last": self.channels_last, "noaffine": not self.affine, "nobias": not self.bias,
                 "notrack": not self.track_running_stats, "nograd-input": not self.input_requires_grad}
        return "-".join(parts + [name for name, on in flags.items() if on])

    @property
    def channels(self) -> int:
        return self.sample_shape[0]

    @property
    def state_dtype(self) -> torch.dtype:
        return self.param_dtype or self.dtype

    def layer_options(self) -> dict:
        return dict(momentum=self.momentum, affine=self.affine, track_running_stats=self.track_running_stats,
                    dtype=self.state_dtype, bias=self.bias)

    def tolerance(self) -> dict:
        if self.dtype == torch.float16:  # one rounding of |y| <~ 4 (and of the input gradient) to 2^-11
            return dict(rtol=2e-3, atol=4e-3)
        return tolerance(self.dtype)


SHARDS = [(4, 4), (5, 2), (6, 0), (0, 6)]  # equal, unequal, empty on rank 1, empty on rank 0
SYNC_CASES = [
    SyncCase(shards, shape, dtype, momentum)
    for shards, shape, dtype, momentum in itertools.product(
        SHARDS, [(3,), (3, 4, 5)], [torch.float32, torch.float64], [0.1, None]
    )
] + [
    SyncCase((3, 2), (3, 5), torch.float64),
    SyncCase((2, 1), (2, 2, 3, 3), torch.float64),
    SyncCase((5, 2), (3, 4, 5), torch.float32, channels_last=True),
    SyncCase((2, 0), (2, 3, 3), torch.float32, channels_last=True),
    SyncCase((5, 2), (3, 4, 5), torch.float64, affine=False),
    SyncCase((5, 2), (3,), torch.float64, bias=False),
    SyncCase((5, 0), (3, 4, 5), torch.float64, track_running_stats=False),
    SyncCase((5, 2), (3, 4, 5), torch.float64, input_requires_grad=False),
    SyncCase((1, 1), (3,), torch.float64),  # the smallest legal global batch: two values per channel
    SyncCase((5, 2), (3, 4, 5), torch.float16, param_dtype=torch.float32),  # mixed precision, as under AMP
    SyncCase((6, 0), (3,), torch.float16, param_dtype=torch.float32),
    # Every shard empty: the group's batch is empty, which batch norm (as torch's) passes through.
    SyncCase((0, 0), (3, 4, 5), torch.float64),
    SyncCase((0, 0), (3,), torch.float32, momentum=None),
]


def global_step_data(case: SyncCase, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) of the whole global batch at `step`, identical in every process."""
    gen = generator(f"{case.id}/step{step}")
    shape = (sum(case.shards), *case.sample_shape)
    per_channel = (1, -1, *[1] * (len(shape) - 2))
    offset = torch.rand(case.channels, generator=gen, dtype=torch.float64) * 6 - 3
    scale = torch.rand(case.channels, generator=gen, dtype=torch.float64) * 2 + 0.5
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale.reshape(per_channel) + offset.reshape(per_channel)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(case.dtype), dy.to(case.dtype)


def initial_state(case: SyncCase, layer) -> dict:
    """A non-trivial starting state for `layer` (only the entries it has)."""
    gen = generator(f"{case.id}/state")
    c = case.channels
    candidates = {
        "weight": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(c, generator=gen, dtype=torch.float64),
        "running_mean": torch.randn(c, generator=gen, dtype=torch.float64),
        "running_var": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
    }
    state = {name: value.to(case.state_dtype) for name, value in candidates.items() if getattr(layer, name) is not None}
    if layer.num_batches_tracked is not None:
        state["num_batches_tracked"] = torch.tensor(3)
    return state


def as_layout(x: torch.Tensor, case: SyncCase) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x


def run_steps(layer, case: SyncCase, rows: Optional[tuple[int, int]]) -> list[dict]:
    """Forward and backward of `layer` over STEPS steps on rows [start, stop) of each global batch (all
    rows if None); what each step produced, detached."""
    layer.load_state_dict(initial_state(case, layer))
    layer.train()
    produced = []
    for step in range(STEPS):
        x, dy = global_step_data(case, step)
        if rows is not None:
            x, dy = x[rows[0]:rows[1]], dy[rows[0]:rows[1]]
        x = as_layout(x.clone(), case).requires_grad_(case.input_requires_grad)
        y = layer(x)
        y.backward(dy)
        record = {"y": y.detach(), "x_grad": x.grad, "channels_last": y.is_contiguous(memory_format=torch.channels_last)}
        for name in ("weight", "bias"):
            p = getattr(layer, name)
            record[f"{name}_grad"] = None if p is None else p.grad.clone()
            if p is not None:
                p.grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(layer, name)
            record[name] = None if value is None else value.clone()
        produced.append(record)
    return produced


# ---- DistributedDataParallel cases: the gradient convention -----------------------------------------


@dataclass(frozen=True)
class DDPCase:
    shards: tuple[int, ...]
    kind: str  # "linear": Linear -> BN -> Sigmoid -> Linear on (N, 5); "conv": Conv2d -> BN -> Sigmoid on (N, 2, 6, 6)
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{'x'.join(map(str, self.shards))}-{self.kind}-{str(self.dtype).replace('torch.', '')}"


DDP_CASES = [
    DDPCase((4, 4), "linear", torch.float64),
    DDPCase((5, 2), "linear", torch.float64),
    DDPCase((6, 0), "linear", torch.float64),
    DDPCase((5, 2), "conv", torch.float32),
    DDPCase((0, 5), "conv", torch.float32),
]


def ddp_case_model(case: DDPCase) -> torch.nn.Sequential:
    """The single-process model of the case (bnlab batch norm), seeded: identical in every process."""
    torch.manual_seed(len(case.id))
    if case.kind == "linear":
        net = torch.nn.Sequential(torch.nn.Linear(5, 3), bnlab.nn.BatchNorm1d(3), torch.nn.Sigmoid(), torch.nn.Linear(3, 2))
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnlab.nn.BatchNorm2d(3), torch.nn.Sigmoid())
    return net.to(case.dtype)


def ddp_case_data(case: DDPCase) -> tuple[torch.Tensor, torch.Tensor]:
    gen = generator(case.id)
    n = sum(case.shards)
    x = torch.randn((n, 5) if case.kind == "linear" else (n, 2, 6, 6), generator=gen, dtype=torch.float64) * 2 + 1
    out_shape = (n, 2) if case.kind == "linear" else (n, 3, 4, 4)
    return x.to(case.dtype), torch.randn(out_shape, generator=gen, dtype=torch.float64).to(case.dtype)


def group_case_data() -> torch.Tensor:
    """The global batch of the process-group case: 7 samples, shards of 4 and 3."""
    return torch.randn(7, 3, generator=generator("groups")) * 2 + 1


def per_sample_losses(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A loss per sample: the sum of its outputs weighted by fixed random weights."""
    return (out * weights).flatten(1).sum(1)


# ---- what each process runs ----------------------------------------------------------------------------


def _in_each_process(sync_cases, ddp_cases) -> dict:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict = {"sync": {}, "ddp": {}}
    for case in sync_cases:
        start = sum(case.shards[:rank])
        layer = bnlab.nn.SyncBatchNorm(case.channels, **case.layer_options())
        results["sync"][case.id] = run_steps(layer, case, (start, start + case.shards[rank]))

    for case in ddp_cases:
        start, stop = sum(case.shards[:rank]), sum(case.shards[: rank + 1])
        ddp = DistributedDataParallel(bnlab.nn.convert_sync_batchnorm(ddp_case_model(case)))
        x, weights = ddp_case_data(case)
        loss_sum = per_sample_losses(ddp(x[start:stop]), weights[start:stop]).sum()
        ddp_loss(loss_sum, len(x), world).backward()
        net = ddp.module
        results["ddp"][case.id] = {
            "grads": {name: p.grad.clone() for name, p in net.named_parameters()},
            "buffers": {name: b.clone() for name, b in net.named_buffers()},
        }

    # Groups of one: each process normalizes its own shard alone; a group of all: the global batch.
    singles = [dist.new_group([r]) for r in range(world)]
    everyone = dist.new_group(list(range(world)))
    x = group_case_data()
    start, stop = shard_bounds(len(x), world, rank)
    shard = x[start:stop]
    results["groups"] = {
        "single": bnlab.nn.SyncBatchNorm(3, process_group=singles[rank])(shard).detach(),
        "everyone": bnlab.nn.SyncBatchNorm(3, process_group=everyone)(shard).detach(),
        "single_size": group_size(singles[rank]),
    }

    # One value per channel over all processes: refused alike in every process, running stats untouched.
    layer = bnlab.nn.SyncBatchNorm(3)
    try:
        layer(torch.randn(1 - rank, 3))
        results["one_value_error"] = None
    except ValueError as exc:
        results["one_value_error"] = str(exc)
    results["one_value_running_mean"] = layer.running_mean.clone()
    return results


@pytest.fixture(scope="module")
def processes() -> list[dict]:
    """What each of the two processes produced, in rank order."""
    return launch(_in_each_process, WORLD, args=(SYNC_CASES, DDP_CASES), timeout=LAUNCH_TIMEOUT)


# ---- checks against single-process batch norm -------------------------------------------------------


def reference_layer(case: SyncCase):
    family = {2: bnlab.nn.BatchNorm1d, 3: bnlab.nn.BatchNorm1d, 4: bnlab.nn.BatchNorm2d, 5: bnlab.nn.BatchNorm3d}
    return family[len(case.sample_shape) + 1](case.channels, **case.layer_options())


@pytest.mark.parametrize("case", SYNC_CASES, ids=[c.id for c in SYNC_CASES])
def test_two_processes_match_single_process_on_the_concatenated_batch(processes, case):
    expected = run_steps(reference_layer(case), case, None)
    tol = case.tolerance()
    for step in range(STEPS):
        ranks = [p["sync"][case.id][step] for p in processes]
        what = f"step {step}"
        assert_close(torch.cat([r["y"] for r in ranks]), expected[step]["y"], f"{what}: output", **tol)
        for rank, r in enumerate(ranks):
            assert r["y"].shape == (case.shards[rank], *case.sample_shape), f"{what}: rank {rank} output shape"
            if case.channels_last and case.shards[rank]:
                assert r["channels_last"], f"{what}: rank {rank} lost the channels-last layout"
        if case.input_requires_grad:
            assert_close(torch.cat([r["x_grad"] for r in ranks]), expected[step]["x_grad"], f"{what}: input gradient", **tol)
        else:
            assert all(r["x_grad"] is None for r in ranks)
        for name in ("weight_grad", "bias_grad"):
            if expected[step][name] is None:
                assert all(r[name] is None for r in ranks), f"{what}: {name} should not exist"
                continue
            # The documented convention: each process holds its share; the shares sum to the gradient.
            assert_close(sum(r[name] for r in ranks), expected[step][name], f"{what}: sum over processes of {name}", **tol)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            for rank, r in enumerate(ranks):
                if expected[step][name] is None:
                    assert r[name] is None
                else:
                    assert_close(r[name], expected[step][name], f"{what}: rank {rank} {name}", **tol)


@pytest.mark.parametrize("case", DDP_CASES, ids=[c.id for c in DDP_CASES])
def test_ddp_averaged_gradients_equal_the_single_process_gradient_of_the_global_mean_loss(processes, case):
    net = ddp_case_model(case)
    x, weights = ddp_case_data(case)
    per_sample_losses(net(x), weights).mean().backward()
    tol = tolerance(case.dtype)
    for rank, p in enumerate(processes):
        got = p["ddp"][case.id]
        for name, param in net.named_parameters():
            assert_close(got["grads"][name], param.grad, f"rank {rank} gradient of {name}", **tol)
        for name, buffer in net.named_buffers():
            assert_close(got["buffers"][name], buffer, f"rank {rank} buffer {name}", **tol)


def test_process_group_scopes_the_statistics(processes):
    x = group_case_data()
    with torch.no_grad():
        alone = [bnlab.nn.BatchNorm1d(3)(x[slice(*shard_bounds(len(x), WORLD, r))]) for r in range(WORLD)]
        together = bnlab.nn.BatchNorm1d(3)(x)
    tol = tolerance(torch.float32)
    for rank, p in enumerate(processes):
        assert p["groups"]["single_size"] == 1
        assert_close(p["groups"]["single"], alone[rank], f"rank {rank} in a group of one", **tol)
    assert_close(torch.cat([p["groups"]["everyone"] for p in processes]), together, "a group of all", **tol)


def test_one_value_per_channel_over_all_processes_is_refused_in_every_process(processes):
    for rank, p in enumerate(processes):
        message = p["one_value_error"]
        assert message is not None, f"rank {rank} normalized a global batch of one value per channel"
        assert "more than 1 value per channel" in message and "over all 2 processes" in message, message
        assert torch.equal(p["one_value_running_mean"], torch.zeros(3)), "a refused batch moved the running mean"


# ---- single process: the fallback, the Function, the checks ------------------------------------------


FALLBACK_SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 4), (2, 3, 2, 3, 3)]


@pytest.mark.parametrize("shape", FALLBACK_SHAPES, ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_the_layer_is_batch_norm(shape, momentum):
    assert not dist.is_initialized() and group_size() == 1
    sync = bnlab.nn.SyncBatchNorm(3, momentum=momentum, dtype=torch.float64)
    plain = bnlab.nn.BatchNorm(3, momentum=momentum, dtype=torch.float64)
    gen = generator(f"fallback/{shape}/{momentum}")
    for training in (True, True, False):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
        x_plain = x.detach().clone().requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        sync.train(training), plain.train(training)
        y, y_plain = sync(x), plain(x_plain)
        y.backward(dy), y_plain.backward(dy)
        tol = tolerance(torch.float64)
        assert_close(y, y_plain, "output", **tol)
        assert_close(x.grad, x_plain.grad, "input gradient", **tol)
        for name in ("weight", "bias"):
            assert_close(getattr(sync, name).grad, getattr(plain, name).grad, f"{name} gradient", **tol)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(sync, name), getattr(plain, name), name, **tol)


def test_without_a_process_group_an_empty_batch_is_torchs_empty_batch():
    sync, reference = bnlab.nn.SyncBatchNorm(3), torch.nn.BatchNorm1d(3)
    x, x_reference = (torch.zeros(0, 3, requires_grad=True) for _ in range(2))
    y, y_reference = sync(x), reference(x_reference)
    y.sum().backward(), y_reference.sum().backward()
    assert y.shape == y_reference.shape == (0, 3)
    for name in ("weight", "bias"):
        assert_close(getattr(sync, name).grad, getattr(reference, name).grad, f"{name} gradient", atol=0, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(sync, name), getattr(reference, name), name, atol=0, rtol=0)


GRAD_SHAPES = [((5, 3), False), ((3, 2, 4), False), ((2, 3, 2, 3), False), ((2, 3, 2, 3), True), ((2, 2, 2, 2, 2), False)]


@pytest.mark.parametrize("shape,channels_last", GRAD_SHAPES, ids=[f"{len(s)}D{'-cl' if cl else ''}" for s, cl in GRAD_SHAPES])
@pytest.mark.parametrize("params", ["weight+bias", "weight", "none"])
def test_gradcheck_of_the_function_in_one_process(shape, channels_last, params):
    gen = generator(f"gradcheck/{shape}/{channels_last}/{params}")
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5) if params != "none" else None
    bias = torch.randn(c, generator=gen, dtype=torch.float64) if params == "weight+bias" else None
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]

    def apply(*args):
        it = iter(args)
        x_, w_ = next(it), (next(it) if weight is not None else None)
        b_ = next(it) if bias is not None else None
        return SyncBatchNormFunction.apply(x_, w_, b_, None, None, 0.1, 1e-5, None)

    assert gradcheck(apply, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)
    # ...and it is batch norm: the forward and the running statistics match bnlab.functional's.
    running = [torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)]
    expected_running = [t.clone() for t in running]
    y = SyncBatchNormFunction.apply(x, weight, bias, *running, 0.1, 1e-5, None)
    expected = batch_norm(x.detach(), *expected_running, weight, bias, True, 0.1, 1e-5)
    tol = tolerance(torch.float64)
    assert_close(y, expected, "output", **tol)
    assert_close(running[0], expected_running[0], "running mean", **tol)
    assert_close(running[1], expected_running[1], "running var", **tol)


def test_double_backward_is_refused():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = SyncBatchNormFunction.apply(x, None, None, None, None, 0.1, 1e-5, None)
    (grad,) = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@pytest.mark.parametrize("dims", [2, 3, 4, 5])
def test_the_layer_accepts_2d_to_5d(dims):
    shape = (4, 3, *[2] * (dims - 2))
    assert bnlab.nn.SyncBatchNorm(3)(torch.randn(shape)).shape == shape


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(3), "expected 2D"),
        (torch.randn(2, 3, 2, 2, 2, 2), "expected 2D"),
        (torch.randn(4, 5), "expected 3 channels"),
        (torch.ones(4, 3, dtype=torch.long), "floating-point"),
    ],
    ids=["1D", "6D", "channels", "integer"],
)
def test_bad_input_raises_value_error_saying_what_was_expected(bad, match):
    with pytest.raises(ValueError, match=match):
        bnlab.nn.SyncBatchNorm(3)(bad)


def test_an_empty_shard_is_still_checked_for_channels_and_dtype():
    for bad, match in ((torch.zeros(0, 4), "expected 3 channels"), (torch.zeros(0, 3, dtype=torch.int32), "floating-point")):
        with pytest.raises(ValueError, match=match):
            bnlab.nn.SyncBatchNorm(3)(bad)


# ---- convert_sync_batchnorm --------------------------------------------------------------------------

CONVERTIBLE = {
    "torch-1d": (lambda: torch.nn.BatchNorm1d(4), (2, 3)),
    "torch-2d": (lambda: torch.nn.BatchNorm2d(4, momentum=None), (4,)),
    "torch-3d": (lambda: torch.nn.BatchNorm3d(4, eps=1e-3), (5,)),
    "torch-noaffine": (lambda: torch.nn.BatchNorm2d(4, affine=False), (4,)),
    "torch-notrack": (lambda: torch.nn.BatchNorm1d(4, track_running_stats=False), (2, 3)),
    "torch-sync": (lambda: torch.nn.SyncBatchNorm(4), (2, 3, 4, 5)),
    "bnlab-1d": (lambda: bnlab.nn.BatchNorm1d(4), (2, 3)),
    "bnlab-2d": (lambda: bnlab.nn.BatchNorm2d(4, momentum=0.3), (4,)),
    "bnlab-3d": (lambda: bnlab.nn.BatchNorm3d(4), (5,)),
    "bnlab-nobias": (lambda: bnlab.nn.BatchNorm2d(4, bias=False), (4,)),
    "chapter-4d": (lambda: bnlab.nn.BatchNorm(4, num_dims=4), (4,)),
    "chapter-any": (lambda: bnlab.nn.BatchNorm(4), (2, 3, 4, 5)),
}


@pytest.mark.parametrize("kind", list(CONVERTIBLE))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_sync_batchnorm_hands_over_the_very_tensors(kind, training):
    make, ranks = CONVERTIBLE[kind]
    old = make().train(training)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(old, name) is not None:
                getattr(old, name).uniform_(0.5, 1.5)
    conv = torch.nn.Conv2d(1, 4, 1)
    net = torch.nn.Sequential(conv, old)
    keys = list(net.state_dict())
    group = object()  # any process-group handle is stored as given
    converted = bnlab.nn.convert_sync_batchnorm(net, process_group=group)
    new = converted[1]
    assert converted is net and converted[0] is conv, "the model and other layers must stay"
    assert type(new) is bnlab.nn.SyncBatchNorm
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(new, name) is getattr(old, name), f"{name} is not the same tensor"
    assert (new.eps, new.momentum, new.affine, new.track_running_stats) == (
        old.eps, old.momentum, old.affine, old.track_running_stats)
    assert new.training == training and new.process_group is group and new.input_dims == ranks
    assert list(converted.state_dict()) == keys, "state dict keys changed"
    for dims in (2, 3, 4, 5):
        x = torch.randn(4, 4, *[2] * (dims - 2))
        if dims in ranks:
            new(x)
        else:
            with pytest.raises(ValueError, match=f"got {dims}D input"):
                new(x)


def test_convert_sync_batchnorm_of_a_single_layer_returns_the_new_layer_and_optimizers_keep_working():
    old = bnlab.nn.BatchNorm1d(3)
    optimizer = torch.optim.SGD(old.parameters(), lr=1.0)
    new = bnlab.nn.convert_sync_batchnorm(old)
    assert isinstance(new, bnlab.nn.SyncBatchNorm) and new is not old
    new(torch.randn(8, 3) * 3 + 1).pow(3).sum().backward()
    before = new.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(new.weight, before), "the optimizer no longer reaches the converted layer's weight"


@pytest.mark.parametrize("lazy", [torch.nn.LazyBatchNorm2d, bnlab.nn.LazyBatchNorm2d], ids=["torch", "bnlab"])
def test_convert_sync_batchnorm_refuses_uninitialized_lazy_layers(lazy):
    with pytest.raises(ValueError, match="run one forward pass"):
        bnlab.nn.convert_sync_batchnorm(torch.nn.Sequential(lazy()))
