"""Layer robustness (issue 11): `bnlab.nn.check_finite`, and `load_state_dict` errors against torch's.

- check_finite: a NaN or inf reaching a normalization layer in training mode raises ValueError naming
  the layer, before its running statistics change; eval mode and finite inputs are untouched (bitwise);
  the hooks go away when the with-block ends, even on error. Also pinned: what torch does without it.
- load_state_dict: wrong shapes, dtypes, missing, unexpected and non-tensor entries give exactly torch's
  errors (naming the key) for bnlab's layers with a torch peer, and torch-style ones for the others.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab.nn as bnn

NAN, INF = float("nan"), float("inf")

# (id, factory of a layer taking the (N, 4, 5, 5) output of a 1x1 conv)
NORMS = [
    ("torch-BatchNorm2d", lambda: nn.BatchNorm2d(4)),
    ("bnlab-BatchNorm2d", lambda: bnn.BatchNorm2d(4)),
    ("bnlab-BatchNorm-chapter", lambda: bnn.BatchNorm(4, 4)),
    ("torch-InstanceNorm2d", lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
    ("bnlab-InstanceNorm2d", lambda: bnn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
    ("torch-GroupNorm", lambda: nn.GroupNorm(2, 4)),
    ("bnlab-GroupNorm", lambda: bnn.GroupNorm(2, 4)),
    ("torch-LayerNorm", lambda: nn.LayerNorm([4, 5, 5])),
    ("bnlab-LayerNorm", lambda: bnn.LayerNorm([4, 5, 5])),
    ("bnlab-BatchRenorm2d", lambda: bnn.BatchRenorm2d(4)),
    ("bnlab-GhostBatchNorm2d", lambda: bnn.GhostBatchNorm2d(4, ghost_batch_size=2)),
    ("bnlab-MeanOnlyBatchNorm2d", lambda: bnn.MeanOnlyBatchNorm2d(4)),
    ("bnlab-DecorrelatedBatchNorm2d", lambda: bnn.DecorrelatedBatchNorm2d(4, 2)),
]
NORM_IDS = [n for n, _ in NORMS]


class Net(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), norm, nn.Flatten())

    def forward(self, x):
        return self.layers(x)


def net(factory) -> Net:
    torch.manual_seed(0)
    return Net(factory())


def batch(*poison) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5)
    for i, value in enumerate(poison):
        x[i, 0, i, i] = value
    return x


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


# ---- what torch does without the guard (the docstring's claim) ---------------------------------------


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(3), lambda: bnn.BatchNorm2d(3)], ids=["torch", "bnlab"])
def test_without_the_guard_one_nan_poisons_running_stats_for_good(make, backend):
    bn = make()
    x = torch.randn(8, 3, 4, 4)
    x[0, 1, 0, 0] = NAN
    bn(x)
    for _ in range(100):
        bn(torch.randn(8, 3, 4, 4))
    assert bn.running_mean[1].isnan() and bn.running_var[1].isnan()
    assert bn.running_mean[[0, 2]].isfinite().all()
    bn.eval()
    assert bn(torch.randn(2, 3, 4, 4))[:, 1].isnan().all()


# ---- the guard ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("factory", [f for _, f in NORMS], ids=NORM_IDS)
def test_non_finite_input_in_training_raises_naming_the_layer(factory, poison, backend):
    model = net(factory)
    before = state(model)
    with pytest.raises(ValueError) as info, bnn.check_finite(model):
        model(batch(poison))
    message = str(info.value)
    kind = "NaN" if poison != poison else "inf"
    assert message.startswith(f"layers.3 ({type(model.layers[3]).__name__}) got a non-finite input")
    assert kind in message and "running statistics" in message and "learning rate" in message
    assert "\n" not in message
    assert_same_state(state(model), before)  # running stats, num_batches_tracked and weights untouched
    assert hook_count(model) == 0


def test_the_message_counts_nan_and_inf(backend):
    bn = nn.BatchNorm1d(3)
    x = torch.randn(4, 3)
    x[0, 0], x[1, 1], x[2, 2] = NAN, NAN, INF
    with pytest.raises(ValueError, match=r"^the model itself \(BatchNorm1d\) got a non-finite input in training "
                                         r"mode: 2 NaN and 1 inf of 12 values"), bnn.check_finite(bn):
        bn(x)
    assert bn.num_batches_tracked == 0 and bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()


@pytest.mark.parametrize("factory", [f for _, f in NORMS], ids=NORM_IDS)
def test_finite_input_and_eval_mode_are_untouched(factory, backend):
    guarded, plain = net(factory), net(factory)
    x = batch()
    with bnn.check_finite(guarded):
        y_guarded = guarded(x)
    y_plain = plain(x)
    torch.testing.assert_close(y_guarded, y_plain, rtol=0, atol=0)  # bitwise
    assert_same_state(state(guarded), state(plain))
    # eval mode: no check, even for a NaN input; the output is the unguarded one, NaN and all
    guarded.eval(), plain.eval()
    poisoned = batch(NAN, INF)
    with bnn.check_finite(guarded):
        y_guarded = guarded(poisoned)
    torch.testing.assert_close(y_guarded, plain(poisoned), rtol=0, atol=0, equal_nan=True)
    assert hook_count(guarded) == 0


def test_hooks_are_removed_on_exit_even_on_error_and_the_one_call_form():
    model = net(lambda: bnn.BatchNorm2d(4))
    model.layers.append(nn.BatchNorm1d(100))
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with bnn.check_finite(model) as guard:
            assert [name for name, _ in guard.layers] == ["layers.3", "layers.5"]
            assert hook_count(model) == 2
            raise RuntimeError("boom")
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match="layers.3"), bnn.check_finite(model):
        model(batch(NAN))
    assert hook_count(model) == 0
    guard = bnn.check_finite(model)  # the one-call form: guards until removed
    with pytest.raises(ValueError, match="layers.3"):
        model(batch(INF))
    guard.remove()
    guard.remove()  # twice is harmless
    assert hook_count(model) == 0
    model(batch(NAN))  # unguarded again: torch's behaviour
    assert model.layers[3].running_mean.isnan().any()


def test_a_guarded_training_step_keeps_the_model_usable():
    """The point of the guard: after the refused step, training and evaluation go on with finite stats."""
    model = net(lambda: bnn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with bnn.check_finite(model):
        for step in range(4):
            x = batch(NAN) if step == 1 else batch()
            try:
                loss = model(x).square().mean()
            except ValueError:
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    bn = model.layers[3]
    assert bn.num_batches_tracked == 3
    assert bn.running_mean.isfinite().all() and bn.running_var.isfinite().all()


def test_check_finite_wants_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bnn.check_finite(torch.zeros(3))


# ---- load_state_dict: wrong shapes and dtypes, against torch -----------------------------------------

# (id, bnlab factory, torch peer factory or None)
LAYERS = [
    ("BatchNorm1d", lambda: bnn.BatchNorm1d(3), lambda: nn.BatchNorm1d(3)),
    ("BatchNorm2d", lambda: bnn.BatchNorm2d(3), lambda: nn.BatchNorm2d(3)),
    ("BatchNorm3d", lambda: bnn.BatchNorm3d(3), lambda: nn.BatchNorm3d(3)),
    ("BatchNorm-chapter", lambda: bnn.BatchNorm(3, 4), lambda: nn.BatchNorm2d(3)),
    ("SyncBatchNorm", lambda: bnn.SyncBatchNorm(3), lambda: nn.SyncBatchNorm(3)),
    ("InstanceNorm2d", lambda: bnn.InstanceNorm2d(3, affine=True, track_running_stats=True),
     lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True)),
    ("GroupNorm", lambda: bnn.GroupNorm(1, 3), lambda: nn.GroupNorm(1, 3)),
    ("LayerNorm", lambda: bnn.LayerNorm([3, 4]), lambda: nn.LayerNorm([3, 4])),
    ("LazyBatchNorm2d-initialized", lambda: initialized(bnn.LazyBatchNorm2d()),
     lambda: initialized(nn.LazyBatchNorm2d())),
    ("MeanOnlyBatchNorm2d", lambda: bnn.MeanOnlyBatchNorm2d(3), None),
    ("VarianceOnlyBatchNorm2d", lambda: bnn.VarianceOnlyBatchNorm2d(3), None),
    ("FrozenBatchNorm2d", lambda: bnn.FrozenBatchNorm2d(3), None),
    ("BatchRenorm2d", lambda: bnn.BatchRenorm2d(3), None),
    ("GhostBatchNorm2d", lambda: bnn.GhostBatchNorm2d(3), None),
    ("DecorrelatedBatchNorm2d", lambda: bnn.DecorrelatedBatchNorm2d(4, 2), None),
    ("IterNorm2d", lambda: bnn.IterNorm2d(4, 2), None),
    ("PITNorm2d", lambda: bnn.PITNorm2d(3), None),
]
FAULTS = ("shape", "scalar", "dtype", "missing", "not-a-tensor")


def initialized(layer):
    layer(torch.randn(2, 3, 4, 4))
    return layer


def faulty(state_dict: dict, key: str, fault: str) -> dict:
    sd = dict(state_dict)
    value = sd[key]
    if fault == "shape":
        sd[key] = torch.zeros(*(s + 1 for s in value.shape)) if value.dim() else torch.zeros(2)
    elif fault == "scalar":
        sd[key] = torch.zeros(()) if value.dim() else torch.zeros(1)
    elif fault == "dtype":
        sd[key] = (value.double() if value.is_floating_point() else value.float()) + 1
    elif fault == "missing":
        del sd[key]
    elif fault == "not-a-tensor":
        sd[key] = "abc"
    return sd


def outcome(model: nn.Module, sd: dict):
    """('ok', the state after loading) or (exception type, message)."""
    try:
        model.load_state_dict(sd)
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        return type(exc), str(exc)
    return "ok", {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


def expected_error(key: str, fault: str, value: torch.Tensor, sd: dict) -> str:
    """The torch-style line naming the key."""
    if fault in ("shape", "scalar"):
        return (f"size mismatch for {key}: copying a param with shape {sd[key].shape} from checkpoint, the shape "
                f"in current model is {value.shape}.")
    if fault == "missing":
        return f'Missing key(s) in state_dict: "{key}".'
    return f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like object'


CASES = [(name, make, peer, key, fault)
         for name, make, peer in LAYERS
         for key in nn.Sequential(nn.Identity(), make()).state_dict()
         for fault in FAULTS]


@pytest.mark.parametrize("name,make,peer,key,fault", CASES, ids=[f"{c[0]}-{c[3]}-{c[4]}" for c in CASES])
def test_load_state_dict_errors_name_the_key_like_torch(name, make, peer, key, fault):
    model = nn.Sequential(nn.Identity(), make())
    good = {k: v.clone() for k, v in model.state_dict().items()}
    sd = faulty(good, key, fault)
    got = outcome(model, sd)
    if (fault == "dtype" or (fault == "missing" and key.endswith("num_batches_tracked"))
            or (fault == "scalar" and good[key].dim() == 0)):
        # torch casts dtypes into the module's own, fills a missing num_batches_tracked (older files) and
        # takes a one-element vector for a 0-dim entry (older files too)
        assert got[0] == "ok", got
        assert got[1] == {k: (v.dtype, tuple(v.shape)) for k, v in good.items()}
        if fault == "dtype":
            torch.testing.assert_close(model.state_dict()[key], (good[key] + 1).to(good[key].dtype))
    else:
        assert got[0] is RuntimeError, got
        assert got[1].startswith("Error(s) in loading state_dict for Sequential:\n\t")
        assert expected_error(key, fault, good[key], sd) in got[1], got[1]
        if fault != "missing":  # a refused entry leaves the layer as it was (torch's behaviour too)
            assert_same_state(state(model), good)
    if peer is not None:
        reference = nn.Sequential(nn.Identity(), peer())
        assert reference.state_dict().keys() == good.keys()
        expected = outcome(reference, faulty(state(reference), key, fault))
        assert got[0] == expected[0] and (got[0] == "ok" or got[1] == expected[1]), (got, expected)


@pytest.mark.parametrize("name,make,peer", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_load_state_dict_unexpected_key_and_old_version(name, make, peer):
    model = nn.Sequential(nn.Identity(), make())
    sd = {**state(model), "1.extra": torch.zeros(1)}
    kind, message = outcome(model, sd)
    assert kind is RuntimeError and 'Unexpected key(s) in state_dict: "1.extra".' in message
    # a state dict written before num_batches_tracked existed (version 1) loads, as torch's does
    sd = copy.deepcopy(model.state_dict())
    sd.pop("1.num_batches_tracked", None)
    sd._metadata["1"]["version"] = 1
    model.load_state_dict(sd)
    if getattr(model[1], "num_batches_tracked", None) is not None:
        assert model[1].num_batches_tracked == 0
