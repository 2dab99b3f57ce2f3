"""BN at prediction time and during accumulation: fold_batchnorm, recompute_stats, accumulate_stats,
`bnlab train --precise-stats`. Exactness is checked against an independent computation every time."""

import copy
import itertools
import json

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import data
from bnlab.bench import bench_infer
from bnlab.cli import main
from bnlab.training import TrainConfig, load_checkpoint, train

LAYERS = {  # (affine layer, input shape, its BN) per rank
    "conv1d": (lambda bias: nn.Conv1d(3, 5, 3, bias=bias), (6, 3, 9), {"bnlab": bnn.BatchNorm1d, "torch": nn.BatchNorm1d}),
    "conv2d": (lambda bias: nn.Conv2d(3, 5, 3, bias=bias), (6, 3, 7, 7), {"bnlab": bnn.BatchNorm2d, "torch": nn.BatchNorm2d}),
    "conv3d": (lambda bias: nn.Conv3d(3, 5, 3, bias=bias), (6, 3, 5, 5, 5), {"bnlab": bnn.BatchNorm3d, "torch": nn.BatchNorm3d}),
    "linear": (lambda bias: nn.Linear(3, 5, bias=bias), (6, 3), {"bnlab": bnn.BatchNorm1d, "torch": nn.BatchNorm1d}),
}


def trained_statistics(net: nn.Module, shape, steps: int = 3) -> nn.Module:
    """A few training-mode forwards and a random affine, so the BN is far from the identity."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):
            net(torch.randn(shape, generator=gen, dtype=next(net.parameters()).dtype) * 3 + 1)
        for m in net.modules():
            if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 2.0, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(generator=gen)
    return net


@pytest.mark.parametrize("layer,impl,bias,affine,dtype", list(itertools.product(
    LAYERS, ("bnlab", "torch"), (True, False), (True, False), (torch.float32, torch.float64))))
def test_fold_equals_eval_mode_model(layer, impl, bias, affine, dtype):
    make, shape, bns = LAYERS[layer]
    net = nn.Sequential(make(bias), bns[impl](5, affine=affine), nn.ReLU()).to(dtype)
    trained_statistics(net, shape)
    before = copy.deepcopy(net.state_dict())
    folded = bnn.fold_batchnorm(net)
    assert isinstance(folded[1], nn.Identity) and not folded.training
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # original untouched
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(folded(x), net.eval()(x), rtol=tol, atol=tol)


class ResidualBlock(nn.Module):
    """Not a Sequential: folding must come from tracing. conv3's output feeds bn3 and the sum."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), bnn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), bnn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + x
        z = self.conv3(y)
        return self.bn3(z) + z


def test_fold_follows_the_graph_and_leaves_shared_outputs_alone():
    block = trained_statistics(ResidualBlock(), (8, 4, 6, 6))
    folded = bnn.fold_batchnorm(block)
    assert type(folded) is ResidualBlock
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(folded.bn3, bnn.BatchNorm2d), "conv3's output is also used directly: folding it would be wrong"
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(folded(x), block.eval()(x), rtol=1e-5, atol=1e-5)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), bnn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x)  # the same BN at two call sites


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), bnn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)  # the conv's weights also serve a second, un-normalized use


@pytest.mark.parametrize("module", [Reused, SharedConv])
def test_fold_skips_layers_called_at_two_sites(module):
    net = trained_statistics(module(), (8, 2, 4, 4))
    folded = bnn.fold_batchnorm(net)
    assert isinstance(folded.bn, bnn.BatchNorm2d)
    x = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(folded(x), net.eval()(x))


class DataDependent(nn.Module):
    """Untraceable (Python control flow on a tensor value): folding falls back to Sequential pairs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3), bnn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else x


def test_fold_falls_back_to_sequentials_for_untraceable_models():
    net = trained_statistics(DataDependent(), (8, 1, 6, 6))
    folded = bnn.fold_batchnorm(net)
    assert isinstance(folded.body[1], nn.Identity)
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(folded(x), net.eval()(x), rtol=1e-5, atol=1e-5)


def test_fold_handles_frozen_batch_norm_and_ignores_other_norms():
    net = trained_statistics(nn.Sequential(nn.Conv2d(1, 4, 3), bnn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                           bnn.GroupNorm(2, 4)), (8, 1, 9, 9))
    folded = bnn.fold_batchnorm(bnn.freeze(copy.deepcopy(net.eval())))
    assert [type(m).__name__ for m in folded] == ["Conv2d", "Identity", "Conv2d", "GroupNorm"]
    x = torch.randn(2, 1, 9, 9)
    torch.testing.assert_close(folded(x), net.eval()(x), rtol=1e-5, atol=1e-5)
    lite = trained_statistics(nn.Sequential(nn.Conv2d(1, 4, 3), bnn.MeanOnlyBatchNorm2d(4)), (8, 1, 9, 9))
    assert isinstance(bnn.fold_batchnorm(lite)[1], bnn.MeanOnlyBatchNorm2d), "its eval mode is not BN's map"


# ---- recompute_stats --------------------------------------------------------------------------------


def test_recompute_stats_gives_the_exact_pooled_statistics():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, 4, 4, generator=gen) * (i + 1) + i for i, n in enumerate((5, 17, 8))]
    bn = bnn.BatchNorm2d(3)
    bn.num_batches_tracked.fill_(7)
    bnn.recompute_stats(bn, ((b, None) for b in batches))  # (input, label) pairs, from a generator
    everything = torch.cat(batches).transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(bn.running_mean.double(), everything.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), everything.var(1), rtol=1e-6, atol=1e-6)  # unbiased
    assert int(bn.num_batches_tracked) == 7


def test_recompute_stats_sees_inputs_as_training_without_dropout_and_restores_modes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.9), bnn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6))
    net.eval()
    net[3].train()  # an odd mix of modes, to be restored exactly
    modes = [m.training for m in net.modules()]
    batches = [torch.randn(16, 4) for _ in range(3)]
    bnn.recompute_stats(net, batches)
    assert [m.training for m in net.modules()] == modes
    inputs = torch.cat([net[0](b) for b in batches]).detach()  # dropout off: the BN input is net[0]'s output
    torch.testing.assert_close(net[2].running_var, inputs.var(0), rtol=1e-5, atol=1e-6)
    # the second BN saw the first BN's training-mode (batch-statistics) output
    second = torch.cat([net[3](torch.nn.functional.batch_norm(net[0](b), None, None, net[2].weight, net[2].bias,
                                                              training=True)) for b in batches]).detach()
    torch.testing.assert_close(net[4].running_mean, second.mean(0), rtol=1e-5, atol=1e-6)


def test_recompute_stats_errors_leave_the_statistics_alone():
    bn = bnn.BatchNorm1d(2)
    with pytest.raises(ValueError, match="yielded nothing"):
        bnn.recompute_stats(bn, [])
    with pytest.raises(ValueError, match="no batch-norm or whitening layer"):
        bnn.recompute_stats(nn.Linear(2, 2), [torch.randn(4, 2)])

    def failing():
        yield torch.randn(8, 2) * 5
        raise RuntimeError("data broke")

    with pytest.raises(RuntimeError, match="data broke"):
        bnn.recompute_stats(bn, failing())
    assert torch.equal(bn.running_mean, torch.zeros(2)) and torch.equal(bn.running_var, torch.ones(2))


@pytest.mark.parametrize("layer, expected", [
    (bnn.BatchNorm2d(3), True),
    (nn.BatchNorm2d(3), True),
    (bnn.BatchNorm2d(3, track_running_stats=False), False),
    (bnn.DecorrelatedBatchNorm2d(4, group_size=2), True),
    (bnn.IterNorm2d(4, group_size=2), True),
    (bnn.IterNorm2d(4, group_size=2, track_running_stats=False), False),
    (bnn.PITNorm2d(3), False),  # running quantiles: no exact statistic to set
    (bnn.MeanOnlyBatchNorm2d(3), False),
    (bnn.LayerNorm(3), False),
    (nn.Linear(3, 3), False),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_recomputable_layers(layer, expected):
    assert bnn.recomputable(layer) is expected


@pytest.mark.parametrize("make", [lambda: bnn.DecorrelatedBatchNorm2d(6, group_size=3, dtype=torch.float64),
                                  lambda: bnn.IterNorm2d(6, group_size=3, iterations=4, dtype=torch.float64)],
                         ids=["zca", "iternorm"])
def test_recompute_stats_whitens_in_eval_mode_by_the_exact_covariance(make):
    """After recomputing over chunks of a data set, eval mode maps that data exactly as training mode maps it
    in one batch: the same mean and the same whitening matrix, of the whole set's covariance."""
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    data_set = torch.einsum("nchw,dc->ndhw", torch.randn(40, 6, 3, 3, generator=gen, dtype=torch.float64), mixing) + 2
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0, generator=gen)
        layer.bias.uniform_(-1.0, 1.0, generator=gen)
        whole_batch = copy.deepcopy(layer).train()(data_set)
    layer(data_set[:5])  # running statistics away from their initial values
    tracked = int(layer.num_batches_tracked)
    bnn.recompute_stats(layer, data_set.split([7, 20, 13]))
    torch.testing.assert_close(layer.eval()(data_set), whole_batch, rtol=1e-9, atol=1e-9)
    assert int(layer.num_batches_tracked) == tracked


def test_recompute_stats_leaves_layers_it_cannot_recompute_alone():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), bnn.BatchNorm2d(3), bnn.PITNorm2d(3))
    net(torch.randn(8, 1, 6, 6))
    quantiles = net[2].running_quantiles.clone()
    bnn.recompute_stats(net, [torch.randn(8, 1, 6, 6) * 3])
    assert torch.equal(net[2].running_quantiles, quantiles)
    with pytest.raises(ValueError, match="no batch-norm or whitening layer"):
        bnn.recompute_stats(bnn.PITNorm2d(3), [torch.randn(8, 3, 4, 4)])


# ---- accumulate_stats -------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_accumulated_micro_batches_update_running_stats_like_the_whole_batch(momentum):
    gen = torch.Generator().manual_seed(0)
    accumulated, whole = bnn.BatchNorm2d(3, momentum=momentum), bnn.BatchNorm2d(3, momentum=momentum)
    for step in range(3):
        batch = torch.randn(24, 3, 5, 5, generator=gen) * (step + 1) + step
        with bnn.accumulate_stats(accumulated):
            outputs = [accumulated(micro) for micro in batch.split([10, 6, 8])]
        whole(batch)
        # each micro-batch is still normalized by its own statistics
        torch.testing.assert_close(outputs[1], torch.nn.functional.batch_norm(batch[10:16], None, None, training=True))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(accumulated, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
    assert int(accumulated.num_batches_tracked) == 3


def test_accumulate_stats_updates_nothing_when_the_step_fails_and_rejects_other_norms():
    bn = bnn.BatchNorm1d(2)
    with pytest.raises(RuntimeError, match="oops"):
        with bnn.accumulate_stats(bn):
            bn(torch.randn(8, 2) * 4 + 3)
            raise RuntimeError("oops")
    assert torch.equal(bn.running_mean, torch.zeros(2)) and int(bn.num_batches_tracked) == 0
    bn(torch.randn(8, 2))  # and the layer works normally afterwards
    assert int(bn.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="GhostBatchNorm1d"):
        with bnn.accumulate_stats(nn.Sequential(bnn.BatchNorm1d(2), bnn.GhostBatchNorm1d(2))):
            pass


def test_accumulate_stats_leaves_eval_mode_alone():
    bn = bnn.BatchNorm1d(2).eval()
    x = torch.randn(8, 2)
    with bnn.accumulate_stats(bn):
        y = bn(x)
    torch.testing.assert_close(y, x / torch.sqrt(torch.tensor(1 + 1e-5)))
    assert int(bn.num_batches_tracked) == 0


# ---- the trainer and the benchmark --------------------------------------------------------------------


def test_train_precise_stats_on_real_data(tmp_path):
    dataset = data.load(download=False)
    config = TrainConfig(epochs=1, lr=1.0, batch_size=256, train_subset=3000, test_subset=1000,
                         precise_stats=True, out=str(tmp_path / "run"))
    result = train(config, dataset=dataset, progress=False, log=lambda line: None)
    summary = json.loads((tmp_path / "run" / "precise_stats.json").read_text())
    assert summary["moving_average"]["test_acc"] == result.final.test_acc
    assert load_checkpoint(tmp_path / "run")["precise_stats"] is True
    assert summary["precise"]["test_acc"] > 0.3, "well above chance with exact statistics"


def test_evaluate_reports_the_precise_statistics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--train-subset", "2000", "--test-subset", "500", "--precise-stats",
                 "--no-download", "--out", str(out)]) == 0
    precise = json.loads((out / "precise_stats.json").read_text())["precise"]["test_acc"]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--no-download"]) == 0
    assert f"test acc {precise:.4f} with precise BN statistics" in capsys.readouterr().out


def test_bench_infer_folding_keeps_the_function():
    results = bench_infer(batch_sizes=(1, 8), repeats=1)
    assert {r.model for r in results} == {"bn-lenet", "bn-lenet-torch"}
    assert all(r.max_abs_diff < 1e-4 and r.unfolded_ms > 0 and r.folded_ms > 0 for r in results)
