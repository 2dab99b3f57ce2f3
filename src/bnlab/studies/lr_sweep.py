"""Study `lr-sweep`: learning rates from 0.01 to 100 with and without batch normalization.

The chapter's second exercise: compare the learning rates for LeNet with and without BN, plot the
decrease of the training and test error, and find how large the learning rate can be before
optimization fails. A run succeeds when it does not diverge (bnlab.training's criterion: the loss stays
finite and below 100x the first batch's loss) and ends at least SUCCESS_ACCURACY test accuracy, five
times chance: a sigmoid LeNet at a huge rate keeps a finite loss while learning nothing, and one at a
tiny rate may not have moved yet; neither has succeeded.
"""

from __future__ import annotations

from collections import defaultdict

from bnlab.studies.engine import (Outcome, Report, Run, Settings, Study, best, final, fmt, markdown_table, mean_curve,
                                  label_axes, plot_epoch_curves, saved_plot, subplots)

MODELS = ("lenet", "bn-lenet")
FULL_RATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
QUICK_RATES = (0.01, 0.1, 1.0, 10.0, 100.0)
QUICK_DATA = {"train_subset": 6000, "test_subset": 2000}
SUCCESS_ACCURACY = 0.5


def succeeded(result: dict) -> bool:
    return result["status"] == "ok" and final(result, "test_acc", 0.0) >= SUCCESS_ACCURACY


class LrSweep(Study):
    name = "lr-sweep"
    question = ("How do learning rates from 0.01 to 100 compare with and without batch normalization, and how "
                "large can the rate be before optimization fails?")
    full_runtime = "about 40 minutes on 2 cores (36 runs of 10 epochs, --jobs 2; diverged runs stop early)"
    quick_plan = {"rates": QUICK_RATES, "epochs": 2, "data": QUICK_DATA}
    full_plan = {"rates": FULL_RATES, "epochs": 10, "data": {}}

    def runs(self, settings: Settings) -> list[Run]:
        plan = self.plan(settings)
        return [Run("train", {"model": model, "lr": lr, "epochs": plan["epochs"], "seed": seed, **plan["data"]})
                for model in MODELS for lr in plan["rates"] for seed in settings.seed_list(2)]

    @staticmethod
    def _table(results: dict, rates) -> tuple[list[str], list[list[str]]]:
        """(headers, rows): per rate, each model's final and best test accuracy and how many seeds succeeded."""
        rows = []
        for lr in rates:
            row = [f"{lr:g}"]
            for model in MODELS:
                rs = results[(model, lr)]
                diverged = sum(r["status"] == "diverged" for r in rs)
                row += [fmt([final(r, "test_acc") for r in rs]), fmt([best(r, "test_acc") for r in rs]),
                        f"{sum(map(succeeded, rs))}/{len(rs)}" + (f" ({diverged} diverged)" if diverged else "")]
            rows.append(row)
        headers = ["lr"] + [f"{m} {col}" for m in MODELS for col in ("final test acc", "best test acc", "succeeded")]
        return headers, rows

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        results = defaultdict(list)
        for o in outcomes:
            results[(o.run.params["model"], o.run.params["lr"])].append(o.result)
        plan = self.plan(settings)
        rates = plan["rates"]
        headers, rows = self._table(results, rates)

        conclusions = []
        window = {}
        for model in MODELS:
            ok = [lr for lr in rates if results[(model, lr)] and all(map(succeeded, results[(model, lr)]))]
            window[model] = ok
            if ok:
                top = max(rates, key=lambda lr: sum(final(r, "test_acc", 0.0) for r in results[(model, lr)]))
                conclusions.append(
                    f"{model}: training succeeds (every seed) for lr {min(ok):g} to {max(ok):g} "
                    f"({len(ok)} of {len(rates)} rates); the best rate is {top:g} with final test accuracy "
                    f"{fmt([final(r, 'test_acc', 0.0) for r in results[(model, top)]])}.")
                fails_above = [lr for lr in rates if lr > max(ok)]
                if fails_above:
                    first = min(fails_above)
                    rs = results[(model, first)]
                    how = ("diverges" if any(r["status"] == "diverged" for r in rs)
                           else f"stays finite but ends at {fmt([final(r, 'test_acc', 0.0) for r in rs])} test accuracy")
                    conclusions.append(f"{model}: at lr {first:g} optimization fails: it {how}.")
                else:
                    conclusions.append(f"{model}: no tested rate up to {max(rates):g} makes it fail.")
            else:
                conclusions.append(f"{model}: no tested rate succeeds on every seed.")
        if window["lenet"] and window["bn-lenet"]:
            factor = max(window["bn-lenet"]) / max(window["lenet"])
            conclusions.append(
                f"Batch normalization {'raises' if factor > 1 else 'does not raise'} the largest working learning rate: "
                f"{max(window['bn-lenet']):g} with BN vs {max(window['lenet']):g} without (×{factor:g}).")

        plots = [self._plot_accuracy(results, rates, settings), self._plot_curves(results, rates, settings)]
        return Report(
            title="lr-sweep: learning rates with and without batch normalization",
            question=self.question,
            settings={"data": "Fashion-MNIST" + (f", subsets {QUICK_DATA}" if settings.quick else " (full)"),
                      "batch size": 128, "epochs": plan["epochs"], "seeds": len(settings.seed_list(2)),
                      "success": f"no divergence and final test accuracy ≥ {SUCCESS_ACCURACY} (chance is 0.1)"},
            varied={"model": MODELS, "learning rate": [f"{lr:g}" for lr in rates]},
            sections=[("Results per learning rate (mean ± std over seeds)", markdown_table(headers, rows))],
            conclusions=conclusions,
            plots=plots,
        )

    @staticmethod
    def _plot_accuracy(results, rates, settings):
        fig, ax = subplots(figsize=(6, 3.6))
        for model, style in zip(MODELS, ("-o", "--s")):
            finals = [sum(final(r, "test_acc", 0.0) for r in results[(model, lr)]) / len(results[(model, lr)]) for lr in rates]
            bests = [sum(best(r, "test_acc", 0.0) for r in results[(model, lr)]) / len(results[(model, lr)]) for lr in rates]
            ax.plot(rates, finals, style, label=f"{model} final")
            ax.plot(rates, bests, style, alpha=0.4, label=f"{model} best")
        ax.axhline(SUCCESS_ACCURACY, color="gray", lw=0.8, ls=":", label="success threshold")
        ax.set_xscale("log")
        label_axes(ax, "learning rate", "test accuracy", legend_size=7)
        return saved_plot(fig, settings, "lr_sweep_accuracy.png",
                          "Final and best test accuracy against the learning rate (mean over seeds).")

    @staticmethod
    def _plot_curves(results, rates, settings):
        fig, axes = subplots(2, 2, figsize=(10, 6.4), sharex=True)
        for column, model in enumerate(MODELS):
            for row, (metric, label) in enumerate((("train_loss", "train loss"), ("test_acc", "test accuracy"))):
                curves = {f"lr {lr:g}": mean_curve(results[(model, lr)], metric) for lr in rates}
                plot_epoch_curves(axes[row][column], {k: v for k, v in curves.items() if v}, label)
                axes[row][column].set_title(f"{model}: {label}")
            axes[0][column].set_yscale("log")
        axes[1][1].legend(fontsize=7)
        return saved_plot(fig, settings, "lr_sweep_curves.png",
                          "Training loss (log scale) and test accuracy per epoch for every learning rate; "
                          "diverged runs end where they stopped.")
