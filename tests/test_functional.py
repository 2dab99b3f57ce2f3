"""bnlab against torch.nn.BatchNorm1d/2d/3d over the one table of cases, under both kernel backends,
and the two backends against each other.

Each case runs several forward+backward steps with fresh inputs through a bnlab layer and a torch
layer that start from the same state; after each step both get the same SGD update. Outputs, every
gradient, the running statistics and num_batches_tracked must agree at every step, and the state
dicts must load across in both directions.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import bnlab.functional
import bnlab.nn
from cases import (
    CASE_IDS,
    CASES,
    LAYOUTS,
    MEMORY_FORMATS,
    STEPS,
    assert_close,
    assert_sums_close,
    backend_tolerance,
    check_layout,
    generator,
    make_layers,
    make_leaf,
    params_of,
    reference_step_inputs,
    sgd_step,
    summand_mass,
    threads,
    tolerance,
    twin_leaf,
    view_of,
)


def _check_memory_format(y: torch.Tensor, x: torch.Tensor, layout: str) -> None:
    if layout == "channels_last":
        fmt = MEMORY_FORMATS[x.dim()]
        assert y.is_contiguous(memory_format=fmt), f"channels-last input gave output strides {y.stride()}"
    elif layout == "contiguous":
        assert y.is_contiguous(), f"contiguous input gave output strides {y.stride()}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_matches_torch_over_steps(case, backend):
    ours, theirs = make_layers(case, generator(case.id))
    tol = tolerance(case.dtype)
    for step in range(STEPS):
        leaf, dy = reference_step_inputs(case, step)
        leaf_t = twin_leaf(leaf)
        x, x_t = view_of(leaf, case.layout), view_of(leaf_t, case.layout)
        check_layout(x, case.layout)

        y, y_t = ours(x), theirs(x_t)
        assert y.dtype == case.dtype and y.shape == x.shape
        assert_close(y, y_t, f"step {step}: output", **tol)
        _check_memory_format(y, x, case.layout)

        y.backward(dy)
        y_t.backward(dy)
        assert_close(leaf.grad, leaf_t.grad, f"step {step}: input gradient", **tol)
        for name, p in params_of(theirs).items():
            assert_close(getattr(ours, name).grad, p.grad, f"step {step}: {name} gradient", **tol)

        for name in ("running_mean", "running_var"):
            theirs_buf = getattr(theirs, name)
            if theirs_buf is None:
                assert getattr(ours, name) is None, f"{name} should be None"
            else:
                assert_close(getattr(ours, name), theirs_buf, f"step {step}: {name}", **tol)
        if theirs.num_batches_tracked is None:
            assert ours.num_batches_tracked is None
        else:
            assert ours.num_batches_tracked.dtype == torch.long
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked), f"step {step}"

        sgd_step((ours, theirs), {n: p.grad.clone() for n, p in params_of(theirs).items()})


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_loads_both_ways(case, backend):
    """After training steps, bnlab's state dict drives a torch layer and torch's drives a bnlab layer."""
    ours, theirs = make_layers(case, generator(case.id))
    # Train each a little with different data, so the two states differ and loading really changes things.
    for layer, tag in ((ours, "ours"), (theirs, "theirs")):
        layer.train()
        for step in range(2):
            leaf = make_leaf(case.shape, case.layout, case.dtype, generator(f"{case.id}/{tag}{step}"))
            layer(view_of(leaf, case.layout)).sum().backward()
            sgd_step((layer,), {n: p.grad.clone() for n, p in params_of(layer).items()})
        layer.train(case.training)

    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs), "state dict keys differ from torch's"

    torch_from_ours = type(theirs)(case.num_features, **case.layer_kwargs()).train(case.training)
    torch_from_ours.load_state_dict(sd_ours)
    ours_from_torch = type(ours)(case.num_features, **case.layer_kwargs()).train(case.training)
    ours_from_torch.load_state_dict(sd_theirs)

    tol = tolerance(case.dtype)
    leaf = make_leaf(case.shape, case.layout, case.dtype, generator(f"{case.id}/probe"))
    x = view_of(leaf, case.layout).detach()
    assert_close(torch_from_ours(x.clone()), ours(x.clone()), "torch layer loaded from bnlab state: output", **tol)
    assert_close(ours_from_torch(x.clone()), theirs(x.clone()), "bnlab layer loaded from torch state: output", **tol)
    for name, value in ours.state_dict().items():
        assert_close(torch_from_ours.state_dict()[name], value, f"{name} after the forward", **tol)


# ---- the two backends against each other -------------------------------------------------------------

# Larger inputs: statistics merged across blocks of rows and tiles, and inputs past the kernels'
# threading threshold (2**15 elements), planar and interleaved; run with two threads.
LARGE_LAYOUTS = [
    ("1d", (4096, 8), "contiguous"),  # interleaved (M, C): rows split between threads
    ("1d", (8, 4, 1100), "contiguous"),  # planar: channels split between threads
    ("1d", (2, 4, 4200), "contiguous"),  # planar rows longer than one block
    ("2d", (256, 4, 8, 8), "contiguous"),  # planar, short planes: the batch split between threads
    ("1d", (4, 1, 9000), "contiguous"),  # planar, fewer channels than threads: batch split, planes past a block
    ("1d", (64, 8, 70), "transposed"),  # channels-last (N, C, L)
    ("2d", (8, 4, 32, 32), "contiguous"),
    ("2d", (8, 4, 32, 32), "channels_last"),
    ("3d", (4, 4, 8, 16, 16), "channels_last"),
]


def layout_id(layout) -> str:
    family, shape, kind = layout
    return f"{family}{'x'.join(map(str, shape))}-{kind}"


def _backend_case(layout, dtype, training, affine):
    name = "-".join([layout_id(layout), str(dtype).replace("torch.", ""), "train" if training else "eval",
                     "affine" if affine else "noaffine"])
    return pytest.param(layout, dtype, training, affine, id=name)


BACKEND_CASES = [
    _backend_case(layout, dtype, training, affine)
    for layout, dtype, training, affine in itertools.product(
        LAYOUTS, (torch.float32, torch.float64), (True, False), (True, False)
    )
] + [
    _backend_case(layout, dtype, training, True)
    for layout, dtype, training in itertools.product(LARGE_LAYOUTS, (torch.float32, torch.float64), (True, False))
]


def _run_functional(layout, dtype, training, affine, seed, n_threads=1):
    """Output, gradients and updated running statistics of bnlab.functional.batch_norm."""
    _, shape, kind = layout
    gen = generator(seed)
    c = shape[1]
    leaf = make_leaf(shape, kind, dtype, gen)
    weight = (torch.rand(c, generator=gen, dtype=dtype) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(c, generator=gen, dtype=dtype).requires_grad_() if affine else None
    running_mean = torch.randn(c, generator=gen, dtype=dtype)
    running_var = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    mass = summand_mass(view_of(leaf, kind), dy, *((None, None) if training else (running_mean, running_var)))
    with threads(n_threads):
        y = bnlab.functional.batch_norm(
            view_of(leaf, kind), running_mean, running_var, weight, bias, training, 0.1, 1e-5
        )
        y.backward(dy)
    out = {"output": y.detach(), "input gradient": leaf.grad, "running_mean": running_mean,
           "running_var": running_var}
    if affine:
        out.update({"weight gradient": weight.grad, "bias gradient": bias.grad})
    return out, mass


@pytest.mark.parametrize("layout,dtype,training,affine", BACKEND_CASES)
def test_compiled_and_torch_backends_agree(layout, dtype, training, affine, switch_backend, request):
    results = {}
    for name in ("compiled", "torch"):
        switch_backend(name)
        # Two threads for the compiled kernels on large inputs: their parallel paths.
        n_threads = 2 if name == "compiled" and layout in LARGE_LAYOUTS else 1
        results[name] = _run_functional(layout, dtype, training, affine, request.node.name, n_threads)
    tol = backend_tolerance(dtype)
    mass = results["torch"][1]
    for key, expected in results["torch"][0].items():
        actual = results["compiled"][0][key]
        if key in ("weight gradient", "bias gradient"):  # sums over the batch: rounding grows with it
            assert_sums_close(actual, expected, mass[key.split()[0]], f"compiled vs torch backend: {key}", dtype)
            continue
        # Relative to the size of the quantity: an input gradient is a difference of O(1) terms.
        scale = float(expected.abs().max())
        assert_close(actual, expected, f"compiled vs torch backend: {key}",
                     rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))


@pytest.mark.parametrize("layout", LARGE_LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_large_inputs_match_torch(layout, training, backend):
    """Inputs past the block size and the threading threshold, float32, against torch's functional."""
    family, shape, kind = layout
    gen = generator(f"large/{layout}/{training}")
    c = shape[1]
    leaf = make_leaf(shape, kind, torch.float32, gen)
    leaf_t = twin_leaf(leaf)
    weight = torch.rand(c, generator=gen) + 0.5
    bias = torch.randn(c, generator=gen)
    w1, b1 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    w2, b2 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    rm1, rv1 = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    dy = torch.randn(shape, generator=gen)
    mass = summand_mass(view_of(leaf, kind), dy, *((None, None) if training else (rm1, rv1)))

    with threads(2 if backend == "compiled" else 1):
        y = bnlab.functional.batch_norm(view_of(leaf, kind), rm1, rv1, w1, b1, training, 0.1, 1e-5)
        y.backward(dy)
    y_t = torch.nn.functional.batch_norm(view_of(leaf_t, kind), rm2, rv2, w2, b2, training, 0.1, 1e-5)
    y_t.backward(dy)
    tol = dict(rtol=1e-5, atol=1e-5)
    assert_close(y, y_t, "output", **tol)
    assert_close(leaf.grad, leaf_t.grad, "input gradient", **tol)
    # Sums over ~10^4 values: held to the rounding of their summands rather than to their result.
    assert_sums_close(w1.grad, w2.grad, mass["weight"], "weight gradient", torch.float32)
    assert_sums_close(b1.grad, b2.grad, mass["bias"], "bias gradient", torch.float32)
    assert_close(rm1, rm2, "running_mean", **tol)
    assert_close(rv1, rv2, "running_var", **tol)


def test_compiled_backend_runs_the_kernels(switch_backend):
    """Under BNLAB_KERNELS=compiled a float32/float64 CPU input goes through the compiled operator (its
    autograd node is the C++ BatchNormFunction), under BNLAB_KERNELS=torch through the Python one; a
    float16 input takes the PyTorch path either way."""
    for dtype, name, node in ((torch.float32, "compiled", "CppNode<(anonymous namespace)::BatchNormFunction>"),
                              (torch.float64, "compiled", "CppNode<(anonymous namespace)::BatchNormFunction>"),
                              (torch.float16, "compiled", "BatchNormFunctionBackward"),
                              (torch.float32, "torch", "BatchNormFunctionBackward")):
        switch_backend(name)
        x = torch.randn(4, 3, 2, 2, dtype=dtype, requires_grad=True)
        y = bnlab.functional.batch_norm(x, None, None, training=True)
        assert y.grad_fn.name().endswith(node), f"BNLAB_KERNELS={name}, {dtype}: {y.grad_fn.name()}"
