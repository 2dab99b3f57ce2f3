"""Errors: every bad input or argument raises ValueError -- never a bare AssertionError, never a crash in
the kernels -- with a message that says what was expected and what arrived.

One table of (what is wrong, how to trigger it, fragments the message must contain); one generic test.
Where torch also rejects the input, the condition is checked to be torch's.
"""

from __future__ import annotations

import pytest
import torch

import bnlab.functional as F
import bnlab.nn as bnn


def expect_value_error(fn, fragments):
    """Call fn; it must raise ValueError (not AssertionError) whose message holds every fragment."""
    try:
        fn()
    except AssertionError as exc:  # a subclass check would not catch this: AssertionError is no ValueError
        pytest.fail(f"bare AssertionError instead of ValueError: {exc!r}")
    except ValueError as exc:
        message = str(exc)
        missing = [f for f in fragments if f not in message]
        assert not missing, f"error message {message!r} lacks {missing}"
        return exc
    else:
        pytest.fail(f"no ValueError raised; expected one mentioning {fragments}")


def layer_call(make_layer, shape, dtype=torch.float32, training=True):
    def call():
        layer = make_layer()
        layer.train(training)
        layer(torch.ones(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape).to(dtype))

    return call


def functional_call(shape, dtype=torch.float32, running=True, training=True, weight_size=None):
    def call():
        x = torch.randn(shape).to(dtype) if len(shape) else torch.tensor(1.0)
        c = shape[1] if len(shape) > 1 else 1
        rm, rv = (torch.zeros(c), torch.ones(c)) if running else (None, None)
        weight = torch.ones(weight_size) if weight_size is not None else None
        F.batch_norm(x, rm, rv, weight, None, training)

    return call


ERROR_CASES = [
    # ---- wrong rank, with the layer's accepted ranks and the rank that arrived
    ("rank-4D-into-BatchNorm1d", layer_call(lambda: bnn.BatchNorm1d(3), (2, 3, 4, 4)),
     ["BatchNorm1d", "2D (N, C) or 3D (N, C, L)", "got 4D", "(2, 3, 4, 4)"]),
    ("rank-1D-into-BatchNorm1d", layer_call(lambda: bnn.BatchNorm1d(3), (3,)), ["BatchNorm1d", "got 1D", "(3,)"]),
    ("rank-2D-into-BatchNorm2d", layer_call(lambda: bnn.BatchNorm2d(3), (4, 3)),
     ["BatchNorm2d", "4D (N, C, H, W)", "got 2D", "(4, 3)"]),
    ("rank-5D-into-BatchNorm2d", layer_call(lambda: bnn.BatchNorm2d(3), (2, 3, 2, 2, 2)),
     ["BatchNorm2d", "4D", "got 5D"]),
    ("rank-4D-into-BatchNorm3d", layer_call(lambda: bnn.BatchNorm3d(3), (2, 3, 4, 4)),
     ["BatchNorm3d", "5D (N, C, D, H, W)", "got 4D"]),
    ("rank-3D-into-BatchNorm-num_dims4", layer_call(lambda: bnn.BatchNorm(6, num_dims=4), (2, 6, 5)),
     ["BatchNorm", "4D (N, C, H, W)", "got 3D", "(2, 6, 5)"]),
    ("rank-4D-into-BatchNorm-num_dims2", layer_call(lambda: bnn.BatchNorm(120, num_dims=2), (2, 120, 2, 2)),
     ["2D (N, C)", "got 4D"]),
    ("rank-3D-into-LazyBatchNorm2d", layer_call(lambda: bnn.LazyBatchNorm2d(), (2, 3, 4)), ["4D", "got 3D"]),
    ("rank-1D-into-functional", functional_call((3,), running=False), ["at least 2 dimensions", "got 1D"]),
    # ---- channel count
    ("channels-3-into-BatchNorm2d-4", layer_call(lambda: bnn.BatchNorm2d(4), (2, 3, 5, 5)),
     ["expected 4 channels", "got 3", "(2, 3, 5, 5)"]),
    ("channels-3-into-BatchNorm1d-4", layer_call(lambda: bnn.BatchNorm1d(4), (8, 3)), ["expected 4 channels", "got 3"]),
    ("channels-eval-too", layer_call(lambda: bnn.BatchNorm1d(4), (8, 3), training=False), ["expected 4", "got 3"]),
    ("channels-weight-functional", functional_call((4, 3), running=False, weight_size=5),
     ["weight has 5 values", "3 channels"]),
    ("channels-running-functional", lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(2), torch.ones(2)),
     ["running_mean has 2 values", "3 channels"]),
    # ---- one value per channel in training (torch's condition: N * prod(spatial) == 1)
    ("single-value-(1,C)-BatchNorm1d", layer_call(lambda: bnn.BatchNorm1d(3), (1, 3)),
     ["more than 1 value per channel", "(1, 3)"]),
    ("single-value-(1,C,1)-BatchNorm1d", layer_call(lambda: bnn.BatchNorm1d(3), (1, 3, 1)),
     ["more than 1 value per channel", "(1, 3, 1)"]),
    ("single-value-(1,C,1,1)-BatchNorm2d", layer_call(lambda: bnn.BatchNorm2d(3), (1, 3, 1, 1)),
     ["more than 1 value per channel", "(1, 3, 1, 1)"]),
    ("single-value-(1,C,1,1,1)-BatchNorm3d", layer_call(lambda: bnn.BatchNorm3d(3), (1, 3, 1, 1, 1)),
     ["more than 1 value per channel"]),
    ("single-value-eval-without-running-stats",
     layer_call(lambda: bnn.BatchNorm1d(3, track_running_stats=False), (1, 3), training=False),
     ["more than 1 value per channel"]),
    ("single-value-functional", functional_call((1, 3)), ["more than 1 value per channel", "(1, 3)"]),
    # ---- dtype
    ("dtype-int64-BatchNorm1d", layer_call(lambda: bnn.BatchNorm1d(3), (4, 3), dtype=torch.int64),
     ["floating", "torch.int64"]),
    ("dtype-int32-BatchNorm2d", layer_call(lambda: bnn.BatchNorm2d(3), (2, 3, 2, 2), dtype=torch.int32),
     ["floating", "torch.int32"]),
    ("dtype-bool-functional", functional_call((4, 3), dtype=torch.bool), ["floating", "torch.bool"]),
    ("dtype-uint8-eval", layer_call(lambda: bnn.BatchNorm1d(3), (4, 3), dtype=torch.uint8, training=False),
     ["floating", "torch.uint8"]),
    ("dtype-float8-functional", functional_call((4, 3), dtype=torch.float8_e4m3fn), ["floating", "torch.float8_e4m3fn"]),
    ("dtype-complex-functional", lambda: F.batch_norm(torch.randn(4, 3, dtype=torch.complex64), None, None, training=True),
     ["floating", "torch.complex64"]),
    # (an empty batch is no error: torch passes it through, and so does bnlab; see test_torch_cases)
    # ---- functional eval mode needs running statistics
    ("functional-eval-without-running-stats", functional_call((4, 3), running=False, training=False),
     ["running_mean and running_var are required", "training=False"]),
    ("functional-eval-without-running-var",
     lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=False),
     ["running_mean and running_var are required"]),
    # ---- constructor arguments
    ("momentum-negative", lambda: bnn.BatchNorm2d(3, momentum=-0.1), ["momentum", "[0, 1]", "-0.1"]),
    ("momentum-above-1", lambda: bnn.BatchNorm1d(3, momentum=1.5), ["momentum", "1.5"]),
    ("momentum-keras-convention", lambda: bnn.BatchNorm1d(3, momentum=9.0), ["momentum", "9.0", "convert_momentum"]),
    ("momentum-nan", lambda: bnn.BatchNorm3d(3, momentum=float("nan")), ["momentum", "nan"]),
    ("momentum-chapter-layer", lambda: bnn.BatchNorm(3, num_dims=2, momentum=2.0), ["momentum", "2.0"]),
    ("momentum-lazy-layer", lambda: bnn.LazyBatchNorm2d(momentum=-1.0), ["momentum", "-1.0"]),
    ("num_dims-1", lambda: bnn.BatchNorm(3, num_dims=1), ["num_dims", "2, 3, 4 or 5", "1"]),
    ("num_dims-6", lambda: bnn.BatchNorm(3, num_dims=6), ["num_dims", "6"]),
    ("num_dims-string", lambda: bnn.BatchNorm(3, num_dims="4"), ["num_dims", "'4'"]),
    ("num_features-negative", lambda: bnn.BatchNorm2d(-3), ["num_features", "-3"]),
    ("eps-zero", lambda: bnn.BatchNorm2d(3, eps=0.0), ["eps", "0.0"]),
    ("convert-unknown-target", lambda: bnn.convert(torch.nn.BatchNorm2d(3), to="keras"), ["'bnlab' or 'torch'", "keras"]),
]


@pytest.mark.parametrize("fn,fragments", [pytest.param(f, m, id=i) for i, f, m in ERROR_CASES])
def test_raises_value_error_with_message(backend, fn, fragments):
    expect_value_error(fn, fragments)


# ---- the single-value condition is torch's -----------------------------------------------------------

SINGLE_VALUE_SHAPES = [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1), (1, 3, 2), (1, 3, 2, 2), (2, 3, 1, 1),
                       (1, 3, 1, 2, 1)]


@pytest.mark.parametrize("shape", SINGLE_VALUE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_batch_size_condition_is_torchs(backend, shape):
    """Training raises exactly when torch does (one value per channel); otherwise the outputs agree."""
    family = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[len(shape)]
    ours = {"1d": bnn.BatchNorm1d, "2d": bnn.BatchNorm2d, "3d": bnn.BatchNorm3d}[family](3)
    theirs = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}[family](3)
    x = torch.randn(shape)
    try:
        expected = theirs(x)
    except ValueError:
        expect_value_error(lambda: ours(x), ["more than 1 value per channel", str(tuple(shape))])
        return
    torch.testing.assert_close(ours(x), expected)


def test_single_sample_is_fine_in_eval_mode(backend):
    """(1, C) is rejected only in training: eval mode normalizes it with the running statistics."""
    ours, theirs = bnn.BatchNorm1d(3).eval(), torch.nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
            layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(1, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_rejected_inputs_leave_running_statistics_untouched(backend):
    """A rejected batch must not move the running statistics (nor write NaN into them)."""
    layer = bnn.BatchNorm2d(3)
    for bad in (torch.ones(1, 3, 1, 1), torch.ones(2, 4, 2, 2), torch.ones(2, 3, 2)):
        expect_value_error(lambda: layer(bad), [])
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))


def test_is_floating_is_membership_of_floating():
    """`is_floating` (dtype attributes, guard-free under torch.compile) agrees with the FLOATING tuple on
    every dtype torch has."""
    from bnlab.functional.core import FLOATING, is_floating

    dtypes = {value for value in vars(torch).values() if isinstance(value, torch.dtype)}
    assert len(dtypes) > 20, "torch's dtypes were not found"
    assert {d for d in dtypes if is_floating(d)} == set(FLOATING)
