"""Pieces shared by the studies that answer the chapter's exercises (placement, bias, lite, fixed-affine,
dropout): the run parameters of both presets, grouping outcomes by configuration, the share of a gain a
variant recovers, and the plots of results by preset.

Every exercise study trains the chapter's unpadded BN-LeNet ("bn-lenet", bnlab's BN) and varies one
LeNetConfig option through ``model_options``; its "no norm" configuration is the same unpadded
architecture with ``norm=None``, so that only the normalization differs between configurations.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Hashable, Optional, Sequence

from bnlab.studies.core import (Outcome, Settings, difference, mean_curve, mean_std, plot_epoch_curves, pyplot,
                                save_figure)
from bnlab.studies.runs import final
from bnlab.train import PRESETS

QUICK_DATA = {"train_subset": 6000, "test_subset": 2000}
QUICK_EPOCHS = 2
FULL_SEEDS = 3
MODEL = "bn-lenet"
NO_NORM = {"norm": None}
TEST_ACCURACY = (("test_acc", "test accuracy"),)
LOSS_AND_ACCURACY = (("train_loss", "train loss"), ("test_acc", "test accuracy"))


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




def group_results(outcomes: Sequence[Outcome], key: Callable[[dict], Hashable]) -> dict:
    """Results (lists over seeds) by `key(run parameters)`."""
    groups = defaultdict(list)
    for outcome in outcomes:
        groups[key(outcome.run.params)].append(outcome.result)
    return groups


def finals(results: Sequence[dict], metric: str) -> list[float]:
    """The final epoch's `metric` of every run (NaN for a run that diverged before finishing an epoch)."""
    return [final(r, metric) for r in results]


def diverged_count(results: Sequence[dict]) -> int:
    return sum(r["status"] == "diverged" for r in results)


def share_of_gain(variant: Sequence[float], full: Sequence[float], baseline: Sequence[float]) -> Optional[float]:
    """(mean(variant) - mean(baseline)) / (mean(full) - mean(baseline)): how much of the full method's gain
    over the baseline the variant recovers (1 = all of it, 0 = none, negative = worse than the baseline).
    None when the full method does not beat the baseline, so that there is no gain to share."""
    v, f, b = (mean_std(values)[0] for values in (variant, full, baseline))
    if not f - b > 0:
        return None
    return (v - b) / (f - b)


def gain_columns(variant: Sequence[float], full: Sequence[float], baseline: Sequence[float]) -> list[str]:
    """Table cells for a variant of a method: the share of the method's gain it recovers, and its difference
    to the full method with `difference`'s verdict (blank for the full method itself)."""
    if list(variant) == list(full):
        return ["100%", "—"]
    share = share_of_gain(variant, full, baseline)
    gap, verdict = difference(variant, full)
    return ["—" if share is None else f"{share:.0%}", f"{gap:+.3f} ({verdict})"]


def plot_bars(ax, labels: Sequence[str], values: Sequence[Sequence[float]], ylabel: str) -> None:
    """A bar per label at the mean over seeds, whiskers at half the range; a missing value is left out.

    Bars take the colour cycle in order, as `plot_epoch_curves`' lines do: the same label, the same colour."""
    means, errors = [], []
    for seed_values in values:
        present = [v for v in seed_values if v == v]  # NaN marks a run without that value
        means.append(sum(present) / len(present) if present else 0.0)
        errors.append((max(present) - min(present)) / 2 if len(present) > 1 else 0.0)
    ax.bar(range(len(labels)), means, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(labels))])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def preset_title(preset: str) -> str:
    return f"{preset} preset (lr {PRESETS[preset]['lr']:g}, batch {PRESETS[preset]['batch_size']})"


def plot_accuracy_by_preset(accuracy: Callable[[str, str], Sequence[float]], names: Sequence[str], settings: Settings,
                            filename: str, caption: str) -> tuple[str, str]:
    """Final test accuracy of each configuration (`plot_bars`), a panel per preset; returns (filename, caption).

    `accuracy(preset, name)` gives the values over seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PRESETS), figsize=(9, 3.4), sharey=True)
    for ax, preset in zip(axes, PRESETS):
        plot_bars(ax, list(names), [accuracy(preset, name) for name in names], "final test accuracy")
        ax.set_title(preset_title(preset))
    save_figure(fig, settings.out / filename)
    return filename, caption


def plot_curves_by_preset(results: dict, names: Sequence[str], settings: Settings, filename: str, caption: str, *,
                          metrics: Sequence[tuple[str, str]] = TEST_ACCURACY, label: Callable[[str], str] = str,
                          panels: Sequence[str] = tuple(PRESETS),
                          title: Callable[[str], str] = "{} preset".format) -> tuple[str, str]:
    """Per-epoch means over seeds of each configuration, a column per panel (the presets unless given) and a
    row per (metric, axis label); `results[(panel, name)]` holds the runs. Returns (filename, caption)."""
    plt = pyplot()
    width = 4.5 * len(panels) + (len(metrics) > 1)
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(width, 0.2 + 3.2 * len(metrics)), sharex=True,
                             sharey="row", squeeze=False)
    for column, panel in enumerate(panels):
        for row, (metric, axis_label) in enumerate(metrics):
            curves = {label(name): mean_curve(results[(panel, name)], metric) for name in names}
            plot_epoch_curves(axes[row][column], curves, axis_label)
            axes[row][column].set_title(title(panel) + (f": {axis_label}" if len(metrics) > 1 else ""))
            if row < len(metrics) - 1:
                axes[row][column].set_xlabel("")  # the shared epoch axis is labelled once, at the bottom
    axes[-1][0].legend(fontsize=8)
    save_figure(fig, settings.out / filename)
    return filename, caption
