"""Study `population-stats`: which statistics should a trained BN network predict with?

The book's own builds of BN-LeNet at lr 1.0 (older edition: batch 256, max pooling) ended anywhere
from 0.68 to 0.89 test accuracy with identical code. Prediction there uses the running statistics, an
exponential moving average of batch statistics taken while the weights were still moving; the chapter
calls recomputing them exactly over the whole training set once training is done the standard
practice. This study trains BN-LeNet under the older edition's settings (classic preset, average and
max pooling) and the current ones over several seeds, and predicts with every final network three ways:

- moving: eval mode with the running statistics (what `bnlab train` reports);
- recomputed: eval mode after `bnlab.nn.recompute_stats` over the whole training set (exact mean and
  unbiased variance of every BN input, one pass in the final weights);
- batch: every BN layer in train mode, so each test batch (of the training batch size, in a seeded
  shuffled order) is normalized by its own statistics; the running statistics are restored afterwards.

Per method and configuration the report gives the mean, standard deviation, minimum and maximum of
the test accuracy over seeds. The steadiest method is the one with the smallest standard deviation
over seeds, the best the one with the highest mean; recomputed vs moving is also compared seed by seed.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from bnlab import data
from bnlab.models import norm_layers
from bnlab.studies.engine import (Outcome, Report, Run, RunContext, Settings, Study, difference, fmt, history_of,
                                  markdown_table, mean_std, saved_plot, subplots, trained_network,
                                  with_precise_statistics)
from bnlab.training import EVAL_BATCH_SIZE, PRESETS, evaluate

CONFIGS = (("classic", "avg"), ("classic", "max"), ("current", "avg"))  # (preset, pooling)
METHODS = ("moving", "recomputed", "batch")
METHOD_NAMES = {"moving": "moving averages", "recomputed": "recomputed on the training set",
                "batch": "test-batch statistics"}
QUICK_DATA = {"train_subset": 6000, "test_subset": 2000}
QUICK_EPOCHS = 2
FULL_SEEDS = 5
EVAL_ORDER_SEED = 0  # the shuffled order of the test set under batch statistics
BOOK_RANGE = (0.68, 0.89)  # the book's builds at lr 1.0


@contextmanager
def batch_statistics(net: nn.Module) -> Iterator[nn.Module]:
    """`net` with its norm layers in train mode (each batch normalized by its own statistics) and every
    other module in eval mode; on exit all buffers (running statistics, batch counts) and modes are
    restored, so the evaluation leaves no trace in the network."""
    saved = {name: buffer.clone() for name, buffer in net.named_buffers()}
    modes = {module: module.training for module in net.modules()}
    net.eval()
    for _, layer in norm_layers(net):
        layer.train()
    try:
        yield net
    finally:
        with torch.no_grad():
            for name, buffer in net.named_buffers():
                buffer.copy_(saved[name])
        for module, training in modes.items():
            module.train(training)


def evaluate_with_batch_statistics(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                                   batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over the set with every test batch normalized by its own statistics."""
    loss_sum, correct = 0.0, 0
    with batch_statistics(net), torch.no_grad():
        for x, y in data.batches(images, labels, batch_size, shuffle=True, seed=EVAL_ORDER_SEED):
            logits = net(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
    return loss_sum / len(labels), correct / len(labels)


def predict_three_ways(net: nn.Module, dataset, batch_size: int) -> dict[str, float]:
    """Test accuracy of the trained `net` with each method of METHODS (see the module docstring)."""
    cpu = torch.device("cpu")
    recomputed = with_precise_statistics(net, dataset.train_images, dataset.train_labels, EVAL_BATCH_SIZE)
    return {
        "moving": evaluate(net, dataset.test_images, dataset.test_labels, cpu)[1],
        "recomputed": evaluate(recomputed, dataset.test_images, dataset.test_labels, cpu)[1],
        "batch": evaluate_with_batch_statistics(net, dataset.test_images, dataset.test_labels, batch_size)[1],
    }


def spread_text(values: list[float]) -> str:
    """'mean ± std (range min–max)' over seeds; the bare value for one seed."""
    return fmt(values) + (f" (range {min(values):.3f}–{max(values):.3f})" if len(values) > 1 else "")


def train_and_predict(params: dict, context: RunContext) -> dict:
    """The shared "train" run (TrainConfig fields in `params`), then its final network's test accuracy
    with each method: {"status", "history", "accuracy": {method: acc}} ("accuracy" only when it did not
    diverge)."""
    result, net = trained_network(params, context)
    if net is None:
        return result
    dataset = context.dataset().subset(params.get("train_subset"), params.get("test_subset"), seed=params["seed"])
    return {**result, "accuracy": predict_three_ways(net, dataset, params["batch_size"])}


class PopulationStats(Study):
    name = "population-stats"
    question = ("Should a trained BN network predict with the moving averages, with statistics recomputed over the "
                "whole training set, or with each test batch's own statistics — which gives the best and the "
                "steadiest test accuracy over seeds?")
    full_runtime = "about 13 minutes on 2 cores (15 runs of 10 epochs on the full data, --jobs 2; measured 13)"

    def runs(self, settings: Settings) -> list[Run]:
        data_options = QUICK_DATA if settings.quick else {}
        return [Run("population-stats", {"model": "bn-lenet", "pool": pool, **self.hyper(preset, settings),
                                          "seed": seed, **data_options})
                for preset, pool in CONFIGS for seed in settings.seed_list(FULL_SEEDS)]

    @staticmethod
    def hyper(preset: str, settings: Settings) -> dict:
        values = PRESETS[preset]
        return {"lr": values["lr"], "batch_size": values["batch_size"],
                "epochs": QUICK_EPOCHS if settings.quick else values["epochs"]}

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        results = defaultdict(list)
        for o in outcomes:
            p = o.run.params
            preset = next(name for name, v in PRESETS.items() if v["lr"] == p["lr"] and v["batch_size"] == p["batch_size"])
            results[(preset, p["pool"])].append((p["seed"], o.result))
        accuracy = {(config, method): [r["accuracy"][method] for _, r in results[config] if "accuracy" in r]
                    for config in CONFIGS for method in METHODS}

        summary, per_seed = self._tables(results, accuracy)
        conclusions = [self._config_finding(config, accuracy) for config in CONFIGS]
        conclusions += self._overall(accuracy) + [self._book_comparison(accuracy)]
        diverged = sum(r["status"] != "ok" for config in CONFIGS for _, r in results[config])
        if diverged:
            conclusions.append(f"{diverged} run(s) diverged and are left out of every statistic.")
        plots = [self._plot_methods(accuracy, settings), self._plot_curves(results, settings)]
        return Report(
            title="population-stats: moving averages, recomputed statistics or batch statistics at prediction",
            question=self.question,
            settings={
                "data": "Fashion-MNIST" + (f", seeded subsets {QUICK_DATA}" if settings.quick else " (60000 train / 10000 test)"),
                "model": "bn-lenet (sigmoid, bnlab's BN after every conv and linear layer, momentum 0.1)",
                "presets": "; ".join(f"{k}: lr {v['lr']}, batch {v['batch_size']}" for k, v in PRESETS.items()),
                "epochs": QUICK_EPOCHS if settings.quick else PRESETS["classic"]["epochs"],
                "optimizer": "plain SGD, no momentum",
                "seeds": len(settings.seed_list(FULL_SEEDS)),
                "recomputed": f"recompute_stats over the whole training set (batches of {EVAL_BATCH_SIZE}, exact pooled "
                              "mean and unbiased variance)",
                "batch statistics": f"test batches of the training batch size, order shuffled with seed {EVAL_ORDER_SEED}; "
                                    "running statistics restored afterwards",
                "steadiest / best": "smallest standard deviation / highest mean of the test accuracy over seeds",
            },
            varied={"preset / pooling": [f"{p} / {q}" for p, q in CONFIGS], "prediction": METHODS},
            sections=[("Test accuracy of the final networks per prediction method (over seeds)", summary),
                      ("Every final network", per_seed)],
            conclusions=conclusions,
            plots=plots,
        )

    @staticmethod
    def _tables(results, accuracy) -> tuple[str, str]:
        """(summary per configuration and method, every final network)."""
        rows = []
        for config in CONFIGS:
            for method in METHODS:
                values = accuracy[(config, method)]
                rows.append([f"{config[0]} / {config[1]}", METHOD_NAMES[method], fmt(values),
                             f"{min(values):.3f}–{max(values):.3f}" if values else "—", len(values)])
        summary = markdown_table(["preset / pooling", "prediction with", "test acc (mean ± std)", "min–max", "seeds"],
                                 rows)
        per_seed = markdown_table(
            ["preset / pooling", "seed", "status"] + [METHOD_NAMES[m] for m in METHODS],
            [[f"{config[0]} / {config[1]}", seed, r["status"]]
             + [f"{r['accuracy'][m]:.4f}" if "accuracy" in r else "—" for m in METHODS]
             for config in CONFIGS for seed, r in results[config]])
        return summary, per_seed

    @staticmethod
    def _config_finding(config, accuracy) -> str:
        name = f"{config[0]} preset, {config[1]} pooling"
        values = {m: accuracy[(config, m)] for m in METHODS}
        if not values["moving"]:
            return f"{name}: every run diverged."
        stats = "; ".join(f"{METHOD_NAMES[m]} {spread_text(v)}" for m, v in values.items())
        gain, how = difference(values["recomputed"], values["moving"])
        wins = sum(r >= m for r, m in zip(values["recomputed"], values["moving"]))
        text = (f"{name}: {stats}. Recomputing the statistics changes the accuracy by {gain:+.3f} ({how}; at least as "
                f"good on {wins} of {len(values['moving'])} seeds)")
        if len(values["moving"]) < 2:
            return text + "."
        steadiest = min(METHODS, key=lambda m: mean_std(values[m])[1])
        best = max(METHODS, key=lambda m: mean_std(values[m])[0])
        return text + (f"; steadiest: {METHOD_NAMES[steadiest]} (std {mean_std(values[steadiest])[1]:.3f}), best: "
                       f"{METHOD_NAMES[best]} (mean {mean_std(values[best])[0]:.3f}).")

    @staticmethod
    def _overall(accuracy) -> list[str]:
        scored = [config for config in CONFIGS if len(accuracy[(config, "moving")]) >= 2]
        if not scored:
            return ["One seed per configuration: no spread over seeds to compare (use --seeds 2 or more)."]
        steadiest = {m: sum(min(METHODS, key=lambda k: mean_std(accuracy[(c, k)])[1]) == m for c in scored) for m in METHODS}
        best = {m: sum(max(METHODS, key=lambda k: mean_std(accuracy[(c, k)])[0]) == m for c in scored) for m in METHODS}
        top_steady = max(METHODS, key=lambda m: steadiest[m])
        top_best = max(METHODS, key=lambda m: best[m])
        ratio = [mean_std(accuracy[(c, "moving")])[1] / mean_std(accuracy[(c, "recomputed")])[1]
                 for c in scored if mean_std(accuracy[(c, "recomputed")])[1] > 0]
        lines = [f"Over the {len(scored)} configurations, the steadiest predictions come from {METHOD_NAMES[top_steady]} "
                 f"({steadiest[top_steady]} of {len(scored)}) and the best from {METHOD_NAMES[top_best]} "
                 f"({best[top_best]} of {len(scored)})."]
        if ratio:
            lines.append(f"The seed-to-seed standard deviation with moving averages is {min(ratio):.1f}x to "
                         f"{max(ratio):.1f}x the one with recomputed statistics.")
        return lines

    @staticmethod
    def _book_comparison(accuracy) -> str:
        classic = accuracy[(("classic", "max"), "moving")]
        if not classic:
            return "The older edition's setting (classic, max pooling) diverged on every seed."
        book = f"The book's builds at lr 1.0 ranged {BOOK_RANGE[0]}–{BOOK_RANGE[1]} (width {BOOK_RANGE[1] - BOOK_RANGE[0]:.2f})"
        if len(classic) < 2:
            return f"{book}; with one seed here there is no range to compare it with (use --seeds 2 or more)."
        width = max(classic) - min(classic)
        recomputed = accuracy[(("classic", "max"), "recomputed")]
        return (f"{book}; here the same setting (classic, max pooling) with moving averages ranges "
                f"{min(classic):.3f}–{max(classic):.3f} (width {width:.3f}, "
                f"{'as wide or wider' if width >= BOOK_RANGE[1] - BOOK_RANGE[0] else 'narrower'}) over {len(classic)} "
                f"seeds, and {min(recomputed):.3f}–{max(recomputed):.3f} (width {max(recomputed) - min(recomputed):.3f}) "
                "with recomputed statistics.")

    @staticmethod
    def _plot_methods(accuracy, settings):
        fig, ax = subplots(figsize=(8, 3.6))
        colors = {"moving": "C0", "recomputed": "C2", "batch": "C1"}
        group_width = len(METHODS) + 1
        for i, config in enumerate(CONFIGS):
            for j, method in enumerate(METHODS):
                x = i * group_width + j
                values = accuracy[(config, method)]
                if values:
                    ax.scatter([x] * len(values), values, color=colors[method], s=18, alpha=0.8, zorder=3,
                               label=METHOD_NAMES[method] if i == 0 else None)
                    ax.hlines(mean_std(values)[0], x - 0.35, x + 0.35, color=colors[method], lw=2)
        ax.axhspan(*BOOK_RANGE, color="gray", alpha=0.12, label=f"the book's range at lr 1.0 ({BOOK_RANGE[0]}–{BOOK_RANGE[1]})")
        centres = [i * group_width + (len(METHODS) - 1) / 2 for i in range(len(CONFIGS))]
        ax.set_xticks(centres, [f"{preset} preset, {pool} pooling" for preset, pool in CONFIGS], fontsize=8)
        ax.set_ylabel("final test accuracy")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        return saved_plot(fig, settings, "population_stats_methods.png",
                          "Final test accuracy of every seed (dots; bar: mean) per prediction method and configuration.")

    @staticmethod
    def _plot_curves(results, settings):
        from matplotlib.ticker import MaxNLocator

        fig, axes = subplots(1, len(CONFIGS), figsize=(11, 3.4), sharey=True)
        for ax, config in zip(axes, CONFIGS):
            for seed, r in results[config]:
                curve = [h["test_acc"] for h in history_of(r)]
                line, = ax.plot(range(1, len(curve) + 1), curve, "-", lw=1, alpha=0.8)
                if "accuracy" in r:
                    ax.plot([len(curve)], [r["accuracy"]["recomputed"]], "*", color=line.get_color(), ms=8)
            ax.set_title(f"{config[0]} preset, {config[1]} pooling", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (moving averages)")
        return saved_plot(fig, settings, "population_stats_curves.png",
                          "Test accuracy with the moving averages after every epoch, one line per seed; the star at the end is "
                          "the same final network with recomputed statistics.")
