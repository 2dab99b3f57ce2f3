"""The exercise studies — placement, bias, lite, fixed-affine, dropout — in their --quick form.

Each study runs once per session (through the CLI, --jobs 2, into a temporary folder); the tests then read
its report.md, its PNGs and its cache, and check that the report has every section and configuration, that
the findings quote the numbers the runs measured, and the facts each study exists to show.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest

from bnlab import cli
from bnlab.models import NORM_SITES, PLACEMENTS
from bnlab.studies import dropout

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Configuration labels each study's results table must list (every one, for both presets).
CONFIGURATIONS = {
    "placement": ("all", "conv", "linear", "first", "none"),
    "bias": ("kept", "removed"),
    "lite": ("batchnorm", "mean-only", "variance-only", "none"),
    "fixed-affine": ("learned", "fixed"),
    "dropout": ("neither", "dropout", "bn", "bn+dropout"),
}
PRESETS = ("current", "classic")


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """quick_study(name) -> output folder: the study's --quick run, done on first request."""
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
    """The body of the '## heading' section (up to the next '## ')."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", report, flags=re.M | re.S)
    assert match, f"report has no '## {heading}' section"
    return match.group(1)


def findings(out: Path) -> str:
    return section(report_of(out), "Findings")


def cached_runs(out: Path) -> list[dict]:
    """Every cache entry: {"kind", "params", "result", "seconds"}."""
    return [json.loads(path.read_text()) for path in sorted((out / "cache").glob("*.json"))]


def table_rows(report: str) -> list[list[str]]:
    """The cells of every markdown table row (header and separator rows included)."""
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in report.splitlines() if line.startswith("|")]


def final_test_acc(entry: dict) -> float:
    return entry["result"]["history"][-1]["test_acc"]


def preset_of(params: dict) -> str:
    return "current" if params["lr"] == 0.1 else "classic"


# ---- every study ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_report_has_every_section_configuration_and_plot(quick_study, name):
    out = quick_study(name)
    report = report_of(out)
    for heading in ("Findings", "What was run", "Plots", "Runtime"):
        section(report, heading)
    assert "(no conclusion could be drawn)" not in report
    assert "mean ± std over seeds)" in report  # the results table's heading
    rows = table_rows(report)
    for preset in PRESETS:
        for label in CONFIGURATIONS[name]:
            assert any(row[:2] == [preset, label] for row in rows), f"no table row for {preset} / {label}"
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert embedded, "report.md embeds no plot"
    for file_name in embedded:
        content = (out / file_name).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and content[12:16] == b"IHDR", f"{file_name} is not a PNG"
        width, height = struct.unpack(">II", content[16:24])
        assert width > 300 and height > 200, f"{file_name} is only {width}x{height}"


def test_second_invocation_is_served_from_the_cache(quick_study, capsys, forbid_computing_runs):
    out = quick_study("fixed-affine")
    forbid_computing_runs()
    runs = len(cached_runs(out))
    capsys.readouterr()
    assert cli.main(["study", "fixed-affine", "--quick", "--jobs", "2", "--out", str(out)]) == 0
    assert f"{runs} runs: {runs} cached, 0 to do" in capsys.readouterr().out
    assert f"runs: {runs} ({runs} from the cache)" in report_of(out)


# ---- placement --------------------------------------------------------------------------------------


def test_placement_findings_quote_the_measured_shares(quick_study):
    out = quick_study("placement")
    accuracy = {(preset_of(e["params"]), e["params"]["model_options"].get("placement", "none")): final_test_acc(e)
                for e in cached_runs(out)}
    text = findings(out)
    for preset in PRESETS:
        full, none = accuracy[(preset, "all")], accuracy[(preset, "none")]
        assert f"reaches {full:.3f} test accuracy vs {none:.3f} with no BN" in text
        if full > none:  # the shares are only defined when BN everywhere beats no BN
            for placement in ("conv", "linear", "first"):
                share = (accuracy[(preset, placement)] - none) / (full - none)
                quoted = f"{placement} ({', '.join(PLACEMENTS[placement])}) {share:.0%}"
                assert quoted in text, f"{preset}: {quoted!r} not in the findings"
    # BN everywhere learns on the quick subset at the current preset; no BN at all does not yet.
    assert accuracy[("current", "all")] > accuracy[("current", "none")] + 0.3


# ---- bias -------------------------------------------------------------------------------------------


def test_bias_before_bn_gets_no_gradient_and_beta_absorbs_it(quick_study):
    out = quick_study("bias")
    kept = [e["result"] for e in cached_runs(out) if e["kind"] == "bias-gradients"]
    assert len(kept) == len(PRESETS)
    for result in kept:
        for stage in ("at_init", "trained"):
            for site in NORM_SITES:
                assert result[stage][site] < 1e-4, f"{stage} {site}: bias gradient {result[stage][site]:.2e}"
            assert result[stage]["output"] > 1e-2  # the control: a bias that no BN follows learns
        assert max(result["drift"][site] for site in NORM_SITES) < 1e-4 < result["drift"]["output"]
        equivalence = result["equivalence"]
        assert equivalence["train_mode_removed"] < 1e-4
        assert equivalence["eval_mode_absorbed"] < 1e-4 < 0.01 < equivalence["eval_mode_removed"]
    text = findings(out)
    largest_at_init = max(r["at_init"][site] for r in kept for site in NORM_SITES)
    assert f"at most {largest_at_init:.1e} of their weights' gradient" in text
    assert "zero up to float32 rounding" in text and "beta absorbs the bias" in text
    assert "saves 226 of" in text  # 6 + 16 + 120 + 84 channels


def test_bias_removal_leaves_accuracy_unchanged_seed_by_seed(quick_study):
    out = quick_study("bias")
    accuracy = {(preset_of(e["params"]), e["kind"]): final_test_acc(e) for e in cached_runs(out)}
    for preset in PRESETS:
        assert abs(accuracy[(preset, "bias-gradients")] - accuracy[(preset, "train")]) < 0.01


# ---- lite -------------------------------------------------------------------------------------------


def test_lite_findings_quote_each_half(quick_study):
    out = quick_study("lite")
    entries = cached_runs(out)
    accuracy = {(preset_of(e["params"]), e["params"]["model_options"]["norm"]): final_test_acc(e)
                for e in entries if e["kind"] == "train"}
    text = findings(out)
    for preset in PRESETS:
        assert (f"mean-only reaches {accuracy[(preset, 'mean-only')]:.3f}, variance-only "
                f"{accuracy[(preset, 'variance-only')]:.3f}") in text
        assert f"full BN reaches {accuracy[(preset, 'batchnorm')]:.3f}" in text
    assert "Stability:" in text
    probes = {e["params"]["model_options"]["norm"]: e["result"] for e in entries if e["kind"] == "sigmoid-inputs"}
    off_center = ", ".join(f"{v:.2f}" for v in probes["variance-only"]["off_center"])
    assert f"|mean|/std = {off_center}" in text


def test_lite_probe_finds_centered_sigmoid_inputs_exactly_where_the_mean_is_subtracted(quick_study):
    out = quick_study("lite")
    probes = {e["params"]["model_options"]["norm"]: e["result"] for e in cached_runs(out)
              if e["kind"] == "sigmoid-inputs"}
    for norm in ("batchnorm", "mean-only"):  # gamma 1, beta 0 at initialization: exactly centered
        assert max(probes[norm]["off_center"]) < 1e-4, norm
    for norm in ("variance-only", None):  # nothing subtracts the mean of conv1's output
        assert probes[norm]["off_center"][0] > 0.1, norm


# ---- fixed-affine -----------------------------------------------------------------------------------


def test_fixed_affine_keeps_gamma_and_beta_and_reports_how_far_learned_ones_move(quick_study):
    out = quick_study("fixed-affine")
    entries = cached_runs(out)
    fixed = [e["result"]["affine"] for e in entries if e["params"]["model_options"] == {"learn_affine": False}]
    learned = [e for e in entries if e["params"]["model_options"] == {}]
    assert fixed and learned
    for affine in fixed:
        for site in NORM_SITES:
            assert set(affine[site]["gamma"]) == {1.0} and set(affine[site]["beta"]) == {0.0}
    text = findings(out)
    assert "exactly at 1 and 0" in text
    for entry in learned:
        layer = entry["result"]["affine"]["fc2"]
        moved = sum(abs(g - 1) for g in layer["gamma"]) / len(layer["gamma"])
        assert moved > 0, "learned gamma never moved from 1"
        assert f"fc2 {moved:.3f}" in text  # the single seed's mean |gamma - 1| of fc2, as measured


# ---- dropout ----------------------------------------------------------------------------------------


def test_dropout_gap_is_eval_mode_train_accuracy_minus_test_accuracy(quick_study):
    out = quick_study("dropout")
    rows = {(row[0], row[1]): row for row in table_rows(report_of(out))}
    for entry in cached_runs(out):
        options, result = entry["params"]["model_options"], entry["result"]
        name = ("bn" if "norm" not in options else "neither") if "dropout" not in options else (
            "bn+dropout" if "norm" not in options else "dropout")
        train_acc = result["train_eval"]["acc"]
        assert 0.0 <= train_acc <= 1.0 and math.isfinite(result["train_eval"]["loss"])
        small = entry["params"].get("train_subset") == dropout.SMALL_DATA["quick"]["train_subset"]
        row = rows[(dropout.SMALL if small else preset_of(entry["params"]), name)]
        assert row[3] == f"{train_acc:.3f}" and row[4] == f"{train_acc - final_test_acc(entry):.3f}"
        if name == "bn+dropout":  # dropout's masks depress the train-mode average, not the eval-mode accuracy
            assert train_acc > result["history"][-1]["train_acc"]
    assert {row[0] for row in rows.values() if row[1] == "bn"} == {*PRESETS, dropout.SMALL}
    text = findings(out)
    assert "train − test gap (eval mode)" in text and "Adding dropout to BN" in text
    assert f"{dropout.SMALL} (lr 1, batch 256, 1000 training examples for 12 epochs)" in text
    assert "current preset (lr 0.1, batch 128)" in text
