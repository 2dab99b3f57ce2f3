"""The one table of batch-norm cases, and the generic helpers the tests run over it.

A `Case` is one layer configuration, one input shape and memory layout, one dtype and one mode. `CASES`
is the full cartesian product; every table-driven test (against torch, against the NumPy oracle,
backend against backend) is a generic function over it.
"""

from __future__ import annotations

import contextlib
import itertools
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

import bnlab.nn

# ---- layouts -----------------------------------------------------------------------------------------

# (layer family, logical shape (N, C, ...), memory layout). For 2D and 3D input "transposed" is a
# non-contiguous view: (N, C) as the transpose of a (C, N) tensor, (N, C, L) as a (N, L, C) tensor with
# its last two dims swapped (the channels-last layout of a 1d input).
LAYOUTS = [
    ("1d", (8, 3), "contiguous"),
    ("1d", (8, 3), "transposed"),
    ("1d", (4, 3, 5), "contiguous"),
    ("1d", (4, 3, 5), "transposed"),
    ("1d", (6, 3, 1), "contiguous"),  # one position per sample: N values per channel
    ("2d", (3, 3, 4, 4), "contiguous"),
    ("2d", (3, 3, 4, 4), "channels_last"),
    ("3d", (2, 3, 2, 3, 3), "contiguous"),
    ("3d", (2, 3, 2, 3, 3), "channels_last"),
]

MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}

TORCH_LAYERS = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}
BNLAB_LAYERS = {"1d": bnlab.nn.BatchNorm1d, "2d": bnlab.nn.BatchNorm2d, "3d": bnlab.nn.BatchNorm3d}


@contextlib.contextmanager
def threads(n: int):
    """Run a block with n torch/OpenMP threads (the suite runs on one): the kernels' threaded paths,
    with per-thread partial statistics merged after a barrier, only run with two or more."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def generator(text: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(text))


def make_leaf(shape, layout: str, dtype, gen: torch.Generator, offset=None, scale=None) -> torch.Tensor:
    """A leaf tensor whose `view_of` has logical `shape` in `layout`; values are per-channel shifted and
    scaled so that the statistics are not trivially 0 and 1."""
    c = shape[1]
    if offset is None:
        offset = torch.rand(c, generator=gen, dtype=torch.float64) * 4 - 2
    if scale is None:
        scale = torch.rand(c, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * scale.reshape(1, -1, *[1] * (len(shape) - 2)) + offset.reshape(1, -1, *[1] * (len(shape) - 2))
    x = x.to(dtype)
    if layout == "contiguous":
        leaf = x.contiguous()
    elif layout == "channels_last":
        leaf = x.contiguous(memory_format=MEMORY_FORMATS[x.dim()])
    elif layout == "transposed":
        leaf = x.transpose(0, 1).contiguous() if x.dim() == 2 else x.transpose(1, 2).contiguous()
    else:
        raise AssertionError(layout)
    return leaf.requires_grad_()


def view_of(leaf: torch.Tensor, layout: str) -> torch.Tensor:
    """The (N, C, ...) input seen by the layer: the leaf itself, or its non-contiguous view."""
    if layout != "transposed":
        return leaf
    return leaf.t() if leaf.dim() == 2 else leaf.transpose(1, 2)


def twin_leaf(leaf: torch.Tensor) -> torch.Tensor:
    """An independent leaf with the same values and the same strides."""
    twin = torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype)
    return twin.copy_(leaf.detach()).requires_grad_()


def check_layout(x: torch.Tensor, layout: str) -> None:
    if layout == "channels_last":
        assert x.is_contiguous(memory_format=MEMORY_FORMATS[x.dim()]) and not x.is_contiguous()
    elif layout == "transposed":
        assert not x.is_contiguous()
    else:
        assert x.is_contiguous()


# ---- tolerances --------------------------------------------------------------------------------------


def tolerance(dtype: torch.dtype) -> dict:
    """Tolerances against torch and against the oracle: tight in float64, ~1e-5 relative in float32."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    return dict(rtol=1e-5, atol=1e-5)


def backend_tolerance(dtype: torch.dtype) -> dict:
    """Compiled kernels against the pure-PyTorch path: the same formulas, summed in another order."""
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    return dict(rtol=1e-6, atol=1e-6)


def assert_close(actual, expected, what: str, **tol) -> None:
    """torch.testing.assert_close with a message that names the quantity."""
    torch.testing.assert_close(
        actual, expected, **tol, check_stride=False, msg=lambda m: f"{what} differs:\n{m}"
    )


def summand_mass(x, dy, mean=None, var=None, eps: float = 1e-5) -> dict:
    """Per channel, the L1 norm of the terms summed into the bias and weight gradients: sum |dy| and
    sum |dy * x_hat| (x_hat with the given statistics, else the batch's). A float sum of n terms is
    exact only up to a small multiple of eps * (this mass), whatever order it is summed in."""
    x, dy = x.detach().double(), dy.detach().double()
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *[1] * (x.dim() - 2))
    if mean is None:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
    x_hat = (x - mean.double().reshape(shape)) / torch.sqrt(var.double().reshape(shape) + eps)
    return {"bias": dy.abs().sum(dims), "weight": (dy * x_hat).abs().sum(dims)}


def assert_sums_close(actual, expected, mass, what: str, dtype) -> None:
    """Per-channel sums agree to within rounding of their summands and of the result:
    |a - e| <= k * eps(dtype) * mass + rtol * |e|."""
    k_eps, rtol = (1e-7, 1e-6) if dtype == torch.float32 else (1e-14, 1e-12)
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).abs()
    allowed = k_eps * mass + rtol * expected.abs() + 1e-12
    assert bool((err <= allowed).all()), (
        f"{what} differs beyond summation rounding:\n actual   {actual.tolist()}\n expected {expected.tolist()}"
        f"\n |diff|   {err.tolist()}\n allowed  {allowed.tolist()}"
    )


# ---- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str  # "1d", "2d", "3d"
    shape: tuple
    layout: str  # "contiguous", "channels_last", "transposed"
    dtype: torch.dtype
    training: bool
    affine: bool
    track_running_stats: bool
    momentum: Optional[float]

    @property
    def id(self) -> str:
        return "-".join(
            [
                "train" if self.training else "eval",
                "affine" if self.affine else "noaffine",
                "track" if self.track_running_stats else "notrack",
                f"mom{self.momentum}",
                f"{self.family}{'x'.join(map(str, self.shape))}",
                self.layout,
                str(self.dtype).replace("torch.", ""),
            ]
        )

    @property
    def num_features(self) -> int:
        return self.shape[1]

    def layer_kwargs(self) -> dict:
        return dict(
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            dtype=self.dtype,
        )


CASES = [
    Case(family, shape, layout, dtype, training, affine, track, momentum)
    for training, affine, track, momentum, (family, shape, layout), dtype in itertools.product(
        (True, False),
        (True, False),
        (True, False),
        (0.1, None),
        LAYOUTS,
        (torch.float32, torch.float64),
    )
]
CASE_IDS = [c.id for c in CASES]
CASES_F64 = [c for c in CASES if c.dtype == torch.float64]


def initial_state(case: Case, gen: torch.Generator) -> dict:
    """A non-trivial starting state (weight, bias, running statistics) to load into both layers."""
    c = case.num_features
    state = {}
    if case.affine:
        state["weight"] = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(case.dtype)
        state["bias"] = torch.randn(c, generator=gen, dtype=torch.float64).to(case.dtype)
    if case.track_running_stats:
        state["running_mean"] = torch.randn(c, generator=gen, dtype=torch.float64).to(case.dtype)
        state["running_var"] = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(case.dtype)
        state["num_batches_tracked"] = torch.tensor(3)
    return state


def make_layers(case: Case, gen: torch.Generator):
    """(bnlab layer, torch layer) with the same configuration, state and mode."""
    ours = BNLAB_LAYERS[case.family](case.num_features, **case.layer_kwargs())
    theirs = TORCH_LAYERS[case.family](case.num_features, **case.layer_kwargs())
    state = initial_state(case, gen)
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    ours.train(case.training)
    theirs.train(case.training)
    return ours, theirs


def sgd_step(layers, grads: dict, lr: float = 0.1) -> None:
    """Apply one identical update (from `grads`) to every layer, so their states stay equal."""
    with torch.no_grad():
        for layer in layers:
            for name, g in grads.items():
                p = getattr(layer, name)
                p.sub_(lr * g)
                p.grad = None


STEPS = 3


def reference_step_inputs(case: Case, step: int):
    """(leaf, upstream gradient) of one step: fresh random values each step."""
    gen = generator(f"{case.id}/step{step}")
    leaf = make_leaf(case.shape, case.layout, case.dtype, gen)
    dy = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(case.dtype)
    return leaf, dy


def params_of(layer) -> dict:
    return {n: p for n, p in (("weight", layer.weight), ("bias", layer.bias)) if p is not None}

