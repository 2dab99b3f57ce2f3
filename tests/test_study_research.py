"""The "research" group's studies: `research` (other normalization transforms, sparsification) and
`smoothness` (covariate shift vs landscape smoothness), run in their --quick form, plus the pieces they
are built on (side-effect-free probes, resumable custom runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bnlab import cli
from bnlab.studies import research, smoothness
from bnlab.studies.engine import LoopSpec, RunContext, train_with_hooks
from bnlab.training import Hooks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_quick(name: str, out: Path) -> str:
    assert cli.main(["study", name, "--quick", "--jobs", "2", "--out", str(out)]) == 0
    return (out / "report.md").read_text()


def cached_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cache").glob("*.json"))]


def section(report: str, heading: str) -> str:
    """The body of the `## heading...` section of a report."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", report, re.M | re.S)
    assert match, f"no section {heading!r} in the report"
    return match.group(1)


def check_common_structure(report: str, out: Path) -> None:
    for heading in ("Findings", "What was run", "Plots", "Runtime"):
        section(report, heading)
    assert "(no conclusion could be drawn)" not in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert images, "the report embeds no plot"
    for name in images:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, f"{name} is not a PNG"


@pytest.fixture(scope="module")
def research_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("research")
    return out, run_quick("research", out)


@pytest.fixture(scope="module")
def smoothness_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoothness")
    return out, run_quick("smoothness", out)


# ---- research -----------------------------------------------------------------------------------------


def research_by_label(out: Path) -> dict[str, dict]:
    by_label = {}
    for entry in cached_results(out):
        params = entry["params"]
        config = next(c for c in research.CONFIGS
                      if c.norm == params["model_options"]["norm"] and c.l1 == params["l1"])
        by_label[config.label] = entry["result"]
    return by_label


def test_research_report_has_every_configuration_and_plot(research_quick):
    out, report = research_quick
    check_common_structure(report, out)
    for heading in ("Accuracy and cost", "Whiteness and sparsity", "Whiteness per layer"):
        body = section(report, heading)
        for config in research.CONFIGS:
            if heading != "Whiteness per layer" or not config.l1:
                assert f"| {config.label} |" in body, f"{config.label} missing from {heading}"
    assert "- epochs: 3" in report and "lr 0.1, batch 128" in report


def test_research_findings_quote_the_measured_numbers(research_quick):
    out, report = research_quick
    results = research_by_label(out)
    findings = section(report, "Findings")
    for config in research.CONFIGS[1:]:
        line = next(line for line in findings.splitlines() if line.startswith(f"- {config.label} vs BN:"))
        accuracy, baseline = results[config.label]["accuracy"]["test"], results["BN"]["accuracy"]["test"]
        assert f"test accuracy {accuracy:.3f} vs {baseline:.3f}" in line
        precise = results[config.label]["accuracy"]["test_precise"]
        if precise is not None:
            assert f"with precise statistics {precise:.3f} vs {results['BN']['accuracy']['test_precise']:.3f}" in line
    bn = results["BN"]["whiteness"]["eval"]
    bn_output = sum(bn[s]["output"]["within"] for s in bn) / len(bn)
    assert f"mean |corr| {bn_output:.3f}" in findings


def test_research_whitening_facts(research_quick):
    out, _ = research_quick
    results = research_by_label(out)
    assert {label: sorted(r["whiteness"]) for label, r in results.items()} == {
        label: ["eval", "train"] if label == "PIT" else ["eval", "precise", "train"] for label in results}
    for mode in ("train", "eval", "precise"):
        for site, measured in results["BN"]["whiteness"][mode].items():
            # A per-channel affine map leaves correlations exactly as they were.
            assert measured["output"]["within"] == pytest.approx(measured["input"]["within"], abs=1e-6), site
    zca = results["ZCA"]["whiteness"]["train"]
    for site, measured in zca.items():
        # ZCA makes each group's batch covariance the identity (up to eps): no correlation left.
        assert measured["output"]["within"] < 0.02, site
        assert measured["output"]["within"] < results["BN"]["whiteness"]["train"][site]["output"]["within"]
    iternorm = results["IterNorm"]["whiteness"]["train"]
    assert sum(m["output"]["within"] for m in iternorm.values()) < sum(m["input"]["within"] for m in iternorm.values())


def test_research_sparsification_facts(research_quick):
    out, report = research_quick
    results = research_by_label(out)
    mean_gamma = {label: sum(r["sparsity"]["abs_gamma"]) / len(r["sparsity"]["abs_gamma"])
                  for label, r in results.items()}
    strongest = f"BN + L1(γ) λ={max(research.L1_COEFFICIENTS):g}"
    assert mean_gamma[strongest] < mean_gamma["BN"] - 0.05
    for label, r in results.items():
        prunable = sum(g < research.PRUNE_THRESHOLD for g in r["sparsity"]["abs_gamma"])
        if prunable == 0:  # nothing pruned: the pruned network is the network
            assert r["sparsity"]["accuracy"]["test"] == r["accuracy"]["test"], label
        assert (r["accuracy"]["test_precise"] is None) == (label == "PIT"), label
    # The step-time ratio is a measurement on a shared machine: reported, never asserted.
    table = section(report, "Accuracy and cost")
    for label, r in results.items():
        ratio = r["step_seconds"]["this"] / r["step_seconds"]["BN"]
        assert r["step_seconds"]["this"] > 0 and r["step_seconds"]["BN"] > 0, label
        assert any(row.startswith(f"| {label} |") and row.endswith(f"| {ratio:.2f}× |") for row in table.splitlines())


def test_research_second_invocation_is_served_from_the_cache(research_quick, forbid_computing_runs):
    out, first = research_quick
    forbid_computing_runs()
    report = run_quick("research", out)
    assert f"- runs: {len(research.CONFIGS)} ({len(research.CONFIGS)} from the cache)" in report
    assert section(report, "Findings") == section(first, "Findings")


# ---- smoothness -----------------------------------------------------------------------------------------


def test_smoothness_report_has_every_model_and_plot(smoothness_quick):
    out, report = smoothness_quick
    check_common_structure(report, out)
    for heading in ("Learning phase", "All probes"):
        body = section(report, heading)
        for label in smoothness.MODELS:
            for lr in smoothness.QUICK_RATES:
                assert f"| {lr:g} | {label} |" in body, f"{label} at lr {lr:g} missing from {heading}"
    section(report, "Decision rule")
    findings = section(report, "Findings")
    assert "Smoothness explanation:" in findings and "Covariate-shift explanation:" in findings


def smoothness_by_model(out: Path) -> dict[tuple[str, float], dict]:
    label_of = {spec: label for label, spec in smoothness.MODELS.items()}
    return {(label_of[(e["params"]["model_options"]["norm"], e["params"]["noise"])], e["params"]["lr"]): e["result"]
            for e in cached_results(out)}


def test_smoothness_probes_are_complete_and_consistent(smoothness_quick):
    out, _ = smoothness_quick
    for (label, lr), result in smoothness_by_model(out).items():
        probes = result["probes"]
        assert [p["step"] for p in probes] == list(range(0, probes[-1]["step"] + 1, smoothness.QUICK_PROBE_EVERY))
        for p in probes:
            assert len(p["losses"]) == len(smoothness.MULTIPLIERS)
            assert p["loss_variation"] == pytest.approx(max(p["losses"]) - min(p["losses"]))
            # β is the largest ratio over k: at least the largest change over the largest step.
            largest_step = lr * max(smoothness.MULTIPLIERS) * p["grad_norm"]
            assert p["beta_smoothness"] * largest_step >= p["grad_change"] * (1 - 1e-9)
            assert -1.0 <= p["ics_cos"] <= 1.0 + 1e-9
        assert all("drift_rel" in p for p in probes[1:]) and "drift_rel" not in probes[0]


def test_smoothness_noise_moves_the_layer_inputs(smoothness_quick):
    out, _ = smoothness_quick
    results = smoothness_by_model(out)
    for lr in smoothness.QUICK_RATES:
        noisy, clean = results[("BN + noise", lr)], results[("BN", lr)]
        # Redrawn scales and shifts after every BN: the sigmoid inputs must drift far more than with BN alone.
        assert smoothness.summary(noisy, "drift_rel") > 5 * smoothness.summary(clean, "drift_rel")


def test_smoothness_findings_quote_the_measured_numbers(smoothness_quick):
    out, report = smoothness_quick
    results = smoothness_by_model(out)
    findings = section(report, "Findings")
    lr = max(smoothness.QUICK_RATES)
    everything = [results[(label, lr)] for label in smoothness.MODELS]
    start = smoothness.learning_start(everything)
    if start == float("inf"):
        assert f"lr {lr:g}: " in findings and "no learning phase" in findings
    else:
        value = smoothness.summary(results[("BN", lr)], "loss_variation", start)
        assert f"lr {lr:g}, learning phase (steps ≥ {start}), BN vs no BN: loss variation {value:.3f}" in findings


def _fake_run(loss: float, final_loss: float, **metrics) -> dict:
    """A smoothness run result whose 5 probes all have batch loss `loss` and the given metric values."""
    values = {metric: 1.0 for metric in smoothness.METRICS} | metrics
    probes = [{"step": 10 * i, "loss": loss, "losses": [loss] * len(smoothness.MULTIPLIERS), **values}
              for i in range(5)]
    return {"status": "ok", "history": [{"test_acc": 0.5, "train_loss": final_loss}], "probes": probes}


def test_smoothness_rate_on_a_plateau_is_not_compared():
    results = {("no BN", 0.1): [_fake_run(2.3, 2.3, loss_variation=0.1, grad_change=0.1, beta_smoothness=0.1)],
               ("BN", 0.1): [_fake_run(0.5, 0.4)], ("BN + noise", 0.1): [_fake_run(0.6, 0.5)]}
    lines, verdict = smoothness.compare_at_rate(results, 0.1)
    assert verdict is None
    assert "no BN never leaves the initial plateau" in lines[0] and "flatness of a saturated network" in lines[0]
    assert "cannot be told apart" in smoothness.overall({0.1: verdict})[0]


@pytest.mark.parametrize("bn_variation, noisy_final_loss, expected", [
    (0.5, 0.6, "support the smoothness explanation over internal covariate shift"),  # noise drifts, still trains
    (0.5, 1.5, "Both explanations survive"),  # the noisy network trains worse than no BN
    (2.0, 0.6, "Neither explanation survives"),  # BN's landscape is rougher
])
def test_smoothness_decision_rule(bn_variation, noisy_final_loss, expected):
    results = {("no BN", 1.0): [_fake_run(1.5, 1.0, drift_rel=0.2)],
               ("BN", 1.0): [_fake_run(1.0, 0.5, drift_rel=0.02, loss_variation=bn_variation,
                                       grad_change=0.5, beta_smoothness=0.5)],
               ("BN + noise", 1.0): [_fake_run(1.0, noisy_final_loss, drift_rel=0.8)]}
    lines, verdict = smoothness.compare_at_rate(results, 1.0)
    assert len(lines) == 2 and verdict is not None
    assert "drift (relative) 0.800 vs 0.200 (×4, single seed)" in lines[1]
    assert expected in smoothness.overall({1.0: verdict})[-1]


# ---- the pieces they are built on -------------------------------------------------------------------------


class _Stop(Exception):
    pass


class _StopAt(Hooks):
    """Interrupts the run before step `step`, as a Ctrl-C would."""

    def __init__(self, step):
        self.step = step

    def before_step(self, net, x, y, step):
        if step == self.step:
            raise _Stop


def _context(tmp_path) -> RunContext:
    return RunContext(tmp_path, None, True)


SMALL = LoopSpec(model="bn-lenet", lr=0.1, epochs=2, seed=3, batch_size=64, train_subset=512, test_subset=256)


def test_custom_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight = train_with_hooks(SMALL, _context(tmp_path / "straight"))
    with pytest.raises(_Stop):
        train_with_hooks(SMALL, _context(tmp_path / "cut"), _StopAt(step=10))  # in epoch 2 (8 steps per epoch)
    resumed = train_with_hooks(SMALL, _context(tmp_path / "cut"))
    strip = [{k: v for k, v in h.items() if k != "examples_per_sec"} for h in straight.history]
    assert [{k: v for k, v in h.items() if k != "examples_per_sec"} for h in resumed.history] == strip
    for name, tensor in straight.net.state_dict().items():
        assert torch.equal(tensor, resumed.net.state_dict()[name]), name


@pytest.mark.parametrize("noise", [False, True])
def test_probes_change_nothing_in_training(tmp_path, noise):
    """A probed run ends exactly as the same run with the probes' work skipped (noise redrawn alike)."""
    train_set = _context(tmp_path).dataset().subset(SMALL.train_subset, SMALL.test_subset, seed=SMALL.seed)
    images = train_set.train_images[:64].float().div(255).unsqueeze(1)
    seed = SMALL.seed if noise else None
    probed = smoothness.Probes(SMALL.lr, 3, images, seed)
    skipped = smoothness.Probes(SMALL.lr, 10**9, images, seed)  # redraws the noise, probes only at step 0
    with_probes = train_with_hooks(SMALL, _context(tmp_path / "probed"), probed)
    without = train_with_hooks(SMALL, _context(tmp_path / "skipped"), skipped)
    assert len(probed.records) == 6 and len(skipped.records) == 1
    for name, tensor in with_probes.net.state_dict().items():
        assert torch.equal(tensor, without.net.state_dict()[name]), name
    assert [h["train_loss"] for h in with_probes.history] == [h["train_loss"] for h in without.history]
