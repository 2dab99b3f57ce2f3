"""Pieces shared by the studies that test the chapter's claims (batch-size, population-stats, depth,
layer-norm): the learning-rate rule across batch sizes and a plot of accuracy against batch size.
"""

from __future__ import annotations

import math
from typing import Sequence

from bnlab.studies.core import LINE_STYLES, mean_std
from bnlab.train import PRESETS

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
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
