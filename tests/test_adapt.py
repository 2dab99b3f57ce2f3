"""bnlab.adapt: AdaBN, tent and batch statistics under a shift, for torch's BN and bnlab's (issue 13)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
import bnlab.nn
from bnlab.adapt import METHODS, predict

BN_KINDS = {"torch": nn.BatchNorm1d, "bnlab": bnlab.nn.BatchNorm1d}


def source_model(kind: str) -> nn.Sequential:
    """A classifier of 3 Gaussian classes in 6 dimensions, trained on the source distribution."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16, bias=False), BN_KINDS[kind](16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(150):
        x, y = sample(64)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval()


CENTRES = torch.eye(6)[:3] * 3


def sample(n: int, shift: float = 0.0, scale: float = 1.0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = CENTRES[y] + torch.randn(n, 6, generator=g)
    return x * scale + shift, y


def shifted_batches(n_batches=8, size=64):
    return [sample(size, shift=4.0, scale=2.0, seed=10 + i) for i in range(n_batches)]


def accuracy(outputs, batches):
    return float((outputs.argmax(1) == torch.cat([y for _, y in batches])).double().mean())


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_adaptation_recovers_accuracy_under_shift_and_leaves_the_original(kind, method):
    net = source_model(kind)
    before = copy.deepcopy(net.state_dict())
    target = shifted_batches()
    with torch.no_grad():
        unadapted = accuracy(torch.cat([net(x) for x, _ in target]), target)
    adapted = accuracy(predict(net, target, method=method, lr=1e-3), target)
    assert unadapted < 0.7 and adapted > unadapted + 0.2, (unadapted, adapted)
    state = net.state_dict()
    assert all(torch.equal(before[k], state[k]) for k in before) and not net.training
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("kind", BN_KINDS)
def test_adabn_sets_exact_target_statistics(kind):
    net = source_model(kind)
    target = shifted_batches()
    adapted = bnlab.adapt(net, target, method="adabn")
    features = net[0](torch.cat([x for x, _ in target])).detach()
    assert torch.allclose(adapted[1].running_mean, features.mean(0), atol=1e-4)
    assert torch.allclose(adapted[1].running_var, features.var(0), rtol=1e-4)
    assert adapted is not net and not adapted.training


def test_batch_stats_normalizes_each_batch_by_its_own_statistics():
    net = source_model("bnlab")
    adapted = bnlab.adapt(net, shifted_batches(), method="batch-stats")
    x = torch.randn(32, 6) * 5 + 3
    expected = nn.functional.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias, training=True)
    assert torch.allclose(adapted[1](adapted[0](x)), expected, atol=1e-5)


@pytest.mark.parametrize("kind", BN_KINDS)
def test_tent_trains_only_the_bn_affine_and_lowers_entropy(kind):
    net = source_model(kind)
    target = shifted_batches()
    adapted = bnlab.adapt(net, target, method="tent", steps=3, lr=1e-2)
    for (name, p), (_, q) in zip(net.named_parameters(), adapted.named_parameters()):
        assert torch.equal(p, q) != name.startswith("1."), name  # only BN's γ, β moved
    plain = bnlab.adapt(net, target, method="batch-stats")

    def entropy(model):
        with torch.no_grad():
            return sum(bnlab.adapt._entropy(model(x)).item() for x, _ in target)

    assert entropy(adapted) < entropy(plain)


def test_tent_reset_adapts_each_batch_from_the_source():
    net = source_model("torch")
    target = shifted_batches(2)
    one = predict(net, target[:1], method="tent", steps=2, lr=0.05)
    episodic = predict(net, target[1:] + target[:1], method="tent", steps=2, lr=0.05, reset=True)
    online = predict(net, target[1:] + target[:1], method="tent", steps=2, lr=0.05, reset=False)
    assert torch.allclose(episodic[64:], one, atol=1e-6)  # the same first-batch prediction after a reset
    assert not torch.allclose(online[64:], one, atol=1e-4)


def test_tent_default_lr_scales_with_each_target_batch():
    net = source_model("torch")
    target = [sample(64, shift=4.0, scale=2.0, seed=10), sample(16, shift=4.0, scale=2.0, seed=11),
              sample(16, shift=4.0, scale=2.0, seed=12)]
    assert bnlab.adapt.tent_lr(128) == pytest.approx(0.1) and bnlab.adapt.tent_lr(16) == pytest.approx(0.0125)
    default = predict(net, target, method="tent", steps=2)
    fixed_64 = predict(net, target, method="tent", steps=2, lr=bnlab.adapt.tent_lr(64))
    # Each batch is predicted before its own steps: the first two only saw steps at 0.1 × 64 / 128 in both ...
    assert torch.allclose(default[:80], fixed_64[:80], atol=1e-6)
    # ... the third follows the second batch's steps, at 0.1 × 16 / 128 by default instead of 0.05.
    assert not torch.allclose(default[80:], fixed_64[80:], atol=1e-5)


@pytest.mark.parametrize("model, kwargs, message", [
    (nn.Sequential(nn.Linear(6, 3), nn.LayerNorm(3)), {}, "no batch-norm layer"),
    (None, {"method": "bn-adapt"}, "unknown adaptation method"),
    (None, {"method": "tent", "steps": 0}, "steps must be a positive int"),
    (None, {"method": "tent", "lr": 0.0}, "lr must be positive"),
    (nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3, affine=False)), {"method": "tent"}, "affine=False"),
])
def test_bad_arguments_are_value_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bnlab.adapt(model or source_model("torch"), shifted_batches(1), **kwargs)


def test_empty_batches_are_a_value_error():
    with pytest.raises(ValueError, match="yielded nothing"):
        bnlab.adapt(source_model("torch"), [], method="adabn")
