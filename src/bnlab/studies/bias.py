"""Study `bias`: can we remove the bias of the conv/linear layer before batch normalization? (exercise 1)

BN subtracts the batch mean of each channel, so a per-channel constant b added just before it cancels:
BN(Wx + b) = BN(Wx) in training, and b's gradient is zero. In evaluation the running mean contains b, and
BN's own shift takes it over: gamma (Wx + b - mu) / s + beta = gamma (Wx - mu) / s + beta' with
beta' = beta + gamma b / s, s = sqrt(running_var + eps). That is the equivalent transformation the chapter
asks for; the reformulation is effective if dropping b changes nothing but the parameter count.

The study trains the BN-LeNet with those biases kept and removed (LeNetConfig.bias_before_norm), under both
presets, and measures, on the kept runs:

- the bias gradient: ||grad b|| / ||grad W|| of each of the four conv/linear layers that a BN follows, in
  train mode, on the first PROBE_BATCHES real batches of the run's first epoch, at initialization and after
  training (largest over those batches). The output layer's bias, which no BN follows, is the control: a
  real gradient, measured the same way.
- the bias drift: the largest change of a pre-BN bias over training (the output bias is again the control).
- the equivalence, on the trained network: the largest change of the logits when the pre-BN biases are
  removed, in train mode (nothing else changed) and in eval mode (with beta' as above, and without it).

The parameters saved are counted on the two networks. Both variants start from the same weights for a
given seed (every layer draws its default bias at construction either way, before the Xavier draws of the
weights), so accuracies are also compared seed by seed.
"""

from __future__ import annotations

import copy
from itertools import islice

import torch
from torch import nn

from bnlab import data
from bnlab.models import NORM_SITES, build_model, norm_layers
from bnlab.studies.engine import (FULL_SEEDS, MODEL, Outcome, PresetStudy, Report, Run, RunContext, Settings, Verdict,
                                  difference, finals, fmt, markdown_table, plot_curves_by_preset, saved_plot, subplots,
                                  trained_network, training_data, training_params)
from bnlab.training import PRESETS, epoch_seed

PROBE_BATCHES = 8
EQUIVALENCE_SAMPLES = 1000
CONTROL = "output"  # the last linear layer: its bias is followed by no BN
# A pre-BN bias gradient below this fraction of its weight gradient is zero up to float32 rounding: sums of
# a batch's float32 terms that cancel exactly in real arithmetic leave about 1e-7 relative error per term.
ROUNDING_LEVEL = 1e-4
# Runs of one seed with and without the biases whose final test accuracies differ by at most this much (a
# tenth of a percent, a handful of test images) count as reaching the same accuracy.
SAME_ACCURACY = 0.001
# A change a thousand times smaller than its reference (the control's drift, the logit change without
# beta's adjustment) counts as none.
NEGLIGIBLE = 1e-3
VARIANTS = {"kept": {}, "removed": {"bias_before_norm": False}}


def normalized_layers(net: nn.Sequential) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Site name -> (conv/linear layer, the norm layer right after it), in network order."""
    norms = {id(module) for _, module in norm_layers(net)}
    children = list(net)
    pairs = [(layer, norm) for layer, norm in zip(children, children[1:])
             if isinstance(layer, (nn.Conv2d, nn.Linear)) and id(norm) in norms]
    if len(pairs) != len(NORM_SITES):
        raise ValueError(f"expected a norm after each of {NORM_SITES}, found {len(pairs)} conv/linear + norm pairs")
    return dict(zip(NORM_SITES, pairs))


def biased_layers(net: nn.Sequential) -> dict[str, nn.Module]:
    """The pre-BN layers by site, and the output layer under CONTROL."""
    return {**{site: layer for site, (layer, _) in normalized_layers(net).items()}, CONTROL: net[-1]}


def gradient_ratios(net: nn.Sequential, dataset, params: dict) -> dict[str, float]:
    """Per layer, the largest ||grad bias|| / ||grad weight|| over the first PROBE_BATCHES training batches."""
    probe = copy.deepcopy(net).train()  # train mode: BN uses batch statistics, as in training
    layers = biased_layers(probe)
    ratios = {name: 0.0 for name in layers}
    batches = data.batches(dataset.train_images, dataset.train_labels, params["batch_size"], shuffle=True,
                           seed=epoch_seed(params["seed"], 1))
    for x, y in islice(batches, PROBE_BATCHES):
        probe.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(probe(x), y).backward()
        for name, layer in layers.items():
            ratio = (layer.bias.grad.norm() / layer.weight.grad.norm()).item()
            ratios[name] = max(ratios[name], ratio)
    return ratios


def bias_drift(initial: nn.Sequential, trained: nn.Sequential) -> dict[str, float]:
    before, after = biased_layers(initial), biased_layers(trained)
    return {name: (after[name].bias - before[name].bias).abs().max().item() for name in before}


def without_biases(net: nn.Sequential, absorb_into_beta: bool) -> nn.Sequential:
    """A copy of `net` without its pre-BN biases; with `absorb_into_beta`, beta' = beta + gamma b / s."""
    changed = copy.deepcopy(net)
    with torch.no_grad():
        for layer, norm in normalized_layers(changed).values():
            if absorb_into_beta:
                scale = norm.running_var.add(norm.eps).sqrt()
                norm.bias += norm.weight * layer.bias / scale
            layer.bias = None
    return changed


def largest_change(reference: nn.Module, changed: nn.Module, x: torch.Tensor, train_mode: bool) -> float:
    # Copies, because a train-mode forward updates the running statistics.
    reference, changed = copy.deepcopy(reference).train(train_mode), copy.deepcopy(changed).train(train_mode)
    with torch.no_grad():
        return (reference(x) - changed(x)).abs().max().item()


def equivalence(trained: nn.Sequential, dataset, params: dict) -> dict[str, float]:
    """How much the trained network's logits change when its pre-BN biases are removed."""
    train_x, _ = next(data.batches(dataset.train_images, dataset.train_labels, params["batch_size"], shuffle=False))
    test_x, _ = next(data.batches(dataset.test_images, dataset.test_labels, EQUIVALENCE_SAMPLES, shuffle=False))
    with torch.no_grad():
        logit_scale = trained.eval()(test_x).abs().max().item()
    removed = without_biases(trained, absorb_into_beta=False)
    return {
        "train_mode_removed": largest_change(trained, removed, train_x, train_mode=True),
        "eval_mode_absorbed": largest_change(trained, without_biases(trained, absorb_into_beta=True), test_x, False),
        "eval_mode_removed": largest_change(trained, removed, test_x, train_mode=False),
        "logit_scale": logit_scale,
    }


def bias_gradients_run(params: dict, context: RunContext) -> dict:
    """Train bn-lenet (biases kept) as the "train" kind does, measuring the pre-BN biases before and after.

    Returns the training result with "at_init" and, unless it diverged, "trained" (gradient ratios by
    layer), "drift" (largest bias change by layer) and "equivalence" (largest logit changes)."""
    dataset = training_data(params, context)
    torch.manual_seed(params["seed"])  # as train() does right before building: the same initial network
    initial = build_model(params["model"], **params["model_options"])
    at_init = gradient_ratios(initial, dataset, params)
    result, trained = trained_network(params, context)
    if trained is None:
        return {**result, "at_init": at_init}
    return {**result, "at_init": at_init, "trained": gradient_ratios(trained, dataset, params),
            "drift": bias_drift(initial, trained), "equivalence": equivalence(trained, dataset, params)}


def paired_gap(results, preset: str) -> float:
    """The largest |test accuracy with the biases - without| between runs of the same seed."""
    kept, removed = results[(preset, "kept")], results[(preset, "removed")]
    return max(abs(a - b) for a, b in zip(finals(kept, "test_acc"), finals(removed, "test_acc")))


def parameter_count(**model_options) -> int:
    return sum(p.numel() for p in build_model(MODEL, **model_options).parameters())


def largest(results: list[dict], section: str, name: str) -> float:
    """The largest value of results[i][section][name] over the seeds that have it (NaN if none)."""
    values = [r[section][name] for r in results if section in r]
    return max(values) if values else float("nan")


class Bias(PresetStudy):
    name = "bias"
    question = ("Can we remove the bias of the conv/linear layer before batch normalization: does it get any "
                "gradient, does accuracy change, what does it save, and what absorbs it?")
    full_runtime = "about 11 minutes on 2 cores (12 runs of 10 epochs, --jobs 2; measured 10.5)"
    configs = VARIANTS

    def runs(self, settings: Settings) -> list[Run]:
        """As PresetStudy's, but the kept runs also measure the biases' gradients ("bias-gradients")."""
        runs = []
        for preset in PRESETS:
            for seed in settings.seed_list(FULL_SEEDS):
                runs.append(Run("bias-gradients", training_params(preset, settings, seed, VARIANTS["kept"])))
                runs.append(Run("train", training_params(preset, settings, seed, VARIANTS["removed"])))
        return runs

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        results = self.results(outcomes)
        counts = {name: parameter_count(**options) for name, options in VARIANTS.items()}

        conclusions = []
        for preset in PRESETS:
            conclusions.append(self._accuracy_finding(preset, results))
        kept = [r for preset in PRESETS for r in results[(preset, "kept")]]
        conclusions += self._gradient_findings(kept)
        saved = counts["kept"] - counts["removed"]
        conclusions.append(f"Removing the four biases saves {saved} of {counts['kept']:,} parameters "
                           f"({saved / counts['kept']:.2%}): one per channel of conv1, conv2, fc1 and fc2.")
        conclusions.append(self._equivalence_finding(kept))
        conclusions.append(self._effectiveness(results, kept))

        return self.preset_report(
            settings,
            title="bias: can we remove the bias before batch normalization?",
            own_settings={"bias measurements": f"kept runs; train mode; first {PROBE_BATCHES} batches of epoch 1; "
                                               f"equivalence on {EQUIVALENCE_SAMPLES} test images (eval mode) and one "
                                               "training batch (train mode)"},
            varied={"bias before each BN": tuple(VARIANTS)},
            sections=[("Accuracy (final epoch, mean ± std over seeds)", self._accuracy_table(results, counts)),
                      ("Bias gradients and drift (largest over seeds)", self._gradient_table(results)),
                      ("Equivalence on the trained networks (largest over seeds)", self._equivalence_table(results))],
            conclusions=conclusions,
            plots=[self._plot_gradients(kept, settings),
                   plot_curves_by_preset(results, list(VARIANTS), settings, "bias_curves.png",
                                         "Test accuracy per epoch with and without the biases before BN (mean "
                                         "over seeds).", label=lambda variant: f"bias {variant}")],
        )

    # ---- findings ---------------------------------------------------------------------------------

    @staticmethod
    def _accuracy_finding(preset: str, results) -> str:
        kept, removed = results[(preset, "kept")], results[(preset, "removed")]
        gap, verdict = difference(finals(kept, "test_acc"), finals(removed, "test_acc"))
        paired = paired_gap(results, preset)
        return (f"{preset} preset: final test accuracy {fmt(finals(kept, 'test_acc'))} with the biases, "
                f"{fmt(finals(removed, 'test_acc'))} without ({gap:+.4f}; {verdict}); seed by seed, from the same "
                f"initial weights, the two differ by at most {paired:.4f}.")

    @staticmethod
    def _gradient_findings(kept: list[dict]) -> list[str]:
        pre_bn = {stage: max(largest(kept, stage, site) for site in NORM_SITES) for stage in ("at_init", "trained")}
        control = {stage: min((r[stage][CONTROL] for r in kept if stage in r), default=float("nan"))
                   for stage in ("at_init", "trained")}
        zero = all(value < ROUNDING_LEVEL for value in pre_bn.values())
        drift = max(largest(kept, "drift", site) for site in NORM_SITES)
        control_drift = min((r["drift"][CONTROL] for r in kept if "drift" in r), default=float("nan"))
        return [
            f"The pre-BN biases' gradient is at most {pre_bn['at_init']:.1e} of their weights' gradient at "
            f"initialization and {pre_bn['trained']:.1e} after training (largest over the 4 layers, both presets, "
            f"every seed and {PROBE_BATCHES} batches), while the output layer's bias, which no BN follows, gets at least "
            f"{control['at_init']:.1e} and {control['trained']:.1e}: "
            + ("the pre-BN bias gradient is zero up to float32 rounding, as BN's mean subtraction predicts."
               if zero else f"the pre-BN bias gradient is above rounding level ({ROUNDING_LEVEL:g}), contrary to "
                            "the prediction."),
            f"Over training the pre-BN biases moved by at most {drift:.1e} from their initial values, the output "
            f"bias by at least {control_drift:.3f}: "
            + ("the biases before BN never learn." if drift < NEGLIGIBLE * control_drift else "the pre-BN biases did move."),
        ]

    @staticmethod
    def _equivalence_finding(kept: list[dict]) -> str:
        train_mode, absorbed, removed, scale = (largest(kept, "equivalence", key) for key in
                                                ("train_mode_removed", "eval_mode_absorbed", "eval_mode_removed",
                                                 "logit_scale"))
        absorbs = absorbed < NEGLIGIBLE * removed
        return (f"Equivalent transformation: in training BN(Wx + b) = BN(Wx) (removing the biases from a trained "
                f"network changes its train-mode logits by at most {train_mode:.1e}, logits up to {scale:.1f}); in "
                f"evaluation the running mean holds b, and beta' = beta + gamma·b/sqrt(running_var + eps) takes it "
                f"over: the eval-mode logits change by at most {absorbed:.1e}, against {removed:.2f} when b is "
                f"dropped without adjusting beta — "
                + ("BN's shift beta absorbs the bias." if absorbs else "beta does not absorb it exactly here."))

    @staticmethod
    def _effectiveness(results, kept: list[dict]) -> str:
        paired = max(paired_gap(results, preset) for preset in PRESETS)
        dead = max(largest(kept, stage, site) for stage in ("at_init", "trained") for site in NORM_SITES) < ROUNDING_LEVEL
        if not dead:
            return "The pre-BN biases do get a gradient here, so removing them is not a pure reformulation."
        if paired <= SAME_ACCURACY:
            return (f"Is the reformulation effective? Yes: the bias before BN gets no gradient and keeps its initial "
                    f"value, and removing it changes the final test accuracy by at most {paired:.4f} seed by seed "
                    f"(at most {SAME_ACCURACY} counts as the same), so it is pure overhead: parameters, memory and an "
                    "addition per activation.")
        verdicts = {preset: difference(finals(results[(preset, "kept")], "test_acc"),
                                       finals(results[(preset, "removed")], "test_acc"))[1] for preset in PRESETS}
        cost = ("so removing the bias is effective: it saves parameters at no measurable cost in accuracy"
                if all(v == Verdict.WITHIN_NOISE for v in verdicts.values()) else
                "so whether removing it costs accuracy is not settled by these seeds")
        return (f"The bias before BN gets no gradient, yet runs of the same seed with and without it end up to "
                f"{paired:.4f} apart in test accuracy (more than {SAME_ACCURACY}): the two computations round "
                f"differently and the difference grows over training. Over seeds the gap is "
                + ", ".join(f"{verdict} at the {preset} preset" for preset, verdict in verdicts.items())
                + f", {cost}.")

    # ---- tables -------------------------------------------------------------------------------------

    @staticmethod
    def _accuracy_table(results, counts) -> str:
        rows = [[preset, variant, f"{counts[variant]:,}", fmt(finals(results[(preset, variant)], "test_acc"), 4),
                 fmt(finals(results[(preset, variant)], "train_loss"), 4)]
                for preset in PRESETS for variant in VARIANTS]
        return markdown_table(["preset", "bias before BN", "parameters", "test acc", "train loss"], rows)

    @staticmethod
    def _gradient_table(results) -> str:
        rows = []
        for preset in PRESETS:
            kept = results[(preset, "kept")]
            for layer in (*NORM_SITES, CONTROL):
                rows.append([preset, layer + (" (control: no BN after it)" if layer == CONTROL else ""),
                             f"{largest(kept, 'at_init', layer):.2e}", f"{largest(kept, 'trained', layer):.2e}",
                             f"{largest(kept, 'drift', layer):.2e}"])
        # "\\|" keeps the absolute-value bars from splitting the table's cells.
        return markdown_table(["preset", "layer", "‖∇b‖/‖∇W‖ at init", "‖∇b‖/‖∇W‖ trained",
                               "largest \\|Δb\\| over training"], rows)

    @staticmethod
    def _equivalence_table(results) -> str:
        rows = [[preset] + [f"{largest(results[(preset, 'kept')], 'equivalence', key):.2e}"
                            for key in ("train_mode_removed", "eval_mode_absorbed", "eval_mode_removed", "logit_scale")]
                for preset in PRESETS]
        return markdown_table(["preset", "train mode, b removed", "eval mode, b removed, beta' = beta + gamma b/s",
                               "eval mode, b removed, beta unchanged", "largest \\|logit\\|"], rows)

    # ---- plots --------------------------------------------------------------------------------------

    @staticmethod
    def _plot_gradients(kept: list[dict], settings):
        fig, ax = subplots(figsize=(7, 3.6))
        layers = (*NORM_SITES, CONTROL)
        width = 0.38
        for offset, (stage, label) in zip((-width / 2, width / 2), (("at_init", "at initialization"),
                                                                    ("trained", "after training"))):
            values = [largest(kept, stage, layer) for layer in layers]
            ax.bar([i + offset for i in range(len(layers))], values, width, label=label)
        ax.axhline(ROUNDING_LEVEL, color="gray", ls=":", lw=0.8, label='threshold of "zero up to rounding"')
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)), [*NORM_SITES, "output\n(no BN after)"])
        ax.set_ylabel("‖∇ bias‖ / ‖∇ weight‖")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        return saved_plot(fig, settings, "bias_gradients.png",
                          "Bias gradient relative to the weight gradient, per layer (largest over seeds, "
                          "presets and probe batches; log scale). conv1 to fc2 are followed by a BN; "
                          "the output layer is not (the control). Dotted: the level below which a "
                          "gradient counts as zero up to float32 rounding.")
