"""Settings the studies share: the exercise studies' runs under both presets (`PresetStudy`), and the
learning-rate rule the claim studies carry across batch sizes.

Every exercise study (placement, bias, lite, fixed-affine, dropout) trains the chapter's unpadded
BN-LeNet ("bn-lenet", bnlab's BN) and varies one LeNetConfig option through ``model_options``; its "no
norm" configuration is the same unpadded architecture with ``norm=None``, so that only the
normalization differs between configurations.
"""

from __future__ import annotations

import math

from bnlab.studies.engine.report import Report
from bnlab.studies.engine.runner import Outcome, Run, Settings
from bnlab.studies.engine.stats import group_results
from bnlab.studies.engine.study import Study
from bnlab.training import PRESETS

QUICK_DATA = {"train_subset": 6000, "test_subset": 2000}
QUICK_EPOCHS = 2
FULL_SEEDS = 3
MODEL = "bn-lenet"
NO_NORM = {"norm": None}


def training_params(preset: str, settings: Settings, seed: int, model_options: dict) -> dict:
    """The "train" run kind's parameters: bn-lenet with `model_options` under `preset`'s lr and batch size."""
    values = PRESETS[preset]
    return {"model": MODEL, "model_options": model_options, "lr": values["lr"], "batch_size": values["batch_size"],
            "epochs": QUICK_EPOCHS if settings.quick else values["epochs"], "seed": seed,
            **(QUICK_DATA if settings.quick else {})}


def config_name(configs: dict, model_options: dict) -> str:
    """The name under which `configs` (name -> model_options) lists these model options."""
    for name, options in configs.items():
        if options == model_options:
            return name
    raise ValueError(f"model options {model_options} are none of the configurations {list(configs)}")


def preset_runs(kind: str, configs: dict, settings: Settings) -> list[Run]:
    """A `kind` run (with `training_params`) per preset, configuration (`configs`: name -> model_options)
    and seed, in that nesting."""
    return [Run(kind, training_params(preset, settings, seed, options))
            for preset in PRESETS for options in configs.values() for seed in settings.seed_list(FULL_SEEDS)]


def by_preset_and_config(outcomes: list[Outcome], configs: dict) -> dict:
    """The results (lists over seeds) by (preset, configuration name in `configs`)."""
    return group_results(outcomes, lambda p: (preset_of(p), config_name(configs, p["model_options"])))


def preset_of(params: dict) -> str:
    """The preset whose learning rate and batch size these training parameters use."""
    for name, values in PRESETS.items():
        if values["lr"] == params["lr"] and values["batch_size"] == params["batch_size"]:
            return name
    raise ValueError(f"lr {params['lr']} with batch size {params['batch_size']} is none of the presets {list(PRESETS)}")


def fixed_settings(settings: Settings) -> dict:
    """Report.settings entries that every exercise study shares."""
    return {
        "data": "Fashion-MNIST" + (f", seeded subsets {QUICK_DATA}" if settings.quick else " (60000 train / 10000 test)"),
        "model": f"{MODEL} (the chapter's BN-LeNet: sigmoid, average pooling, unpadded first convolution, bnlab's "
                 "BN after every conv/linear layer unless varied); Xavier-uniform weights",
        "presets": "; ".join(f"{name}: lr {v['lr']}, batch {v['batch_size']}" for name, v in PRESETS.items()),
        "optimizer": "plain SGD (no momentum, no weight decay)",
        "epochs": QUICK_EPOCHS if settings.quick else PRESETS["current"]["epochs"],
        "seeds": len(settings.seed_list(FULL_SEEDS)),
        "metrics": "final epoch; train loss is the train-mode average over the last epoch, test accuracy is in "
                   "eval mode on the whole test set",
    }


class PresetStudy(Study):
    """An exercise study that compares configurations under both presets: `configs` (name -> model_options
    of bn-lenet), a `run_kind` run of each per preset and seed (`preset_runs`), and a report that lists the
    exercise studies' `fixed_settings` and the presets among what varied."""

    configs: dict = {}
    run_kind = "train"

    def runs(self, settings: Settings) -> list[Run]:
        return preset_runs(self.run_kind, self.configs, settings)

    def results(self, outcomes: list[Outcome]) -> dict:
        """The results (lists over seeds) by (preset, configuration name)."""
        return by_preset_and_config(outcomes, self.configs)

    def preset_report(self, settings: Settings, *, title: str, own_settings: dict, varied: dict,
                      sections: list[tuple[str, str]], conclusions: list[str], plots: list[tuple[str, str]]) -> Report:
        """The study's Report: `fixed_settings` followed by the study's `own_settings`; `varied`, then the preset."""
        return Report(title=title, question=self.question, settings={**fixed_settings(settings), **own_settings},
                      varied={**varied, "preset": tuple(PRESETS)}, sections=sections, conclusions=conclusions,
                      plots=plots)


def preset_title(preset: str) -> str:
    return f"{preset} preset (lr {PRESETS[preset]['lr']:g}, batch {PRESETS[preset]['batch_size']})"


REFERENCE = PRESETS["current"]  # the current edition's lr 0.1 at batch 128 anchors the rule below


def scaled_lr(batch_size: int) -> float:
    """The current edition's learning rate carried to `batch_size` by square-root scaling.

    lr = 0.1 * sqrt(batch / 128). Square-root scaling keeps the variance of one epoch's summed
    update steady when the batch changes at a matched number of epochs; linear scaling (lr ∝ batch)
    would give 0.0016 at batch 2 and 0.4 at 512, a range that a pilot (3 epochs on 10000 examples)
    found far steeper than the best rates of BN-LeNet, which moved by less than 4x from batch 8 to 512.
    """
    return REFERENCE["lr"] * math.sqrt(batch_size / REFERENCE["batch_size"])


def round_lr(lr: float) -> float:
    """Three significant digits: readable in tables and stable as part of a run's cache key."""
    return float(f"{lr:.3g}")
