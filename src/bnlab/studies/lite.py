"""Study `lite`: a "lite" batch norm that does only half of BN's work — which half matters?

Batch norm centers each channel (subtracts the batch mean) and scales it (divides by the batch standard
deviation), then applies the learned scale and shift. The study trains the BN-LeNet with full BN, with
mean-only BN (centering only), with variance-only BN (dividing by the standard deviation of the uncentered
input only) and with no norm, all at the same four places of the same unpadded network, under both presets:
the high learning rate of the older edition (lr 1.0) is where the halves may differ in stability.

Metrics: final and best test accuracy, final train loss, and the share of full BN's gain over no norm that
each half recovers, (acc(half) - acc(none)) / (acc(BN) - acc(none)) on the means over seeds. A half does
part of the work when it recovers at least WORKING_SHARE and is clearly above no norm, and all of it when
its difference to full BN is within the seed-to-seed noise. Stability: diverged runs
(bnlab.training's criterion) and the peak epoch-average train loss; above twice a uniform guess's loss (2 ln 10)
the network is confidently wrong, thrown off even where it does not diverge. Why a half fails: the
initial network's sigmoid inputs on one training batch — how far off-center each channel sits
(|mean| / std) and the share of saturated units.
"""

from __future__ import annotations

import math

import torch

from bnlab.data import to_input
from bnlab.models import NORM_SITES, build_model
from bnlab.studies.engine import (FULL_SEEDS, MODEL, GainRecovery, Outcome, PresetStudy, Report, Run, RunContext,
                                  Settings, Verdict, activations_at, best, config_name, difference, diverged_count,
                                  finals, fmt, gain_findings, gain_table, group_results, history_of, markdown_table,
                                  mean_std, plot_accuracy_and_curves_by_preset)
from bnlab.training import PRESETS

CONFIGS = {"batchnorm": {"norm": "batchnorm"}, "mean-only": {"norm": "mean-only"},
           "variance-only": {"norm": "variance-only"}, "none": {"norm": None}}
HALVES = ("mean-only", "variance-only")
# An epoch-average train loss above twice the cross-entropy of a uniform guess (ln 10) cannot come from a
# network that merely has not learned yet (it stays near ln 10): it is confidently wrong, thrown off.
THROWN_OFF_LOSS = 2 * math.log(10)
# A half "does work" when it recovers at least this share of full BN's gain (and, with several seeds, its
# gain over no norm is clear).
WORKING_SHARE = 0.1
WHAT_IT_DOES = {"batchnorm": "(x - mean) / std", "mean-only": "x - mean", "variance-only": "x / std",
                "none": "no norm layer"}


# The initial network is probed on this many training images, in train mode (batch statistics).
PROBE_IMAGES = 256
# sigmoid'(z) < 0.01 means |z| > 4.6: the unit passes under 4% of the largest gradient a sigmoid can pass.
SATURATED_SLOPE = 0.01


def sigmoid_inputs_run(params: dict, context: RunContext) -> dict:
    """The initial network's sigmoid inputs on the first PROBE_IMAGES training images, in train mode.

    Returns {"off_center": [...], "saturated": [...]}, one entry per sigmoid from the input side: the mean
    over channels of |channel mean| / channel std, and the share of units whose sigmoid slope is below
    SATURATED_SLOPE.
    """
    torch.manual_seed(params["seed"])  # as train() does right before building: the same initial network
    net = build_model(params["model"], **params["model_options"]).train()
    sigmoids = {str(i): m for i, m in enumerate(m for m in net.modules() if isinstance(m, torch.nn.Sigmoid))}
    with activations_at(sigmoids) as inputs, torch.no_grad():
        net(to_input(context.dataset().train_images[:PROBE_IMAGES]))
    off_center, saturated = [], []
    for z in (inputs[label] for label in sigmoids):
        dims = [d for d in range(z.dim()) if d != 1]
        off_center.append(float((z.mean(dims).abs() / z.std(dims).clamp_min(1e-12)).mean()))
        slope = torch.sigmoid(z) * torch.sigmoid(-z)
        saturated.append(float((slope < SATURATED_SLOPE).float().mean()))
    return {"off_center": off_center, "saturated": saturated}


def peak_loss(result: dict) -> float:
    """The highest epoch-average train loss of a run (NaN if it finished no epoch)."""
    return max((h["train_loss"] for h in history_of(result)), default=float("nan"))


class Lite(PresetStudy):
    name = "lite"
    question = ("Which half of batch normalization does the work: subtracting the batch mean only, dividing by the "
                "batch standard deviation only, or do we need both?")
    full_runtime = "about 20 minutes on 2 cores (24 runs of 10 epochs, --jobs 2; measured 20)"
    configs = CONFIGS

    def runs(self, settings: Settings) -> list[Run]:
        return (super().runs(settings)
                + [Run("sigmoid-inputs", {"model": MODEL, "model_options": options, "seed": seed})
                   for options in CONFIGS.values() for seed in settings.seed_list(FULL_SEEDS)])

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        trainings = [outcome for outcome in outcomes if outcome.run.kind == "train"]
        results = self.results(trainings)
        probes = group_results([outcome for outcome in outcomes if outcome.run.kind == "sigmoid-inputs"],
                               lambda p: config_name(CONFIGS, p["model_options"]))

        def accuracy(preset, norm):
            return finals(results[(preset, norm)], "test_acc")

        table = gain_table(results, list(CONFIGS), "batchnorm", "none", "norm", {
            "normalizes": lambda norm, rs: WHAT_IT_DOES[norm],
            "test acc": lambda norm, rs: fmt(finals(rs, "test_acc")),
            "best test acc": lambda norm, rs: fmt([best(r) for r in rs]),
            "peak train loss": lambda norm, rs: fmt([peak_loss(r) for r in rs]),
            "train loss": lambda norm, rs: fmt(finals(rs, "train_loss")),
        }, ("share of BN's gain", "test acc vs BN"))

        conclusions = [line for preset in PRESETS for line in self._preset_findings(preset, accuracy)]
        conclusions.append(self._stability(results))
        conclusions.append(self._initial_finding(probes))
        return self.preset_report(
            settings,
            title="lite: mean-only and variance-only batch normalization",
            own_settings={"norm layers": "after conv1, conv2, fc1 and fc2, each with a learned per-channel scale and "
                                         "shift; evaluation uses the running statistics the variant uses"},
            varied={"norm": [f"{name} ({WHAT_IT_DOES[name]})" for name in CONFIGS]},
            sections=[("Results (final epoch, mean ± std over seeds)", table),
                      (f"Sigmoid inputs of the initial network (first {PROBE_IMAGES} training images, train mode; "
                       "mean ± std over seeds)", self._initial_table(probes))],
            conclusions=conclusions,
            plots=plot_accuracy_and_curves_by_preset(
                accuracy, results, CONFIGS, settings, "lite",
                "Final test accuracy of full, mean-only and variance-only BN and no norm (bars: mean over seeds; "
                "whiskers: half the range).",
                "Train loss and test accuracy per epoch (mean over seeds); a run that diverged ends where it stopped."),
        )

    @staticmethod
    def _preset_findings(preset: str, accuracy) -> list[str]:
        none = accuracy(preset, "none")

        def recovered(r: GainRecovery) -> list[str]:
            worker = r.best
            other = next(half for half in HALVES if half != worker)
            shares = f"{worker} recovers {r.shares[worker]:.0%} of full BN's gain and {other} {r.shares[other]:.0%}"
            if (r.shares[worker] < WORKING_SHARE
                    or difference(accuracy(preset, worker), none)[1] == Verdict.WITHIN_NOISE):
                return [f"{shares}: neither half alone does the work, BN needs both."]
            return [f"{shares}; " + r.best_against_full(
                within_noise=f"{worker} is within noise of full BN, so that half does all of BN's work here.",
                single_seed=f"{worker} is {r.gap:+.3f} from full BN (one seed cannot tell whether that is noise).",
                below=f"{worker} does part of the work but stays clearly below full BN ({r.gap:+.3f}), so BN needs "
                      "both halves here.",
                above=f"{worker} alone beats full BN clearly ({r.gap:+.3f}).")]

        return gain_findings(
            preset, accuracy, "batchnorm", "none", HALVES, full_label="full BN", baseline_label="no norm",
            also=f"; mean-only reaches {fmt(accuracy(preset, 'mean-only'))}, variance-only "
                 f"{fmt(accuracy(preset, 'variance-only'))}",
            no_gain="full BN does not beat no norm, so neither half has a gain to recover.", recovered=recovered)

    @staticmethod
    def _initial_table(probes) -> str:
        rows = [[norm, *(fmt([r[measure][site] for r in probes[norm]], 2) for measure in ("off_center", "saturated")
                         for site in range(len(NORM_SITES)))] for norm in CONFIGS]
        return markdown_table(["norm", *(f"{label} after {site}" for label in ("\\|mean\\|/std", "saturated")
                                         for site in NORM_SITES)], rows)

    @staticmethod
    def _initial_finding(probes) -> str:
        def means(norm, measure):
            return [mean_std([r[measure][site] for r in probes[norm]])[0] for site in range(len(NORM_SITES))]

        def listed(values, digits=2):
            return ", ".join(f"{v:.{digits}f}" for v in values)

        last = NORM_SITES[-1]
        saturated = {norm: means(norm, "saturated")[-1] for norm in CONFIGS}
        others = "; ".join(f"{norm} {listed(means(norm, 'off_center'))}, {saturated[norm]:.0%}" for norm in CONFIGS
                           if norm != "variance-only")
        line = (f"At initialization variance-only's sigmoid inputs after {', '.join(NORM_SITES)} sit off-center by "
                f"|mean|/std = {listed(means('variance-only', 'off_center'))}, and {saturated['variance-only']:.0%} "
                f"of the units after {last} saturate (sigmoid slope below {SATURATED_SLOPE}); |mean|/std and "
                f"saturation after {last} for the others: {others}.")
        if saturated["variance-only"] > max(v for norm, v in saturated.items() if norm != "variance-only") + 0.1:
            line += (" Dividing by the standard deviation without subtracting the mean turns the offset into "
                     "saturated units, which pass almost no gradient.")
        return line

    @staticmethod
    def _stability(results) -> str:
        unstable = [f"{norm} at the {preset} preset ({diverged_count(results[(preset, norm)])}/"
                    f"{len(results[(preset, norm)])} runs)"
                    for preset in PRESETS for norm in CONFIGS if diverged_count(results[(preset, norm)])]
        diverged = "runs diverged for " + "; ".join(unstable) if unstable else "no run diverged at either preset"
        thrown = [f"{norm} at the {preset} preset (peak {fmt([peak_loss(r) for r in results[(preset, norm)]], 2)})"
                  for preset in PRESETS for norm in CONFIGS
                  if mean_std([peak_loss(r) for r in results[(preset, norm)]])[0] > THROWN_OFF_LOSS]
        limit = f"twice a uniform guess's loss, 2 ln 10 = {THROWN_OFF_LOSS:.2f}"
        above = (f"an epoch's average train loss rose above {limit}, for " + "; ".join(thrown) if thrown
                 else f"no epoch's average train loss rose above {limit}")
        return f"Stability: {diverged}; {above}."
