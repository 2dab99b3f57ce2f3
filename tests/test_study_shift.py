"""The shift study (issue 13): bnlab's corruptions, and `bnlab study shift --quick` end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bnlab import cli, data
from bnlab.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from bnlab.studies.shift import NORMS, SEVERITY_LEVELS, conditions


def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 1, 28, 28, generator=g) * torch.rand(8, 1, 1, 1, generator=g)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_grow_with_severity_and_stay_images(name):
    x = images()
    original = x.clone()
    distances = []
    for severity in (1, 2, 3):
        y = corrupt(x, name, severity, seed=3)
        assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
        assert torch.equal(y, corrupt(x, name, severity, seed=3))  # deterministic
        distances.append(float((y - x).abs().mean()))
    assert torch.equal(x, original)  # the input is not modified
    assert 0 < distances[0] < distances[1] < distances[2], distances
    assert torch.equal(corrupt(x, name, 0), x)


@pytest.mark.parametrize("name, parameter, expected", [
    ("brightness", 0.2, lambda x: (x + 0.2).clamp(0, 1)),
    ("inversion", 1.0, lambda x: 1 - x),
    ("contrast", 0.5, lambda x: x.mean((1, 2, 3), keepdim=True) * 0.5 + 0.5 * x),
])
def test_corruptions_match_their_formula(name, parameter, expected):
    x = images()
    severity = SEVERITIES[name].index(parameter) + 1
    assert torch.allclose(corrupt(x, name, severity), expected(x), atol=1e-6)


def test_blur_keeps_the_mean_of_a_padded_image_and_translation_moves_pixels():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 14, 14] = 1.0
    assert corrupt(x, "blur", 1).sum().item() == pytest.approx(1.0, abs=1e-5)
    assert corrupt(x, "translation", 1)[0, 0, 16, 16] == 1.0


@pytest.mark.parametrize("args, message", [
    (("fog", 1), "unknown corruption"),
    (("blur", 4), "severity must be"),
])
def test_corruption_errors(args, message):
    with pytest.raises(ValueError, match=message):
        corrupt(images(), *args)


def test_uint8_images_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="to_input"):
        corrupt(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "blur", 1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if data.locate() is None:
        pytest.fail("the real Fashion-MNIST is needed: apt-get install dataset-fashion-mnist, or `bnlab data download`")
    out = tmp_path_factory.mktemp("shift")
    assert cli.main(["study", "shift", "--quick", "--no-download", "--out", str(out)]) == 0
    results = [json.loads(p.read_text()) for p in sorted((out / "cache").glob("*.json"))]
    return out, results


def test_quick_study_writes_a_report_with_every_section(quick):
    out, _ = quick
    report = (out / "report.md").read_text()
    for heading in ("Findings", "Mean test accuracy over the six corruptions", "Accuracy at severity 3 per corruption",
                    "Target batch size", "Runtime"):
        assert f"## {heading}" in report
    assert (out / "shift_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_study_measures_every_condition_and_method(quick):
    _, results = quick
    assert len(results) == len(NORMS)
    for entry in results:
        accuracy = entry["result"]["accuracy"]
        assert set(accuracy) == {f"{n}/{s}" for n, s in conditions(SEVERITY_LEVELS["quick"])}
        adaptable = not entry["params"]["train"]["model_options"]
        expected = {"none", "adabn", "batch-stats@8", "tent@8", "batch-stats@128", "tent@128"} if adaptable else {"none"}
        assert all(set(row) == expected for row in accuracy.values())
        assert all(0 <= value <= 1 for row in accuracy.values() for value in row.values())


def test_quick_study_adapting_bn_recovers_from_a_global_shift(quick):
    # Brightness and contrast move every BN input's statistics; the running ones no longer fit, the target's do.
    _, results = quick
    bn = next(e["result"]["accuracy"] for e in results if not e["params"]["train"]["model_options"])
    for condition in ("brightness/3", "contrast/3"):
        row = bn[condition]
        assert row["adabn"] > row["none"] + 0.1, (condition, row)
        assert row["batch-stats@128"] > row["none"] + 0.1, (condition, row)


def test_quick_report_quotes_the_measured_numbers(quick):
    out, results = quick
    report = (out / "report.md").read_text()
    bn = next(e["result"]["accuracy"] for e in results if not e["params"]["train"]["model_options"])
    clean_none = re.search(r"^\| batchnorm \| none \| ([0-9.]+) \|", report, flags=re.M)
    assert clean_none and float(clean_none.group(1)) == pytest.approx(bn["clean/0"]["none"], abs=5e-4)
    severity3 = sum(bn[f"{n}/3"]["adabn"] for n in CORRUPTIONS) / len(CORRUPTIONS)
    assert f"adabn {severity3:.3f}" in report
