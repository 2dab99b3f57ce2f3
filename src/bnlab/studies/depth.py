"""Study `depth`: did batch normalization make 100-layer networks trainable, as the chapter says?

The chapter credits BN, together with residual blocks, with making networks of over 100 layers
routinely trainable. This study trains deep fully connected networks on flattened Fashion-MNIST
images at 10, 30 and 100 layers, with and without BN and with and without residual connections.

The network (`deep_mlp`): `depth` linear layers of width 128, 784 -> 128 first and 128 -> 10 last,
with [bnlab BatchNorm1d] -> ReLU between consecutive ones, so that without residual connections it is
the chapter's Linear -> BN -> ReLU repeated. A residual connection goes around each hidden
(BN -> ReLU -> Linear) unit, h + unit(h): the pre-activation ResNet form, whose last BN -> ReLU before
the classifier normalizes the summed stream. An MLP isolates depth (no pooling, one width throughout)
and a 100-layer one trains in minutes on 2 CPU cores, where a conv net of that depth would not. ReLU
with Kaiming (He) normal weights and zero biases is the setting in which 100-layer networks were
trained (ResNets) and keeps a plain network's forward variance steady at initialization, so a failure
is the depth's doing, not an initialization chosen for another activation; the chapter's sigmoid
would fail far earlier without BN.

Every combination is trained with plain SGD at each rate of LEARNING_RATES; per combination the
rate with the lowest mean final training loss over seeds is kept (a rate with a diverged seed is
never kept; training loss judges optimization without looking at the test set). A combination
trained when, at its kept rate, every seed ends without divergence (bnlab.training's criterion) and with
test accuracy >= SUCCESS_ACCURACY (five times chance). At initialization the study also measures, on
one fixed batch in train mode, the gradient norm of every layer's weight. Its ratio first/last layer
shows gradients vanishing (below VANISHING) or exploding (above EXPLODING) on the way back to the
input; a first-layer norm that grows more than BLOWN_UP times from the shallowest to the deepest
network, at a moderate ratio, means the forward signal itself explodes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from bnlab import data
from bnlab.nn import BatchNorm1d
from bnlab.studies.engine import (Outcome, Report, Run, RunContext, Settings, Study, final, fmt, markdown_table,
                                  label_axes, mean_std, saved_plot, subplots, training_result)
from bnlab.training import Diverged, Loop

DEPTHS = (10, 30, 100)
WIDTH = 128
VARIANTS = ((False, False), (True, False), (False, True), (True, True))  # (batch norm, residual)
LEARNING_RATES = (0.01, 0.1, 1.0)
BATCH_SIZE = 128
FULL_DATA = {"train_subset": 20000, "test_subset": None}
QUICK_DATA = {"train_subset": 3000, "test_subset": 1000}
FULL_EPOCHS, QUICK_EPOCHS = 5, 2
FULL_SEEDS = 3
SUCCESS_ACCURACY = 0.5
PROBE_SEED = 12345  # the order from which the gradient-probe batch is drawn
EXPLODING, VANISHING = 100.0, 0.01  # first/last layer gradient-norm ratios that count as such
BLOWN_UP = 1000.0  # growth of the first layer's gradient norm from the shallowest to the deepest network


class Residual(nn.Module):
    """h + body(h)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def deep_mlp(depth: int, width: int, batchnorm: bool, residual: bool) -> nn.Sequential:
    """A `depth`-layer ReLU MLP for 28x28 images (see the module docstring), Kaiming-initialized."""
    if depth < 2:
        raise ValueError(f"depth counts the linear layers, input and output included: at least 2, got {depth}")

    def activation() -> list[nn.Module]:
        return [*([BatchNorm1d(width)] if batchnorm else []), nn.ReLU()]

    hidden = [nn.Sequential(*activation(), nn.Linear(width, width)) for _ in range(depth - 2)]
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, width), *(Residual(h) if residual else h for h in hidden),
                        *activation(), nn.Linear(width, 10))
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return net


def linear_layers(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def gradient_probe(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Loss and every linear layer's weight-gradient norm on (x, y), in train mode, on a copy of `net`
    (its running statistics stay untouched)."""
    probe = copy.deepcopy(net).train()
    loss = nn.functional.cross_entropy(probe(x), y)
    loss.backward()
    return {"loss": loss.item(), "grad_norms": [m.weight.grad.norm().item() for m in linear_layers(probe)]}


def train_epochs(net: nn.Module, dataset, lr: float, epochs: int, seed: int) -> dict:
    """Plain SGD in `bnlab train`'s loop (`bnlab.training.Loop`), not checkpointed. Returns
    {"status", "history"[, "diverged"]}."""
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=lr), dataset, torch.device("cpu"), BATCH_SIZE, seed, lr,
                epochs)
    history, diverged = [], None
    try:
        loop.run(history, None)
    except Diverged as exc:
        diverged = exc.where()
    return training_result([dataclasses.asdict(m) for m in history], diverged)


def deep_mlp_run(params: dict, context: RunContext) -> dict:
    """Build `deep_mlp(depth, width, batchnorm, residual)` (seeded), probe its gradients at initialization,
    train it. Not resumable: its longest run (100 layers) takes a few minutes."""
    dataset = context.dataset().subset(params["train_subset"], params["test_subset"], seed=params["seed"])
    torch.manual_seed(params["seed"])
    net = deep_mlp(params["depth"], params["width"], params["batchnorm"], params["residual"])
    x, y = next(data.batches(dataset.train_images, dataset.train_labels, BATCH_SIZE, shuffle=True, seed=PROBE_SEED))
    probe = gradient_probe(net, x, y)
    return {"init": probe, **train_epochs(net, dataset, params["lr"], params["epochs"], params["seed"])}


def variant_name(batchnorm: bool, residual: bool) -> str:
    return ("BN" if batchnorm else "no BN") + (", residual" if residual else ", plain")


def geometric_mean(values: list[float]) -> float:
    """Of gradient norms, which span many orders of magnitude across seeds; inf if any is not finite."""
    if any(not math.isfinite(v) or v <= 0 for v in values):
        return math.inf
    return math.exp(sum(math.log(v) for v in values) / len(values))


class Depth(Study):
    name = "depth"
    question = ("Does batch normalization make 100-layer networks trainable, with and without residual "
                "connections, and what happens to the gradients at initialization?")
    full_runtime = ("about 11 minutes on 2 cores (108 runs of up to 5 epochs on 20000 examples, --jobs 2; diverged runs "
                    "stop early; measured 11)")
    quick_plan = {"data": QUICK_DATA, "epochs": QUICK_EPOCHS}
    full_plan = {"data": FULL_DATA, "epochs": FULL_EPOCHS}

    def runs(self, settings: Settings) -> list[Run]:
        plan = self.plan(settings)
        return [Run("deep-mlp", {"depth": depth, "width": WIDTH, "batchnorm": bn, "residual": res, "lr": lr,
                                 "epochs": plan["epochs"], "seed": seed, **plan["data"]})
                for depth in DEPTHS for bn, res in VARIANTS for lr in LEARNING_RATES
                for seed in settings.seed_list(FULL_SEEDS)]

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        results = defaultdict(list)
        for o in outcomes:
            p = o.run.params
            results[(p["depth"], p["batchnorm"], p["residual"], p["lr"])].append(o.result)
        combos = [(depth, bn, res) for depth in DEPTHS for bn, res in VARIANTS]
        kept = {combo: self._keep_rate({lr: results[(*combo, lr)] for lr in LEARNING_RATES}) for combo in combos}
        at_kept = {combo: results[(*combo, kept[combo])] if kept[combo] else [] for combo in combos}
        init = {combo: [r["init"] for r in results[(*combo, LEARNING_RATES[0])]] for combo in combos}
        trained = {combo: bool(at_kept[combo]) and all(self._succeeded(r) for r in at_kept[combo]) for combo in combos}

        table = self._table(combos, results, kept, at_kept, init)
        conclusions = self._depth_findings(combos, trained, at_kept)
        conclusions += self._gradient_findings(init)
        plots = [self._plot_gradients(init, settings), self._plot_accuracy(at_kept, settings)]
        plan = self.plan(settings)
        data_options = plan["data"]
        return Report(
            title="depth: does batch normalization make 100-layer networks trainable?",
            question=self.question,
            settings={
                "data": f"Fashion-MNIST, flattened; seeded subsets: {data_options['train_subset']} training examples, "
                        f"test set: {data_options['test_subset'] or 'all 10000'}",
                "network": f"MLP of width {WIDTH}; depth counts its linear layers, with [BatchNorm1d] -> ReLU between "
                           "consecutive ones; residual: h + (BN -> ReLU -> Linear)(h) around every hidden layer",
                "initialization": "Kaiming normal (ReLU gain) weights, zero biases",
                "optimizer": f"plain SGD, batch {BATCH_SIZE}, each rate of {', '.join(map(str, LEARNING_RATES))}",
                "epochs": plan["epochs"],
                "seeds": len(settings.seed_list(FULL_SEEDS)),
                "kept rate": "lowest mean final training loss over seeds among rates with no diverged seed",
                "trained": f"at the kept rate every seed ends without divergence and with test accuracy >= "
                           f"{SUCCESS_ACCURACY}",
                "gradient probe": f"one batch of {BATCH_SIZE} (fixed order, seed {PROBE_SEED}) in train mode at "
                                  "initialization; norms are geometric means over seeds",
            },
            varied={"layers": DEPTHS, "batch norm": ("no", "yes"), "residual": ("no", "yes"),
                    "learning rate": LEARNING_RATES},
            sections=[("Results per depth and network (final epoch; kept rate: mean ± std over seeds)", table)],
            conclusions=conclusions,
            plots=plots,
        )

    def _table(self, combos, results, kept, at_kept, init) -> str:
        rows = []
        for combo in combos:
            first = geometric_mean([i["grad_norms"][0] for i in init[combo]])
            ratio = geometric_mean([i["grad_norms"][0] / i["grad_norms"][-1] for i in init[combo]])
            loss = geometric_mean([i["loss"] for i in init[combo]])
            per_rate = ", ".join(f"{lr:g}: {self._rate_text(results[(*combo, lr)])}" for lr in LEARNING_RATES)
            kept_rs = at_kept[combo]
            rows.append([combo[0], variant_name(*combo[1:]), f"{first:.3g}", f"{ratio:.3g}", f"{loss:.3g}", per_rate,
                         f"{kept[combo]:g}" if kept[combo] else "—", fmt([final(r, "test_acc") for r in kept_rs]),
                         f"{sum(map(self._succeeded, kept_rs))}/{len(kept_rs)}" if kept_rs else "0 (diverged)"])
        return markdown_table(["layers", "network", "first-layer grad norm at init", "first/last grad ratio",
                               "initial loss (geometric mean)", "final train loss per lr", "kept lr", "test acc (kept lr)",
                               "trained seeds"], rows)

    @staticmethod
    def _succeeded(result: dict) -> bool:
        return result["status"] == "ok" and final(result, "test_acc", 0.0) >= SUCCESS_ACCURACY

    @staticmethod
    def _keep_rate(by_lr: dict) -> Optional[float]:
        usable = {lr: rs for lr, rs in by_lr.items() if rs and all(r["status"] == "ok" for r in rs)}
        if not usable:
            return None
        return min(usable, key=lambda lr: mean_std([final(r, "train_loss") for r in usable[lr]])[0])

    @staticmethod
    def _rate_text(results: list[dict]) -> str:
        diverged = sum(r["status"] != "ok" for r in results)
        if diverged == len(results):
            return "diverged"
        text = fmt([final(r, "train_loss") for r in results if r["status"] == "ok"], 2)
        return text + (f" ({diverged} diverged)" if diverged else "")

    @staticmethod
    def _depth_findings(combos, trained, at_kept) -> list[str]:
        deepest = max(DEPTHS)
        lines = []
        for depth in DEPTHS:
            ok = [variant_name(bn, res) for d, bn, res in combos if d == depth and trained[(d, bn, res)]]
            failed = [variant_name(bn, res) for d, bn, res in combos if d == depth and not trained[(d, bn, res)]]
            lines.append(f"{depth} layers: trained — {'; '.join(ok) or 'none'}; failed — {'; '.join(failed) or 'none'}.")

        def accuracy(bn, res):
            rs = at_kept[(deepest, bn, res)]
            return fmt([final(r, "test_acc") for r in rs]) if rs else "diverged at every rate"

        bn_plain, bn_res = trained[(deepest, True, False)], trained[(deepest, True, True)]
        without = [trained[(deepest, False, res)] for res in (False, True)]
        if bn_res and not any(without):
            verdict = (f"holds: with BN and residual connections the {deepest}-layer network trains (test accuracy "
                       f"{accuracy(True, True)}), without BN it does not")
        elif bn_res:
            verdict = (f"is not borne out as stated: the {deepest}-layer network trains with BN and residual "
                       f"connections ({accuracy(True, True)}), but also without BN")
        else:
            verdict = f"does not hold here: even with BN and residual connections the {deepest}-layer network fails"
        lines.append(f"The chapter's claim that BN, together with residual blocks, makes {deepest}-layer networks "
                     f"trainable {verdict}. BN alone (plain, no residual connections) "
                     f"{'also trains it' if bn_plain else 'does not train it'} (test accuracy {accuracy(True, False)}).")
        return lines

    @staticmethod
    def _gradient_findings(init) -> list[str]:
        shallow, deep = min(DEPTHS), max(DEPTHS)
        lines = []
        for bn, res in VARIANTS:
            before = geometric_mean([i["grad_norms"][0] for i in init[(shallow, bn, res)]])
            after = geometric_mean([i["grad_norms"][0] for i in init[(deep, bn, res)]])
            ratio = geometric_mean([i["grad_norms"][0] / i["grad_norms"][-1] for i in init[(deep, bn, res)]])
            if not math.isfinite(after) or not math.isfinite(ratio):
                kind = "the gradients overflow (not finite): exploding"
            elif ratio > EXPLODING:
                kind = f"{ratio:.3g}x the last layer's: exploding gradients"
            elif ratio < VANISHING:
                kind = f"{ratio:.3g}x the last layer's: vanishing gradients"
            elif after > BLOWN_UP * before:
                kind = (f"{ratio:.3g}x the last layer's, but every layer's gradient is huge: the forward signal itself "
                        "explodes")
            else:
                kind = f"{ratio:.3g}x the last layer's: neither vanishing nor exploding"
            lines.append(f"At initialization, {variant_name(bn, res)}: the first layer's gradient norm goes from "
                         f"{before:.3g} at {shallow} layers to {after:.3g} at {deep} layers; at {deep} layers it is {kind}.")
        return lines

    @staticmethod
    def _plot_gradients(init, settings):
        deep = max(DEPTHS)
        fig, ax = subplots(figsize=(7, 3.8))
        for (bn, res), style in zip(VARIANTS, ("-", "--", ":", "-.")):
            norms = [geometric_mean([i["grad_norms"][layer] for i in init[(deep, bn, res)]]) for layer in range(deep)]
            finite = [(layer + 1, n) for layer, n in enumerate(norms) if math.isfinite(n)]
            if finite:
                ax.plot(*zip(*finite), style, label=variant_name(bn, res))
            else:
                ax.plot([], [], style, label=f"{variant_name(bn, res)} (not finite)")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("weight-gradient norm at init")
        ax.set_title(f"{deep}-layer networks at initialization")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return saved_plot(fig, settings, "depth_gradients.png",
                          f"Weight-gradient norm of every layer of the {deep}-layer networks at initialization (one batch, train "
                          "mode; geometric mean over seeds; log scale; non-finite norms are left out).")

    @staticmethod
    def _plot_accuracy(at_kept, settings):
        fig, ax = subplots(figsize=(6, 3.6))
        for (bn, res), style in zip(VARIANTS, ("-o", "--s", ":^", "-.v")):
            stats = [mean_std([final(r, "test_acc") for r in at_kept[(d, bn, res)]]) for d in DEPTHS]
            ax.errorbar(DEPTHS, [0.0 if math.isnan(m) else m for m, _ in stats],
                        yerr=[0.0 if math.isnan(s) else s for _, s in stats], fmt=style, capsize=3,
                        label=variant_name(bn, res))
        ax.axhline(SUCCESS_ACCURACY, color="gray", lw=0.8, ls=":", label="success threshold")
        ax.set_xscale("log")
        ax.set_xticks(DEPTHS, [str(d) for d in DEPTHS])
        label_axes(ax, "layers", "final test accuracy (kept lr)", legend_size=7)
        return saved_plot(fig, settings, "depth_accuracy.png",
                          "Final test accuracy at each combination's kept learning rate (mean ± std over seeds; 0 where every "
                          "rate diverged).")
