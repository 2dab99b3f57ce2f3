"""Study `shift`: when the test data moves away from the training data, what can batch norm's statistics do?

BN-LeNet is trained on clean Fashion-MNIST (the chapter's current setting: 10 epochs on all of it), with
group-norm and layer-norm LeNets as controls that have no statistics to adapt. Every final network is
evaluated on the test set under bnlab's synthetic corruptions (`bnlab.corruptions`: Gaussian noise,
blur, contrast, brightness, translation, inversion) at severities 1–3, and on the clean test set, four ways
(`bnlab.adapt`, none of them sees a label):

- none: eval mode with the training set's running statistics;
- adabn: running statistics recomputed exactly over the corrupted test set (Li et al., 2016);
- batch-stats: each test batch normalized by its own statistics;
- tent: online entropy minimization over γ and β with each batch's statistics (Wang et al., 2021);
  one SGD step per batch, `bnlab.adapt`'s default lr 0.1 × B / 128 for batches of B, momentum 0.9,
  no reset.

batch-stats and tent depend on the target batch size, which varies (`BATCH_SIZES`); adabn pools over
the whole test set, so its batch size does not matter. The test set is taken in its stored order.
The evaluation runs on one thread: its small batches are bound by per-call overhead, and two threads
on a shared machine made batch-stats at batch 8 twenty times slower.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from bnlab import adapt
from bnlab.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from bnlab.data import to_input
from bnlab.studies.engine import (FULL_SEEDS, Outcome, Report, Run, RunContext, Settings, Study, difference, fmt,
                                  markdown_table, mean_std, save_figure, subplots, trained_network, training_params)

NORMS = {"batchnorm": {}, "groupnorm": {"norm": "groupnorm"}, "layernorm": {"norm": "layernorm"}}
BATCH_SIZES = {"full": (8, 32, 128), "quick": (8, 128)}
SEVERITY_LEVELS = {"full": (1, 2, 3), "quick": (3,)}  # --quick: the strongest level only
# --quick: 2 epochs on a seeded 3,000 training images, 500 test images evaluated, so that it fits the test suite
QUICK_TRAINING = {"train_subset": 3000, "test_subset": 500}
ADAPTING = ("batch-stats", "tent")  # the methods whose result depends on the target batch size
TENT_LR = "0.1*B/128"  # bnlab.adapt's default (adapt.tent_lr); in the run's parameters, so a change redoes it
EVAL_BATCH = 1000  # none and adabn: the batch size only groups the work


def conditions(severities) -> list[tuple[str, int]]:
    """(corruption, severity) pairs evaluated: the clean test set ("clean", 0), then every corruption at
    every severity of `severities`."""
    return [("clean", 0)] + [(name, s) for name in CORRUPTIONS for s in severities]


def _key(corruption: str, severity: int) -> str:
    return f"{corruption}/{severity}"


def _accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((outputs.argmax(1) == labels).double().mean()), 4)


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def accuracies_under_shift(net, images: torch.Tensor, labels: torch.Tensor, batch_sizes, severities,
                           adaptable: bool) -> dict:
    """{condition: {method or method@batch: test accuracy}} for every condition of `conditions(severities)`;
    only "none" for a network without batch norm."""
    with _one_thread():
        return _accuracies(net, images, labels, batch_sizes, severities, adaptable)


def _accuracies(net, images, labels, batch_sizes, severities, adaptable: bool) -> dict:
    results = {}
    for name, severity in conditions(severities):
        x = images if severity == 0 else corrupt(images, name, severity, seed=severity)
        with torch.no_grad():
            row = {"none": _accuracy(torch.cat([net(b) for b in x.split(EVAL_BATCH)]), labels)}
        if adaptable:
            row["adabn"] = _accuracy(adapt.predict(net, x.split(EVAL_BATCH), method="adabn"), labels)
            for size in batch_sizes:
                for method in ADAPTING:
                    outputs = adapt.predict(net, x.split(size), method=method)
                    row[f"{method}@{size}"] = _accuracy(outputs, labels)
        results[_key(name, severity)] = row
    return results


def shift_run(params: dict, context: RunContext) -> dict:
    """Train (the shared "train" run with params["train"]), then the accuracies under shift of the final
    network: {"status", "history", "accuracy": {condition: {method: acc}}}."""
    result, net = trained_network(params["train"], context)
    if net is None:
        return result
    train = params["train"]
    dataset = context.dataset().subset(train.get("train_subset"), train.get("test_subset"), seed=train["seed"])
    adaptable = not train["model_options"]  # batch norm; the controls have no statistics
    return {**result, "accuracy": accuracies_under_shift(net, to_input(dataset.test_images), dataset.test_labels,
                                                         params["batch_sizes"], params["severities"], adaptable)}


def _methods(batch_sizes) -> list[str]:
    return ["none", "adabn"] + [f"{m}@{b}" for b in batch_sizes for m in ADAPTING]


class Shift(Study):
    name = "shift"
    question = ("When the test images are corrupted (noise, blur, contrast, brightness, translation, inversion), how "
                "much accuracy do adapting BN's statistics (AdaBN), each batch's statistics and tent recover, against "
                "group and layer norm that have no statistics to adapt, and how small may the test batches be?")
    full_runtime = ("about 20 minutes on 2 cores (9 runs of 10 epochs, then 19 test conditions each, --jobs 2; "
                    "measured 20 under load)")

    def runs(self, settings: Settings) -> list[Run]:
        mode = "quick" if settings.quick else "full"
        return [Run("shift", {"train": self._training(settings, seed, options), "batch_sizes": list(BATCH_SIZES[mode]),
                              "severities": list(SEVERITY_LEVELS[mode]), "tent_lr": TENT_LR})
                for options in NORMS.values() for seed in settings.seed_list(FULL_SEEDS)]

    @staticmethod
    def _training(settings: Settings, seed: int, options: dict) -> dict:
        params = training_params("current", settings, seed, options)
        return {**params, **QUICK_TRAINING} if settings.quick else params

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        mode = "quick" if settings.quick else "full"
        sizes, levels = BATCH_SIZES[mode], (0, *SEVERITY_LEVELS[mode])  # 0: clean
        acc = defaultdict(list)  # (norm, condition, method) -> accuracies over seeds
        diverged = 0
        for o in outcomes:
            norm = next(n for n, opts in NORMS.items() if opts == o.run.params["train"]["model_options"])
            if "accuracy" not in o.result:
                diverged += 1
                continue
            for condition, row in o.result["accuracy"].items():
                for method, value in row.items():
                    acc[(norm, condition, method)].append(value)
        mean_over = self._severity_means(acc, sizes, levels)
        conclusions = self._conclusions(acc, mean_over, sizes)
        if diverged:
            conclusions.append(f"{diverged} run(s) diverged and are left out of every statistic.")
        return Report(
            title="shift: batch norm when the test data moves",
            question=self.question,
            settings={
                "data": "Fashion-MNIST" + (" (seeded subsets: {train_subset} train / {test_subset} test)".format(
                                               **QUICK_TRAINING) if settings.quick
                                           else " (60000 train / 10000 test)"),
                "training": "the chapter's current setting: lr 0.1, batch 128, plain SGD, "
                            f"{self._training(settings, 0, {})['epochs']} epochs, clean images",
                "models": "bn-lenet (bnlab's BN); controls: the same LeNet with GroupNorm (groups of at most 4 "
                          "channels) or layer norm in place of every BN",
                "corruptions": "; ".join(f"{n} {SEVERITIES[n]}" for n in CORRUPTIONS) + " (bnlab.corruptions)",
                "methods": "none, adabn (exact statistics of the whole corrupted test set), batch-stats, tent (1 SGD "
                           "step per batch, bnlab.adapt's default lr 0.1 × B / 128 for test batches of B, momentum "
                           "0.9, online, no reset)",
                "seeds": len(settings.seed_list(FULL_SEEDS)),
            },
            varied={"norm": list(NORMS), "target batch size (batch-stats, tent)": list(sizes),
                    "condition": [_key(*c) for c in conditions(levels[1:])]},
            sections=[("Mean test accuracy over the six corruptions, per severity", self._severity_table(mean_over, sizes, levels)),
                      ("Accuracy at severity 3 per corruption (batch norm)", self._corruption_table(acc, sizes)),
                      ("Target batch size: mean accuracy over every corrupted condition (batch norm)",
                       self._batch_size_table(acc, sizes, levels))],
            conclusions=conclusions,
            plots=[self._plot(mean_over, sizes, levels, settings)],
        )

    @staticmethod
    def _severity_means(acc, sizes, levels) -> dict:
        """(norm, severity, method) -> per seed, the mean accuracy over the corruptions at that severity."""
        out = {}
        for norm in NORMS:
            for severity in levels:
                keys = ["clean/0"] if severity == 0 else [_key(n, severity) for n in CORRUPTIONS]
                for method in _methods(sizes):
                    columns = [acc[(norm, c, method)] for c in keys]
                    if all(columns):
                        out[(norm, severity, method)] = [sum(v) / len(v) for v in zip(*columns)]
        return out

    @staticmethod
    def _severity_table(mean_over, sizes, levels) -> str:
        rows = [[norm, method] + [fmt(mean_over.get((norm, s, method), [])) for s in levels]
                for norm in NORMS for method in _methods(sizes) if (norm, 0, method) in mean_over]
        return markdown_table(["norm", "method", "clean"] + [f"severity {s}" for s in levels[1:]], rows)

    @staticmethod
    def _corruption_table(acc, sizes) -> str:
        methods = ["none", "adabn", f"batch-stats@{max(sizes)}", f"tent@{max(sizes)}"]
        rows = [[name] + [fmt(acc[("batchnorm", _key(name, 3), m)]) for m in methods]
                + [fmt(acc[(norm, _key(name, 3), "none")]) for norm in ("groupnorm", "layernorm")]
                for name in CORRUPTIONS]
        return markdown_table(["corruption"] + [f"BN {m}" for m in methods] + ["GroupNorm", "LayerNorm"], rows)

    @staticmethod
    def _batch_size_table(acc, sizes, levels) -> str:
        corrupted = [_key(*c) for c in conditions(levels[1:])[1:]]

        def overall(method):
            columns = [acc[("batchnorm", c, method)] for c in corrupted]
            return fmt([sum(v) / len(v) for v in zip(*columns)]) if all(columns) else "—"

        rows = [[size] + [overall(f"{m}@{size}") for m in ADAPTING] + [overall("none"), overall("adabn")] for size in sizes]
        return markdown_table(["target batch", "batch-stats", "tent", "none (any batch)", "adabn (pooled)"], rows)

    @staticmethod
    def _conclusions(acc, mean_over, sizes) -> list[str]:
        big, small = max(sizes), min(sizes)

        def at(norm, severity, method):
            return mean_over.get((norm, severity, method), [])

        lines = []
        none3 = at("batchnorm", 3, "none")
        if not none3:
            return ["Every batch-norm run diverged: nothing to compare."]
        parts = []
        for method in ("adabn", f"batch-stats@{big}", f"tent@{big}"):
            gain, how = difference(at("batchnorm", 3, method), none3)
            parts.append(f"{method} {fmt(at('batchnorm', 3, method))} ({gain:+.3f}, {how})")
        controls = "; ".join(f"{n} {fmt(at(n, 3, 'none'))}" for n in ("groupnorm", "layernorm") if at(n, 3, "none"))
        lines.append(f"At severity 3, averaged over the six corruptions, BN-LeNet without adaptation scores {fmt(none3)}; "
                     f"adapted: {'; '.join(parts)}. The controls without statistics: {controls}.")
        clean = [f"{m} {difference(at('batchnorm', 0, m), at('batchnorm', 0, 'none'))[0]:+.3f}"
                 for m in ("adabn", f"batch-stats@{big}", f"tent@{big}")]
        lines.append(f"On the clean test set adaptation changes BN's accuracy ({fmt(at('batchnorm', 0, 'none'))}) by "
                     f"{', '.join(clean)}.")
        for method in ADAPTING:
            gain, how = difference(at("batchnorm", 3, f"{method}@{small}"), at("batchnorm", 3, f"{method}@{big}"))
            lines.append(f"{method} with test batches of {small} instead of {big}: {fmt(at('batchnorm', 3, f'{method}@{small}'))} "
                         f"at severity 3 ({gain:+.3f}, {how}); on clean data "
                         f"{fmt(at('batchnorm', 0, f'{method}@{small}'))}.")
        best = {}
        for name in CORRUPTIONS:
            scores = {m: mean_std(acc[("batchnorm", _key(name, 3), m)])[0] for m in _methods(sizes)}
            best[name] = max(scores, key=scores.get)
        lines.append("Best BN method per corruption at severity 3: " + ", ".join(f"{n} {m}" for n, m in best.items()) + ".")
        return lines

    @staticmethod
    def _plot(mean_over, sizes, severities, settings):
        fig, ax = subplots(figsize=(7, 4))
        curves = [("batchnorm", m) for m in ("none", "adabn", f"batch-stats@{max(sizes)}", f"tent@{max(sizes)}",
                                               f"tent@{min(sizes)}")]
        curves += [("groupnorm", "none"), ("layernorm", "none")]
        for norm, method in curves:
            if all((norm, s, method) in mean_over for s in severities):
                means = [mean_std(mean_over[(norm, s, method)])[0] for s in severities]
                ax.plot(severities, means, "o-" if norm == "batchnorm" else "s--", label=f"{norm}: {method}")
        ax.set_xticks(severities, ["clean"] + [str(s) for s in severities[1:]])
        ax.set_xlabel("severity")
        ax.set_ylabel("test accuracy (mean over corruptions and seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, settings.out / "shift_accuracy.png")
        return ("shift_accuracy.png", "Mean test accuracy over the six corruptions against severity, per norm and "
                                      "adaptation method (method@B: test batches of B).")
