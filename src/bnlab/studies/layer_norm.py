"""Study `layer-norm`: batch norm against the normalizations that do not depend on the batch.

The chapter's BN-LeNet is trained with each of four normalization layers in the same places (after
every convolution and linear layer, before the sigmoid; `bnlab.models.NORM_LAYERS`):

- batchnorm: per channel over the batch (and H, W), running statistics at prediction;
- layernorm: per sample over all features (over C, H, W on a convolution: GroupNorm with one group);
- groupnorm: per sample over groups of at most 4 channels (6 -> 3 groups, 16 -> 4, 120 -> 30, 84 -> 21);
- instancenorm: per sample and channel over H, W on a convolution; a linear layer's instance would be
  a single value, so the fully connected layers get layer norm.

Only batch norm depends on the other samples of the batch, so it alone should suffer at tiny batches.
Each is trained at the default batch size (128) and at sizes where BN struggles (2, 4, 16), for the
same number of epochs on the same training subset at every size. Matched epochs leave batch 128 with
few steps (under 400), so each is also trained in the chapter's default setting — batch 128, lr 0.1, the
whole training set for 10 epochs — which answers "which works best at the default batch size". The learning rate follows one rule
for every normalization, `engine.presets.scaled_lr` (0.1 * sqrt(batch / 128), square-root scaling from
the current edition's 0.1 at 128). The metric is the final test accuracy (eval mode), mean ± std over
seeds; at each batch size the winner is the normalization with the highest mean, and `difference`
says which others are within seed noise of it.
"""

from __future__ import annotations

from collections import defaultdict

from bnlab.studies.engine import (Outcome, Report, Run, Settings, Study, Verdict, difference, final, fmt,
                                  markdown_table, mean_curve, mean_std, plot_against_batch_size, plot_epoch_curves,
                                  round_lr, saved_plot, scaled_lr, subplots)

NORMS = ("batchnorm", "layernorm", "groupnorm", "instancenorm")
FULL_BATCHES, QUICK_BATCHES = (2, 4, 16, 128), (2, 16, 128)
FULL_DATA = {"train_subset": 10000}  # test: all 10000
QUICK_DATA = {"train_subset": 2000, "test_subset": 1000}
FULL_EPOCHS, QUICK_EPOCHS = 5, 2
FULL_SEEDS = 3
DEFAULT = "default"  # the chapter's default setting, beside the grid of batch sizes
DEFAULT_RUN = {"full": {"batch_size": 128, "lr": 0.1, "epochs": 10},
               "quick": {"batch_size": 128, "lr": 0.1, "epochs": 2 * QUICK_EPOCHS, **QUICK_DATA}}


def label(column) -> str:
    """How the findings name a column: a batch size of the grid, or the default setting."""
    return "the default setting" if column == DEFAULT else f"batch {column}"


class LayerNormStudy(Study):
    name = "layer-norm"
    question = ("Which normalization — batch, layer, group or instance norm — works best in LeNet at the default "
                "batch size, and at the small batch sizes where batch norm struggles?")
    full_runtime = ("about 35 minutes on 2 cores (48 runs of 5 epochs on 10000 examples and 12 of 10 epochs on the "
                    "whole training set, --jobs 2)")
    # (batch sizes, data subsets, epochs) of the grid
    quick_plan = (QUICK_BATCHES, QUICK_DATA, QUICK_EPOCHS)
    full_plan = (FULL_BATCHES, FULL_DATA, FULL_EPOCHS)

    def runs(self, settings: Settings) -> list[Run]:
        batches, data_options, epochs = self.plan(settings)
        seeds = settings.seed_list(FULL_SEEDS)
        grid = [Run("train", {"model": "bn-lenet", "model_options": {"norm": norm}, "batch_size": size,
                              "lr": round_lr(scaled_lr(size)), "epochs": epochs, "seed": seed, **data_options})
                for norm in NORMS for size in batches for seed in seeds]
        default = [Run("train", {"model": "bn-lenet", "model_options": {"norm": norm}, "seed": seed,
                                 **DEFAULT_RUN["quick" if settings.quick else "full"]})
                   for norm in NORMS for seed in seeds]
        return grid + default

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        batches, data_options, epochs = self.plan(settings)
        default = DEFAULT_RUN["quick" if settings.quick else "full"]
        columns = (*batches, DEFAULT)
        results = defaultdict(list)
        for o in outcomes:
            params = o.run.params
            column = DEFAULT if params["epochs"] == default["epochs"] else params["batch_size"]
            results[(params["model_options"]["norm"], column)].append(o.result)
        accuracy = {key: [final(r, "test_acc") for r in rs if r["status"] == "ok"] for key, rs in results.items()}

        rows = [[norm] + [self._cell(results[(norm, column)], accuracy[(norm, column)]) for column in columns]
                for norm in NORMS]
        table = markdown_table(["normalization"] + [f"batch {size} (lr {round_lr(scaled_lr(size)):g})" for size in batches]
                               + [f"default: batch {default['batch_size']}, lr {default['lr']:g}, {default['epochs']} "
                                  "epochs"], rows)

        conclusions = [self._winner(column, accuracy) for column in columns]
        conclusions += self._batch_norm_findings(columns, accuracy)
        plots = [self._plot_accuracy(batches, accuracy, settings), self._plot_curves(batches, results, settings)]
        return Report(
            title="layer-norm: batch, layer, group and instance normalization across batch sizes",
            question=self.question,
            settings={
                "data": "Fashion-MNIST, seeded subsets " + ", ".join(f"{k}={v}" for k, v in data_options.items())
                        + ("" if "test_subset" in data_options else " (test: all 10000)"),
                "model": "bn-lenet (sigmoid, average pooling, unpadded first convolution) with the normalization "
                         "after every conv and linear layer",
                "normalizations": "batchnorm per channel over the batch; layernorm per sample over C, H, W (all "
                                  "features on a linear layer); groupnorm per sample over groups of at most 4 channels; "
                                  "instancenorm per sample and channel over H, W, layer norm on the linear layers",
                "epochs": f"{epochs} at every batch size (matched epochs on the same subset)",
                "default setting": (f"batch {default['batch_size']}, lr {default['lr']:g}, {default['epochs']} epochs on "
                                    + ("the quick subset" if settings.quick else "the whole training set")),
                "learning rate": "0.1 * sqrt(batch / 128), 3 significant digits: "
                                 + ", ".join(f"{round_lr(scaled_lr(size)):g} at {size}" for size in batches),
                "optimizer": "plain SGD, no momentum",
                "seeds": len(settings.seed_list(FULL_SEEDS)),
                "metric": "final-epoch test accuracy in eval mode (batch norm: running statistics)",
            },
            varied={"normalization": NORMS, "batch size": batches, "setting": ("grid", DEFAULT)},
            sections=[("Final test accuracy (mean ± std over seeds)", table)],
            conclusions=conclusions,
            plots=plots,
        )

    @staticmethod
    def _cell(results: list[dict], accuracy: list[float]) -> str:
        diverged = len(results) - len(accuracy)
        return fmt(accuracy) + (f" ({diverged} diverged)" if diverged else "")

    @staticmethod
    def _ranked(column, accuracy) -> list[str]:
        """The normalizations that did not diverge in `column`, best mean first."""
        scored = [norm for norm in NORMS if accuracy[(norm, column)]]
        return sorted(scored, key=lambda norm: -mean_std(accuracy[(norm, column)])[0])

    def _winner(self, column, accuracy) -> str:
        name = label(column)
        name = name[0].upper() + name[1:]
        ranked = self._ranked(column, accuracy)
        if not ranked:
            return f"{name}: every normalization diverged."
        best = ranked[0]
        others = []
        for norm in ranked[1:]:
            gap, how = difference(accuracy[(norm, column)], accuracy[(best, column)])
            others.append(f"{norm} {fmt(accuracy[(norm, column)])} ({gap:+.3f}, {how})")
        return (f"{name}: {best} wins with {fmt(accuracy[(best, column)])}"
                + (f"; {', '.join(others)}" if others else "") + ".")

    def _batch_norm_findings(self, columns, accuracy) -> list[str]:
        lines = []
        for column in (min(c for c in columns if c != DEFAULT), DEFAULT):
            ranked = [norm for norm in self._ranked(column, accuracy) if norm != "batchnorm"]
            if not ranked or not accuracy[("batchnorm", column)]:
                continue
            rival = ranked[0]
            gap, how = difference(accuracy[("batchnorm", column)], accuracy[(rival, column)])
            if how == Verdict.CLEAR:
                relation = "beats" if gap > 0 else "loses to"
            else:
                relation = "is level with" if how == Verdict.WITHIN_NOISE else ("leads" if gap > 0 else "trails")
            lines.append(f"At {label(column)}, batch norm {relation} the best batch-independent normalization, "
                         f"{rival} ({gap:+.3f}, {how}).")
        ranks = {column: self._ranked(column, accuracy) for column in columns}
        placed = [f"{ranks[column].index('batchnorm') + 1} of {len(ranks[column])} at {label(column)}"
                  for column in columns if "batchnorm" in ranks[column]]
        if placed:
            lines.append("Batch norm's rank among the normalizations by mean test accuracy: " + ", ".join(placed) + ".")
        return lines

    @staticmethod
    def _plot_accuracy(batches, accuracy, settings):
        fig, ax = subplots(figsize=(6.4, 3.8))
        plot_against_batch_size(ax, {norm: {size: accuracy[(norm, size)] for size in batches} for norm in NORMS},
                                "final test accuracy")
        default = DEFAULT_RUN["quick" if settings.quick else "full"]
        for index, norm in enumerate(NORMS):  # the default setting, beside the grid's point at the same batch size
            mean, std = mean_std(accuracy[(norm, DEFAULT)])
            ax.errorbar([default["batch_size"] * 1.15], [mean], yerr=[std], fmt="*", ms=9, capsize=3, color=f"C{index}",
                        label="default setting" if index == 0 else None)
        ax.legend(fontsize=8)
        return saved_plot(fig, settings, "layer_norm_accuracy.png",
                          "Final test accuracy per normalization against the batch size (mean ± std over seeds; lr = "
                          f"0.1·sqrt(batch/128); matched epochs, so the larger batches take fewer steps). Stars: the default "
                          f"setting (batch {default['batch_size']}, lr {default['lr']:g}, {default['epochs']} epochs).")

    @staticmethod
    def _plot_curves(batches, results, settings):
        fig, axes = subplots(1, 2, figsize=(10, 3.4), sharey=True)
        for ax, column in zip(axes, (min(batches), DEFAULT)):
            plot_epoch_curves(ax, {norm: mean_curve(results[(norm, column)], "test_acc") for norm in NORMS},
                              "test accuracy")
            ax.set_title(label(column))
        axes[0].legend(fontsize=8)
        return saved_plot(fig, settings, "layer_norm_curves.png",
                          f"Test accuracy per epoch (mean over seeds) at the smallest batch size ({min(batches)}, matched "
                          "epochs) and in the default setting.")
