"""The quick versions of `compare` and `lr-sweep`, and the study framework's cache and listing."""

import json

import pytest

from bnlab import studies
from bnlab.cli import main
from bnlab.studies.lr_sweep import QUICK_RATES, SUCCESS_ACCURACY

PNG = b"\x89PNG\r\n\x1a\n"


def run_quick(name, out, capsys):
    assert main(["study", name, "--quick", "--jobs", "2", "--out", str(out), "--no-download"]) == 0
    assert f"report written to {out / 'report.md'}" in capsys.readouterr().out
    return (out / "report.md").read_text()


def cached_results(out):
    return [json.loads(p.read_text()) for p in sorted((out / "cache").glob("*.json"))]


def check_report_structure(report, out):
    for section in ("## Findings", "## What was run", "## Runtime", "## Plots", "mean ± std"):
        assert section in report, section
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert images, "the report embeds its plots"
    for name in images:
        assert (out / name).read_bytes()[:8] == PNG, name


def test_study_list_names_all_fourteen_with_runtimes(capsys):
    assert main(["study", "list"]) == 0
    listing = capsys.readouterr().out
    names = ["compare", "lr-sweep", "placement", "bias", "lite", "fixed-affine", "dropout", "batch-size",
             "population-stats", "depth", "layer-norm", "research", "smoothness", "shift"]
    assert list(studies.STUDIES) == names
    for name in names:
        assert f"{name:>17}  " in listing
    assert listing.count("full run: about") == 14


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(["study", "compare", "--quick", "--jobs", "2", "--out", str(out), "--no-download"]) == 0
    return out


def test_compare_quick_report(compare_run):
    report = (compare_run / "report.md").read_text()
    check_report_structure(report, compare_run)
    results = cached_results(compare_run)
    assert len(results) == 12  # 3 models x 2 presets x 2 poolings, one seed
    for preset in ("current", "classic"):
        for pool in ("avg", "max"):
            for model in ("lenet", "bn-lenet", "bn-lenet-torch"):
                assert f"| {preset} | {pool} | {model} |" in report
    # the BN gain quoted in the findings is the one in the cache
    acc = {(r["params"]["model"], r["params"]["pool"], r["params"]["lr"]): r["result"]["history"][-1]["test_acc"]
           for r in results}
    gain = acc[("bn-lenet", "avg", 0.1)] - acc[("lenet", "avg", 0.1)]
    assert f"current preset, avg pooling: BN changes final test accuracy by {gain:+.3f}" in report
    # bnlab's from-scratch BN and torch's trained the same network from the same seed
    assert abs(acc[("bn-lenet", "avg", 0.1)] - acc[("bn-lenet-torch", "avg", 0.1)]) < 0.01
    paired = max(abs(acc[("bn-lenet", pool, 0.1)] - acc[("bn-lenet-torch", pool, 0.1)]) for pool in ("avg", "max"))
    assert f"final test accuracies differ by at most {paired:.4f}" in report


def test_a_rerun_is_served_from_the_cache(compare_run, capsys, forbid_computing_runs):
    forbid_computing_runs()
    before = {p.name: p.read_bytes() for p in (compare_run / "cache").iterdir()}
    assert main(["study", "compare", "--quick", "--jobs", "2", "--out", str(compare_run), "--no-download"]) == 0
    assert "12 runs: 12 cached, 0 to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (compare_run / "cache").iterdir()} == before


def test_lr_sweep_quick_report(tmp_path, capsys):
    out = tmp_path / "lr"
    report = run_quick("lr-sweep", out, capsys)
    check_report_structure(report, out)
    results = cached_results(out)
    assert len(results) == 2 * len(QUICK_RATES)
    for lr in QUICK_RATES:
        assert f"| {lr:g} |" in report
    bn = {r["params"]["lr"]: r["result"] for r in results if r["params"]["model"] == "bn-lenet"}
    working = [lr for lr, r in bn.items() if r["status"] == "ok" and r["history"][-1]["test_acc"] >= SUCCESS_ACCURACY]
    assert working, "BN-LeNet trains at some rate even in the quick version"
    assert f"bn-lenet: training succeeds (every seed) for lr {min(working):g} to {max(working):g}" in report
    plain = {r["params"]["lr"]: r["result"] for r in results if r["params"]["model"] == "lenet"}
    assert plain[100.0]["status"] == "diverged", "plain LeNet at lr 100 blows up (divergence is recorded, not raised)"
