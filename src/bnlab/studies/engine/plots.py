"""Plot helpers the studies share: a file-only matplotlib, epoch curves, bars over seeds, panels per preset
and curves against batch size. Every plot keeps one style per label, so identical curves stay visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from bnlab import files
from bnlab.studies.engine.presets import preset_title
from bnlab.studies.engine.runner import Settings
from bnlab.studies.engine.stats import mean_std
from bnlab.training import PRESETS

TEST_ACCURACY = (("test_acc", "test accuracy"),)
LOSS_AND_ACCURACY = (("train_loss", "train loss"), ("test_acc", "test accuracy"))


def save_figure(fig, path: Path) -> None:
    with files.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def saved_plot(fig, settings: Settings, filename: str, caption: str) -> tuple[str, str]:
    """Save `fig` as `filename` in the study's output folder; return the report's (file name, caption)
    entry for it, so the name is written once."""
    save_figure(fig, settings.out / filename)
    return filename, caption


def subplots(*args, **kwargs):
    """A new figure and its axes: matplotlib.pyplot.subplots(*args, **kwargs) on a file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


LINE_STYLES = ("-o", "--s", ":^", "-.v", "-d", "--x", ":*", "-.p")


def label_axes(ax, xlabel: str, ylabel: str, legend_size: Optional[int] = None) -> None:
    """Label both axes and draw the studies' light grid; with `legend_size`, a legend in that font size."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend_size is not None:
        ax.legend(fontsize=legend_size)


def mean_curve(results: Sequence[dict], metric: str) -> list[float]:
    """Per-epoch mean of `metric` over the training results (seeds), up to the shortest history."""
    curves = [[h[metric] for h in r.get("history", [])] for r in results]
    length = min((len(c) for c in curves), default=0)
    return [sum(c[i] for c in curves) / len(curves) for i in range(length)]


def plot_epoch_curves(ax, curves: dict[str, list[float]], ylabel: str) -> None:
    """One line per label against epoch 1..n, each in its own style so identical curves stay visible."""
    from matplotlib.ticker import MaxNLocator

    for (label, values), style in zip(curves.items(), LINE_STYLES * len(curves)):
        ax.plot(range(1, len(values) + 1), values, style, ms=3, label=label, alpha=0.85)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    label_axes(ax, "epoch", ylabel)


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


def plot_accuracy_by_preset(accuracy: Callable[[str, str], Sequence[float]], names: Sequence[str], settings: Settings,
                            filename: str, caption: str) -> tuple[str, str]:
    """Final test accuracy of each configuration (`plot_bars`), a panel per preset; returns (filename, caption).

    `accuracy(preset, name)` gives the values over seeds."""
    fig, axes = subplots(1, len(PRESETS), figsize=(9, 3.4), sharey=True)
    for ax, preset in zip(axes, PRESETS):
        plot_bars(ax, list(names), [accuracy(preset, name) for name in names], "final test accuracy")
        ax.set_title(preset_title(preset))
    return saved_plot(fig, settings, filename, caption)


def plot_accuracy_and_curves_by_preset(accuracy: Callable[[str, str], Sequence[float]], results: dict,
                                       names: Sequence[str], settings: Settings, stem: str, accuracy_caption: str,
                                       curves_caption: str) -> list[tuple[str, str]]:
    """The two plots of a study that compares configurations under both presets: final test accuracy
    (STEM_accuracy.png, `plot_accuracy_by_preset`) and train loss and test accuracy per epoch
    (STEM_curves.png, `plot_curves_by_preset`)."""
    return [plot_accuracy_by_preset(accuracy, list(names), settings, f"{stem}_accuracy.png", accuracy_caption),
            plot_curves_by_preset(results, list(names), settings, f"{stem}_curves.png", curves_caption,
                                  metrics=LOSS_AND_ACCURACY)]


def plot_curves_by_preset(results: dict, names: Sequence[str], settings: Settings, filename: str, caption: str, *,
                          metrics: Sequence[tuple[str, str]] = TEST_ACCURACY, label: Callable[[str], str] = str,
                          panels: Sequence[str] = tuple(PRESETS),
                          title: Callable[[str], str] = "{} preset".format) -> tuple[str, str]:
    """Per-epoch means over seeds of each configuration, a column per panel (the presets unless given) and a
    row per (metric, axis label); `results[(panel, name)]` holds the runs. Returns (filename, caption)."""
    width = 4.5 * len(panels) + (len(metrics) > 1)
    fig, axes = subplots(len(metrics), len(panels), figsize=(width, 0.2 + 3.2 * len(metrics)), sharex=True,
                         sharey="row", squeeze=False)
    for column, panel in enumerate(panels):
        for row, (metric, axis_label) in enumerate(metrics):
            curves = {label(name): mean_curve(results[(panel, name)], metric) for name in names}
            plot_epoch_curves(axes[row][column], curves, axis_label)
            axes[row][column].set_title(title(panel) + (f": {axis_label}" if len(metrics) > 1 else ""))
            if row < len(metrics) - 1:
                axes[row][column].set_xlabel("")  # the shared epoch axis is labelled once, at the bottom
    axes[-1][0].legend(fontsize=8)
    return saved_plot(fig, settings, filename, caption)


def plot_against_batch_size(ax, series: dict[str, dict[int, Sequence[float]]], ylabel: str) -> None:
    """One line per label: the mean over seeds at each batch size, whiskers at ± one standard deviation."""
    for (label, by_size), style in zip(series.items(), LINE_STYLES * len(series)):
        sizes = sorted(by_size)
        stats = [mean_std(by_size[size]) for size in sizes]
        ax.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, ms=4, capsize=3,
                    label=label, alpha=0.85)
    ax.set_xscale("log", base=2)
    ticks = sorted({size for by_size in series.values() for size in by_size})
    ax.set_xticks(ticks, [str(size) for size in ticks])
    label_axes(ax, "batch size", ylabel)
