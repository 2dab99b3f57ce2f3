"""The claims studies — batch-size, population-stats, depth, layer-norm — in their --quick form.

Each study runs once per session (through the CLI, --jobs 2, into a temporary folder); the tests read its
report.md, its PNGs and its cache, and check that the report has every section and configuration, that the
findings quote the numbers the runs measured (recomputed here from the cache, independently of the study's
analysis), and the facts each study exists to show. A few tests check the studies' building blocks directly.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from bnlab import cli
from bnlab.data import FashionMNIST, to_input
from bnlab.models import build_model, norm_layers
from bnlab.studies.batch_size import FULL_PLAN, QUICK_PLAN, validation_split
from bnlab.studies import layer_norm
from bnlab.studies.depth import deep_mlp
from bnlab.studies.population_stats import evaluate_with_batch_statistics
from bnlab.studies.engine import with_precise_statistics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STUDIES = ("batch-size", "population-stats", "depth", "layer-norm")
RESULTS_HEADINGS = {
    "batch-size": "Results per batch size",
    "population-stats": "Test accuracy of the final networks per prediction method",
    "depth": "Results per depth and network",
    "layer-norm": "Final test accuracy",
}


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """quick_study(name) -> output folder of the study's --quick run, done on first request."""
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            assert cli.main(["study", name, "--quick", "--jobs", "2", "--out", str(out)]) == 0
            done[name] = out
        return done[name]

    return run


def report_of(out: Path) -> str:
    return (out / "report.md").read_text()


def section(report: str, heading: str) -> str:
    """The body of the first '## heading...' section (up to the next '## ')."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", report, flags=re.M | re.S)
    assert match, f"report has no '## {heading}' section"
    return match.group(1)


def cached(out: Path, kind: str) -> list[tuple[dict, dict]]:
    """(params, result) of every cached run of `kind`."""
    entries = [json.loads(path.read_text()) for path in (out / "cache").glob("*.json")]
    return [(e["params"], e["result"]) for e in entries if e["kind"] == kind]


def table_rows(body: str) -> list[list[str]]:
    """The cells of every data row of the first markdown table in `body`."""
    lines = [line for line in body.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


# ---- every study -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STUDIES)
def test_report_has_every_section_and_valid_plots(quick_study, name):
    out = quick_study(name)
    report = report_of(out)
    for heading in ("Findings", "What was run", RESULTS_HEADINGS[name], "Plots", "Runtime"):
        section(report, heading)
    assert "- seeds: 1" in section(report, "What was run")
    assert "(no conclusion could be drawn)" not in section(report, "Findings")
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert plots, "the report embeds no plot"
    for name_png in plots:
        blob = (out / name_png).read_bytes()
        assert blob[:8] == PNG_SIGNATURE and blob[12:16] == b"IHDR", f"{name_png} is not a PNG"
        width, height = struct.unpack(">II", blob[16:24])
        assert width > 200 and height > 200


# ---- batch-size --------------------------------------------------------------------------------------


def test_batch_size_findings_quote_the_best_size_chosen_on_validation(quick_study):
    out = quick_study("batch-size")
    runs = [(p, r) for p, r in cached(out, "batch-size-train") if not p.get("model_options")]
    best_size, best_acc = None, -1.0
    for size in sorted({p["batch_size"] for p, _ in runs}):
        candidates = [(r["val_acc_precise"], r["test_acc_precise"]) for p, r in runs
                      if p["batch_size"] == size and r["status"] == "ok"]
        _, test_acc = max(candidates)  # the rate with the best validation accuracy, one seed
        if test_acc > best_acc:
            best_size, best_acc = size, test_acc
    findings = section(report_of(out), "Findings")
    assert f"The best batch size is {best_size} (test accuracy {best_acc:.3f}" in findings
    rows = table_rows(section(report_of(out), "Results per batch size"))
    assert [row[0] for row in rows] == ["2", "8", "64", "256"]
    for row in rows:  # test accuracy with precise statistics, then with the moving averages, of the chosen rate
        size, chosen_lr = int(row[0]), float(row[2].split()[0])
        [result] = [r for p, r in runs if p["batch_size"] == size and p["lr"] == chosen_lr]
        assert row[3:5] == [f"{result['test_acc_precise']:.3f}", f"{result['test_acc']:.3f}"]


def test_precise_statistics_are_exact_over_the_images_and_leave_the_network_as_it_was():
    torch.manual_seed(0)
    net = build_model("bn-lenet")
    images, labels = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (300,))
    before = {name: buffer.clone() for name, buffer in net.named_buffers()}
    precise = with_precise_statistics(net, images, labels, batch_size=128)
    for name, buffer in net.named_buffers():
        assert torch.equal(buffer, before[name]), f"{name} of the original network changed"
    [(_, first_bn), *_] = norm_layers(precise)
    conv_out = precise[0](to_input(images)).transpose(0, 1).flatten(1)  # the first BN's input, per channel
    torch.testing.assert_close(first_bn.running_mean, conv_out.mean(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first_bn.running_var, conv_out.var(dim=1), rtol=1e-4, atol=1e-6)


def test_batch_size_one_is_refused_with_linear_bn_and_trains_with_conv_bn(quick_study):
    out = quick_study("batch-size")
    [(_, refusal)] = cached(out, "batch-one-refusal")
    assert refusal["refused"]
    assert refusal["message"].startswith("Expected more than 1 value per channel when training")
    assert "(1, 120)" in refusal["message"]  # the first linear layer's BN, not a convolution's
    findings = section(report_of(out), "Findings")
    assert refusal["message"] in findings
    [(params, conv_only)] = [(p, r) for p, r in cached(out, "batch-size-train") if p.get("model_options")]
    assert params["batch_size"] == 1 and params["model_options"] == {"placement": "conv"}
    assert conv_only["status"] == "ok" and conv_only["test_acc_precise"] > 0.2  # chance is 0.1
    assert f"test accuracy {conv_only['test_acc_precise']:.3f}, against 0.1 for chance" in findings


def test_lr_grid_is_square_root_scaled_around_the_current_preset():
    assert QUICK_PLAN.lr_grid(128) == [0.025, 0.1, 0.4]
    assert QUICK_PLAN.lr_grid(2) == [0.00313, 0.0125, 0.05]
    assert FULL_PLAN.lr_grid(128) == [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8]
    assert FULL_PLAN.at_edge(128, 0.8) and FULL_PLAN.at_edge(128, 0.0125) and not FULL_PLAN.at_edge(128, 0.4)


@pytest.mark.parametrize("plan", [FULL_PLAN, QUICK_PLAN], ids=["full", "quick"])
def test_every_batch_size_divides_the_training_split(plan):
    """No epoch ends with a partial batch: a step on a few examples at a rate tuned for full batches."""
    assert all(plan.split["train_examples"] % size == 0 for size in plan.sizes)


def test_validation_split_is_disjoint_from_training_and_keeps_the_test_set():
    n = 600
    index = torch.arange(n)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0], images[:, 0, 1] = (index // 256).to(torch.uint8), (index % 256).to(torch.uint8)
    test_images = torch.full((50, 28, 28), 7, dtype=torch.uint8)
    full = FashionMNIST(images, index % 10, test_images, torch.arange(50) % 10, root=Path("."))
    fit, test_x, test_y = validation_split(full, train_examples=300, validation_examples=200, test_examples=None)

    def rows(x):
        return set((x[:, 0, 0].long() * 256 + x[:, 0, 1].long()).tolist())

    train_rows, validation_rows = rows(fit.train_images), rows(fit.test_images)
    assert len(train_rows) == 300 and len(validation_rows) == 200
    assert not train_rows & validation_rows
    assert torch.equal(test_x, test_images) and len(test_y) == 50
    with pytest.raises(ValueError, match="training set has 600"):
        validation_split(full, train_examples=500, validation_examples=200, test_examples=None)


# ---- population-stats --------------------------------------------------------------------------------


def test_population_stats_findings_quote_every_method(quick_study):
    out = quick_study("population-stats")
    report = report_of(out)
    findings = section(report, "Findings")
    runs = cached(out, "population-stats")
    assert len(runs) == 3
    for params, result in runs:
        accuracy = result["accuracy"]
        assert set(accuracy) == {"moving", "recomputed", "batch"}
        # The moving-average prediction is the trainer's own final test accuracy.
        assert accuracy["moving"] == result["history"][-1]["test_acc"]
        config = f"{'classic' if params['lr'] == 1.0 else 'current'} preset, {params['pool']} pooling"
        line = next(line for line in findings.splitlines() if line.startswith(f"- {config}:"))
        for value in accuracy.values():
            assert f"{value:.3f}" in line
        for value in accuracy.values():
            assert f"{value:.4f}" in section(report, "Every final network")


def test_batch_statistics_evaluation_uses_batch_statistics_and_restores_the_network():
    torch.manual_seed(0)
    net = build_model("bn-lenet").eval()
    images = (torch.rand(64, 28, 28) * 255).to(torch.uint8)
    labels = torch.arange(64) % 10
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss, _ = evaluate_with_batch_statistics(net, images, labels, batch_size=16)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m.training for m in net.modules())
    # A fresh network's running statistics (0 and 1) are not its batches' statistics: the losses differ.
    with torch.no_grad():
        x = images.float().div(255).unsqueeze(1)
        eval_loss = torch.nn.functional.cross_entropy(net(x), labels).item()
    assert abs(loss - eval_loss) > 1e-3


def test_a_second_invocation_is_served_from_the_cache(quick_study, forbid_computing_runs):
    out = quick_study("population-stats")
    forbid_computing_runs()
    assert cli.main(["study", "population-stats", "--quick", "--jobs", "2", "--out", str(out)]) == 0
    assert "- runs: 3 (3 from the cache)" in report_of(out)
    assert "0 s computed now" in section(report_of(out), "Runtime")


# ---- depth -------------------------------------------------------------------------------------------


def test_depth_gradients_at_initialization(quick_study):
    out = quick_study("depth")
    init = {(p["depth"], p["batchnorm"], p["residual"]): r["init"] for p, r in cached(out, "deep-mlp")}
    assert all(len(init[key]["grad_norms"]) == key[0] for key in init)
    # BN without residual connections: gradients explode towards the input as depth grows.
    assert init[(100, True, False)]["grad_norms"][0] > 1e4 * init[(10, True, False)]["grad_norms"][0]
    # Residual connections without BN: the forward signal itself blows up (Kaiming init doubles it per block).
    assert init[(100, False, True)]["loss"] > 1e6
    # BN with residual connections: moderate gradients and a loss near chance's log(10) at 100 layers.
    assert init[(100, True, True)]["grad_norms"][0] < 100 and init[(100, True, True)]["loss"] < 5


def test_depth_findings_and_the_100_layer_residual_bn_network(quick_study):
    out = quick_study("depth")
    runs = [(p, r) for p, r in cached(out, "deep-mlp") if p["depth"] == 100 and p["batchnorm"] and p["residual"]]
    usable = [(r["history"][-1]["train_loss"], r["history"][-1]["test_acc"]) for _, r in runs if r["status"] == "ok"]
    _, test_acc = min(usable)  # the rate kept: lowest final training loss
    assert test_acc >= 0.5
    findings = section(report_of(out), "Findings")
    assert f"test accuracy {test_acc:.3f}" in findings
    assert "100 layers: trained —" in findings
    rows = table_rows(section(report_of(out), "Results per depth and network"))
    assert len(rows) == 12 and {row[0] for row in rows} == {"10", "30", "100"}


@pytest.mark.parametrize("depth", [2, 3, 10])
def test_deep_mlp_counts_its_linear_layers(depth):
    for batchnorm in (False, True):
        for residual in (False, True):
            net = deep_mlp(depth, 16, batchnorm, residual)
            assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == depth
            assert net(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    with pytest.raises(ValueError, match="at least 2"):
        deep_mlp(1, 16, True, True)


# ---- layer-norm --------------------------------------------------------------------------------------


def test_layer_norm_winners_and_batch_norm_at_batch_2(quick_study):
    out = quick_study("layer-norm")
    default_epochs = layer_norm.DEFAULT_RUN["quick"]["epochs"]
    accuracy = {(p["model_options"]["norm"], "default" if p["epochs"] == default_epochs else p["batch_size"]):
                r["history"][-1]["test_acc"] for p, r in cached(out, "train")}
    assert len(accuracy) == 16
    findings = section(report_of(out), "Findings")
    for column, name in ((2, "Batch 2"), (16, "Batch 16"), (128, "Batch 128"), ("default", "The default setting")):
        winner = max((acc, norm) for (norm, c), acc in accuracy.items() if c == column)
        assert f"{name}: {winner[1]} wins with {winner[0]:.3f}" in findings
    assert "At the default setting, batch norm" in findings
    # Batch norm alone depends on the batch: at batch 2 a batch-independent normalization beats it.
    assert accuracy[("batchnorm", 2)] < max(acc for (norm, s), acc in accuracy.items() if s == 2 and norm != "batchnorm")
    rows = table_rows(section(report_of(out), "Final test accuracy"))
    assert [row[0] for row in rows] == ["batchnorm", "layernorm", "groupnorm", "instancenorm"]
    assert rows[0][-1] == f"{accuracy[('batchnorm', 'default')]:.3f}"  # the default setting's column
