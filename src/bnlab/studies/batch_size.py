"""Study `batch-size`: does BN-LeNet work best with minibatches of 50–100, as the chapter says?

BN-LeNet (bnlab's BN after every layer) is trained at batch sizes from 2 to 512 for the same number
of epochs on the same training examples, so every size sees the same data the same number of times
(small batches take more, noisier steps). Each size gets its own learning rate, tuned over the grid
scaled_lr(batch) x 2^k, k = -3..3 (square-root scaling from the current edition's 0.1 at batch 128; see
`engine.presets.scaled_lr`). The rate is chosen by the final accuracy on a validation split held out
from the training set (mean over seeds; a rate with a diverged seed is never chosen), never by test
accuracy; the report gives the test accuracy of the chosen rate, mean ± std over seeds. A chosen rate
at the edge of its grid is flagged: the best rate may lie beyond it.

Accuracy is measured with precise statistics: every BN's running statistics recomputed exactly over the
training examples (`with_precise_statistics`). The moving averages lag behind the weights by an amount
that depends on the learning rate and the number of steps — both of which change with the batch size
here — and the population-stats study shows they can cost BN-LeNet several points at random; precise
statistics keep that out of the comparison of batch sizes. Test accuracy with the moving averages is
reported beside it.

The sweet spot holds when the best size lies in 50–100 (64 is the only tested power of two there), or
when 64 is within seed noise of the best size (`difference`). The batch of one is tested apart: a BN
of a linear layer has one value per channel at batch 1, which bnlab's trainer must refuse with a clear
ValueError (captured by running it); a BN of a convolution still has H*W values per channel, so a
LeNet with BN on its convolutions only (placement "conv") trains at batch 1, and its accuracy is
reported.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from bnlab.data import FashionMNIST
from bnlab.studies.engine import (Outcome, Report, Run, RunContext, Settings, Study, Verdict, difference, fmt,
                                  markdown_table, mean_std, plot_against_batch_size, round_lr, saved_plot, scaled_lr,
                                  subplots, train_run, trained_network, with_precise_statistics)
from bnlab.training import EVAL_BATCH_SIZE, evaluate

FULL_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512)
QUICK_SIZES = (2, 8, 64, 256)
FULL_LR_FACTORS = tuple(2.0 ** k for k in range(-3, 4))  # the grids around scaled_lr(batch)
QUICK_LR_FACTORS = (0.25, 1.0, 4.0)
# Training-set sizes are multiples of every batch size of the plan, so every step uses a full batch. A
# last partial batch would end each epoch (and training) with one step on a few examples at a rate
# tuned for full batches, and update the moving averages from those few; with 10000 examples it would
# hold 16 examples at every size from 32 to 256 but not at 512. (At batch 1 a last batch of one
# example is what a BN of a linear layer refuses.)
SPLIT_KEYS = ("train_examples", "validation_examples", "test_examples")  # run parameters of the split
# Precise statistics are recomputed in batches this large: in train mode each BN's input depends on the
# batch statistics of the BNs before it, and large batches make those close to the population's, which
# is what eval mode uses.
PRECISE_BATCH = EVAL_BATCH_SIZE
FULL_SPLIT = {"train_examples": 10240, "validation_examples": 5000, "test_examples": None}  # 20 x 512
QUICK_SPLIT = {"train_examples": 1536, "validation_examples": 768, "test_examples": 2000}  # 6 x 256
FULL_EPOCHS, QUICK_EPOCHS = 5, 2
FULL_SEEDS = 3
SPLIT_SEED = 0  # one split for every run: runs differ only in batch size, rate and seed
SWEET_SPOT = (50, 100)
CONV_ONLY = {"placement": "conv"}


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    split: dict
    epochs: int
    lr_factors: tuple[float, ...]

    def lr_grid(self, batch_size: int) -> list[float]:
        return [round_lr(scaled_lr(batch_size) * factor) for factor in self.lr_factors]

    def at_edge(self, batch_size: int, lr: Optional[float]) -> bool:
        grid = self.lr_grid(batch_size)
        return lr is not None and lr in (grid[0], grid[-1])


FULL_PLAN = Plan(FULL_SIZES, FULL_SPLIT, FULL_EPOCHS, FULL_LR_FACTORS)
QUICK_PLAN = Plan(QUICK_SIZES, QUICK_SPLIT, QUICK_EPOCHS, QUICK_LR_FACTORS)


def validation_split(full: FashionMNIST, train_examples: int, validation_examples: int,
                     test_examples: Optional[int]) -> tuple[FashionMNIST, torch.Tensor, torch.Tensor]:
    """(data to fit: the training subset, with the validation split in the place of the test set;
    test images; test labels). The validation and training rows are disjoint draws from the
    training set; the test rows (all, or a seeded subset) come from the test set only."""
    wanted = train_examples + validation_examples
    if wanted > len(full.train_labels):
        raise ValueError(f"{train_examples} training + {validation_examples} validation examples were asked for, "
                         f"but the training set has {len(full.train_labels)}")
    rows = torch.randperm(len(full.train_labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    validation, train = rows[:validation_examples], rows[validation_examples:wanted]
    test = full.subset(test=test_examples, seed=SPLIT_SEED) if test_examples else full
    fit = dataclasses.replace(full, train_images=full.train_images[train], train_labels=full.train_labels[train],
                              test_images=full.train_images[validation], test_labels=full.train_labels[validation])
    return fit, test.test_images, test.test_labels


@dataclass
class _SplitContext(RunContext):
    """A run context whose data set is the fit split: the trainer then "tests" on the validation split."""

    fit: Optional[FashionMNIST] = None

    def dataset(self):
        return self.fit


def train_with_validation(params: dict, context: RunContext) -> dict:
    """The shared "train" run on the validation split, then the accuracies of its final network.

    params: TrainConfig fields plus train_examples, validation_examples, test_examples (None: all) and
    precise_batch (the batch size for recomputing the BN statistics).
    Returns {"status", "curve": per epoch train_loss, train_acc, val_loss, val_acc (moving averages),
    examples_per_sec, "test_acc" (moving averages), "val_acc_precise", "test_acc_precise" (precise
    statistics)}; the accuracies are None when the run diverged, which also adds "diverged".
    """
    split = {key: params[key] for key in SPLIT_KEYS}
    fit, test_images, test_labels = validation_split(context.dataset(), **split)
    training = {k: v for k, v in params.items() if k not in (*SPLIT_KEYS, "precise_batch")}
    result, net = trained_network(training, _SplitContext(context.run_dir, context.data_dir, context.download, fit))
    curve = [{"epoch": h["epoch"], "train_loss": h["train_loss"], "train_acc": h["train_acc"],
              "val_loss": h["test_loss"], "val_acc": h["test_acc"], "examples_per_sec": h["examples_per_sec"]}
             for h in result["history"]]
    accuracies = {"test_acc": None, "val_acc_precise": None, "test_acc_precise": None}
    if net:
        cpu = torch.device("cpu")
        precise = with_precise_statistics(net, fit.train_images, fit.train_labels, params["precise_batch"])
        accuracies = {"test_acc": evaluate(net, test_images, test_labels, cpu)[1],
                      "val_acc_precise": evaluate(precise, fit.test_images, fit.test_labels, cpu)[1],
                      "test_acc_precise": evaluate(precise, test_images, test_labels, cpu)[1]}
    extra = {"diverged": result["diverged"]} if "diverged" in result else {}
    return {"status": result["status"], "curve": curve, **accuracies, **extra}


def batch_one_refusal(params: dict, context: RunContext) -> dict:
    """Ask bnlab's trainer for BN-LeNet (BN on every layer, linear ones included) at batch size 1.

    Returns {"refused": whether it raised ValueError, "message": its text (or "")}.
    """
    try:
        train_run({**params, "batch_size": 1}, context)
    except ValueError as exc:
        return {"refused": True, "message": str(exc)}
    return {"refused": False, "message": ""}


def final_val(result: dict) -> float:
    """Validation accuracy of the final network with precise statistics (nan when the run diverged)."""
    return result["val_acc_precise"] if result["status"] == "ok" else float("nan")


def validation_text(results: list[dict]) -> str:
    """Final validation accuracy over seeds, and how many seeds diverged."""
    diverged = sum(r["status"] != "ok" for r in results)
    return fmt([final_val(r) for r in results]) + (f" ({diverged} diverged)" if diverged else "")


def test_accuracies(results: list[dict], key: str = "test_acc_precise") -> list[float]:
    return [r[key] for r in results if r["status"] == "ok"]


def examples_per_sec(result: dict) -> float:
    curve = result["curve"]
    return sum(c["examples_per_sec"] for c in curve) / len(curve) if curve else float("nan")


def choose_lr(by_lr: dict[float, list[dict]]) -> Optional[float]:
    """The rate with the best mean final validation accuracy among those where no seed diverged."""
    usable = {lr: rs for lr, rs in by_lr.items() if all(r["status"] == "ok" for r in rs)}
    if not usable:
        return None
    return max(usable, key=lambda lr: mean_std([final_val(r) for r in usable[lr]])[0])


class BatchSize(Study):
    name = "batch-size"
    question = ("Does BN-LeNet work best with minibatches of 50–100, as the chapter says, when every batch size "
                "gets the same epochs and its own tuned learning rate; and what happens at batch size 1?")
    full_runtime = "about 40 minutes on 2 cores (193 runs of 5 epochs on 10240 examples, --jobs 2)"
    quick_plan = QUICK_PLAN
    full_plan = FULL_PLAN

    def runs(self, settings: Settings) -> list[Run]:
        plan = self.plan(settings)
        seeds = settings.seed_list(FULL_SEEDS)
        base = {"model": "bn-lenet", "epochs": plan.epochs, "precise_batch": PRECISE_BATCH, **plan.split}
        grid = [Run("batch-size-train", {**base, "batch_size": size, "lr": lr, "seed": seed})
                for size in plan.sizes for lr in plan.lr_grid(size) for seed in seeds]
        batch_one = [Run("batch-size-train", {**base, "batch_size": 1, "lr": round_lr(scaled_lr(1)), "seed": seed,
                                              "model_options": CONV_ONLY}) for seed in seeds]
        refusal = Run("batch-one-refusal", {"model": "bn-lenet", "epochs": 1, "train_subset": 100, "test_subset": 100})
        return grid + batch_one + [refusal]

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        plan = self.plan(settings)
        by_config = defaultdict(list)
        refusal = None
        for o in outcomes:
            if o.run.kind == "batch-one-refusal":
                refusal = o.result
                continue
            p = o.run.params
            by_config[(p["batch_size"], p["lr"], bool(p.get("model_options")))].append(o.result)
        sizes = plan.sizes
        chosen = {size: choose_lr({lr: by_config[(size, lr, False)] for lr in plan.lr_grid(size)}) for size in sizes}
        picked = {size: by_config[(size, chosen[size], False)] if chosen[size] else [] for size in sizes}
        test = {size: test_accuracies(picked[size]) for size in sizes}
        test_moving = {size: test_accuracies(picked[size], "test_acc") for size in sizes}
        batch_one_lr = round_lr(scaled_lr(1))
        batch_one_runs = by_config[(1, batch_one_lr, True)]
        batch_one = test_accuracies(batch_one_runs)

        table = self._table(plan, by_config, chosen, picked, test, test_moving)
        batch_one_rows = markdown_table(
            ["batch", "model", "lr", "test acc", "test acc, moving averages", "train loss"],
            [[1, "BN on the convolutions only (placement conv)", f"{batch_one_lr:g}", fmt(batch_one),
              fmt(test_accuracies(batch_one_runs, "test_acc")),
              fmt([r["curve"][-1]["train_loss"] for r in batch_one_runs if r["curve"]])]])

        best = self._best(sizes, test)
        conclusions = self._sweet_spot(sizes, test, best) + self._extremes(sizes, test, picked, best)
        conclusions += self._moving_averages(sizes, test, test_moving)
        conclusions += self._batch_of_one(refusal, batch_one, test, sizes)
        conclusions += self._edges(plan, chosen, by_config)
        plots = [self._plot(plan, test, test_moving, by_config, batch_one, settings)]
        return Report(
            title="batch-size: is 50–100 the best minibatch size for batch normalization?",
            question=self.question,
            settings=self._fixed_settings(plan, settings, batch_one_lr),
            varied={"batch size": sizes},
            sections=[("Results per batch size (final epoch; accuracy with precise statistics unless the column "
                       "says otherwise; test accuracy at the chosen rate; mean ± std over seeds)", table),
                      ("Batch size 1", batch_one_rows + "\n\nThe trainer's answer to bn-lenet at batch size 1:\n\n"
                       + (f"> {refusal['message']}" if refusal and refusal["refused"] else "> (no error was raised)"))],
            conclusions=conclusions,
            plots=plots,
        )

    @staticmethod
    def _table(plan, by_config, chosen, picked, test, test_moving) -> str:
        rows = []
        for size in plan.sizes:
            grid_text = ", ".join(f"{lr:g}: {validation_text(by_config[(size, lr, False)])}"
                                  for lr in plan.lr_grid(size))
            chosen_text = (f"{chosen[size]:g}" + (" (edge)" if plan.at_edge(size, chosen[size]) else "")
                           if chosen[size] else "none (all diverged)")
            rows.append([size, grid_text, chosen_text, fmt(test[size]), fmt(test_moving[size]),
                         fmt([r["curve"][-1]["train_loss"] for r in picked[size]]),
                         fmt([examples_per_sec(r) for r in picked[size]], 0)])
        return markdown_table(["batch", "validation acc per lr", "chosen lr", "test acc", "test acc, moving averages",
                               "train loss", "examples/s"], rows)

    @staticmethod
    def _fixed_settings(plan, settings: Settings, batch_one_lr: float) -> dict:
        split = plan.split
        return {
            "data": (f"Fashion-MNIST: {split['train_examples']} training and {split['validation_examples']} "
                     f"validation examples, disjoint seeded draws (seed {SPLIT_SEED}) from the training set; "
                     f"test set: {split['test_examples'] or 'all 10000'} examples"),
            "model": "bn-lenet (sigmoid, average pooling, bnlab's BN after every conv and linear layer)",
            "optimizer": "plain SGD, no momentum",
            "epochs": f"{plan.epochs} at every batch size (matched epochs: the same examples seen as often)",
            "learning-rate grid": f"0.1 * sqrt(batch / 128) x {', '.join(f'{f:g}' for f in plan.lr_factors)}, "
                                  "3 significant digits",
            "prediction": (f"precise statistics: every BN's running statistics recomputed exactly over the "
                           f"{split['train_examples']} training examples, in batches of {PRECISE_BATCH}; the "
                           "accuracy with the moving averages (momentum 0.1) is reported beside it"),
            "selection": "the rate with the best mean final validation accuracy over seeds (precise statistics; "
                         "a rate with a diverged seed is excluded); test accuracy is reported for that rate only",
            "seeds": len(settings.seed_list(FULL_SEEDS)),
            "batch of one": (f"bn-lenet asked of the trainer at batch 1; a LeNet with BN on its convolutions "
                             f"only trained at batch 1, lr {batch_one_lr:g} (the rule's value, not tuned)"),
        }

    @staticmethod
    def _best(sizes, test) -> Optional[int]:
        ranked = [size for size in sizes if test[size]]
        return max(ranked, key=lambda size: mean_std(test[size])[0]) if ranked else None

    @staticmethod
    def _sweet_spot(sizes, test, best) -> list[str]:
        if best is None:
            return ["No batch size trained without divergence at any rate of its grid."]
        ranked = [size for size in sizes if test[size]]
        inside = [size for size in ranked if SWEET_SPOT[0] <= size <= SWEET_SPOT[1]]
        text = f"The best batch size is {best} (test accuracy {fmt(test[best])} at its chosen rate)"
        near = [size for size in ranked if size != best and difference(test[best], test[size])[1] == Verdict.WITHIN_NOISE]
        if near:
            text += f"; within seed noise of it: {', '.join(map(str, near))}"
        if best in inside:
            return [f"{text}: it lies in 50–100, so the chapter's sweet spot holds."]
        if not inside:
            return [f"{text}; no tested size lies in 50–100, so the sweet spot is not tested."]
        gap, how = difference(test[best], test[inside[0]])
        verdict = {
            Verdict.CLEAR: "the chapter's 50–100 sweet spot does not hold here",
            Verdict.WITHIN_NOISE: "the sweet spot is not contradicted, but the data do not single it out either",
            Verdict.SINGLE_SEED: "with one seed per size there is no noise estimate to judge it (use --seeds 2 or more)",
        }[how]
        return [f"{text}. Batch {inside[0]}, the tested size in 50–100, trails it by {gap:.3f} ({how}): {verdict}."]

    @staticmethod
    def _extremes(sizes, test, picked, best) -> list[str]:
        if best is None or sum(bool(test[size]) for size in sizes) < 2:
            return []
        lines = []
        for size in (sizes[0], sizes[-1]):
            if size == best or not test[size]:
                continue
            gap, how = difference(test[size], test[best])
            lines.append(f"Batch {size}: test accuracy {fmt(test[size])}, {gap:+.3f} against batch {best} ({how}).")
        small, large = sizes[0], sizes[-1]
        speed = {size: mean_std([examples_per_sec(r) for r in picked[size]])[0] for size in (small, large)
                 if picked[size]}
        if len(speed) == 2:
            lines.append(f"Cost: an epoch at batch {small} processes {speed[small]:.0f} examples/s against "
                         f"{speed[large]:.0f} at batch {large}, so matched epochs take {speed[large] / speed[small]:.0f}x "
                         f"longer at batch {small}.")
        return lines

    @staticmethod
    def _moving_averages(sizes, test, test_moving) -> list[str]:
        scored = [size for size in sizes if test[size] and test_moving[size]]
        if not scored:
            return []
        change = {size: mean_std(test_moving[size])[0] - mean_std(test[size])[0] for size in scored}
        worst = min(scored, key=change.get)
        text = (f"Predicting with the moving averages instead of precise statistics changes test accuracy at the "
                f"chosen rates by {min(change.values()):+.3f} to {max(change.values()):+.3f} (most at batch {worst}: "
                f"{fmt(test_moving[worst])} vs {fmt(test[worst])})")
        if all(len(test[size]) > 1 for size in scored):
            spread = [(mean_std(test_moving[size])[1], mean_std(test[size])[1]) for size in scored]
            text += (f"; the seed-to-seed std averages {sum(m for m, _ in spread) / len(spread):.3f} with them "
                     f"against {sum(p for _, p in spread) / len(spread):.3f} with precise statistics")
        return [text + "."]

    @staticmethod
    def _edges(plan, chosen, by_config) -> list[str]:
        """Sizes whose chosen rate is an end of the grid, with the validation accuracy there and at the
        neighbouring rate: still rising, or on a plateau."""
        cases = []
        for size in plan.sizes:
            if not plan.at_edge(size, chosen[size]):
                continue
            grid = plan.lr_grid(size)
            neighbour = grid[1] if chosen[size] == grid[0] else grid[-2]
            cases.append(f"batch {size}: {chosen[size]:g} scores {validation_text(by_config[(size, chosen[size], False)])}, "
                         f"{neighbour:g} {validation_text(by_config[(size, neighbour, False)])}")
        if not cases:
            return []
        return [f"The chosen rate lies at an end of its grid for {len(cases)} size(s), so a rate beyond it might do "
                f"better there; validation accuracy at that end and next to it — {'; '.join(cases)}."]

    @staticmethod
    def _batch_of_one(refusal, batch_one, test, sizes) -> list[str]:
        lines = []
        if refusal is not None:
            if refusal["refused"]:
                lines.append(f"At batch size 1 the trainer refuses bn-lenet (BN on its linear layers) with a ValueError: "
                             f"\"{refusal['message']}\"")
            else:
                lines.append("At batch size 1 the trainer did NOT refuse bn-lenet, although its linear-layer BN sees one "
                             "value per channel.")
        if batch_one:
            smallest = sizes[0]
            compare = (f"; all-layer BN at batch {smallest} reaches {fmt(test[smallest])}" if test[smallest] else "")
            lines.append(f"BN on the convolutions only is defined at batch 1 (H*W values per channel) and trains there: "
                         f"test accuracy {fmt(batch_one)}, against 0.1 for chance{compare}.")
        else:
            lines.append("BN on the convolutions only diverged at batch size 1.")
        return lines

    @staticmethod
    def _plot(plan, test, test_moving, by_config, batch_one, settings):
        sizes = plan.sizes
        fig, (left, right) = subplots(1, 2, figsize=(11, 3.8))
        plot_against_batch_size(left, {"precise statistics": {s: test[s] for s in sizes if test[s]},
                                       "moving averages": {s: test_moving[s] for s in sizes if test_moving[s]}},
                                "test accuracy")
        if batch_one:
            mean, std = mean_std(batch_one)
            left.errorbar([1], [mean], yerr=[std], fmt="D", color="C3", capsize=3, label="BN on convs only, batch 1")
            left.set_xticks([1, *sizes], [str(size) for size in (1, *sizes)])
        left.axvspan(*SWEET_SPOT, color="C2", alpha=0.15, label="the chapter's 50–100")
        left.set_title("test accuracy at each size's chosen rate")
        left.legend(fontsize=7)
        by_position = {}
        for position, factor in enumerate(plan.lr_factors):
            by_position[f"lr = rule x {factor:g}"] = {
                size: [final_val(r) for r in by_config[(size, plan.lr_grid(size)[position], False)]] for size in sizes}
        plot_against_batch_size(right, by_position, "final validation accuracy")
        right.set_title("validation accuracy per rate of the grid (diverged: gap)")
        right.legend(fontsize=7)
        return saved_plot(fig, settings, "batch_size_accuracy.png",
                          "Left: test accuracy at each batch size's chosen learning rate, with precise statistics and with the "
                          "moving averages (mean ± std over seeds; shaded: the chapter's 50–100). Right: final validation "
                          "accuracy (precise statistics) for each rate of the grid, rule = 0.1·sqrt(batch/128).")