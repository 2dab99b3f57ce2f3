"""Study `research`: the chapter's research ideas — other normalization transforms (the probability integral
transform, a full-rank covariance estimate) and sparsification as a regularizer — tried on BN-LeNet.

Every configuration is the chapter's BN-LeNet (unpadded, a norm layer after each conv and linear layer
before the sigmoid) trained alike (SGD, lr 0.1, batch 128), differing only in its norm layers or loss:

- BN: batch normalization, the baseline.
- PIT: the probability integral transform (`bnlab.nn.PITNorm`): each channel's batch values mapped
  through their empirical CDF and the Gaussian inverse CDF, so the marginal is exactly Gaussian; its
  input gradient is batch norm's (a straight-through surrogate, since ranks have zero derivative).
- ZCA: decorrelated BN (Huang et al. 2018), full-covariance ZCA whitening per group of at most 16
  channels (6, 16, 15, 14 in LeNet's four layers) by eigendecomposition.
- IterNorm: the same whitening approximated by 5 Newton–Schulz iterations (Huang et al. 2019).
- BN + L1(γ): sparsification as in network slimming (Liu et al. 2017): BN with `λ · Σ|γ|` over every
  BN scale added to the minibatch loss, for each λ in L1_COEFFICIENTS.

Metrics, at the end of training unless said otherwise:

- test accuracy (eval mode, running statistics) and train loss (cross-entropy averaged over the last
  epoch in train mode, without the penalty); generalization gap = eval-mode accuracy on (the first
  GAP_IMAGES images of) the training set − test accuracy. Also the test accuracy with precise
  statistics (`recompute_stats` over the training set; every configuration but PIT, whose running
  quantiles have no exact counterpart there): the running statistics average batch statistics taken
  while the weights moved, so they can misjudge a network — one trained with L1, where γ shrinking
  shifts the next layers' inputs faster than the moving averages follow, or a whitening network,
  whose running whitening matrix is an average of batch whitening matrices rather than the whitening
  matrix of any covariance. With precise statistics a whitening layer whitens by the exact
  covariance of its input over the training set.
- time per epoch: wall seconds of the training steps (forward, backward, update; no evaluation),
  averaged over epochs. Runs share the machine with each other (and whatever else runs), so the cost
  relative to BN is measured separately at the end of each run: TIMING_ROUNDS rounds, each timing one
  SGD step of the configuration and one of a BN-LeNet on the same batch back to back, so that both see
  the same load; the ratio of the median step times is "step time vs BN".
- whiteness: on WHITENESS_BATCH test images, the mean |correlation| between distinct channels of each
  norm layer's output (channels as variables, batch × positions as samples), over the pairs inside a
  whitening group (the groups ZCA and IterNorm whiten; all pairs for the convolutions) and, averaged
  over the four layers. Measured in train mode (normalizing by the batch's own statistics, as in
  training; running statistics left untouched), in eval mode (running statistics, as deployed) and in
  eval mode with precise statistics.
  The same for the layer's input shows how much the layer removed: a per-channel affine map such as
  BN leaves correlations exactly as they were.
- sparsity: the fraction of norm channels with |γ| < PRUNE_THRESHOLD, and the test accuracy after
  pruning them (γ set to 0: the channel then outputs its constant shift β, which the next layer's bias
  could absorb, so the channel can be removed), with the running and with precise statistics.

An idea "helps" when it raises test accuracy clearly over BN (by more than twice the standard error
over seeds, `difference`); sparsification "acts as a regularizer" when it clearly narrows the
generalization gap.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from bnlab import data
from bnlab.models import NORM_SITES, build_model, norm_layers
from bnlab.nn import recomputable
from bnlab.studies.engine import (LoopSpec, Outcome, Report, Run, RunContext, Settings, Study, Verdict, activations_at,
                                  channel_columns, difference, fmt, markdown_table, mean_curve, mean_std, label_axes,
                                  plot_epoch_curves, saved_plot, side_effect_free, subplots, train_with_hooks,
                                  with_precise_statistics)
from bnlab.training import Hooks, evaluate

L1_COEFFICIENTS = (3e-3, 1e-2)
PRUNE_THRESHOLD = 1e-2  # |γ| below 1% of its initial value 1
WHITENESS_BATCH = 500
GAP_IMAGES = 10_000  # training images the generalization gap is measured on
TIMING_ROUNDS = 30
LR, BATCH_SIZE = 0.1, 128
QUICK_DATA = {"train_subset": 6000, "test_subset": 2000}


@dataclass(frozen=True)
class Config:
    label: str
    norm: str
    l1: float = 0.0


CONFIGS = (
    Config("BN", "batchnorm"),
    Config("PIT", "pit"),
    Config("ZCA", "decorrelated"),
    Config("IterNorm", "iternorm"),
    *(Config(f"BN + L1(γ) λ={c:g}", "batchnorm", c) for c in L1_COEFFICIENTS),
)
BASELINE = CONFIGS[0]
WHITENING = ("ZCA", "IterNorm")


class L1OnScales(Hooks):
    """Network slimming's sparsity penalty: λ times the sum of |γ| over every norm layer's scale."""

    def __init__(self, coefficient: float):
        self.coefficient = coefficient

    def penalty(self, net):
        if not self.coefficient:
            return None
        return self.coefficient * sum(layer.weight.abs().sum() for _, layer in norm_layers(net))


def research_run(params: dict, context: RunContext) -> dict:
    """Train BN-LeNet with `norm` (and L1 coefficient `l1`), then measure accuracy, whiteness, prunable
    channels and the step time."""
    outcome = train_with_hooks(LoopSpec.from_params(params), context, L1OnScales(params["l1"]))
    result = outcome.result()
    if outcome.diverged:
        return result
    net, sets = outcome.net, outcome.dataset
    precise = precise_copy(net, sets, params["precise_batch"])
    batch = data.to_input(sets.test_images[:WHITENESS_BATCH])
    modes = {"train": net, "eval": net, "precise": precise}
    result["whiteness"] = {mode: whiteness(model, batch, train=(mode == "train"))
                           for mode, model in modes.items() if model is not None}
    result["accuracy"] = accuracies(net, precise, sets)
    scales = torch.cat([layer.weight.detach().abs() for _, layer in norm_layers(net)])
    if (scales < PRUNE_THRESHOLD).any():
        smaller = pruned(net)
        pruned_accuracy = accuracies(smaller, precise_copy(smaller, sets, params["precise_batch"]), sets,
                                     on_train_set=False)
    else:  # with nothing to prune, the pruned network is the network
        pruned_accuracy = result["accuracy"]
    result["sparsity"] = {"abs_gamma": scales.tolist(), "accuracy": pruned_accuracy}
    train_batch = data.to_input(sets.train_images[:BATCH_SIZE]), sets.train_labels[:BATCH_SIZE]
    result["step_seconds"] = interleaved_step_seconds({"this": net, "BN": build_model("bn-lenet")}, *train_batch)
    return result


def precise_copy(net, sets, batch_size: int):
    """`net` with its norm layers' statistics recomputed exactly over the training set (in batches of
    `batch_size`); None when a norm layer has none that can be (PIT)."""
    if not all(recomputable(layer) for _, layer in norm_layers(net)):
        return None
    return with_precise_statistics(net, sets.train_images, sets.train_labels, batch_size)


def accuracies(net, precise, sets, on_train_set: bool = True) -> dict:
    """Eval-mode accuracy of `net` on the test set (and on GAP_IMAGES training images if asked), and of
    `precise` (its copy with precise statistics) on the test set; None without it."""
    cpu = torch.device("cpu")
    result = {"test": evaluate(net, sets.test_images, sets.test_labels, cpu)[1],
              "test_precise": evaluate(precise, sets.test_images, sets.test_labels, cpu)[1] if precise else None}
    if on_train_set:
        result["train"] = evaluate(net, sets.train_images[:GAP_IMAGES], sets.train_labels[:GAP_IMAGES], cpu)[1]
    return result


def pruned(net):
    """A copy of `net` with every norm channel whose |γ| < PRUNE_THRESHOLD pruned: γ set to 0, so the
    channel outputs its constant shift β, which the next layer's bias could absorb."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for _, layer in norm_layers(net):
            layer.weight[layer.weight.abs() < PRUNE_THRESHOLD] = 0.0
    return net


def interleaved_step_seconds(nets: dict, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Median seconds of one SGD step of each net (on copies: the nets stay as they are), timed in turns
    within each of TIMING_ROUNDS rounds, after one untimed warm-up step each."""
    copies = {label: copy.deepcopy(net).train() for label, net in nets.items()}
    optimizers = {label: torch.optim.SGD(net.parameters(), lr=LR) for label, net in copies.items()}
    times = {label: [] for label in copies}
    for round_ in range(TIMING_ROUNDS + 1):
        for label, net in copies.items():
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizers[label].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[label].step()
            if round_:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def _group_sizes() -> list[int]:
    """The channels ZCA/IterNorm whiten together in each of LeNet's norm layers (read off the layers)."""
    return [layer.group_size for _, layer in norm_layers(build_model("bn-lenet", norm="decorrelated"))]


def mean_abs_correlation(columns: torch.Tensor, group_size: int) -> dict:
    """Mean |correlation| over distinct channel pairs: all pairs, and those inside each group of
    `group_size` consecutive channels. Constant channels (no correlation defined) are left out."""
    corr = torch.corrcoef(columns.double().T).abs()
    channels = corr.shape[0]
    off_diagonal = ~torch.eye(channels, dtype=torch.bool)
    group = torch.arange(channels) // group_size
    within = off_diagonal & (group[:, None] == group[None, :])
    return {"all": float(corr[off_diagonal].nanmean()), "within": float(corr[within].nanmean())}


def whiteness(net, batch: torch.Tensor, *, train: bool) -> dict:
    """Per norm site: mean |off-diagonal correlation| of the norm layer's input and output on `batch`."""
    layers = dict(zip(NORM_SITES, (layer for _, layer in norm_layers(net))))
    with activations_at(layers, "input") as inputs, activations_at(layers, "output") as outputs, torch.no_grad():
        side_effect_free(net, batch, train=train)
    return {site: {"input": mean_abs_correlation(channel_columns(inputs[site]), size),
                   "output": mean_abs_correlation(channel_columns(outputs[site]), size)}
            for site, size in zip(layers, _group_sizes())}


# ---- the study ---------------------------------------------------------------------------------------


class Research(Study):
    name = "research"
    question = ("The chapter's research ideas: does normalizing by the probability integral transform, whitening "
                "with a full-rank covariance (ZCA, IterNorm) or sparsifying BN's scales (L1 on γ) help BN-LeNet?")
    full_runtime = "about 30 minutes on 2 cores (18 runs of 10 epochs, --jobs 2; PIT is the slowest)"
    quick_plan = {"epochs": 3, "data": QUICK_DATA}
    full_plan = {"epochs": 10, "data": {}}

    def runs(self, settings: Settings) -> list[Run]:
        plan = self.plan(settings)
        slowest_first = sorted(CONFIGS, key=lambda c: c.norm != "pit")  # a shorter tail with parallel jobs
        return [Run("research", {"model": "bn-lenet", "model_options": {"norm": c.norm}, "l1": c.l1, "lr": LR,
                                 "batch_size": BATCH_SIZE, "epochs": plan["epochs"], "seed": seed,
                                 "precise_batch": BATCH_SIZE, **plan["data"]})
                for c in slowest_first for seed in settings.seed_list(3)]

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        by_config = defaultdict(list)
        for o in outcomes:
            config = next(c for c in CONFIGS
                          if c.norm == o.run.params["model_options"]["norm"] and c.l1 == o.run.params["l1"])
            by_config[config].append(o.result)
        m = Measures(by_config)
        diverged = [c.label for c in CONFIGS if m.diverged(c)]
        conclusions = [f"Diverged (left out of the comparisons): {', '.join(diverged)}."] if diverged else []
        conclusions += [m.versus_baseline(c) for c in CONFIGS[1:]]
        conclusions += m.whiteness_findings() + m.sparsity_findings()
        return Report(
            title="research: other normalization transforms and sparsification",
            question=self.question,
            settings={"model": "bn-lenet (the chapter's BN LeNet: unpadded, a norm layer after every conv/linear "
                               "layer, sigmoid, average pooling)",
                      "data": "Fashion-MNIST" + (f", subsets {QUICK_DATA}" if settings.quick else " (full)"),
                      "optimizer": f"SGD, lr {LR}, batch {BATCH_SIZE}, no momentum or weight decay",
                      "epochs": self.plan(settings)["epochs"], "seeds": len(settings.seed_list(3)),
                      "whitening groups": "ZCA and IterNorm whiten groups of " + ", ".join(map(str, _group_sizes()))
                                          + " channels (conv1, conv2, fc1, fc2); IterNorm uses 5 iterations",
                      "PIT": "rank → Gaussian quantile per channel; backward is batch norm's (straight-through)",
                      "sparsification": "loss + λ·Σ|γ| over all norm scales (network slimming); "
                                        f"pruned = |γ| < {PRUNE_THRESHOLD:g}, set to 0",
                      "accuracy": "eval mode with the running statistics; 'precise': the norm layers' statistics "
                                  f"recomputed exactly over the training set (batches of {BATCH_SIZE}; for ZCA and "
                                  "IterNorm the whitening matrix of the exact covariance; not for PIT)",
                      "generalization gap": f"eval-mode accuracy on the first {GAP_IMAGES} training images − "
                                            "test accuracy",
                      "whiteness": f"mean |off-diagonal correlation| within whitening groups on {WHITENESS_BATCH} "
                                   "test images, averaged over the 4 norm layers",
                      "time": f"examples / s: training steps only (mean over epochs), {settings.jobs} run(s) at a time on this shared "
                              f"machine; step time vs BN: ratio of medians over {TIMING_ROUNDS} interleaved steps"},
            varied={"configuration": [c.label for c in CONFIGS]},
            sections=[("Accuracy and cost (final epoch, mean ± std over seeds)", m.accuracy_table()),
                      ("Whiteness and sparsity (mean ± std over seeds)", m.structure_table()),
                      ("Whiteness per layer (eval mode, within groups; input → output)", m.whiteness_table())],
            conclusions=conclusions,
            plots=[m.plot_curves(settings), m.plot_whiteness(settings), m.plot_scales(settings)],
        )


class Measures:
    """The per-configuration numbers of the report, from the run results (diverged runs left out)."""

    def __init__(self, by_config: dict[Config, list[dict]]):
        self.all = by_config
        self.ok = {c: [r for r in rs if r["status"] == "ok"] for c, rs in by_config.items()}

    def diverged(self, config: Config) -> bool:
        return len(self.ok[config]) < len(self.all[config])

    def final(self, config: Config, metric: str) -> list[float]:
        return [r["history"][-1][metric] for r in self.ok[config]]

    def accuracy(self, config: Config, which: str = "test", pruned: bool = False) -> list[float]:
        """Per seed: accuracy `which` ("test", "train" or "test_precise"), of the pruned network if asked."""
        values = [(r["sparsity"] if pruned else r)["accuracy"][which] for r in self.ok[config]]
        return [v for v in values if v is not None]

    def gap(self, config: Config) -> list[float]:
        return [a - b for a, b in zip(self.accuracy(config, "train"), self.accuracy(config, "test"))]

    def throughput(self, config: Config) -> list[float]:
        return [sum(h["examples_per_sec"] for h in r["history"]) / len(r["history"]) for r in self.ok[config]]

    def time_ratio(self, config: Config) -> list[float]:
        """Per seed: the interleaved step-time ratio to a BN-LeNet (see the module docstring)."""
        return [r["step_seconds"]["this"] / r["step_seconds"]["BN"] for r in self.ok[config]]

    def correlation(self, config: Config, mode: str, where: str, site=None, pairs: str = "within") -> list[float]:
        """Per seed: mean |correlation| at `site` (default: averaged over the four norm layers) in `mode`
        ("train", "eval" or "precise"; a run without precise statistics has no "precise")."""
        sites = NORM_SITES if site is None else (site,)
        return [sum(r["whiteness"][mode][s][where][pairs] for s in sites) / len(sites)
                for r in self.ok[config] if mode in r["whiteness"]]

    def prunable(self, config: Config) -> list[float]:
        return [sum(g < PRUNE_THRESHOLD for g in r["sparsity"]["abs_gamma"]) / len(r["sparsity"]["abs_gamma"])
                for r in self.ok[config]]

    # -- tables

    def accuracy_table(self) -> str:
        return markdown_table(
            ["configuration", "test acc", "test acc, precise stats", "train loss", "generalization gap",
             "examples / s", "step time vs BN"],
            [[c.label, fmt(self.accuracy(c)), fmt(self.accuracy(c, "test_precise")), fmt(self.final(c, "train_loss")),
              fmt(self.gap(c)), fmt(self.throughput(c), 0), fmt(self.time_ratio(c), 2) + "×"] for c in CONFIGS])

    def structure_table(self) -> str:
        return markdown_table(
            # Escaped pipes: a bare | would end the markdown cell.
            ["configuration", "input \\|corr\\|", "output \\|corr\\|, train mode", "output \\|corr\\|, eval mode",
             "output \\|corr\\|, eval mode, precise stats", f"prunable (\\|γ\\| < {PRUNE_THRESHOLD:g})",
             "pruned: test acc", "pruned: test acc, precise stats"],
            [[c.label, fmt(self.correlation(c, "eval", "input")), fmt(self.correlation(c, "train", "output")),
              fmt(self.correlation(c, "eval", "output")), fmt(self.correlation(c, "precise", "output")),
              fmt(self.prunable(c), 2),
              fmt(self.accuracy(c, pruned=True)), fmt(self.accuracy(c, "test_precise", pruned=True))]
             for c in CONFIGS])

    def whiteness_table(self) -> str:
        rows = []
        for config in (c for c in CONFIGS if self.ok[c] and not c.l1):
            cells = [f"{fmt(self.correlation(config, 'eval', 'input', s), 2)} → "
                     f"{fmt(self.correlation(config, 'eval', 'output', s), 2)}" for s in NORM_SITES]
            rows.append([config.label, *cells, fmt(self.correlation(config, "eval", "output", pairs="all"), 3)])
        return markdown_table(["configuration", *NORM_SITES, "output, all pairs (avg)"], rows)

    # -- conclusions

    def versus_baseline(self, config: Config) -> str:
        if not self.ok[config]:
            return f"{config.label}: every seed diverged."
        gain, verdict = difference(self.accuracy(config), self.accuracy(BASELINE))
        loss_change, _ = difference(self.final(config, "train_loss"), self.final(BASELINE, "train_loss"))
        ratio, _ = mean_std(self.time_ratio(config))
        text = (f"{config.label} vs BN: test accuracy {fmt(self.accuracy(config))} vs {fmt(self.accuracy(BASELINE))} "
                f"({gain:+.3f}, {verdict})")
        precise, baseline_precise = self.accuracy(config, "test_precise"), self.accuracy(BASELINE, "test_precise")
        if not (precise and baseline_precise):
            return (f"{text}, train loss {loss_change:+.3f}, {ratio:.2f}× BN's time per training step — on this "
                    f"problem it {self._effect(gain, verdict)}.")
        precise_gain, precise_verdict = difference(precise, baseline_precise)
        return (f"{text}; with precise statistics {fmt(precise)} vs {fmt(baseline_precise)} ({precise_gain:+.3f}, "
                f"{precise_verdict}); train loss {loss_change:+.3f}, {ratio:.2f}× BN's time per training step — on "
                f"this problem it {self._effect(gain, verdict)} with the running statistics and "
                f"{self._effect(precise_gain, precise_verdict)} with precise ones.")

    @staticmethod
    def _effect(gain: float, verdict: str) -> str:
        if verdict == Verdict.CLEAR:
            return "helps" if gain > 0 else "hurts"
        if verdict == Verdict.WITHIN_NOISE:
            return "makes no measurable difference"
        return f"{'raises' if gain > 0 else 'lowers'} accuracy on the single seed run (no spread to judge by)"

    def whiteness_findings(self) -> list[str]:
        bn_in, bn_out = self.correlation(BASELINE, "eval", "input"), self.correlation(BASELINE, "eval", "output")
        same = abs(mean_std(bn_out)[0] - mean_std(bn_in)[0]) < 0.01
        findings = [f"BN's outputs are {'as' if same else 'not as'} correlated as its inputs (mean |corr| "
                    f"{fmt(bn_out)} vs {fmt(bn_in)})" + (": a per-channel affine map cannot decorrelate." if same
                                                         else ".")]
        for config in (c for c in CONFIGS if c.label in WHITENING and self.ok[c]):
            train_out = self.correlation(config, "train", "output")
            eval_out = self.correlation(config, "eval", "output")
            precise_out = self.correlation(config, "precise", "output")
            cut, verdict = difference(train_out, bn_out)
            held = mean_std(eval_out)[0] < 0.5 * mean_std(bn_out)[0]
            findings.append(
                f"{config.label}: output |corr| {fmt(train_out)} in train mode vs BN's {fmt(bn_out)} ({cut:+.3f}, "
                f"{verdict}); with its running whitening matrices (eval mode) {fmt(eval_out)}, from inputs at "
                f"{fmt(self.correlation(config, 'eval', 'input'))}"
                + (f", and {fmt(precise_out)} with the whitening matrices of the exact covariance" if precise_out else "")
                + " — " + ("the whitening carries over to test time (under half of BN's correlation)." if held
                           else "at test time the outputs are not much whiter than BN's (over half of BN's "
                                "correlation)."))
        return findings

    def sparsity_findings(self) -> list[str]:
        findings = []
        for config in (c for c in CONFIGS if c.l1 and self.ok[c]):
            gap_change, verdict = difference(self.gap(config), self.gap(BASELINE))
            if verdict == Verdict.SINGLE_SEED:
                regularizes = f"{'narrows' if gap_change < 0 else 'widens'} the gap on the single seed run"
            elif verdict == Verdict.CLEAR and gap_change < 0:
                regularizes = "acts as a regularizer: it clearly narrows the gap"
            else:
                regularizes = "does not measurably regularize"
            moving, precise = self.accuracy(config), self.accuracy(config, "test_precise")
            stats_matter, stats_verdict = difference(precise, moving)
            findings.append(
                f"{config.label}: {fmt(self.prunable(config), 2)} of the norm channels have |γ| < {PRUNE_THRESHOLD:g} "
                f"(BN: {fmt(self.prunable(BASELINE), 2)}); pruned, test accuracy is "
                f"{fmt(self.accuracy(config, pruned=True))} ({fmt(self.accuracy(config, 'test_precise', pruned=True))} "
                f"with precise BN statistics) against {fmt(moving)} ({fmt(precise)}) unpruned and BN's "
                f"{fmt(self.accuracy(BASELINE))} ({fmt(self.accuracy(BASELINE, 'test_precise'))}). Precise statistics "
                f"change its accuracy by {stats_matter:+.3f} ({stats_verdict}). Generalization gap "
                f"{fmt(self.gap(config))} vs BN's {fmt(self.gap(BASELINE))} ({gap_change:+.3f}, {verdict}): the "
                f"penalty {regularizes}.")
        return findings

    # -- plots

    def plot_curves(self, settings):
        fig, (ax_acc, ax_loss) = subplots(1, 2, figsize=(10, 3.6))
        plot_epoch_curves(ax_acc, {c.label: mean_curve(self.ok[c], "test_acc") for c in CONFIGS}, "test accuracy")
        plot_epoch_curves(ax_loss, {c.label: mean_curve(self.ok[c], "train_loss") for c in CONFIGS}, "train loss")
        ax_loss.set_yscale("log")
        ax_acc.legend(fontsize=7)
        return saved_plot(fig, settings, "research_curves.png",
                          "Test accuracy (eval mode, running statistics) and training loss (log scale) "
                          "per epoch, mean over seeds.")

    def plot_whiteness(self, settings):
        configs = [c for c in CONFIGS if self.ok[c] and not c.l1]
        fig, axes = subplots(1, 2, figsize=(10, 3.6), sharey=True)
        width = 0.8 / len(configs)
        for ax, mode in zip(axes, ("train", "eval")):
            for i, config in enumerate(configs):
                xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(NORM_SITES))]
                outputs = [mean_std(self.correlation(config, mode, "output", s))[0] for s in NORM_SITES]
                inputs = [mean_std(self.correlation(config, mode, "input", s))[0] for s in NORM_SITES]
                ax.bar(xs, outputs, width, color=f"C{i}", label=f"{config.label} output")
                ax.plot(xs, inputs, "_", ms=12, mew=2, color=f"C{i}", label=f"{config.label} input")
            ax.set_xticks(range(len(NORM_SITES)), NORM_SITES)
            ax.set_title(f"{mode} mode ({'batch' if mode == 'train' else 'running'} statistics)")
            ax.set_ylabel("mean |off-diagonal correlation|")
            ax.grid(axis="y", alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        return saved_plot(fig, settings, "research_whiteness.png",
                          "How white each norm layer's output is (bars; dashes: its input) on test "
                          "images, within whitening groups, mean over seeds.")

    def plot_scales(self, settings):
        fig, ax = subplots(figsize=(6, 3.6))
        channels = 0
        for i, (config, style) in enumerate(zip((c for c in CONFIGS if c.norm == "batchnorm"), ("-", "--", ":"))):
            for n, r in enumerate(self.ok[config]):
                values = sorted(r["sparsity"]["abs_gamma"])
                channels = len(values)
                ax.plot([k / len(values) for k in range(len(values))], values, style, color=f"C{i}", alpha=0.8,
                        label=None if n else config.label)
        ax.axhline(PRUNE_THRESHOLD, color="gray", lw=0.8, ls=":", label="prune threshold")
        ax.set_yscale("log")
        label_axes(ax, "fraction of norm channels (sorted by |γ|)", "|γ|", legend_size=7)
        return saved_plot(fig, settings, "research_scales.png",
                          f"Sorted |γ| of all {channels} norm channels after training "
                          "(one line per seed).")
