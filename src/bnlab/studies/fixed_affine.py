"""Study `fixed-affine`: fix BN's scale gamma at 1 and shift beta at 0 — what changes? (exercise 5)

After normalizing, BN applies a learned per-channel affine map, y = gamma x_hat + beta, so that the network
can undo the normalization where that helps. The study trains the BN-LeNet with gamma and beta learned and
fixed at 1 and 0 (LeNetConfig.learn_affine=False: no gradient, not in the optimizer), under both presets.

Metrics: final test accuracy and train loss (learned vs fixed, with `difference`'s verdict), and, from the
trained networks' BN layers, how far the learned parameters moved: per layer the mean over channels of
|gamma - 1| and of |beta| (then mean ± std over seeds) and the largest single-channel move. A normalized
activation has unit standard deviation, so a move under SMALL_MOVE (a tenth of it) counts as small. The
fixed runs' parameters are read back too: they must still be exactly 1 and 0.
"""

from __future__ import annotations

from bnlab.models import NORM_SITES, norm_layers
from bnlab.studies.engine import (Outcome, PresetStudy, Report, RunContext, Settings, Verdict, difference, finals, fmt,
                                  markdown_table, mean_std, plot_curves_by_preset, saved_plot, subplots,
                                  trained_network)
from bnlab.training import PRESETS

CONFIGS = {"learned": {}, "fixed": {"learn_affine": False}}
SMALL_MOVE = 0.1


def affine_parameters_run(params: dict, context: RunContext) -> dict:
    """Train as the "train" kind does; add "affine": {site: {"gamma": [...], "beta": [...]}} of the trained
    network's BN layers (absent when the run diverged)."""
    result, net = trained_network(params, context)
    if net is None:
        return result
    layers = [layer for _, layer in norm_layers(net)]
    if len(layers) != len(NORM_SITES):
        raise ValueError(f"expected a BN after each of {NORM_SITES}, found {len(layers)} norm layers")
    affine = {site: {"gamma": layer.weight.tolist(), "beta": layer.bias.tolist()}
              for site, layer in zip(NORM_SITES, layers)}
    return {**result, "affine": affine}


def moves(result: dict, site: str) -> dict[str, list[float]]:
    """|gamma - 1| and |beta| of every channel of one BN layer of a run."""
    layer = result["affine"][site]
    return {"gamma": [abs(g - 1) for g in layer["gamma"]], "beta": [abs(b) for b in layer["beta"]]}


def mean_move(results: list[dict], site: str, parameter: str) -> list[float]:
    """Per seed, the mean over the layer's channels of |gamma - 1| (parameter "gamma") or |beta| ("beta")."""
    per_seed = [moves(r, site)[parameter] for r in results if "affine" in r]
    return [sum(values) / len(values) for values in per_seed]


def largest_move(results: list[dict], sites, parameter: str) -> float:
    values = [v for r in results if "affine" in r for site in sites for v in moves(r, site)[parameter]]
    return max(values, default=float("nan"))


class FixedAffine(PresetStudy):
    name = "fixed-affine"
    question = ("What happens when BN's scale gamma and shift beta are fixed at 1 and 0, and how far do they move "
                "from 1 and 0 when they are learned?")
    full_runtime = "about 14 minutes on 2 cores (12 runs of 10 epochs, --jobs 2; measured 14)"
    configs = CONFIGS
    run_kind = "affine-parameters"

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        results = self.results(outcomes)
        conclusions = [self._accuracy_finding(preset, results) for preset in PRESETS]
        conclusions += [self._movement_finding(preset, results) for preset in PRESETS]
        conclusions.append(self._fixed_check(results))
        return self.preset_report(
            settings,
            title="fixed-affine: batch normalization with gamma = 1 and beta = 0",
            own_settings={"fixed": "gamma and beta of all four BN layers frozen at 1 and 0 (no gradient, not in the "
                                   "optimizer); the running statistics are still tracked",
                          "small move": f"under {SMALL_MOVE} (normalized activations have unit standard deviation)"},
            varied={"BN affine parameters": tuple(CONFIGS)},
            sections=[("Accuracy (final epoch, mean ± std over seeds)", self._accuracy_table(results)),
                      ("How far the learned gamma and beta moved (mean over channels; mean ± std over seeds)",
                       self._movement_table(results))],
            conclusions=conclusions,
            plots=[self._plot_parameters(results, settings),
                   plot_curves_by_preset(results, list(CONFIGS), settings, "fixed_affine_curves.png",
                                         "Test accuracy per epoch with gamma and beta learned and fixed (mean "
                                         "over seeds).", label=lambda name: f"gamma, beta {name}")],
        )

    @staticmethod
    def _accuracy_finding(preset: str, results) -> str:
        learned, fixed = (finals(results[(preset, name)], "test_acc") for name in CONFIGS)
        gap, verdict = difference(fixed, learned)
        if verdict == Verdict.CLEAR:
            effect = f"fixing them clearly {'costs' if gap < 0 else 'gains'} accuracy"
        elif verdict == Verdict.WITHIN_NOISE:
            effect = "fixing them changes nothing beyond seed noise"
        else:
            effect = "one seed cannot tell whether that is noise"
        return (f"{preset} preset (lr {PRESETS[preset]['lr']:g}): final test accuracy {fmt(learned)} with gamma and "
                f"beta learned, {fmt(fixed)} with them fixed ({gap:+.3f}): {effect}.")

    @staticmethod
    def _movement_finding(preset: str, results) -> str:
        learned = results[(preset, "learned")]
        averages = {parameter: {site: mean_std(mean_move(learned, site, parameter))[0] for site in NORM_SITES}
                    for parameter in ("gamma", "beta")}
        parts = [f"mean |{label}| per layer "
                 + ", ".join(f"{site} {averages[parameter][site]:.3f}" for site in NORM_SITES)
                 + f" (single channels up to {largest_move(learned, NORM_SITES, parameter):.3f})"
                 for parameter, label in (("gamma", "gamma - 1"), ("beta", "beta"))]
        small = all(value < SMALL_MOVE for per_site in averages.values() for value in per_site.values())
        size = (f"every layer's average move is small (under {SMALL_MOVE:g}): the learned values stay near the "
                "fixed ones" if small else
                f"some layers move them by {SMALL_MOVE:g} or more on average: training uses the freedom")
        return f"{preset} preset, learned runs: " + "; ".join(parts) + f" — {size}."

    @staticmethod
    def _fixed_check(results) -> str:
        fixed = [r for preset in PRESETS for r in results[(preset, "fixed")]]
        deviation = max(largest_move(fixed, NORM_SITES, "gamma"), largest_move(fixed, NORM_SITES, "beta"))
        state = "exactly at 1 and 0" if deviation == 0 else f"up to {deviation:.2e} away from 1 and 0"
        return f"Check: the fixed runs' gamma and beta ended {state}."

    @staticmethod
    def _accuracy_table(results) -> str:
        rows = []
        for preset in PRESETS:
            learned = finals(results[(preset, "learned")], "test_acc")
            for name in CONFIGS:
                rs = results[(preset, name)]
                gap, verdict = difference(finals(rs, "test_acc"), learned)
                rows.append([preset, name, fmt(finals(rs, "test_acc")), fmt(finals(rs, "train_loss")),
                             "—" if name == "learned" else f"{gap:+.3f} ({verdict})"])
        return markdown_table(["preset", "gamma, beta", "test acc", "train loss", "test acc vs learned"], rows)

    @staticmethod
    def _movement_table(results) -> str:
        rows = []
        for preset in PRESETS:
            learned = results[(preset, "learned")]
            for site in NORM_SITES:
                rows.append([preset, site, fmt(mean_move(learned, site, "gamma")),
                             f"{largest_move(learned, [site], 'gamma'):.3f}", fmt(mean_move(learned, site, "beta")),
                             f"{largest_move(learned, [site], 'beta'):.3f}"])
        # "\\|" keeps the absolute-value bars from splitting the table's cells.
        return markdown_table(["preset", "BN after", "mean \\|gamma - 1\\|", "largest \\|gamma - 1\\|",
                               "mean \\|beta\\|", "largest \\|beta\\|"], rows)

    @staticmethod
    def _plot_parameters(results, settings):
        fig, axes = subplots(2, len(PRESETS), figsize=(10, 6), sharex=True)
        for column, preset in enumerate(PRESETS):
            learned = [r for r in results[(preset, "learned")] if "affine" in r]
            for row, (parameter, fixed_value) in enumerate((("gamma", 1.0), ("beta", 0.0))):
                ax = axes[row][column]
                values = [[v for r in learned for v in r["affine"][site][parameter]] for site in NORM_SITES]
                ax.boxplot(values, showfliers=True, flierprops={"markersize": 2})
                ax.set_xticks(range(1, len(NORM_SITES) + 1), NORM_SITES)
                ax.axhline(fixed_value, color="C3", ls="--", lw=1, label=f"fixed value {fixed_value:g}")
                ax.set_ylabel(parameter)
                ax.set_title(f"{preset} preset: learned {parameter}")
                ax.grid(axis="y", alpha=0.3)
                ax.legend(fontsize=8)
        return saved_plot(fig, settings, "fixed_affine_parameters.png",
                          "The learned gamma and beta of every channel, per BN layer (boxes over "
                          "channels and seeds), against the values the fixed runs keep.")
