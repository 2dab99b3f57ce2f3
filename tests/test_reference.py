"""bnlab against the NumPy float64 oracle (`bnlab.reference`), over the float64 half of the case table,
under both kernel backends.

The oracle is driven by a small NumPy re-statement of torch's layer semantics (`OracleLayer`): which
statistics a mode uses, when the running statistics move, num_batches_tracked and momentum=None.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlab import reference
from cases import (
    CASES_F64,
    STEPS,
    BNLAB_LAYERS,
    generator,
    initial_state,
    params_of,
    reference_step_inputs,
    view_of,
)

RTOL = ATOL = 1e-10


class OracleLayer:
    """A batch-norm layer in NumPy: torch's bookkeeping around `reference.forward` / `reference.backward`."""

    def __init__(self, case, state: dict):
        self.case = case
        as_np = lambda key: state[key].double().numpy().copy() if key in state else None  # noqa: E731
        self.weight, self.bias = as_np("weight"), as_np("bias")
        self.running_mean, self.running_var = as_np("running_mean"), as_np("running_var")
        self.num_batches_tracked = int(state["num_batches_tracked"]) if "num_batches_tracked" in state else None

    def step(self, x: np.ndarray, dy: np.ndarray, training: bool):
        """Forward and backward of one batch; returns (y, dx, dweight, dbias)."""
        track = self.case.track_running_stats
        use_batch_stats = training or not track
        if use_batch_stats:
            update = training and track
            momentum = self.case.momentum
            if update:
                self.num_batches_tracked += 1
                if momentum is None:
                    momentum = 1.0 / self.num_batches_tracked
            out = reference.forward(
                x, self.weight, self.bias,
                self.running_mean if update else None, self.running_var if update else None,
                training=True, momentum=0.0 if momentum is None else momentum,
            )
            if update:
                self.running_mean, self.running_var = out.running_mean, out.running_var
            dx, dw, db = reference.backward(dy, x, self.weight, training=True)
        else:
            out = reference.forward(x, self.weight, self.bias, self.running_mean, self.running_var, training=False)
            dx, dw, db = reference.backward(
                dy, x, self.weight, mean=self.running_mean, var=self.running_var, training=False
            )
        return out.y, dx, dw, db


def _close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(
        actual.detach().double().numpy(), expected, rtol=RTOL, atol=ATOL, err_msg=f"{what} differs from the oracle"
    )


@pytest.mark.parametrize("case", CASES_F64, ids=[c.id for c in CASES_F64])
def test_layer_matches_numpy_oracle_over_steps(case, backend):
    gen = generator(case.id)
    state = initial_state(case, gen)
    layer = BNLAB_LAYERS[case.family](case.num_features, **case.layer_kwargs())
    layer.load_state_dict(state)
    layer.train(case.training)
    oracle = OracleLayer(case, state)

    for step in range(STEPS):
        leaf, dy = reference_step_inputs(case, step)
        x = view_of(leaf, case.layout)
        y = layer(x)
        y.backward(dy)
        y_ref, dx_ref, dw_ref, db_ref = oracle.step(x.detach().numpy(), dy.numpy(), case.training)

        _close(y, y_ref, f"step {step}: output")
        _close(view_of(leaf.grad, case.layout), dx_ref, f"step {step}: input gradient")
        if case.affine:
            _close(layer.weight.grad, dw_ref, f"step {step}: weight gradient")
            _close(layer.bias.grad, db_ref, f"step {step}: bias gradient")
        if case.track_running_stats:
            _close(layer.running_mean, oracle.running_mean, f"step {step}: running_mean")
            _close(layer.running_var, oracle.running_var, f"step {step}: running_var")
            assert int(layer.num_batches_tracked) == oracle.num_batches_tracked, f"step {step}"
        else:
            assert layer.running_mean is None and layer.running_var is None

        # The same SGD update on both sides, from the oracle's gradients.
        with torch.no_grad():
            for name, p in params_of(layer).items():
                g = dw_ref if name == "weight" else db_ref
                p.sub_(0.1 * torch.from_numpy(g))
                p.grad = None
                setattr(oracle, name, getattr(oracle, name) - 0.1 * g)
