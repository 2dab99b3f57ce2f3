"""Study `placement`: do we need batch normalization in every layer? (the chapter's exercise 3)

The BN-LeNet carries bnlab's BN after each of its four conv/linear layers ("all"). The study trains the
same unpadded network with BN after the convolutions only ("conv"), after the two hidden fully connected
layers only ("linear"), after the first convolution only ("first") and nowhere ("none"), under both
presets: the current edition's lr 0.1 / batch 128 and the older edition's lr 1.0 / batch 256, where a
missing norm should matter more.

Metrics: final test accuracy and train loss, and the share of the all-layers gain a placement recovers,
(acc(placement) - acc(none)) / (acc(all) - acc(none)) on the means over seeds: 100% means that placement
does as well as BN everywhere, 0% no better than no BN. A partial placement "suffices" when its
difference to "all" is within the seed-to-seed noise (`difference`).
"""

from __future__ import annotations

from bnlab.models import PLACEMENTS
from bnlab.studies.engine import (NO_NORM, GainRecovery, Outcome, PresetStudy, Report, Settings, finals, fmt,
                                  gain_findings, gain_table, plot_accuracy_and_curves_by_preset, share_of_gain)
from bnlab.training import PRESETS

# Placement name -> the model_options that realize it; "none" is the same network without norm layers.
CONFIGS = {**{name: {"placement": name} for name in PLACEMENTS}, "none": NO_NORM}
PARTIAL = tuple(name for name in CONFIGS if name not in ("all", "none"))


def sites_of(placement: str) -> str:
    return ", ".join(PLACEMENTS[placement]) if placement in PLACEMENTS else "no norm layer"


class Placement(PresetStudy):
    name = "placement"
    question = ("Do we need batch normalization in every layer, or does BN after only the convolutions, only the "
                "fully connected layers or only the first layer recover its gain?")
    full_runtime = "about 21 minutes on 2 cores (30 runs of 10 epochs, --jobs 2; measured 21)"
    configs = CONFIGS

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        results = self.results(outcomes)

        def accuracy(preset, placement):
            return finals(results[(preset, placement)], "test_acc")

        table = gain_table(results, list(CONFIGS), "all", "none", "placement", {
            "norm after": lambda placement, rs: sites_of(placement),
            "test acc": lambda placement, rs: fmt(finals(rs, "test_acc")),
            "train loss": lambda placement, rs: fmt(finals(rs, "train_loss")),
        }, ("share of all-layers gain", "test acc vs all"))

        conclusions = [line for preset in PRESETS for line in self._preset_findings(preset, accuracy)]
        conclusions.append(self._where_placement_matters(accuracy))
        return self.preset_report(
            settings,
            title="placement: do we need batch normalization in every layer?",
            own_settings={"norm": "bnlab's BatchNorm (batch statistics in training, running statistics in evaluation)"},
            varied={"placement": [f"{name} ({sites_of(name)})" for name in CONFIGS]},
            sections=[("Results (final epoch, mean ± std over seeds)", table)],
            conclusions=conclusions,
            plots=plot_accuracy_and_curves_by_preset(
                accuracy, results, CONFIGS, settings, "placement",
                "Final test accuracy per BN placement (bars: mean over seeds; whiskers: half the range). all: after "
                "conv1, conv2, fc1, fc2; conv: conv1, conv2; linear: fc1, fc2; first: conv1; none: no BN.",
                "Train loss and test accuracy per epoch for every placement (mean over seeds)."),
        )

    @staticmethod
    def _preset_findings(preset: str, accuracy) -> list[str]:
        def recovered(r: GainRecovery) -> list[str]:
            answer = r.best_against_full(
                single_seed="one seed cannot tell whether that difference is noise",
                within_noise=f"within noise of BN everywhere, so BN is not needed in every layer here: {r.best} "
                             "suffices",
                below="clearly below BN everywhere, so every layer's BN contributes here",
                above="clearly above BN everywhere, so adding BN to the other layers hurts here")
            return ["the share of that gain each partial placement recovers — "
                    + ", ".join(f"{name} ({sites_of(name)}) {r.shares[name]:.0%}" for name in PARTIAL) + ".",
                    f"the best partial placement, {r.best}, is {r.gap:+.3f} from BN everywhere: {answer}."]

        return gain_findings(
            preset, accuracy, "all", "none", PARTIAL, full_label="BN after every layer", baseline_label="no BN",
            no_gain="BN everywhere does not beat no BN, so there is no gain for partial placements to recover; their "
                    "accuracies: " + ", ".join(f"{name} {fmt(accuracy(preset, name))}" for name in PARTIAL) + ".",
            recovered=recovered)

    @staticmethod
    def _where_placement_matters(accuracy) -> str:
        """Compare the presets by the mean share of the all-layers gain that the partial placements recover."""
        mean_share = {}
        for preset in PRESETS:
            shares = [share_of_gain(accuracy(preset, name), accuracy(preset, "all"), accuracy(preset, "none"))
                      for name in PARTIAL]
            if all(share is not None for share in shares):
                mean_share[preset] = sum(shares) / len(shares)
        if len(mean_share) < len(PRESETS):
            return "BN everywhere does not beat no BN at every preset, so the presets cannot be compared by shares."
        costlier = min(mean_share, key=mean_share.get)
        return ("On average the partial placements recover "
                + " and ".join(f"{mean_share[p]:.0%} of the gain at the {p} preset (lr {PRESETS[p]['lr']:g})"
                               for p in PRESETS)
                + f": leaving layers without BN costs more at the {costlier} preset.")
