"""Study `compare`: plain LeNet vs BN-LeNet (bnlab, from scratch) vs BN-LeNet (torch's built-in layer),
under both editions' settings and both poolings.

The older edition trained its plain LeNet with average pooling but its BN LeNet with max pooling, at
lr 1.0 and batch 256: part of the gain it showed may belong to the pooling. Training every model with
both poolings splits that apparent gain into a pooling part and a BN part.
"""

from __future__ import annotations

from collections import defaultdict

from bnlab.studies.engine import (Outcome, Report, Run, Settings, Study, Verdict, difference, final, fmt,
                                  markdown_table, mean_curve, plot_epoch_curves, saved_plot, subplots)
from bnlab.training import PRESETS

MODELS = ("lenet", "bn-lenet", "bn-lenet-torch")
POOLS = ("avg", "max")
QUICK_DATA = {"train_subset": 6000, "test_subset": 2000}


class Compare(Study):
    name = "compare"
    question = ("Does batch normalization improve LeNet on Fashion-MNIST, does bnlab's from-scratch layer match "
                "torch's built-in one, and how much of the older edition's BN gain came from max pooling?")
    full_runtime = "about 45 minutes on 2 cores (36 runs of 10 epochs, --jobs 2)"

    def configs(self, settings: Settings):
        for preset, values in PRESETS.items():
            for pool in POOLS:
                for model in MODELS:
                    yield preset, pool, model, {**values, "epochs": 2 if settings.quick else values["epochs"]}

    def runs(self, settings: Settings) -> list[Run]:
        data = QUICK_DATA if settings.quick else {}
        return [
            Run("train", {"model": model, "pool": pool, "seed": seed, **hyper, **data})
            for preset, pool, model, hyper in self.configs(settings)
            for seed in settings.seed_list(3)
        ]

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        by_config, by_seed = defaultdict(list), {}
        for o in outcomes:
            p = o.run.params
            preset = next(name for name, v in PRESETS.items() if v["lr"] == p["lr"] and v["batch_size"] == p["batch_size"])
            by_config[(preset, p["pool"], p["model"])].append(o.result)
            by_seed[(preset, p["pool"], p["model"], p["seed"])] = final(o.result, "test_acc")

        def metric(key, name):
            return [final(r, name) for r in by_config[key]]

        rows = []
        for preset, pool, model, _ in self.configs(settings):
            key = (preset, pool, model)
            rows.append([preset, pool, model, fmt(metric(key, "test_acc")), fmt(metric(key, "train_loss")),
                         fmt(metric(key, "examples_per_sec"), 0)])
        table = markdown_table(["preset", "pooling", "model", "test acc", "train loss", "examples/s"], rows)

        conclusions = (self._bn_gains(metric) + self._bnlab_against_torch(metric, by_seed, settings)
                       + [self._pooling_split(metric)] + self._throughput(metric))
        plots = [self._plot_bars(metric, settings), self._plot_curves(by_config, settings)]
        return Report(
            title="compare: LeNet with and without batch normalization",
            question=self.question,
            settings={"data": "Fashion-MNIST" + (f", subsets {QUICK_DATA}" if settings.quick else " (60000 train / 10000 test)"),
                      "presets": "; ".join(f"{k}: lr {v['lr']}, batch {v['batch_size']}" for k, v in PRESETS.items()),
                      "epochs": 2 if settings.quick else 10,
                      "seeds": len(settings.seed_list(3)),
                      "architectures": "as in the chapter: the plain LeNet pads its first convolution, the BN LeNets do not"},
            varied={"model": MODELS, "pooling": POOLS, "preset": tuple(PRESETS)},
            sections=[("Results (final epoch, mean ± std over seeds)", table)],
            conclusions=conclusions,
            plots=plots,
        )

    @staticmethod
    def _bn_gains(metric) -> list[str]:
        lines = []
        for preset in PRESETS:
            for pool in POOLS:
                gain, verdict = difference(metric((preset, pool, "bn-lenet"), "test_acc"),
                                           metric((preset, pool, "lenet"), "test_acc"))
                lines.append(
                    f"{preset} preset, {pool} pooling: BN changes final test accuracy by {gain:+.3f} "
                    f"({fmt(metric((preset, pool, 'bn-lenet'), 'test_acc'))} vs "
                    f"{fmt(metric((preset, pool, 'lenet'), 'test_acc'))}; {verdict}).")
        return lines

    @staticmethod
    def _bnlab_against_torch(metric, by_seed, settings: Settings) -> list[str]:
        lines = []
        for preset in PRESETS:
            ours = metric((preset, "avg", "bn-lenet"), "test_acc") + metric((preset, "max", "bn-lenet"), "test_acc")
            theirs = metric((preset, "avg", "bn-lenet-torch"), "test_acc") + metric((preset, "max", "bn-lenet-torch"), "test_acc")
            gap, verdict = difference(ours, theirs)
            paired = [abs(by_seed[(preset, pool, "bn-lenet", seed)] - by_seed[(preset, pool, "bn-lenet-torch", seed)])
                      for pool in POOLS for seed in settings.seed_list(3)]
            matches = "does not match" if verdict == Verdict.CLEAR else "matches"
            lines.append(f"{preset} preset: bnlab's BN vs torch's built-in BN differ by {gap:+.4f} in mean test "
                         f"accuracy ({verdict}); run by run, from the same initial weights and data order, their "
                         f"final test accuracies differ by at most {max(paired):.4f} (the two round differently, "
                         f"and the difference grows over training): the from-scratch layer {matches} the built-in one.")
        return lines

    @staticmethod
    def _throughput(metric) -> list[str]:
        speed = [a / b for a, b in zip(metric(("current", "avg", "bn-lenet"), "examples_per_sec"),
                                       metric(("current", "avg", "bn-lenet-torch"), "examples_per_sec"))]
        if not speed:
            return []
        return [f"Training throughput, current preset: bn-lenet runs at {fmt(speed, 2)}× the examples/s "
                f"of bn-lenet-torch (separate runs, which may have shared the machine with others, so load "
                "differs between them; `bnlab bench train` compares them side by side)."]

    @staticmethod
    def _pooling_split(metric) -> str:
        """The older edition compared lenet/avg with bn-lenet/max: split that gap into pooling and BN."""
        plain_avg, plain_max, bn_max = (sum(v) / len(v) for v in (
            metric(("classic", "avg", "lenet"), "test_acc"), metric(("classic", "max", "lenet"), "test_acc"),
            metric(("classic", "max", "bn-lenet"), "test_acc")))
        apparent = bn_max - plain_avg
        pooling = plain_max - plain_avg
        if apparent <= 0:
            return (f"Older edition's comparison (classic preset): BN-LeNet with max pooling does not beat plain LeNet "
                    f"with average pooling here ({apparent:+.3f}), so there is no gain to split between BN and pooling.")
        share = pooling / apparent
        holds = "holds" if share > 0.1 else "does not hold"
        return (f"Older edition's comparison (classic preset): BN-LeNet with max pooling vs plain LeNet with average "
                f"pooling gains {apparent:+.3f}; switching the plain LeNet to max pooling alone gains {pooling:+.3f}, "
                f"so {share:.0%} of the apparent gain is pooling, not BN — the claim that part of it came from max "
                f"pooling {holds} here.")

    @staticmethod
    def _plot_bars(metric, settings):
        fig, ax = subplots(figsize=(8, 3.6))
        labels, means, errs = [], [], []
        for preset in PRESETS:
            for pool in POOLS:
                for model in MODELS:
                    values = metric((preset, pool, model), "test_acc")
                    labels.append(f"{model}\n{preset}/{pool}")
                    means.append(sum(values) / len(values))
                    errs.append((max(values) - min(values)) / 2 if len(values) > 1 else 0)
        colors = ["#999999", "#1f77b4", "#ff7f0e"] * (len(labels) // 3)
        ax.bar(range(len(labels)), means, yerr=errs, color=colors, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_ylabel("final test accuracy")
        ax.set_ylim(max(0.0, min(means) - 0.1), 1.0)
        ax.grid(axis="y", alpha=0.3)
        return saved_plot(fig, settings, "compare_accuracy.png",
                          "Final test accuracy per model, preset and pooling (bars: mean; whiskers: half the range over seeds).")

    @staticmethod
    def _plot_curves(by_config, settings):
        fig, axes = subplots(1, 2, figsize=(9, 3.4), sharey=True)
        for ax, preset in zip(axes, PRESETS):
            curves = {model: mean_curve(by_config[(preset, "avg", model)], "test_acc") for model in MODELS}
            plot_epoch_curves(ax, curves, "test accuracy")
            ax.set_title(f"{preset} preset, average pooling")
        axes[0].legend()
        return saved_plot(fig, settings, "compare_curves.png",
                          "Test accuracy per epoch (mean over seeds), average pooling.")
