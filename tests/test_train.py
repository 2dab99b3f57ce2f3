"""The trainer and the `bnlab` command on the real Fashion-MNIST: run directory, resume, determinism,
divergence, locking, presets, and the one-line errors of a user's mistakes."""

import argparse
import csv
import json
import math

import pytest
import torch

from bnlab import data
from bnlab.cli import main
from bnlab.training import Diverged, PRESETS, TrainConfig, load_checkpoint, read_metrics, train
from bnlab.training.rundir import METRIC_COLUMNS, run_lock

SMALL = {"train_subset": 3000, "test_subset": 1000}


@pytest.fixture(scope="module")
def dataset():
    if data.locate() is None:
        pytest.fail("the real Fashion-MNIST is needed: apt-get install dataset-fashion-mnist, or `bnlab data download`")
    return data.load(download=False)


def quiet_train(config, **kwargs):
    return train(config, progress=False, log=lambda line: None, **kwargs)


def metrics_without_speed(history):
    return [(m.epoch, m.train_loss, m.train_acc, m.test_loss, m.test_acc) for m in history]


def test_short_run_on_real_data_learns_and_writes_its_directory(tmp_path, dataset):
    out = tmp_path / "run"
    result = quiet_train(TrainConfig(epochs=2, out=str(out), **SMALL), dataset=dataset)
    assert result.final.test_acc > 0.6, "well above chance (0.1) after two epochs on 3000 examples"
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS and len(rows) == 3
    for written, returned in zip(read_metrics(out), result.history, strict=True):
        assert written.epoch == returned.epoch
        for column in METRIC_COLUMNS[1:-1]:  # losses and accuracies: written with 6 decimals
            assert abs(getattr(written, column) - getattr(returned, column)) < 1e-6, column
    stored = json.loads((out / "config.json").read_text())
    assert stored["config"]["seed"] == 0 and stored["config"]["lr"] == 0.1 and stored["config"]["batch_size"] == 128
    assert {"torch", "bnlab", "device", "python"} <= set(stored["environment"])
    state = load_checkpoint(out)  # weights_only=True
    assert len(state["history"]) == 2 and "model" in state and "optimizer" in state
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path, dataset):
    runs = [quiet_train(TrainConfig(epochs=1, seed=seed, out=str(tmp_path / f"r{i}"), **SMALL), dataset=dataset)
            for i, seed in enumerate((3, 3, 4))]
    assert metrics_without_speed(runs[0].history) == metrics_without_speed(runs[1].history)
    assert metrics_without_speed(runs[0].history) != metrics_without_speed(runs[2].history)


@pytest.mark.parametrize("model", ["bn-lenet", "lenet"])
def test_resume_ends_with_the_metrics_of_an_uninterrupted_run(tmp_path, dataset, model):
    config = dict(model=model, epochs=3, momentum=0.9, **SMALL)  # momentum: the optimizer state must survive too
    whole = quiet_train(TrainConfig(out=str(tmp_path / "whole"), **config), dataset=dataset)
    interrupted = TrainConfig(out=str(tmp_path / "cut"), **config)
    quiet_train(interrupted, dataset=dataset, stop_after=1)
    assert len(read_metrics(tmp_path / "cut")) == 1
    resumed = quiet_train(interrupted, dataset=dataset, resume=True)
    assert metrics_without_speed(resumed.history) == metrics_without_speed(whole.history)


def test_resume_refuses_other_settings_and_fewer_epochs(tmp_path, dataset):
    out = str(tmp_path / "run")
    quiet_train(TrainConfig(epochs=1, out=out, **SMALL), dataset=dataset)
    with pytest.raises(ValueError, match="lr: run has 0.1, asked 0.5"):
        quiet_train(TrainConfig(epochs=2, lr=0.5, out=out, **SMALL), dataset=dataset, resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        quiet_train(TrainConfig(epochs=1, out=out, **SMALL), dataset=dataset)
    longer = quiet_train(TrainConfig(epochs=2, out=out, **SMALL), dataset=dataset, resume=True)
    assert [m.epoch for m in longer.history] == [1, 2]
    with pytest.raises(ValueError, match="fewer epochs"):
        quiet_train(TrainConfig(epochs=1, out=out, **SMALL), dataset=dataset, resume=True)


def test_two_runs_cannot_write_into_one_directory(tmp_path, dataset):
    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(ValueError, match="another bnlab run is writing"):
            quiet_train(TrainConfig(epochs=1, out=str(out), **SMALL), dataset=dataset)


@pytest.mark.parametrize("model", ["lenet", "bn-lenet"])
def test_divergence_stops_the_run_naming_epoch_batch_and_rate(tmp_path, dataset, model):
    # A sigmoid LeNet at lr 1e6 keeps a finite loss (~1e6 here): the 100x-first-loss rule catches it.
    with pytest.raises(Diverged) as caught:
        quiet_train(TrainConfig(model=model, lr=1e6, epochs=1, out=str(tmp_path / "run"), **SMALL), dataset=dataset)
    error = caught.value
    assert error.epoch == 1 and error.batch >= 2 and error.lr == 1e6
    assert math.isfinite(error.loss) and error.loss > 100 * error.first_loss
    assert "epoch 1, batch" in str(error) and "lr 1e+06" in str(error)


def test_divergence_criterion_flags_a_non_finite_loss(tmp_path, dataset, monkeypatch):
    real_cross_entropy = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def nan_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        loss = real_cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_on_third_batch)
    with pytest.raises(Diverged, match="batch 3 .*not finite"):
        quiet_train(TrainConfig(epochs=1, out=str(tmp_path / "run"), **SMALL), dataset=dataset)


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_train_inspect_evaluate(tmp_path, capsys, dataset):
    out = str(tmp_path / "run")
    code, stdout, _ = run_cli(["train", "--epochs", "1", "--preset", "classic", "--train-subset", "2000",
                               "--test-subset", "500", "--no-download", "--out", out], capsys)
    assert code == 0 and "epoch   1/1" in stdout and f"run saved in {out}" in stdout
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (stored["lr"], stored["batch_size"]) == (PRESETS["classic"]["lr"], PRESETS["classic"]["batch_size"])
    code, stdout, _ = run_cli(["inspect", out], capsys)
    assert code == 0 and stdout.count("gamma (weight)") == 4 and stdout.count("running var") == 4
    code, stdout, _ = run_cli(["evaluate", out, "--no-download"], capsys)
    recorded = read_metrics(tmp_path / "run")[-1].test_acc
    assert code == 0 and f"test acc {recorded:.4f}" in stdout.split("(")[0]


@pytest.mark.parametrize("args,fragment", [
    (["train", "--batch-size", "0"], "batch-size: expected a positive integer, got '0'"),
    (["train", "--epochs", "-3"], "epochs: expected a positive integer, got '-3'"),
    (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["train", "--lr", "-1"], "expected a positive number, got '-1'"),
    (["train", "--resume"], "--resume needs --out"),
    (["inspect", "/nonexistent/run"], "no bnlab run in /nonexistent/run"),
    (["evaluate", "/nonexistent/run"], "no bnlab run in /nonexistent/run"),
    (["study", "nope"], "unknown study 'nope'"),
    (["bench", "op", "--shapes", "12xbanana"], "expected a shape like 256x6x24x24"),
    (["train", "--bn-momentum", "1.5"], "BN momentum must be in [0, 1]"),
    (["train", "--bn-eps", "0"], "bn-eps: expected a positive number"),
    (["train", "--model", "bn-lenet-chapter", "--bn-momentum", "0.2"], "momentum and eps are fixed in its code"),
    (["train", "--model", "lenet", "--bn-eps", "1e-3"], "no batch norm layer to take --bn-momentum/--bn-eps"),
])
def test_cli_user_mistakes_are_one_line_with_exit_code_2(args, fragment, capsys):
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(main(args))
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_cli_divergence_is_one_line_and_nonzero(tmp_path, capsys, dataset):
    code, _, err = run_cli(["train", "--model", "lenet", "--lr", "1e6", "--epochs", "1", "--train-subset", "2000",
                            "--test-subset", "500", "--no-download", "--out", str(tmp_path / "run")], capsys)
    assert code == 3 and "training diverged at epoch 1" in err and len(err.strip().splitlines()) == 1


def test_bn_momentum_and_eps_reach_every_bn_layer_and_the_running_statistics(tmp_path, capsys, dataset):
    from bnlab.models import norm_layers
    from bnlab.training.loop import build, epoch_seed

    out = tmp_path / "run"
    code, _, _ = run_cli(["train", "--bn-momentum", "0.5", "--bn-eps", "0.01", "--epochs", "1", "--train-subset", "128",
                          "--test-subset", "256", "--no-download", "--out", str(out)], capsys)
    assert code == 0
    stored = json.loads((out / "config.json").read_text())["config"]
    assert (stored["bn_momentum"], stored["bn_eps"]) == (0.5, 0.01)
    torch.manual_seed(0)  # the run's initial network, built as the trainer builds it
    net, _ = build(TrainConfig(bn_momentum=0.5, bn_eps=0.01), torch.device("cpu"))
    layers = [layer for _, layer in norm_layers(net)]
    assert len(layers) == 4 and all((layer.momentum, layer.eps) == (0.5, 0.01) for layer in layers)
    # One batch of 128, one step: conv1's BN running mean is 0.5 x that batch's mean (torch's default: 0.1 x).
    sets = dataset.subset(128, 256, seed=0)
    x, _ = next(data.batches(sets.train_images, sets.train_labels, 128, shuffle=True, seed=epoch_seed(0, 1)))
    batch_mean = net[0](x).mean(dim=(0, 2, 3)).detach()
    torch.testing.assert_close(load_checkpoint(out)["model"]["1.running_mean"], 0.5 * batch_mean)


def test_compile_trains_as_eager_and_saves_plain_keys(tmp_path, dataset):
    common = dict(model="lenet", epochs=1, train_subset=512, test_subset=256)
    eager = quiet_train(TrainConfig(out=str(tmp_path / "eager"), **common), dataset=dataset)
    compiled = quiet_train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, **common), dataset=dataset)
    keys = set(load_checkpoint(tmp_path / "compiled")["model"])
    assert keys == set(load_checkpoint(tmp_path / "eager")["model"]) and not any("_orig_mod" in k for k in keys)
    for got, want in zip(metrics_without_speed(compiled.history), metrics_without_speed(eager.history)):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_every_cli_option_says_its_default():
    from bnlab.cli import build_parser

    def options(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from options(sub)
            elif action.option_strings and action.dest != "help":
                yield parser.prog, action

    missing = [f"{prog} {action.option_strings[0]}" for prog, action in options(build_parser())
               if "default" not in (action.help or "")]
    assert missing == []
