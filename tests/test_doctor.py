"""bnlab.doctor: every check fires on a model built to trigger it and stays silent on its healthy twin,
for torch's batch norm and bnlab's (issue 13)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import bnlab.nn
from bnlab.doctor import CHECKS, diagnose

BN_KINDS = {"torch": nn.BatchNorm2d, "bnlab": bnlab.nn.BatchNorm2d}


def make_net(kind: str, *, bias=False, momentum=0.1, eps=1e-5, dropout_first=False) -> nn.Sequential:
    """conv -> BN -> ReLU -> flatten -> [dropout] -> linear, for (N, 1, 6, 6) input."""
    torch.manual_seed(0)
    head = [nn.Dropout(0.3)] if dropout_first else []
    tail = [] if dropout_first else [nn.Dropout(0.3)]
    return nn.Sequential(*head, nn.Conv2d(1, 4, 3, bias=bias), BN_KINDS[kind](4, eps=eps, momentum=momentum),
                         nn.ReLU(), nn.Flatten(), *tail, nn.Linear(64, 3))


def make_batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 1, 6, 6, generator=g) * 2 + 1 for _ in range(n)]


def trained(net: nn.Sequential, batches) -> nn.Sequential:
    """As after training: γ and β moved, statistics tracked, then exact (precise BN); eval mode."""
    bn = next(m for m in net.modules() if isinstance(m, tuple(BN_KINDS.values())))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.8, 1.2, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.2, 0.0]))
        net.train()
        for x in batches:
            net(x)
    return bnlab.nn.recompute_stats(net, batches).eval()


def labelled(net: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches labelled with the healthy model's own predictions: accuracy 1 when nothing is wrong."""
    with torch.no_grad():
        return [(x, net(x).argmax(1)) for x in batches]


def bn_of(net: nn.Module) -> nn.Module:
    return next(m for m in net.modules() if isinstance(m, tuple(BN_KINDS.values())))


def corrupt_stats(net):
    with torch.no_grad():
        bn_of(net).running_mean.add_(3.0)
        bn_of(net).running_var.mul_(9.0)
    return net


def reset_stats(net):
    bn_of(net).reset_running_stats()
    return net


def kill_channel(net):
    with torch.no_grad():
        bn_of(net).weight[2] = 0.0
    return net


def freeze_bn_affine(net):
    for p in bn_of(net).parameters():
        p.requires_grad_(False)
    return net


@dataclass
class Case:
    """A model that triggers `code` and its healthy twin; both built from the trained healthy base."""

    code: str
    trigger: Callable[[str, list], nn.Module]
    healthy: Callable[[str, list], nn.Module]
    trigger_batch: Optional[int] = 32  # per_device_batch passed with the trigger
    with_data: bool = True


def base(kind, batches, **options):
    return trained(make_net(kind, **options), batches)


CASES = [
    Case("stale-running-stats", lambda k, b: corrupt_stats(base(k, b)), base),
    Case("train-mode-at-inference", lambda k, b: base(k, b).train(), base),
    Case("foreign-momentum", lambda k, b: base(k, b, momentum=0.99), lambda k, b: base(k, b, momentum=0.01)),
    Case("unusual-eps", lambda k, b: base(k, b, eps=1e-3), base),
    Case("bias-before-bn", lambda k, b: base(k, b, bias=True), base),
    Case("small-batch", base, base, trigger_batch=2),
    Case("untracked-stats", lambda k, b: reset_stats(base(k, b)), base),
    Case("dead-channels", lambda k, b: kill_channel(base(k, b)), base),
    Case("dropout-before-bn", lambda k, b: base(k, b, dropout_first=True), base),
    Case("half-precision-stats", lambda k, b: base(k, b).to(torch.bfloat16), base, with_data=False),
    Case("frozen-but-updating", lambda k, b: freeze_bn_affine(base(k, b)),
         lambda k, b: bnlab.nn.freeze(freeze_bn_affine(base(k, b)))),
]


def test_every_check_has_a_case():
    assert sorted(c.code for c in CASES) == sorted(CHECKS)


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.code)
def test_check_fires_on_trigger_and_not_on_healthy_twin(case, kind):
    raw = make_batches()
    reference = base(kind, raw)
    data = labelled(reference, raw) if case.with_data else None
    fired = diagnose(case.trigger(kind, raw), data, per_device_batch=case.trigger_batch)
    assert case.code in fired.codes(), str(fired)
    finding = next(f for f in fired.findings if f.code == case.code)
    assert finding.layers and finding.evidence and finding.fix
    twin = diagnose(case.healthy(kind, raw), data, per_device_batch=32)
    assert case.code not in twin.codes(), str(twin)


@pytest.mark.parametrize("kind", BN_KINDS)
def test_healthy_model_has_no_warning_or_error(kind):
    raw = make_batches()
    net = base(kind, raw)
    diagnosis = diagnose(net, labelled(net, raw), per_device_batch=128)
    assert diagnosis.healthy and diagnosis.findings == [], str(diagnosis)
    assert set(diagnosis.checked) == set(CHECKS) and diagnosis.skipped == {}


def test_stale_evidence_has_numbers_and_the_fix_removes_it():
    raw = make_batches()
    net = corrupt_stats(base("bnlab", raw))
    data = labelled(base("bnlab", raw), raw)
    finding = next(f for f in diagnose(net, data).findings if f.code == "stale-running-stats")
    assert finding.evidence["exact"]["accuracy"] == 1.0
    assert finding.evidence["running"]["accuracy"] < 1.0 - finding.evidence["threshold"]
    assert "recompute_stats" in finding.fix
    bnlab.nn.recompute_stats(net, raw)
    assert "stale-running-stats" not in diagnose(net, data).codes()


def test_stale_check_works_on_unlabelled_batches():
    raw = make_batches()
    assert "stale-running-stats" in diagnose(corrupt_stats(base("torch", raw)), raw).codes()
    assert "stale-running-stats" not in diagnose(base("torch", raw), raw).codes()


def test_foreign_momentum_fix_gives_the_converted_value():
    finding = diagnose(base("torch", make_batches(), momentum=0.99)).findings[0]
    assert finding.code == "foreign-momentum" and finding.evidence["converted"] == pytest.approx(0.01)
    assert "momentum=0.01" in finding.fix and "convert_momentum" in finding.fix


def test_without_batches_the_data_checks_are_skipped_with_a_reason():
    diagnosis = diagnose(base("bnlab", make_batches()))
    assert set(diagnosis.skipped) == {"stale-running-stats", "small-batch"}
    assert all(diagnosis.skipped.values())
    assert "skipped stale-running-stats" in str(diagnosis)


def test_diagnose_leaves_the_model_unchanged():
    raw = make_batches()
    net = corrupt_stats(base("torch", raw)).train()
    before = copy.deepcopy(net.state_dict())
    diagnose(net, raw, per_device_batch=2)
    assert net.training and all(m.training for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reports_render_every_finding():
    diagnosis = diagnose(base("bnlab", make_batches(), bias=True, eps=1e-3))
    assert json.loads(json.dumps(diagnosis.to_dict()))["healthy"] is True
    markdown = diagnosis.to_markdown()
    assert "`bias-before-bn`" in markdown and "`unusual-eps`" in markdown and "Skipped" in markdown


@pytest.mark.parametrize("batches, per_device_batch, message", [
    ([], None, "yielded nothing"),
    (torch.randn(4, 1, 6, 6), None, "iterable of batches"),
    (None, 0, "per_device_batch must be a positive int"),
])
def test_bad_arguments_are_value_errors(batches, per_device_batch, message):
    with pytest.raises(ValueError, match=message):
        diagnose(make_net("torch"), batches, per_device_batch=per_device_batch)


def test_non_module_is_a_value_error():
    with pytest.raises(ValueError, match="expects a torch.nn.Module"):
        diagnose("resnet50")


# ---- the command: `bnlab doctor RUN` and `bnlab doctor --model` ----------------------------------------------

from bnlab import cli, data  # noqa: E402
from bnlab.training import load_checkpoint, rundir  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short real `bnlab train` run on Fashion-MNIST (two epochs of 10,000 images)."""
    if data.locate() is None:
        pytest.fail("the real Fashion-MNIST is needed: apt-get install dataset-fashion-mnist, or `bnlab data download`")
    out = tmp_path_factory.mktemp("doctor") / "run"
    assert cli.main(["train", "--epochs", "2", "--train-subset", "10000", "--test-subset", "1000", "--no-download",
                     "--out", str(out)]) == 0
    return out


def doctor_json(capsys, *argv) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli.main(["doctor", *argv, "--examples", "2000", "--no-download", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_doctor_on_a_trained_run_is_healthy(run_dir, capsys):
    code, report = doctor_json(capsys, str(run_dir))
    assert code == 0 and report["healthy"]
    assert [f["code"] for f in report["findings"]] == ["bias-before-bn"]  # the chapter's biases: info only
    assert "small-batch" in report["checked"] and report["skipped"] == {}


def test_doctor_finds_corrupted_statistics_and_its_fix_removes_them(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "metrics.csv"):
        (broken / name).write_bytes((run_dir / name).read_bytes())
    state = load_checkpoint(run_dir)
    state["model"]["1.running_mean"] += 2.0  # the first BN's statistics no longer match its weights
    rundir.save_checkpoint(broken, state)
    code, report = doctor_json(capsys, str(broken))
    stale = next(f for f in report["findings"] if f["code"] == "stale-running-stats")
    assert code == 1 and stale["severity"] == "warning"
    assert stale["evidence"]["exact"]["accuracy"] - stale["evidence"]["running"]["accuracy"] > 0.02
    assert "recompute_stats" in stale["fix"]

    config, net, _ = cli._load_run(broken)  # the suggested fix, on the run's training data
    bnlab.nn.recompute_stats(net, [x for x, _ in __import__("bnlab.doctor").doctor.fashion_batches(examples=6000)])
    state["model"] = net.state_dict()
    rundir.save_checkpoint(broken, state)
    code, report = doctor_json(capsys, str(broken))
    assert code == 0 and "stale-running-stats" not in [f["code"] for f in report["findings"]]


def momentum_net() -> nn.Module:
    """A factory for --model: a flattened-input MLP with a Keras momentum ported unchanged."""
    return nn.Sequential(nn.Linear(784, 16, bias=False), nn.BatchNorm1d(16, momentum=0.99), nn.ReLU(), nn.Linear(16, 10))


def healthy_net() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


@pytest.mark.parametrize("factory, expected_code, expected_findings", [
    ("momentum_net", 1, ["foreign-momentum"]),
    ("healthy_net", 0, []),
])
def test_doctor_on_an_importable_model(factory, expected_code, expected_findings, tmp_path, capsys):
    weights = tmp_path / "w.pt"
    torch.save(getattr(__import__(__name__), factory)().state_dict(), weights)
    code, report = doctor_json(capsys, "--model", f"{__name__}:{factory}", "--weights", str(weights),
                               "--per-device-batch", "64")
    assert code == expected_code and [f["code"] for f in report["findings"]] == expected_findings
    assert "stale-running-stats" in report["skipped"]


def test_doctor_model_with_data_runs_the_data_checks(capsys):
    code, report = doctor_json(capsys, "--model", f"{__name__}:healthy_net", "--input-shape", "784",
                               "--data-dir", str(data.locate()))
    assert "stale-running-stats" in report["checked"] and list(report["skipped"]) == ["small-batch"]
    assert code == 0 and report["findings"] == []


@pytest.mark.parametrize("argv, message", [
    ([], "give either a run directory or --model"),
    (["--model", "no_such_module_xyz:f"], "cannot import it"),
    (["--model", "torch"], "expects module:factory"),
    (["--model", "tests.test_doctor:healthy_net", "--input-shape", "3x32x32", "--data-dir", "."], "784"),
])
def test_doctor_usage_errors_are_one_line_exit_2(argv, message, capsys):
    assert cli.main(["doctor", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
