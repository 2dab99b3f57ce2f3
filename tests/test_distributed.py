"""Data-parallel training: bnlab.distributed's plumbing (shards, the loss scaling, the launcher environment,
`launch` and its failures) and `bnlab train --nproc`, on the real Fashion-MNIST.

The central claims, each checked here with two gloo processes on 127.0.0.1:
- one data-parallel step (`bnlab.training.data_parallel_step`) leaves the parameters and running statistics
  of the one-process step on the whole global batch, for equal, unequal and empty shards;
- `train` with nproc=2 (stopped after one epoch, then resumed) ends with the metrics and parameters of
  the uninterrupted one-process run, and only rank 0 writes the run directory.

Every launch has a timeout, so a hang fails instead of blocking. The real data set must be installed in
/usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist); without it the tests that need it fail.

Run: python -m pytest tests/test_distributed.py (about 50 s on two cores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bnlab import data, distributed
from bnlab.cli import _train_config, build_parser
from bnlab.distributed import ddp_loss, launch, rank_environment, report, shard_bounds
from bnlab.nn import SyncBatchNorm, convert_sync_batchnorm
from bnlab.training import Diverged, TrainConfig, data_parallel_step, load_checkpoint, read_metrics, train
from bnlab.training.loop import build

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
LAUNCH_TIMEOUT = 180  # seconds: generous for a loaded machine, but never forever
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 after one step
RUN_TOL = dict(rtol=1e-4, atol=1e-4)  # float32 after two epochs of rounding differences


@pytest.fixture(scope="module")
def fashion() -> data.FashionMNIST:
    try:
        return data.load(REAL_DIR, download=False)
    except data.DataError as exc:
        pytest.fail(f"the real Fashion-MNIST is needed in {REAL_DIR} (apt install dataset-fashion-mnist): {exc}")


# ---- shards and the loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_contiguous_cover_the_batch_and_differ_by_at_most_one(world):
    for batch in range(0, 12):
        bounds = [shard_bounds(batch, world, rank) for rank in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == batch
        assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:])), bounds
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True), sizes


@pytest.mark.parametrize("args", [(5, 0, 0), (5, 2, 2), (5, 2, -1), (-1, 2, 0)])
def test_shard_bounds_refuses_bad_arguments(args):
    with pytest.raises(ValueError, match="expected batch_size >= 0"):
        shard_bounds(*args)


def test_ddp_loss_makes_the_average_over_processes_the_global_mean():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    for world in (1, 2, 3, 7):
        shards = [losses[slice(*shard_bounds(len(losses), world, r))].sum() for r in range(world)]
        averaged = sum(ddp_loss(s, len(losses), world) for s in shards) / world  # what DDP does to gradients
        assert torch.allclose(averaged, losses.mean())
    with pytest.raises(ValueError, match="at least one sample"):
        ddp_loss(torch.tensor(0.0), 0, 2)


# ---- the launcher's environment ------------------------------------------------------------------------


def test_rank_environment_reads_what_torchrun_sets():
    assert rank_environment({}) is None
    env = rank_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)


@pytest.mark.parametrize(
    "environ,match",
    [
        ({"RANK": "0"}, "but not WORLD_SIZE, LOCAL_RANK"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be integers"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent"),
    ],
    ids=["partial", "not-int", "rank-out-of-range"],
)
def test_rank_environment_refuses_a_broken_environment(environ, match):
    with pytest.raises(ValueError, match=match):
        rank_environment(environ)


def test_under_torchrun_a_different_nproc_is_refused(monkeypatch, tmp_path):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="launcher started 2 processes"):
        train(TrainConfig(nproc=3, out=str(tmp_path / "run")), dataset=None, progress=False)
    assert not (tmp_path / "run").exists()


# ---- the configuration and the command line ----------------------------------------------------------


def test_bnlab_train_nproc_reaches_the_config():
    args = build_parser().parse_args(["train", "--nproc", "2", "--epochs", "1"])
    assert _train_config(args).nproc == 2
    assert _train_config(build_parser().parse_args(["train"])).nproc == 1


@pytest.mark.parametrize(
    "changes,match",
    [({"nproc": 0}, "nproc must be a positive integer"), ({"nproc": 2, "model": "bn-lenet-chapter"}, "naive batch norm")],
    ids=["zero", "chapter-layer"],
)
def test_config_refuses_bad_nproc(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TrainConfig(), **changes).validate()


def test_diverged_survives_the_trip_between_processes():
    exc = pickle.loads(pickle.dumps(Diverged(2, 7, 3.0, float("inf"), 2.3)))
    assert (exc.epoch, exc.batch, exc.lr, exc.first_loss) == (2, 7, 3.0, 2.3) and "batch 7" in str(exc)


# ---- launch: errors and hangs end, and are reported ----------------------------------------------------


def _hang(marker: str):
    """Sleep far longer than any test waits, then leave `marker`: it exists only if nobody ended us."""
    time.sleep(600)
    Path(marker).touch()


def _fail_on_rank_one_while_rank_zero_hangs(marker: str):
    if dist.get_rank() == 1:
        raise ValueError("rank one refuses this shard")
    _hang(marker)


# Whether a hung process was ended is checked by what it left, not by a clock: a timed check fails on
# a loaded machine, and one that waited out the sleep would leave the marker.


def test_launch_reraises_the_error_of_a_process_and_ends_its_hung_peer(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "PEER_GRACE_SECONDS", 1.0)
    marker = tmp_path / "rank0-finished"
    with pytest.raises(ValueError, match="rank one refuses this shard") as info:
        launch(_fail_on_rank_one_while_rank_zero_hangs, 2, args=(str(marker),), timeout=LAUNCH_TIMEOUT)
    assert not marker.exists(), "the hung peer was waited for instead of ended"
    assert any("rank 1 of 2" in note for note in getattr(info.value, "__notes__", [])), "no note names the rank"


def test_launch_ends_hung_processes_at_the_timeout(tmp_path):
    marker = tmp_path / "finished"
    with pytest.raises(TimeoutError, match="did not finish within 4 s"):
        launch(_hang, 2, args=(str(marker),), timeout=4)
    assert not marker.exists(), "the hung processes were waited for instead of ended"


def test_launch_refuses_what_cannot_be_sent_to_a_process():
    with pytest.raises(ValueError, match="picklable"):
        launch(lambda: None, 2, timeout=LAUNCH_TIMEOUT)


# ---- one data-parallel step equals the one-process step ----------------------------------------------

# (name, global batch size, model, model options): shards of 32+32, 23+22, 1+0 (the conv-only BN model,
# since a global batch of one sample has one value per channel in a BN after a linear layer), 17+16.
ONE_STEP_CASES = [
    ("equal", 64, "bn-lenet", {}),
    ("unequal", 45, "bn-lenet", {}),
    ("empty", 1, "bn-lenet", {"placement": "conv"}),
    ("torch-layers", 33, "bn-lenet-torch", {}),
]


def one_step_config(model: str, options: dict) -> TrainConfig:
    return TrainConfig(model=model, model_options=options, lr=0.5, momentum=0.9, weight_decay=1e-3, device="cpu")


def one_step_batch(fashion, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(data.batches(fashion.train_images, fashion.train_labels, size, shuffle=True, seed=size))
    return x, y


def _one_step_in_each_process(batches: dict) -> dict:
    torch.set_num_threads(1)
    report(f"rank {dist.get_rank()} ready")
    produced = {}
    for name, batch_size, model, options in ONE_STEP_CASES:
        torch.manual_seed(0)
        net, optimizer = build(one_step_config(model, options), torch.device("cpu"))
        net = convert_sync_batchnorm(net)
        assert any(isinstance(m, SyncBatchNorm) for m in net.modules())
        totals = data_parallel_step(DistributedDataParallel(net), optimizer, *batches[name])
        produced[name] = {"state": {k: v.clone() for k, v in net.state_dict().items()}, "totals": totals}
    return produced


@pytest.fixture(scope="module")
def one_step(fashion):
    batches = {name: one_step_batch(fashion, size) for name, size, _, _ in ONE_STEP_CASES}
    messages: list[str] = []
    produced = launch(_one_step_in_each_process, 2, args=(batches,), timeout=LAUNCH_TIMEOUT, on_message=messages.append)
    return batches, produced, messages


@pytest.mark.parametrize("case", ONE_STEP_CASES, ids=[c[0] for c in ONE_STEP_CASES])
def test_one_data_parallel_step_equals_the_one_process_step(one_step, case):
    name, batch_size, model, options = case
    batches, produced, _ = one_step
    x, y = batches[name]
    torch.manual_seed(0)
    net, optimizer = build(one_step_config(model, options), torch.device("cpu"))
    logits = net(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    correct = (logits.argmax(dim=1) == y).sum().item()
    for rank, result in enumerate(produced):
        state = result[name]["state"]
        assert list(state) == list(net.state_dict()), "the converted model's state dict keys differ"
        for key, expected in net.state_dict().items():
            torch.testing.assert_close(state[key], expected, **TOL, msg=lambda m: f"rank {rank} {key}: {m}")
        loss_sum, total_correct = result[name]["totals"].tolist()
        assert math.isclose(loss_sum, loss.item() * batch_size, rel_tol=1e-5), (loss_sum, loss.item() * batch_size)
        assert total_correct == correct


def test_messages_of_launched_processes_reach_the_launcher(one_step):
    assert sorted(one_step[2]) == ["rank 0 ready", "rank 1 ready"]


# ---- bnlab train --nproc 2 --------------------------------------------------------------------------


def _resume_as_under_torchrun(config, dataset):
    """A process of a torchrun launch: `train` sees RANK/WORLD_SIZE and joins the group it is in."""
    result = train(config, resume=True, dataset=dataset, progress=False, log=report)
    return str(result.run_dir), result.history


def test_two_process_training_stops_resumes_and_ends_where_one_process_does(fashion, tmp_path):
    # Batches of 31 split 16 + 15: every shard pair is unequal; 1500 % 31 = 12 splits 6 + 6.
    config = TrainConfig(model="bn-lenet", epochs=2, lr=0.3, batch_size=31, train_subset=1500, test_subset=1000,
                         seed=0, device="cpu", threads=1)
    one = train(dataclasses.replace(config, out=str(tmp_path / "one")), dataset=fashion, progress=False,
                log=lambda line: None)

    two_dir = tmp_path / "two"
    two_config = dataclasses.replace(config, nproc=2, out=str(two_dir))
    lines: list[str] = []
    first = train(two_config, dataset=fashion, progress=False, log=lines.append, stop_after=1, timeout=LAUNCH_TIMEOUT)
    assert [m.epoch for m in first.history] == [1] and first.run_dir == two_dir
    assert len(lines) == 1 and lines[0].startswith("epoch   1/2"), lines
    # The second half runs through the torchrun path: processes that find RANK/WORLD_SIZE set (and
    # nproc left at 1, as `torchrun ... bnlab train` leaves it).
    resumed_lines: list[str] = []
    run_dirs = launch(_resume_as_under_torchrun, 2, args=(dataclasses.replace(two_config, nproc=1), fashion),
                      timeout=LAUNCH_TIMEOUT, on_message=resumed_lines.append)
    assert [Path(d) for d, _ in run_dirs] == [two_dir, two_dir]
    assert run_dirs[0][1] == run_dirs[1][1], "every process returns rank 0's history"
    assert resumed_lines[0] == f"resuming {two_dir} after epoch 1" and len(resumed_lines) == 2, resumed_lines

    two = read_metrics(two_dir)
    assert [m.epoch for m in two] == [1, 2]
    for ours, theirs in zip(two, one.history):
        for field in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert math.isclose(getattr(ours, field), getattr(theirs, field), rel_tol=1e-4, abs_tol=2e-4), (
                f"epoch {ours.epoch} {field}: 2 processes {getattr(ours, field)}, 1 process {getattr(theirs, field)}")
    assert two[-1].test_acc > 0.5, f"test accuracy {two[-1].test_acc} is not well above chance (0.1)"

    state_two, state_one = load_checkpoint(two_dir)["model"], load_checkpoint(one.run_dir)["model"]
    assert list(state_two) == list(state_one)
    for key in state_one:
        torch.testing.assert_close(state_two[key], state_one[key], **RUN_TOL, msg=lambda m: f"{key}: {m}")

    stored = json.loads((two_dir / "config.json").read_text())
    assert stored["config"]["nproc"] == 2
    assert sorted(p.name for p in two_dir.iterdir()) == [".lock", "checkpoint.pt", "config.json", "curves.png", "metrics.csv"]
