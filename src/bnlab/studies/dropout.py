"""Study `dropout`: can batch normalization replace dropout? Does BN regularize, as the chapter says? (exercise 4)

The study trains the same unpadded LeNet four ways: with neither BN nor dropout, with dropout only (p =
DROPOUT after each hidden sigmoid of the fully connected part, LeNetConfig.dropout), with BN only (the
BN-LeNet), and with both, under both presets on the full data — and in a small-data regime built to
overfit (SMALL_DATA: a few thousand training examples for many epochs, at the classic preset's rate), since
on the whole of Fashion-MNIST ten epochs leave little gap between training and test accuracy to regularize.

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

from bnlab.studies.engine import (FULL_SEEDS, NO_NORM, Outcome, Report, Run, RunContext, Settings, Study, Verdict,
                                  config_name, difference, finals, fixed_settings, fmt, group_results, markdown_table,
                                  mean_std, plot_bars, plot_curves_by_preset, preset_of, saved_plot, subplots,
                                  trained_network, training_data, training_params)
from bnlab.training import PRESETS, evaluate

DROPOUT = 0.5
# A network whose eval-mode training accuracy is below this (five times chance) has not learned: its gap
# compares nothing.
LEARNED_ACCURACY = 0.5
# The small-data regime: few examples, many epochs (about a full run's compute), the classic preset's lr 1
# so that the networks without BN leave the sigmoid plateau; the whole test set still measures.
SMALL_DATA = {"full": {"train_subset": 5000, "epochs": 100}, "quick": {"train_subset": 1000, "epochs": 12}}
SMALL = "small data"
REGIMES = {**{preset: preset for preset in PRESETS}, SMALL: "classic"}  # regime -> the preset it trains with
CONFIGS = {"neither": NO_NORM, "dropout": {**NO_NORM, "dropout": DROPOUT}, "bn": {}, "bn+dropout": {"dropout": DROPOUT}}

# (what is added, the network with it, the network without it): the effects on the gap the study reads.
REGULARIZER_CHECKS = (("BN", "bn", "neither"), ("Dropout", "dropout", "neither"),
                      ("Dropout on top of BN", "bn+dropout", "bn"))


def train_set_accuracy_run(params: dict, context: RunContext) -> dict:
    """Train as the "train" kind does; add "train_eval": {"loss", "acc"} of the trained network on its own
    training set in eval mode (absent when the run diverged)."""
    result, net = trained_network(params, context)
    if net is None:
        return result
    dataset = training_data(params, context)
    loss, accuracy = evaluate(net, dataset.train_images, dataset.train_labels, next(net.parameters()).device)
    return {**result, "train_eval": {"loss": loss, "acc": accuracy}}


def regime_params(regime: str, settings: Settings, seed: int, model_options: dict) -> dict:
    """The training parameters of a regime: its preset's, with the small-data regime's subset and epochs."""
    params = training_params(REGIMES[regime], settings, seed, model_options)
    return {**params, **SMALL_DATA["quick" if settings.quick else "full"]} if regime == SMALL else params


def regime_of(params: dict, settings: Settings) -> str:
    small = SMALL_DATA["quick" if settings.quick else "full"]
    if all(params.get(key) == value for key, value in small.items()):
        return SMALL
    return preset_of(params)


def describe_regime(regime: str, settings: Settings) -> str:
    preset = PRESETS[REGIMES[regime]]
    text = f"lr {preset['lr']:g}, batch {preset['batch_size']}"
    if regime == SMALL:
        small = SMALL_DATA["quick" if settings.quick else "full"]
        text += f", {small['train_subset']} training examples for {small['epochs']} epochs"
    return text


def regime_title(regime: str) -> str:
    return SMALL if regime == SMALL else f"{regime} preset"


def train_accuracy(results: list[dict]) -> list[float]:
    """The eval-mode accuracy on the training set of each run that finished (NaN for one that diverged)."""
    return [r["train_eval"]["acc"] if "train_eval" in r else float("nan") for r in results]


def gaps(results: list[dict]) -> list[float]:
    return [train - test for train, test in zip(train_accuracy(results), finals(results, "test_acc"))]


class Dropout(Study):
    name = "dropout"
    question = ("Can batch normalization replace dropout, and does BN regularize (narrow the gap between training "
                "and test accuracy) as the chapter says?")
    full_runtime = ("about 36 minutes on 2 cores (24 runs of 10 epochs and 12 small-data runs of 100 epochs on 5000 "
                    "examples, --jobs 2; measured 24 + 12)")

    def runs(self, settings: Settings) -> list[Run]:
        return [Run("train-set-accuracy", regime_params(regime, settings, seed, options))
                for regime in REGIMES for options in CONFIGS.values() for seed in settings.seed_list(FULL_SEEDS)]

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        results = group_results(outcomes, lambda p: (regime_of(p, settings), config_name(CONFIGS, p["model_options"])))
        rows = []
        for regime in REGIMES:
            for name in CONFIGS:
                rs = results[(regime, name)]
                rows.append([regime, name, fmt(finals(rs, "test_acc")), fmt(train_accuracy(rs)), fmt(gaps(rs)),
                             fmt(finals(rs, "train_acc")), fmt(finals(rs, "train_loss"))])
        table = markdown_table(["regime", "network", "test acc", "train acc (eval mode)", "train − test gap",
                                "train acc (train-mode epoch average)", "train loss"], rows)
        conclusions = [line for regime in REGIMES for line in self._regime_findings(regime, results, settings)]
        return Report(
            title="dropout: can batch normalization replace dropout?",
            question=self.question,
            settings={**fixed_settings(settings),
                      "dropout": f"p = {DROPOUT} after the sigmoids of the two hidden fully connected layers",
                      "train/test gap": "accuracy on the (same) training set in eval mode minus test accuracy",
                      "regimes": f"current and classic: the presets on the full training set; {SMALL}: "
                                 f"{describe_regime(SMALL, settings)}"},
            varied={"network": [f"{name} ({self._describe(name)})" for name in CONFIGS], "regime": tuple(REGIMES)},
            sections=[("Results (final epoch, mean ± std over seeds)", table)],
            conclusions=conclusions,
            plots=[self._plot_gap(results, settings),
                   plot_curves_by_preset(results, list(CONFIGS), settings, "dropout_curves.png",
                                         "Test accuracy per epoch of the four networks (mean over seeds).",
                                         panels=REGIMES, title=regime_title)],
        )

    @staticmethod
    def _describe(name: str) -> str:
        options = CONFIGS[name]
        norm = "no norm" if "norm" in options else "BN after every conv/linear layer"
        return norm + (f", dropout {DROPOUT}" if "dropout" in options else ", no dropout")

    @staticmethod
    def _regime_findings(regime: str, results, settings: Settings) -> list[str]:
        def test(name):
            return finals(results[(regime, name)], "test_acc")

        rate = f"{regime_title(regime)} ({describe_regime(regime, settings)})"
        replace_gap, replace_verdict = difference(test("bn"), test("dropout"))
        if replace_verdict == Verdict.CLEAR:
            replaces = "BN beats dropout" if replace_gap > 0 else "BN cannot replace dropout here: it is clearly below it"
        elif replace_verdict == Verdict.WITHIN_NOISE:
            replaces = "BN matches dropout within noise"
        else:
            replaces = "one seed cannot tell whether that is noise"
        both_gap, both_verdict = difference(test("bn+dropout"), test("bn"))
        lines = [f"{rate}: test accuracy — neither {fmt(test('neither'))}, dropout {fmt(test('dropout'))}, BN "
                 f"{fmt(test('bn'))}, both {fmt(test('bn+dropout'))}. BN vs dropout: {replace_gap:+.3f} "
                 f"({replace_verdict}): {replaces}. Adding dropout to BN: {both_gap:+.3f} ({both_verdict})."]
        lines.append(f"{rate}: train − test gap (eval mode) — " + ", ".join(
            f"{name} {fmt(gaps(results[(regime, name)]))} (train acc {fmt(train_accuracy(results[(regime, name)]))})"
            for name in CONFIGS) + ".")
        lines.append(f"{rate}: " + " ".join(Dropout._regularizes(label, added, base, regime, results)
                                            for label, added, base in REGULARIZER_CHECKS))
        return lines

    @staticmethod
    def _regularizes(label: str, added: str, base: str, regime: str, results) -> str:
        """Whether going from network `base` to network `added` narrows the train/test gap, read with the fit."""
        before, after = results[(regime, base)], results[(regime, added)]
        unlearned = [f"{name} (train acc {fmt(train_accuracy(rs))})" for name, rs in ((base, before), (added, after))
                     if not mean_std(train_accuracy(rs))[0] >= LEARNED_ACCURACY]
        if unlearned:
            verb, its = ("have", "their gaps mean") if len(unlearned) > 1 else ("has", "its gap means")
            return (f"{label}: no verdict, since {' and '.join(unlearned)} {verb} not learned (train accuracy under "
                    f"{LEARNED_ACCURACY}), so {its} nothing.")
        gap, verdict = difference(gaps(after), gaps(before))
        fit, fit_verdict = difference(train_accuracy(after), train_accuracy(before))
        numbers = f"{label} changes the gap by {gap:+.3f} ({verdict}) and the train accuracy by {fit:+.3f} ({fit_verdict})"
        if verdict == Verdict.SINGLE_SEED:
            return f"{numbers}: one seed cannot say whether it regularizes."
        if verdict == Verdict.WITHIN_NOISE:
            return f"{numbers}: no regularizing effect beyond seed noise."
        if gap < 0 and fit_verdict == Verdict.CLEAR and fit < 0:
            return f"{numbers}: the gap narrows because the fit worsens, which is underfitting as much as regularization."
        if gap < 0:
            return f"{numbers}: it regularizes, narrowing the gap without a clear loss of fit."
        return f"{numbers}: it widens the gap, so no regularization shows here" + (
            ", while it fits the training set clearly better." if fit_verdict == Verdict.CLEAR and fit > 0 else ".")

    @staticmethod
    def _plot_gap(results, settings):
        fig, axes = subplots(2, len(REGIMES), figsize=(14, 6.4), sharex=True, sharey="row")
        names, width = list(CONFIGS), 0.38
        lowest = 1.0
        for column, regime in enumerate(REGIMES):
            ax = axes[0][column]
            for offset, (label, metric) in zip((-width / 2, width / 2), (
                    ("train acc (eval mode)", train_accuracy), ("test acc", lambda rs: finals(rs, "test_acc")))):
                means = [mean_std(metric(results[(regime, name)]))[0] for name in names]
                ax.bar([i + offset for i in range(len(names))], means, width, label=label)
                lowest = min([lowest] + [m for m in means if m == m])
            ax.set_title(f"{regime_title(regime)}: accuracy")
            ax.grid(axis="y", alpha=0.3)
            plot_bars(axes[1][column], names, [gaps(results[(regime, name)]) for name in names], "train − test gap")
            axes[1][column].axhline(0, color="black", lw=0.8)
            axes[1][column].set_title(f"{regime_title(regime)}: train − test gap")
            if column:  # the rows share their y axis: one label per row
                axes[1][column].set_ylabel("")
        axes[0][0].set_ylim(max(0.0, lowest - 0.05), 1.0)  # the row shares it; zoomed in to show gaps of a few points
        axes[0][0].set_ylabel("accuracy (mean over seeds)")
        axes[0][0].legend(fontsize=8)
        return saved_plot(fig, settings, "dropout_gap.png",
                          "Top: accuracy on the training set (eval mode) beside test accuracy (mean over "
                          "seeds; the axis starts near the lowest bar). Bottom: their difference, the "
                          "train/test gap (whiskers: half the range over seeds).")
