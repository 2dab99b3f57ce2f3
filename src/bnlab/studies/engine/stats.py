"""Statistics over seeds, reading training results, and the gain tables and findings of the studies that
ask which variants of a method recover its gain: what every study's numbers go through.

A study runs each configuration with several seeds; `fmt` shows mean ± sample std, and `difference`
says whether two configurations differ by more than their seed-to-seed spread, as a `Verdict`.

Example::

    difference([0.88, 0.87, 0.89], [0.70, 0.71, 0.69])    # (0.18, Verdict.CLEAR)
    fmt([0.88, 0.87, 0.89])                                # '0.880 ± 0.010'
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

from bnlab.studies.engine.report import markdown_table
from bnlab.studies.engine.runner import Outcome
from bnlab.training import PRESETS


class Verdict(enum.StrEnum):
    """How clear a difference between two sets of seeds is (the text is what reports print)."""

    CLEAR = "clear"  # more than twice its standard error (Welch)
    WITHIN_NOISE = "within noise"  # not more than that
    SINGLE_SEED = "single seed"  # one side has one value: no spread to compare with


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN mean for no values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """'0.872 ± 0.004' over seeds; a single value without the ±; '—' for none."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    n = len([v for v in values if v is not None and not math.isnan(v)])
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, Verdict]:
    """(mean(a) - mean(b), how clear that is given the seed-to-seed spread): CLEAR when the difference
    exceeds twice its standard error sqrt(s_a²/n_a + s_b²/n_b) (Welch), WITHIN_NOISE when it does not,
    SINGLE_SEED when either side has one value."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2:
        return diff, Verdict.SINGLE_SEED
    standard_error = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if standard_error == 0:
        return diff, Verdict.CLEAR if diff != 0 else Verdict.WITHIN_NOISE
    return diff, Verdict.CLEAR if abs(diff) > 2 * standard_error else Verdict.WITHIN_NOISE


def share_of_gain(variant: Sequence[float], full: Sequence[float], baseline: Sequence[float]) -> Optional[float]:
    """(mean(variant) - mean(baseline)) / (mean(full) - mean(baseline)): how much of the full method's gain
    over the baseline the variant recovers (1 = all of it, 0 = none, negative = worse than the baseline).
    None when the full method does not beat the baseline, so that there is no gain to share."""
    v, f, b = (mean_std(values)[0] for values in (variant, full, baseline))
    if not f - b > 0:
        return None
    return (v - b) / (f - b)


@dataclass
class GainRecovery:
    """How much of a method's gain over a baseline its variants recover (see `gain_recovery`)."""

    gain: float  # mean(full) - mean(baseline)
    verdict: Verdict  # of that gain
    shares: Optional[dict[str, float]]  # variant -> share_of_gain; None when full does not beat the baseline
    best: Optional[str] = None  # the variant with the largest share (the first one on a tie)
    gap: float = math.nan  # mean(best) - mean(full)
    gap_verdict: Optional[Verdict] = None

    def best_against_full(self, *, single_seed: str, within_noise: str, below: str, above: str) -> str:
        """The sentence that fits how the best variant compares with the full method."""
        if self.gap_verdict == Verdict.SINGLE_SEED:
            return single_seed
        if self.gap_verdict == Verdict.WITHIN_NOISE:
            return within_noise
        return below if self.gap < 0 else above


def gain_recovery(full: Sequence[float], baseline: Sequence[float],
                  variants: dict[str, Sequence[float]]) -> GainRecovery:
    """The full method's gain over the baseline, the share of it each variant recovers, and how the
    best variant compares with the full method (values over seeds throughout)."""
    gain, verdict = difference(full, baseline)
    shares = {name: share_of_gain(values, full, baseline) for name, values in variants.items()}
    if any(share is None for share in shares.values()):
        return GainRecovery(gain, verdict, None)
    best = max(shares, key=shares.get)
    gap, gap_verdict = difference(variants[best], full)
    return GainRecovery(gain, verdict, shares, best, gap, gap_verdict)


def gain_columns(variant: Sequence[float], full: Sequence[float], baseline: Sequence[float]) -> list[str]:
    """Table cells for a variant of a method: the share of the method's gain it recovers, and its difference
    to the full method with `difference`'s verdict (blank for the full method itself)."""
    if list(variant) == list(full):
        return ["100%", "—"]
    share = share_of_gain(variant, full, baseline)
    gap, verdict = difference(variant, full)
    return ["—" if share is None else f"{share:.0%}", f"{gap:+.3f} ({verdict})"]


# ---- reading results ------------------------------------------------------------------------------


def history_of(result: dict) -> list[dict]:
    return result.get("history", [])


def final(result: dict, metric: str, default=float("nan")) -> float:
    """The last epoch's `metric` of a training result; `default` if it has no epoch (diverged at once)."""
    history = history_of(result)
    return history[-1][metric] if history else default


def best(result: dict, metric: str = "test_acc", default=float("nan")) -> float:
    history = history_of(result)
    return max(h[metric] for h in history) if history else default


def finals(results: Sequence[dict], metric: str) -> list[float]:
    """The final epoch's `metric` of every run (NaN for a run that diverged before finishing an epoch)."""
    return [final(r, metric) for r in results]


def diverged_count(results: Sequence[dict]) -> int:
    return sum(r["status"] == "diverged" for r in results)


def group_results(outcomes: Sequence[Outcome], key: Callable[[dict], Hashable]) -> dict:
    """Results (lists over seeds) by `key(run parameters)`."""
    groups = defaultdict(list)
    for outcome in outcomes:
        groups[key(outcome.run.params)].append(outcome.result)
    return groups


# ---- a method and its variants under both presets -------------------------------------------------------
# For a study of which variants of a method (configurations, results keyed (preset, name)) recover its gain
# over a baseline configuration.


def gain_table(results: dict, names: Sequence[str], full: str, baseline: str, name_header: str,
               columns: dict[str, Callable[[str, list[dict]], str]], gain_headers: tuple[str, str]) -> str:
    """The results table: a row per preset and configuration with the `columns` (header -> the cell of a
    configuration's name and runs), the `gain_columns` against `full` and `baseline` under `gain_headers`,
    and how many runs diverged."""
    rows = []
    for preset in PRESETS:
        accuracy = {name: finals(results[(preset, name)], "test_acc") for name in names}
        for name in names:
            rs = results[(preset, name)]
            rows.append([preset, name, *(cell(name, rs) for cell in columns.values()),
                         *gain_columns(accuracy[name], accuracy[full], accuracy[baseline]),
                         f"{diverged_count(rs)}/{len(rs)}"])
    return markdown_table(["preset", name_header, *columns, *gain_headers, "diverged"], rows)


def gain_findings(preset: str, accuracy: Callable[[str, str], Sequence[float]], full: str, baseline: str,
                  variants: Sequence[str], *, full_label: str, baseline_label: str, no_gain: str,
                  recovered: Callable[[GainRecovery], list[str]], also: str = "") -> list[str]:
    """The findings on one preset: first how far `full` beats `baseline` (their `*_label`s name them in the
    text; `also` is appended to that sentence), then `no_gain` when it does not beat it, else the sentences
    `recovered` makes of the `gain_recovery` of the `variants`. `accuracy(preset, name)`: the final test
    accuracies over seeds."""
    full_accuracy, baseline_accuracy = accuracy(preset, full), accuracy(preset, baseline)
    r = gain_recovery(full_accuracy, baseline_accuracy, {name: accuracy(preset, name) for name in variants})
    opening = (f"{preset} preset (lr {PRESETS[preset]['lr']:g}): {full_label} reaches {fmt(full_accuracy)} test "
               f"accuracy vs {fmt(baseline_accuracy)} with {baseline_label} ({r.gain:+.3f}; {r.verdict}){also}.")
    sentences = [no_gain] if r.shares is None else recovered(r)
    return [opening, *(f"{preset} preset: {sentence}" for sentence in sentences)]
