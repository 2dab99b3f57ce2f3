"""Study `dropout`: can batch normalization replace dropout? Does BN regularize, as the chapter says? (exercise 4)

The study trains the same unpadded LeNet four ways: with neither BN nor dropout, with dropout only (p =
DROPOUT after each hidden sigmoid of the fully connected part, LeNetConfig.dropout), with BN only (the
BN-LeNet), and with both, under both presets.

Metrics: final test accuracy, and the train/test gap: the trained network's accuracy on its own training
set, measured in eval mode (dropout off, BN on running statistics) like the test accuracy, minus the test
accuracy. (The train accuracy the trainer logs is a train-mode average over the epoch, which dropout's
masks depress; it is shown for reference only.) A regularizer narrows the gap; one that narrows it only
because the network fits the training set worse is underfitting, so the gap is read with the eval-mode
train accuracy beside it; a network under LEARNED_ACCURACY of it has not learned, and a comparison of gaps
that involves it gets no verdict. BN "replaces" dropout if BN alone is not clearly below dropout alone in
test accuracy; comparisons use `difference`'s verdict.
"""

from __future__ import annotations

from bnlab.studies.core import (Outcome, Report, Run, RunContext, Settings, Study, difference, fmt, markdown_table,
                                mean_std, pyplot, run_kind, save_figure)
from bnlab.studies.exercise_common import (FULL_SEEDS, NO_NORM, config_name, finals, fixed_settings, group_results,
                                           plot_bars, plot_curves_by_preset, preset_of, training_params)
from bnlab.studies.runs import trained_network, training_data
from bnlab.train import PRESETS, evaluate

DROPOUT = 0.5
# A network whose eval-mode training accuracy is below this (five times chance) has not learned: its gap
# compares nothing.
LEARNED_ACCURACY = 0.5
CONFIGS = {"neither": NO_NORM, "dropout": {**NO_NORM, "dropout": DROPOUT}, "bn": {}, "bn+dropout": {"dropout": DROPOUT}}

# (what is added, the network with it, the network without it): the effects on the gap the study reads.
REGULARIZER_CHECKS = (("BN", "bn", "neither"), ("Dropout", "dropout", "neither"),
                      ("Dropout on top of BN", "bn+dropout", "bn"))


@run_kind("train-set-accuracy")
def train_set_accuracy_run(params: dict, context: RunContext) -> dict:
    """Train as the "train" kind does; add "train_eval": {"loss", "acc"} of the trained network on its own
    training set in eval mode (absent when the run diverged)."""
    result, net = trained_network(params, context)
    if net is None:
        return result
    dataset = training_data(params, context)
    loss, accuracy = evaluate(net, dataset.train_images, dataset.train_labels, next(net.parameters()).device)
    return {**result, "train_eval": {"loss": loss, "acc": accuracy}}


def train_accuracy(results: list[dict]) -> list[float]:
    """The eval-mode accuracy on the training set of each run that finished (NaN for one that diverged)."""
    return [r["train_eval"]["acc"] if "train_eval" in r else float("nan") for r in results]


def gaps(results: list[dict]) -> list[float]:
    return [train - test for train, test in zip(train_accuracy(results), finals(results, "test_acc"))]


class Dropout(Study):
    name = "dropout"
    question = ("Can batch normalization replace dropout, and does BN regularize (narrow the gap between training "
                "and test accuracy) as the chapter says?")
    full_runtime = "about 22 minutes on 2 cores (24 runs of 10 epochs at ~100 s each, --jobs 2)"

    def runs(self, settings: Settings) -> list[Run]:
        return [Run("train-set-accuracy", training_params(preset, settings, seed, options))
                for preset in PRESETS for options in CONFIGS.values() for seed in settings.seed_list(FULL_SEEDS)]

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        results = group_results(outcomes, lambda p: (preset_of(p), config_name(CONFIGS, p["model_options"])))
        rows = []
        for preset in PRESETS:
            for name in CONFIGS:
                rs = results[(preset, name)]
                rows.append([preset, name, fmt(finals(rs, "test_acc")), fmt(train_accuracy(rs)), fmt(gaps(rs)),
                             fmt(finals(rs, "train_acc")), fmt(finals(rs, "train_loss"))])
        table = markdown_table(["preset", "network", "test acc", "train acc (eval mode)", "train − test gap",
                                "train acc (train-mode epoch average)", "train loss"], rows)
        conclusions = [line for preset in PRESETS for line in self._preset_findings(preset, results)]
        return Report(
            title="dropout: can batch normalization replace dropout?",
            question=self.question,
            settings={**fixed_settings(settings),
                      "dropout": f"p = {DROPOUT} after the sigmoids of the two hidden fully connected layers",
                      "train/test gap": "accuracy on the (same) training set in eval mode minus test accuracy"},
            varied={"network": [f"{name} ({self._describe(name)})" for name in CONFIGS], "preset": tuple(PRESETS)},
            sections=[("Results (final epoch, mean ± std over seeds)", table)],
            conclusions=conclusions,
            plots=[self._plot_gap(results, settings),
                   plot_curves_by_preset(results, list(CONFIGS), settings, "dropout_curves.png",
                                         "Test accuracy per epoch of the four networks (mean over seeds).")],
        )

    @staticmethod
    def _describe(name: str) -> str:
        options = CONFIGS[name]
        norm = "no norm" if "norm" in options else "BN after every conv/linear layer"
        return norm + (f", dropout {DROPOUT}" if "dropout" in options else ", no dropout")

    @staticmethod
    def _preset_findings(preset: str, results) -> list[str]:
        def test(name):
            return finals(results[(preset, name)], "test_acc")

        rate = f"{preset} preset (lr {PRESETS[preset]['lr']:g})"
        replace_gap, replace_verdict = difference(test("bn"), test("dropout"))
        if replace_verdict == "clear":
            replaces = "BN beats dropout" if replace_gap > 0 else "BN cannot replace dropout here: it is clearly below it"
        elif replace_verdict == "within noise":
            replaces = "BN matches dropout within noise"
        else:
            replaces = "one seed cannot tell whether that is noise"
        both_gap, both_verdict = difference(test("bn+dropout"), test("bn"))
        lines = [f"{rate}: test accuracy — neither {fmt(test('neither'))}, dropout {fmt(test('dropout'))}, BN "
                 f"{fmt(test('bn'))}, both {fmt(test('bn+dropout'))}. BN vs dropout: {replace_gap:+.3f} "
                 f"({replace_verdict}): {replaces}. Adding dropout to BN: {both_gap:+.3f} ({both_verdict})."]
        lines.append(f"{rate}: train − test gap (eval mode) — " + ", ".join(
            f"{name} {fmt(gaps(results[(preset, name)]))} (train acc {fmt(train_accuracy(results[(preset, name)]))})"
            for name in CONFIGS) + ".")
        lines.append(f"{rate}: " + " ".join(Dropout._regularizes(label, added, base, preset, results)
                                            for label, added, base in REGULARIZER_CHECKS))
        return lines

    @staticmethod
    def _regularizes(label: str, added: str, base: str, preset: str, results) -> str:
        """Whether going from network `base` to network `added` narrows the train/test gap, read with the fit."""
        before, after = results[(preset, base)], results[(preset, added)]
        unlearned = [f"{name} (train acc {fmt(train_accuracy(rs))})" for name, rs in ((base, before), (added, after))
                     if not mean_std(train_accuracy(rs))[0] >= LEARNED_ACCURACY]
        if unlearned:
            verb, its = ("have", "their gaps mean") if len(unlearned) > 1 else ("has", "its gap means")
            return (f"{label}: no verdict, since {' and '.join(unlearned)} {verb} not learned (train accuracy under "
                    f"{LEARNED_ACCURACY}), so {its} nothing.")
        gap, verdict = difference(gaps(after), gaps(before))
        fit, fit_verdict = difference(train_accuracy(after), train_accuracy(before))
        numbers = f"{label} changes the gap by {gap:+.3f} ({verdict}) and the train accuracy by {fit:+.3f} ({fit_verdict})"
        if verdict == "single seed":
            return f"{numbers}: one seed cannot say whether it regularizes."
        if verdict == "within noise":
            return f"{numbers}: no regularizing effect beyond seed noise."
        if gap < 0 and fit_verdict == "clear" and fit < 0:
            return f"{numbers}: the gap narrows because the fit worsens, which is underfitting as much as regularization."
        if gap < 0:
            return f"{numbers}: it regularizes, narrowing the gap without a clear loss of fit."
        return f"{numbers}: it widens the gap, so no regularization shows here" + (
            ", while it fits the training set clearly better." if fit_verdict == "clear" and fit > 0 else ".")

    @staticmethod
    def _plot_gap(results, settings):
        plt = pyplot()
        fig, axes = plt.subplots(2, len(PRESETS), figsize=(10, 6.4), sharex=True, sharey="row")
        names, width = list(CONFIGS), 0.38
        for column, preset in enumerate(PRESETS):
            ax = axes[0][column]
            lowest = 1.0
            for offset, (label, metric) in zip((-width / 2, width / 2), (
                    ("train acc (eval mode)", train_accuracy), ("test acc", lambda rs: finals(rs, "test_acc")))):
                means = [mean_std(metric(results[(preset, name)]))[0] for name in names]
                ax.bar([i + offset for i in range(len(names))], means, width, label=label)
                lowest = min([lowest] + [m for m in means if m == m])
            ax.set_ylim(max(0.0, lowest - 0.05), 1.0)  # zoomed in: the gaps are a few points of accuracy
            ax.set_title(f"{preset} preset (lr {PRESETS[preset]['lr']:g}): accuracy")
            ax.grid(axis="y", alpha=0.3)
            plot_bars(axes[1][column], names, [gaps(results[(preset, name)]) for name in names], "train − test gap")
            axes[1][column].axhline(0, color="black", lw=0.8)
            axes[1][column].set_title(f"{preset} preset: train − test gap")
            if column:  # the rows share their y axis: one label per row
                axes[1][column].set_ylabel("")
        axes[0][0].set_ylabel("accuracy (mean over seeds)")
        axes[0][0].legend(fontsize=8)
        save_figure(fig, settings.out / "dropout_gap.png")
        return "dropout_gap.png", ("Top: accuracy on the training set (eval mode) beside test accuracy (mean over "
                                   "seeds; the axis starts near the lowest bar). Bottom: their difference, the "
                                   "train/test gap (whiskers: half the range over seeds).")
