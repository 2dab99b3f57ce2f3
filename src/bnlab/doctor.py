"""`bnlab doctor`: diagnose the batch-norm pitfalls of any PyTorch model, with evidence and a fix.

`diagnose(model, batches)` runs one check per pitfall on a copy of `model` (the model itself is never
changed) and returns a `Diagnosis`: a list of `Finding(code, severity, layers, evidence, fix)`. The
static checks read the model's modules, parameters and buffers; the data checks need `batches`, an
iterable of inputs or of (input, target) pairs, and are reported as skipped without them. Torch's
batch-norm layers and bnlab's are both recognised.

Each threshold comes from a bnlab study (docs/studies/):

- stale-running-stats: a gap in test accuracy between the running statistics and exact ones larger
  than twice the largest seed-to-seed standard deviation of BN-LeNet with recomputed statistics
  (population-stats: 0.004 to 0.010), i.e. more than `STALE_ACCURACY_GAP` = 0.02;
- small-batch: fewer than `SAFE_BATCH` = 8 samples per device (batch-size: 8 to 64 are within noise of
  the best size, 2 collapses; layer-norm: BN collapses at 2 while group and layer norm hold);
- dead-channels: |γ| below `DEAD_GAMMA` = 0.01 of the layer's largest |γ| (research: network slimming
  prunes |γ| < 0.01 at no accuracy cost).

Example:
    >>> import torch
    >>> from bnlab.doctor import diagnose
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8, momentum=0.9))
    >>> [f.code for f in diagnose(net.eval()).findings]
    ['foreign-momentum', 'bias-before-bn']
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, fx, nn

from bnlab import files
from bnlab.functional import convert_momentum
from bnlab.nn import recompute_stats
from bnlab.nn.batchnorm import BatchNormBase
from bnlab.nn.inference import _is_batch_norm, _pairs_from_graph, _pairs_from_sequentials

SEVERITIES = ("info", "warning", "error")
STALE_ACCURACY_GAP = 0.02  # 2 x the largest seed std with recomputed statistics (population-stats: 0.010)
SAFE_BATCH = 8  # batch-size and layer-norm studies: BN collapses at 2, holds from 4-8 samples on
DEAD_GAMMA = 0.01  # research study: network slimming prunes |gamma| < 0.01
FOREIGN_MOMENTUM = 0.5  # torch's convention: weight of the new batch; >= 0.5 forgets the past at once
EPS_RANGE = (1e-6, 1e-4)  # within 10x of torch's 1e-5
DEGENERATE_VAR = (1e-8, 1e8)  # running variances outside this range are degenerate
HALF_DTYPES = (torch.float16, torch.bfloat16)
_LINEAR_OPS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Flatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d,
               nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
               nn.Dropout3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class Finding:
    """One pitfall found: `code` (stable), `severity` ("info", "warning" or "error"), the `layers` it
    concerns (qualified module names), the measured `evidence` (JSON-able numbers) and a one-sentence
    `fix`."""

    code: str
    severity: str
    layers: list[str]
    evidence: dict
    fix: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")


@dataclass
class Diagnosis:
    """The findings of `diagnose`, the checks that ran, and those skipped with the reason."""

    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """No warning and no error (info findings allowed)."""
        return not any(f.severity != "info" for f in self.findings)

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def to_dict(self) -> dict:
        return {"healthy": self.healthy, "findings": [asdict(f) for f in self.findings], "checked": self.checked,
                "skipped": self.skipped}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [f"## bnlab doctor: {self._verdict()}", ""]
        for f in self.findings:
            lines += [f"### {f.severity}: `{f.code}`", "", f"- layers: {', '.join(f.layers) or 'the model'}",
                      f"- evidence: {_evidence_text(f.evidence)}", f"- fix: {f.fix}", ""]
        lines.append(f"Checks run: {', '.join(self.checked) or 'none'}.")
        lines += [f"Skipped `{code}`: {why}" for code, why in self.skipped.items()]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        lines = [f"bnlab doctor: {self._verdict()}"]
        for f in self.findings:
            lines.append(f"  [{f.severity}] {f.code} ({', '.join(f.layers) or 'the model'}): {_evidence_text(f.evidence)}")
            lines.append(f"      fix: {f.fix}")
        lines += [f"  skipped {code}: {why}" for code, why in self.skipped.items()]
        return "\n".join(lines)

    def _verdict(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        head = "healthy" if self.healthy else "findings"
        return f"{head} ({counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info)"


def _evidence_text(evidence: dict) -> str:
    def show(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {show(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(show(x) for x in v) + "]"
        return str(v)

    return "; ".join(f"{k} {show(v)}" for k, v in evidence.items())


# ---- the model's structure ------------------------------------------------------------------------------


def batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every batch norm proper with running statistics, bnlab's or torch's."""
    return [(name or "the model", m) for name, m in model.named_modules() if _is_batch_norm(m)]


def _any_batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BN, with or without running statistics (bnlab's family or torch's _BatchNorm)."""
    kinds = (BatchNormBase, nn.modules.batchnorm._BatchNorm)
    return [(name or "the model", m) for name, m in model.named_modules()
            if isinstance(m, kinds) and getattr(m, "eval_is_batch_norm", True)]


def _successors(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the modules that read its output: from the torch.fx graph (BNs as leaves), or the
    order of leaf modules when the model cannot be traced."""
    modules = dict(model.named_modules())

    class Leaves(fx.Tracer):
        def is_leaf_module(self, m, name):
            return _is_batch_norm(m) or super().is_leaf_module(m, name)

    try:
        graph = Leaves().trace(model)
    except Exception:  # untraceable (data-dependent control flow): registration order of the leaves
        leaves = [name for name, m in modules.items() if name and not list(m.children())]
        return {a: [b] for a, b in zip(leaves, leaves[1:])}
    following: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            following[node.target] = [u.target for u in node.users if u.op == "call_module"]
    return following


def _feeds_batch_norm(model: nn.Module, start: str, successors: dict[str, list[str]]) -> Optional[str]:
    """The BN that `start`'s output reaches through linear layers only (conv, linear, pooling, flatten,
    dropout), or None."""
    modules = dict(model.named_modules())
    frontier, seen = list(successors.get(start, [])), set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if _is_batch_norm(modules[name]):
            return name
        if isinstance(modules[name], _LINEAR_OPS):
            frontier += successors.get(name, [])
    return None


def _has_trained(model: nn.Module) -> bool:
    """Whether the BN affine parameters have left their initialization (γ = 1, β = 0)."""
    for _, bn in _any_batch_norms(model):
        if bn.weight is not None and not torch.all(bn.weight == 1):
            return True
        if bn.bias is not None and not torch.all(bn.bias == 0):
            return True
    return False


# ---- static checks ---------------------------------------------------------------------------------------


def check_train_mode(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """train-mode-at-inference: BN layers in training mode in the model handed over for inference."""
    layers = [name for name, bn in _any_batch_norms(model) if bn.training]
    if not layers:
        return []
    evidence = {"bn_layers_in_training_mode": len(layers), "bn_layers": len(_any_batch_norms(model))}
    if ctx.batches:
        as_given, in_eval = ctx.metrics(model, "as given"), ctx.metrics(ctx.eval_copy, "eval mode")
        evidence.update({"as_given": as_given, "eval_mode": in_eval})
    return [Finding("train-mode-at-inference", "error", layers, evidence,
                    "call model.eval() before inference: in training mode every prediction depends on the other "
                    "samples of its batch and the running statistics keep moving")]


def check_momentum(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """foreign-momentum: a momentum >= 0.5 in torch's convention, i.e. another framework's number."""
    findings = []
    for momentum in sorted({bn.momentum for _, bn in batch_norms(model) if bn.momentum is not None}):
        if momentum < FOREIGN_MOMENTUM:
            continue
        layers = [name for name, bn in batch_norms(model) if bn.momentum == momentum]
        converted = round(convert_momentum(momentum, "keras"), 6)
        findings.append(Finding(
            "foreign-momentum", "warning", layers,
            {"momentum": momentum, "new_batch_weight": momentum, "converted": converted},
            f"torch's momentum is the weight of the new batch, so {momentum} keeps only {1 - momentum:.3g} of the "
            f"past; if it was ported from Keras/Flax/MXNet set momentum={converted} "
            f"(bnlab.functional.convert_momentum({momentum}, 'keras'))"))
    return findings


def check_eps(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """unusual-eps: eps outside 10x of torch's 1e-5 (Keras uses 1e-3)."""
    findings = []
    for eps in sorted({bn.eps for _, bn in batch_norms(model)}):
        if EPS_RANGE[0] <= eps <= EPS_RANGE[1]:
            continue
        layers = [name for name, bn in batch_norms(model) if bn.eps == eps]
        variances = torch.cat([bn.running_var.double().flatten() for _, bn in batch_norms(model) if bn.eps == eps])
        shrink = torch.sqrt(variances / (variances + eps))
        findings.append(Finding(
            "unusual-eps", "info", layers,
            {"eps": eps, "channels": len(variances), "channels_var_below_10eps": int((variances < 10 * eps).sum()),
             "min_output_scale": float(shrink.min())},
            f"eps={eps} (torch's default is 1e-5, Keras' 1e-3) scales each normalized channel by "
            f"sqrt(var / (var + eps)); keep it if the weights were trained with it, otherwise set eps=1e-5"))
    return findings


def check_bias_before_bn(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """bias-before-bn: a conv/linear bias feeding a BN, which subtracts it again (the bias study)."""
    pairs = _pairs_from_graph(model)
    pairs = _pairs_from_sequentials(model) if pairs is None else pairs
    modules = dict(model.named_modules())
    biased = [(layer, bn) for layer, bn in pairs if getattr(modules[layer], "bias", None) is not None]
    if not biased:
        return []
    wasted = sum(modules[layer].bias.numel() for layer, _ in biased)
    return [Finding("bias-before-bn", "info", [layer for layer, _ in biased],
                    {"pairs": [f"{layer} -> {bn}" for layer, bn in biased], "wasted_parameters": wasted,
                     "bias_study_max_gradient_ratio": 8.9e-6},
                    "harmless but redundant: BN subtracts the mean and β takes the bias's role; build the layers with "
                    "bias=False to save the parameters")]


def check_small_batch(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """small-batch: fewer than SAFE_BATCH samples per device behind each BN's training statistics."""
    if ctx.per_device_batch is None:
        ctx.skip("small-batch", "needs per_device_batch (the training batch size on one device)")
        return []
    if ctx.per_device_batch >= SAFE_BATCH or not batch_norms(model):
        return []
    layers = [name for name, _ in batch_norms(model)]
    positions = ctx.positions_per_sample()
    evidence = {"per_device_batch": ctx.per_device_batch, "safe_batch": SAFE_BATCH}
    if positions:
        evidence["values_per_channel"] = {n: ctx.per_device_batch * p for n, p in positions.items()}
    return [Finding("small-batch", "warning", layers, evidence,
                    f"with {ctx.per_device_batch} samples per device the batch statistics are too noisy (the batch-size "
                    "study: batch 2 collapses BN-LeNet); use bnlab.nn.convert_sync_batchnorm across devices, "
                    "bnlab.nn.GhostBatchNorm2d, or bnlab.nn.GroupNorm")]


def check_untracked(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """untracked-stats: running statistics never updated, or degenerate, in a model that has trained."""
    if not _has_trained(model):
        return []
    never, degenerate = [], {}
    for name, bn in batch_norms(model):
        var = bn.running_var.double()
        at_init = torch.all(bn.running_mean == 0) and torch.all(var == 1)
        if bn.num_batches_tracked is not None and int(bn.num_batches_tracked) == 0 and at_init:
            never.append(name)
        bad = ~torch.isfinite(var) | (var < DEGENERATE_VAR[0]) | (var > DEGENERATE_VAR[1])
        if bad.any():
            degenerate[name] = int(bad.sum())
    if not never and not degenerate:
        return []
    return [Finding("untracked-stats", "error", never + [n for n in degenerate if n not in never],
                    {"never_updated": never, "degenerate_channels": degenerate,
                     "degenerate_range": list(DEGENERATE_VAR)},
                    "the model's weights have trained but these running statistics are not its own; set them with "
                    "bnlab.nn.recompute_stats(model, training_batches)")]


def check_dead_channels(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """dead-channels: |γ| below DEAD_GAMMA of the layer's largest |γ|: the channel is constant, prunable."""
    dead = {}
    for name, bn in _any_batch_norms(model):
        if bn.weight is None:
            continue
        scale = bn.weight.detach().abs()
        count = int((scale <= DEAD_GAMMA * float(scale.max())).sum()) if float(scale.max()) > 0 else len(scale)
        if count:
            dead[name] = count
    if not dead:
        return []
    return [Finding("dead-channels", "info", list(dead), {"dead_channels": dead, "threshold": DEAD_GAMMA},
                    "these channels output β alone whatever the input; prune them (the research study's network "
                    "slimming: |γ| < 0.01 is pruned at no accuracy cost)")]


def check_dropout_before_bn(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """dropout-before-bn: dropout whose output reaches a BN through linear layers (Li et al., 2019)."""
    successors = _successors(model)
    pairs = []
    for name, m in model.named_modules():
        if isinstance(m, _DROPOUTS) and m.p > 0:
            bn = _feeds_batch_norm(model, name, successors)
            if bn:
                pairs.append((name, bn, m.p))
    if not pairs:
        return []
    return [Finding("dropout-before-bn", "warning", [d for d, _, _ in pairs],
                    {"pairs": [f"{d} (p={p}) -> {bn}" for d, bn, p in pairs],
                     "variance_ratio_train_over_eval": [round(1 / (1 - p), 4) for _, _, p in pairs]},
                    "dropout scales the variance the BN sees in training by up to 1/(1-p), which inference does not "
                    "reproduce (Li et al., 2019); move dropout after the last BN, or recompute the statistics in eval "
                    "mode of dropout with bnlab.nn.recompute_stats")]


def check_half_precision(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """half-precision-stats: running statistics stored in float16 or bfloat16."""
    layers = {name: str(bn.running_var.dtype).removeprefix("torch.") for name, bn in batch_norms(model)
              if bn.running_var.dtype in HALF_DTYPES or bn.running_mean.dtype in HALF_DTYPES}
    if not layers:
        return []
    return [Finding("half-precision-stats", "warning", list(layers),
                    {"dtypes": layers, "float16_epsilon": float(torch.finfo(torch.float16).eps),
                     "bfloat16_epsilon": float(torch.finfo(torch.bfloat16).eps)},
                    "a momentum update of 0.1 x a small difference rounds away in half precision; keep BN in float32 "
                    "(torch.autocast does; or call .float() on the BN layers)")]


def check_frozen_but_updating(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """frozen-but-updating: γ and β frozen while the rest fine-tunes and the running statistics still move."""
    if not any(p.requires_grad for p in model.parameters()):
        return []  # nothing trains: an inference model, not a fine-tuning
    layers = [name for name, bn in batch_norms(model)
              if bn.weight is not None and not bn.weight.requires_grad
              and (bn.bias is None or not bn.bias.requires_grad) and bn.momentum != 0]
    if not layers:
        return []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return [Finding("frozen-but-updating", "warning", layers,
                    {"frozen_bn_layers": len(layers), "trainable_parameters": trainable},
                    "in model.train() these layers still normalize by batch statistics and overwrite their running "
                    "statistics; replace them with bnlab.nn.freeze(model), or keep them in eval mode while training")]


# ---- data checks ----------------------------------------------------------------------------------------


def check_stale_stats(model: nn.Module, ctx: "_Context") -> list[Finding]:
    """stale-running-stats: eval mode with the running statistics against exact statistics of the batches."""
    if not batch_norms(model):
        return []
    exact = recompute_stats(copy.deepcopy(ctx.eval_copy), ctx.batches)
    running = ctx.metrics(ctx.eval_copy, "running statistics")
    recomputed = ctx.metrics(exact, "exact statistics")
    batch = ctx.metrics(_batch_stats_copy(ctx.eval_copy), "batch statistics")
    if "accuracy" in running:
        gap = recomputed["accuracy"] - running["accuracy"]
    else:
        gap = _disagreement(ctx.outputs(ctx.eval_copy), ctx.outputs(exact))
    if gap <= STALE_ACCURACY_GAP:
        return []
    return [Finding("stale-running-stats", "warning", [name for name, _ in batch_norms(model)],
                    {"running": running, "exact": recomputed, "batch": batch, "gap": gap,
                     "threshold": STALE_ACCURACY_GAP},
                    "the running statistics do not match the model's weights; replace them with exact ones: "
                    "bnlab.nn.recompute_stats(model, training_batches)")]


def _batch_stats_copy(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model).eval()
    for _, bn in batch_norms(twin):
        bn.train()
    return twin


def _disagreement(a: Tensor, b: Tensor) -> float:
    """Fraction of samples whose predicted class differs (argmax over dim 1)."""
    return float((a.argmax(1) != b.argmax(1)).double().mean())


CHECKS: dict[str, Callable[[nn.Module, "_Context"], list[Finding]]] = {
    "stale-running-stats": check_stale_stats,
    "train-mode-at-inference": check_train_mode,
    "foreign-momentum": check_momentum,
    "unusual-eps": check_eps,
    "bias-before-bn": check_bias_before_bn,
    "small-batch": check_small_batch,
    "untracked-stats": check_untracked,
    "dead-channels": check_dead_channels,
    "dropout-before-bn": check_dropout_before_bn,
    "half-precision-stats": check_half_precision,
    "frozen-but-updating": check_frozen_but_updating,
}
DATA_CHECKS = frozenset({"stale-running-stats"})


class _Context:
    """What the checks share: the batches (as a list), an eval-mode copy, the per-device batch size."""

    def __init__(self, model: nn.Module, batches: Optional[list], per_device_batch: Optional[int]):
        self.batches = batches
        self.per_device_batch = per_device_batch
        self.eval_copy = copy.deepcopy(model).eval()
        self.skipped: dict[str, str] = {}

    def skip(self, code: str, why: str) -> None:
        self.skipped[code] = why

    def inputs(self):
        for batch in self.batches:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch

    def targets(self) -> Optional[Tensor]:
        if not all(isinstance(b, (tuple, list)) and len(b) > 1 for b in self.batches):
            return None
        return torch.cat([b[1] for b in self.batches])

    def outputs(self, model: nn.Module) -> Tensor:
        """The model's outputs on every batch, in its current modes, on a copy (no buffer changes)."""
        twin = copy.deepcopy(model)
        with torch.no_grad():
            return torch.cat([twin(x).float() for x in self.inputs()])

    def metrics(self, model: nn.Module, label: str) -> dict:
        """{"loss", "accuracy"} of a classifier on labelled batches; {"mean_abs_output"} otherwise."""
        outputs, targets = self.outputs(model), self.targets()
        if targets is None or outputs.dim() != 2 or targets.dtype not in (torch.int64, torch.int32):
            return {"mean_abs_output": float(outputs.abs().mean())}
        loss = nn.functional.cross_entropy(outputs, targets.long()).item()
        return {"loss": round(loss, 4), "accuracy": round(float((outputs.argmax(1) == targets).double().mean()), 4)}

    def positions_per_sample(self) -> dict[str, int]:
        """BN name -> values per channel per sample (spatial positions), measured on one batch."""
        if not self.batches:
            return {}
        seen: dict[str, int] = {}

        def record(name: str):
            def hook(module, args) -> None:  # a pre-hook returning a value would replace the input
                seen.setdefault(name, args[0][0, 0].numel())
            return hook

        hooks = [bn.register_forward_pre_hook(record(name)) for name, bn in batch_norms(self.eval_copy)]
        try:
            with torch.no_grad():
                self.eval_copy(next(self.inputs()))
        finally:
            for h in hooks:
                h.remove()
        return seen


def _checked_batches(batches) -> Optional[list]:
    if batches is None:
        return None
    if isinstance(batches, Tensor):
        raise ValueError("batches must be an iterable of batches (inputs, or (input, target) pairs), got one tensor; "
                         "pass [tensor] to diagnose it as a single batch")
    listed = list(batches)
    if not listed:
        raise ValueError("batches yielded nothing; pass at least one batch of inputs, or batches=None to run only "
                         "the static checks")
    return listed


def diagnose(model: nn.Module, batches: Optional[Iterable] = None, *,
             per_device_batch: Optional[int] = None) -> Diagnosis:
    """Diagnose `model`'s batch-norm pitfalls; the model is not modified.

    Args:
        model: any torch.nn.Module, in the mode it is used for inference (a BN in training mode is a
            finding). Torch's BatchNorm1d/2d/3d, SyncBatchNorm and bnlab's batch norms are checked.
        batches: an iterable of inputs or of (input, target) pairs, for the data checks (iterated
            several times, so it is read into a list once). Targets of class indices give loss and
            accuracy; without targets the stale-statistics check compares predicted classes. None: only
            the static checks run, and the data checks are listed in `Diagnosis.skipped`.
        per_device_batch: the training batch size on one device, for the small-batch check (skipped
            without it).

    Returns:
        A `Diagnosis`: `findings`, `checked`, `skipped`, `healthy`, `to_markdown()`, `to_dict()`, str().

    Example:
        >>> import torch, bnlab.nn
        >>> from bnlab.doctor import diagnose
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4)).eval()
        >>> batches = [torch.randn(16, 1, 6, 6) for _ in range(2)]
        >>> diagnose(net, batches, per_device_batch=64).codes()  # statistics still at their initial 0 and 1
        ['stale-running-stats']
        >>> d = diagnose(bnlab.nn.recompute_stats(net, batches), batches, per_device_batch=64)
        >>> d.healthy, d.codes()
        (True, [])
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"diagnose expects a torch.nn.Module, got {type(model).__name__}; pass the model itself")
    if per_device_batch is not None and (not isinstance(per_device_batch, int) or per_device_batch < 1):
        raise ValueError(f"per_device_batch must be a positive int (samples per device per step), got {per_device_batch!r}")
    ctx = _Context(model, _checked_batches(batches), per_device_batch)
    diagnosis = Diagnosis()
    for code, check in CHECKS.items():
        if code in DATA_CHECKS and ctx.batches is None:
            ctx.skip(code, "needs batches (pass batches=..., or --data-dir / a run directory on the command line)")
            continue
        findings = check(model, ctx)
        if code not in ctx.skipped:
            diagnosis.checked.append(code)
        diagnosis.findings += findings
    diagnosis.skipped = ctx.skipped
    if not batch_norms(model) and not _any_batch_norms(model):
        diagnosis.skipped["all"] = "the model has no batch-norm layer"
    return diagnosis


# ---- the command line's sources: a bnlab run, or any importable model ------------------------------------


def fashion_batches(data_dir=None, *, download: bool = True, examples: int = 10000, seed: int = 0,
                    input_shape: tuple[int, ...] = (1, 28, 28), batch_size: int = 1000) -> list:
    """(input, label) batches of a seeded random `examples` Fashion-MNIST training images, reshaped to
    `input_shape` per sample: the data `bnlab doctor` diagnoses with."""
    from bnlab import data

    if math.prod(input_shape) != 28 * 28:
        raise ValueError(f"--input-shape {'x'.join(map(str, input_shape))} has {math.prod(input_shape)} values per "
                         "sample, but a Fashion-MNIST image has 784; use 1x28x28 or 784")
    dataset = data.load(data_dir, download=download).subset(min(examples, 60000), None, seed=seed)
    return [(x.reshape(len(x), *input_shape), y)
            for x, y in data.batches(dataset.train_images, dataset.train_labels, batch_size, shuffle=False)]


def load_factory(spec: str) -> nn.Module:
    """The model returned by `module:factory` (e.g. torchvision.models:resnet18), called without arguments."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model expects module:factory, e.g. torchvision.models:resnet18, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {spec}: cannot import it ({exc}); check the module is on PYTHONPATH") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load a state dict (or a bnlab checkpoint, whose "model" entry is one) as untrusted data
    (`bnlab.files.load_torch_file`: CRC-checked, weights_only)."""
    state = files.load_torch_file(path, fix="check the --weights path")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"--weights {path} does not fit the model: {first}") from None
    return model


__all__ = ["CHECKS", "Diagnosis", "Finding", "diagnose", "batch_norms", "SEVERITIES", "STALE_ACCURACY_GAP",
           "SAFE_BATCH", "DEAD_GAMMA", "fashion_batches", "load_factory", "load_weights"]
