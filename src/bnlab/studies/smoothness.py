"""Study `smoothness`: does batch normalization reduce internal covariate shift, or does it make the loss
landscape smoother? (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help
Optimization?", on the chapter's LeNet.)

Three networks train with plain SGD at the same learning rates, differing only in what follows each
conv/linear layer before its sigmoid:

- no BN: the chapter's unpadded BN-LeNet without its norm layers;
- BN: the chapter's BN-LeNet;
- BN + noise: Santurkar et al.'s control — after every BN a per-channel random scale (log-uniform in
  [1/NOISE_SCALE, NOISE_SCALE]) and shift (uniform in [−NOISE_SHIFT, NOISE_SHIFT]), redrawn at every
  step and shared by the batch, so the sigmoids' input distribution jumps at every step: a network
  with BN's landscape but more covariate shift than no BN. Identity in eval mode.

Every `probe_every` steps, before the step, on that step's minibatch B with gradient g = ∇L_B(θ) and
learning rate η, for each multiplier k in MULTIPLIERS (θ_k = θ − η·k·g):

- loss variation: max_k L_B(θ_k) − min_k L_B(θ_k), the spread of the loss along the step;
- gradient change: max_k ‖∇L_B(θ_k) − g‖ (gradient predictiveness: small when the gradient at θ
  still describes the gradient a step away), also relative to ‖g‖;
- effective β-smoothness: max_k ‖∇L_B(θ_k) − g‖ / ‖η·k·g‖, a local Lipschitz constant of the gradient;
- Santurkar's ICS: for each conv/linear layer i after the first, G_i = ∂L_B/∂W_i at θ and G'_i the
  same once every earlier layer (its weights and its BN) has taken its SGD step −η·g; ICS is ‖G_i − G'_i‖
  and cos(G_i, G'_i), averaged over the layers (0 and 1 when the earlier layers' update does not change
  what layer i should do);
- distribution drift (the chapter's "internal covariate shift": the inputs of each sigmoid changing as
  the earlier layers train): on a fixed probe batch of PROBE_IMAGES training images, each channel's mean
  μ and std σ of every sigmoid's input (the pre-activation; after BN, and noise, where there are), and
  between consecutive probes the Gaussian Wasserstein-2 distance sqrt((Δμ)² + (Δσ)²) averaged over the
  channels, raw ("absolute") and in units of the layer's earlier mean σ ("relative"), averaged over the
  four hidden layers.

Probes run in train mode (BN normalizes by B's statistics and the noise is the step's, as in the step)
through `side_effect_free`, so they change neither the parameters nor the running statistics, and draw
no random numbers (the noise of step t comes from a generator seeded by (seed, t)): a run is the same
with or without them, deterministic for its seed, and resumable.

The sigmoid LeNet without BN first sits on a plateau at chance (loss ln 10 ≈ 2.30) for hundreds of
steps, where nothing moves and the landscape is trivially flat: comparing that with a BN network that
is already learning would call a stuck network "smooth". So at each learning rate the comparison
window is its learning phase: from the first probe at which every run at that rate (all networks and
seeds) has left the plateau — batch loss below PLATEAU_LOSS — to the end, the same steps for all; a
rate is compared when that window holds at least MIN_LEARNING_PROBES probes. A run's summary of each
metric is its median over the window's probes (the all-probe medians are reported too); the report
gives mean ± std of the summaries over seeds.

Decision rule, per compared learning rate:
- the smoothness explanation is refuted if BN does not lower all three of loss variation, gradient
  change and β-smoothness relative to no BN;
- the covariate-shift explanation (BN helps by steadying the layers' input distributions) is refuted
  if BN does not lower the relative drift, or if BN + noise drifts more than no BN and still trains
  better than it (lower final training loss): then BN's benefit does not need steady inputs.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import torch
from torch import Tensor, nn

from bnlab.data import to_input
from bnlab.models import NORM_SITES, norm_layers
from bnlab.studies.engine import (LoopSpec, Outcome, Report, Run, RunContext, Settings, Study, activations_at,
                                  channel_columns, difference, fmt, markdown_table, mean_std, saved_plot,
                                  side_effect_free, subplots, train_with_hooks)
from bnlab.training import Hooks

# label -> (norm of the unpadded bn-lenet architecture, noise after each norm)
MODELS = {"no BN": (None, False), "BN": ("batchnorm", False), "BN + noise": ("batchnorm", True)}
NOISE_SCALE, NOISE_SHIFT = 2.0, 1.0
MULTIPLIERS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
PROBE_IMAGES = 512
# Quick keeps the one rate where the plain sigmoid LeNet leaves its plateau within a quick budget (after
# ~450 steps at lr 1; at lr 0.1 it stays there for over 2 epochs), and enough steps to get past it.
FULL_RATES, QUICK_RATES = (0.1, 1.0), (1.0,)
FULL_PROBE_EVERY, QUICK_PROBE_EVERY = 50, 30
FULL_EPOCHS, QUICK_EPOCHS = 10, 3
QUICK_DATA = {"train_subset": 30000, "test_subset": 2000}
PLATEAU_LOSS = 2.0
MIN_LEARNING_PROBES = 3
BATCH_SIZE = 128

# Probe metric -> its label in the report (see the module docstring for the definitions).
METRICS = {
    "loss_variation": "loss variation",
    "grad_change": "gradient change",
    "grad_change_rel": "gradient change / ‖g‖",
    "beta_smoothness": "β-smoothness",
    "drift_rel": "drift (relative)",
    "drift_abs": "drift (absolute)",
    "ics_l2": "ICS ‖G − G'‖",
    "ics_cos": "ICS cos(G, G')",
}
SMOOTHNESS = ("loss_variation", "grad_change", "beta_smoothness")


# ---- the probes -------------------------------------------------------------------------------------


def _flat_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def loss_and_gradient(net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[float, dict]:
    """L_B at `params` (train mode, no side effects) and its gradient, name -> tensor."""
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    loss = nn.functional.cross_entropy(side_effect_free(net, x, leaves), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.item(), dict(zip(leaves, grads))


def landscape(net: nn.Module, x: Tensor, y: Tensor, lr: float) -> tuple[dict, dict]:
    """Loss variation, gradient change and β-smoothness along the gradient step (module docstring), and
    the gradient g itself."""
    params = {name: p.detach() for name, p in net.named_parameters()}
    loss, grad = loss_and_gradient(net, params, x, y)
    grad_norm = _flat_norm(grad.values())
    losses, changes, betas = [], [], []
    for k in MULTIPLIERS:
        moved = {name: p - lr * k * grad[name] for name, p in params.items()}
        loss_k, grad_k = loss_and_gradient(net, moved, x, y)
        change = _flat_norm(grad_k[name] - grad[name] for name in params)
        losses.append(loss_k)
        changes.append(change)
        betas.append(change / (lr * k * grad_norm) if grad_norm else math.nan)
    return {"loss": loss, "grad_norm": grad_norm, "losses": losses, "loss_variation": max(losses) - min(losses),
            "grad_change": max(changes), "grad_change_rel": max(changes) / grad_norm if grad_norm else math.nan,
            "beta_smoothness": max(betas)}, grad


def layer_stages(net: nn.Sequential) -> dict[str, int]:
    """Parameter name -> index of its layer: each conv/linear starts one, and a norm joins the layer before."""
    stages, stage = {}, -1
    for child_name, child in net.named_children():
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            stage += 1
        for name, _ in child.named_parameters():
            stages[f"{child_name}.{name}"] = stage
    return stages


def santurkar_ics(net: nn.Sequential, x: Tensor, y: Tensor, lr: float, grad: dict) -> dict:
    """‖G_i − G'_i‖ and cos(G_i, G'_i) averaged over the conv/linear layers i after the first."""
    params = {name: p.detach() for name, p in net.named_parameters()}
    stages = layer_stages(net)
    weights = {stages[f"{name}.weight"]: f"{name}.weight" for name, m in net.named_children()
               if isinstance(m, (nn.Conv2d, nn.Linear))}
    distances, cosines = [], []
    for i in range(1, len(weights)):
        moved = {name: p - lr * grad[name] if stages[name] < i else p for name, p in params.items()}
        _, grad_after = loss_and_gradient(net, moved, x, y)
        before, after = grad[weights[i]].flatten().double(), grad_after[weights[i]].flatten().double()
        distances.append(float((before - after).norm()))
        cosines.append(float(nn.functional.cosine_similarity(before, after, dim=0)))
    return {"ics_l2": statistics.fmean(distances), "ics_cos": statistics.fmean(cosines)}


def preactivation_stats(net: nn.Module, images: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per hidden layer (the input of each sigmoid): per-channel mean and std on `images`, train mode."""
    sigmoids = dict(zip(NORM_SITES, (m for m in net.modules() if isinstance(m, nn.Sigmoid))))
    with activations_at(sigmoids, "input") as inputs, torch.no_grad():
        side_effect_free(net, images)
    stats = {}
    for site, values in inputs.items():
        std, mean = torch.std_mean(channel_columns(values).double(), dim=0, correction=0)
        stats[site] = (mean, std)
    return stats


def drift(before: dict, after: dict) -> dict:
    """Gaussian W2 distance between consecutive per-channel pre-activation distributions, averaged over
    channels and layers: raw, and in units of the layer's earlier mean std (a per-channel unit would
    blow up on the near-constant channels of a saturated layer)."""
    absolute, relative = [], []
    for site, (mean0, std0) in before.items():
        mean1, std1 = after[site]
        w2 = float(((mean1 - mean0) ** 2 + (std1 - std0) ** 2).sqrt().mean())
        absolute.append(w2)
        relative.append(w2 / max(float(std0.mean()), 1e-12))
    return {"drift_abs": statistics.fmean(absolute), "drift_rel": statistics.fmean(relative)}


class StepNoise(nn.Module):
    """A per-channel scale and shift that the training loop redraws at every step (`redraw`); identity in
    eval mode. Placed after a BN layer it moves the next layer's input distribution at every step."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale, self.shift = torch.ones(channels), torch.zeros(channels)

    def redraw(self, generator: torch.Generator) -> None:
        log_scale = math.log(NOISE_SCALE)
        self.scale = torch.empty(len(self.scale)).uniform_(-log_scale, log_scale, generator=generator).exp()
        self.shift = torch.empty(len(self.shift)).uniform_(-NOISE_SHIFT, NOISE_SHIFT, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def with_step_noise(net: nn.Sequential) -> nn.Sequential:
    """`net` with a StepNoise after each of its norm layers."""
    norms = {id(layer) for _, layer in norm_layers(net)}
    layers = []
    for layer in net:
        layers.append(layer)
        if id(layer) in norms:
            layers.append(StepNoise(layer.num_features))
    return nn.Sequential(*layers)


class Probes(Hooks):
    """Measures the landscape, ICS and drift every `every` steps, and redraws the noise (if any) before
    every step; the records survive a resume."""

    def __init__(self, lr: float, every: int, probe_images: Tensor, noise_seed=None):
        self.lr, self.every, self.probe_images, self.noise_seed = lr, every, probe_images, noise_seed
        self.records: list[dict] = []
        self.previous_stats = None

    def setup(self, net):
        return net if self.noise_seed is None else with_step_noise(net)

    def before_step(self, net, x, y, step):
        if self.noise_seed is not None:
            generator = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + step)
            for module in net.modules():
                if isinstance(module, StepNoise):
                    module.redraw(generator)
        if step % self.every:
            return
        record, grad = landscape(net, x, y, self.lr)
        record.update(santurkar_ics(net, x, y, self.lr, grad), step=step)
        stats = preactivation_stats(net, self.probe_images)
        if self.previous_stats is not None:
            record.update(drift(self.previous_stats, stats))
        self.previous_stats = stats
        self.records.append(record)

    def state_dict(self) -> dict:
        return {"records": self.records, "previous_stats": self.previous_stats}

    def load_state_dict(self, state: dict) -> None:
        self.records, self.previous_stats = state["records"], state["previous_stats"]


def smoothness_run(params: dict, context: RunContext) -> dict:
    """Train LeNet (no BN, BN, or BN + noise) and probe it every `probe_every` steps (module docstring)."""
    spec = LoopSpec.from_params(params)
    train_set = context.dataset().subset(spec.train_subset, spec.test_subset, seed=spec.seed)
    probe_images = to_input(train_set.train_images[:PROBE_IMAGES])
    probes = Probes(spec.lr, params["probe_every"], probe_images, spec.seed if params["noise"] else None)
    outcome = train_with_hooks(spec, context, probes)
    return {**outcome.result(), "probes": probes.records}


# ---- the study ---------------------------------------------------------------------------------------


def learning_start(runs: list[dict]) -> float:
    """The first step by which every run has left the plateau (a probe with batch loss below
    PLATEAU_LOSS); infinity when some run never does."""
    firsts = [min((p["step"] for p in r["probes"] if p["loss"] < PLATEAU_LOSS), default=math.inf) for r in runs]
    return max(firsts, default=math.inf)


def window_probes(result: dict, start: float) -> list[dict]:
    return [p for p in result["probes"] if p["step"] >= start]


def summary(result: dict, metric: str, start: float = 0) -> float:
    """The run's median of `metric` over its probes from step `start` on; NaN if none has it."""
    values = [p[metric] for p in window_probes(result, start) if metric in p and not math.isnan(p[metric])]
    return statistics.median(values) if values else math.nan


def final_train_loss(result: dict) -> float:
    return result["history"][-1]["train_loss"] if result["status"] == "ok" else math.nan


class Smoothness(Study):
    name = "smoothness"
    question = ("Does BN reduce internal covariate shift (drift of layer inputs), or does it mainly make the loss "
                "and its gradient smoother (Santurkar et al. 2018)?")
    full_runtime = "about 15 minutes on 2 cores (18 runs of 10 epochs with probes, --jobs 2; measured 15)"
    quick_plan = {"rates": QUICK_RATES, "epochs": QUICK_EPOCHS, "probe_every": QUICK_PROBE_EVERY, "data": QUICK_DATA}
    full_plan = {"rates": FULL_RATES, "epochs": FULL_EPOCHS, "probe_every": FULL_PROBE_EVERY, "data": {}}

    def runs(self, settings: Settings) -> list[Run]:
        plan = self.plan(settings)
        return [Run("smoothness", {"model": "bn-lenet", "model_options": {"norm": norm}, "noise": noise, "lr": lr,
                                   "batch_size": BATCH_SIZE, "epochs": plan["epochs"], "seed": seed,
                                   "probe_every": plan["probe_every"], **plan["data"]})
                for lr in plan["rates"] for norm, noise in MODELS.values() for seed in settings.seed_list(3)]

    def analyse(self, outcomes: list[Outcome], settings: Settings) -> Report:
        plan = self.plan(settings)
        label_of = {spec: label for label, spec in MODELS.items()}
        results = defaultdict(list)
        for o in outcomes:
            spec = (o.run.params["model_options"]["norm"], o.run.params["noise"])
            results[(label_of[spec], o.run.params["lr"])].append(o.result)
        conclusions, verdicts = [], {}
        for lr in plan["rates"]:
            lines, verdicts[lr] = compare_at_rate(results, lr)
            conclusions += lines
        conclusions += overall(verdicts)
        return Report(
            title="smoothness: internal covariate shift or a smoother landscape?",
            question=self.question,
            settings={"models": "the chapter's BN-LeNet (unpadded, BN after every conv/linear layer), the same "
                                "network without BN, and with per-step noise after each BN; sigmoid, average pooling",
                      "noise": f"per channel and step: scale log-uniform in [1/{NOISE_SCALE:g}, {NOISE_SCALE:g}], "
                               f"shift uniform in [−{NOISE_SHIFT:g}, {NOISE_SHIFT:g}]; none in eval mode",
                      "data": "Fashion-MNIST" + (f", subsets {QUICK_DATA}" if settings.quick else " (full)"),
                      "optimizer": f"SGD, batch {BATCH_SIZE}, no momentum", "epochs": plan["epochs"],
                      "seeds": len(settings.seed_list(3)),
                      "probes": f"every {plan['probe_every']} steps on the step's minibatch, train mode, "
                                "no side effects",
                      "step multipliers k": ", ".join(f"{k:g}" for k in MULTIPLIERS) + " (θ − η·k·g)",
                      "drift probe batch": f"the first {PROBE_IMAGES} training images (fixed)",
                      "learning phase": f"from the first probe by which every run at the rate has had a batch loss "
                                        f"below {PLATEAU_LOSS} (chance: ln 10 ≈ 2.30); a rate is compared when it "
                                        f"holds at least {MIN_LEARNING_PROBES} probes",
                      "summary": "per run the median over probes; mean ± std over seeds"},
            varied={"model": tuple(MODELS), "learning rate": [f"{lr:g}" for lr in plan["rates"]]},
            sections=[("Learning phase: probes from the step where every run at the rate has left the plateau "
                       "(per-run medians, mean ± std over seeds)",
                       results_table(results, plan["rates"], learning=True)),
                      ("All probes, plateau included", results_table(results, plan["rates"], learning=False)),
                      ("Decision rule", DECISION_RULE)],
            conclusions=conclusions,
            plots=[plot_curves(results, plan["rates"], settings)],
        )


DECISION_RULE = (
    "At each learning rate with a learning phase: the smoothness explanation is refuted if BN does not lower all of "
    "loss variation, gradient change and β-smoothness relative to no BN. The internal-covariate-shift explanation "
    "(BN helps by steadying the layers' input distributions) is refuted if BN does not lower the relative drift, or "
    "if BN + noise drifts more than no BN yet still ends at a lower training loss than no BN.")


def results_table(results, rates, learning: bool) -> str:
    rows = []
    for lr in rates:
        start = learning_start([r for label in MODELS for r in results[(label, lr)]]) if learning else 0
        for label in MODELS:
            rs = results[(label, lr)]
            diverged = sum(r["status"] == "diverged" for r in rs)
            rows.append([f"{lr:g}", label,
                         fmt([r["history"][-1]["test_acc"] if r["history"] else math.nan for r in rs])
                         + (f" ({diverged} diverged)" if diverged else ""),
                         fmt([final_train_loss(r) for r in rs]),
                         *(["never" if math.isinf(start) else start] if learning else []),
                         sum(len(window_probes(r, start)) for r in rs),
                         *(fmt([summary(r, m, start) for r in rs], 2 if m == "beta_smoothness" else 3)
                           for m in METRICS)])
    headers = ["lr", "model", "final test acc", "final train loss", *(["from step"] if learning else []), "probes",
               *METRICS.values()]
    return markdown_table(headers, rows)


def _versus(a_runs: list[dict], b_runs: list[dict], metric: str, start: float) -> tuple[str, float]:
    """'label a vs b (×ratio, verdict)' for `metric` from step `start` on, and the ratio of the means."""
    a = [summary(r, metric, start) for r in a_runs]
    b = [summary(r, metric, start) for r in b_runs]
    _, verdict = difference(a, b)
    (mean_a, _), (mean_b, _) = mean_std(a), mean_std(b)
    ratio = mean_a / mean_b if mean_b else math.nan
    return f"{METRICS[metric]} {fmt(a)} vs {fmt(b)} (×{ratio:.2g}, {verdict})", ratio


def compare_at_rate(results, lr: float) -> tuple[list[str], dict | None]:
    """Sentences comparing the networks at `lr`, and the verdicts {smoothness, covariate_shift: reason it
    was refuted or None}; None when the rate cannot be compared."""
    runs = {label: results[(label, lr)] for label in MODELS}
    everything = [r for rs in runs.values() for r in rs]
    if not all(r["probes"] for r in everything):
        return [f"lr {lr:g}: a run has no probe (it diverged at once), nothing to compare."], None
    start = learning_start(everything)
    if min(len(window_probes(r, start)) for r in everything) < MIN_LEARNING_PROBES:
        stuck = [label for label in MODELS if math.isinf(learning_start(runs[label]))]
        texts = [_versus(runs["BN"], runs["no BN"], m, 0) for m in SMOOTHNESS]
        flatter = all(ratio > 1 for _, ratio in texts)
        why = (f"{' and '.join(stuck)} never leaves the initial plateau (batch loss ≥ {PLATEAU_LOSS}) in some run"
               if stuck else f"the learning phase (from step {start}) holds under {MIN_LEARNING_PROBES} probes")
        return [f"lr {lr:g}: {why}, so there is no learning phase to compare at this rate. Over all probes, BN vs "
                "no BN: " + "; ".join(text for text, _ in texts)
                + (" — the landscape without BN is flatter, the flatness of a saturated network that cannot move, "
                   "not a smoothness that helps it." if stuck == ["no BN"] and flatter else ".")], None

    ratios, parts = {}, []
    for metric in (*SMOOTHNESS, "drift_rel", "ics_l2", "ics_cos"):
        text, ratios[metric] = _versus(runs["BN"], runs["no BN"], metric, start)
        parts.append(text)
    smooths = all(ratios[m] < 1 for m in SMOOTHNESS)
    ics = ("lower" if ratios["ics_l2"] < 1 and ratios["ics_cos"] > 1 else
           "higher" if ratios["ics_l2"] > 1 and ratios["ics_cos"] < 1 else "mixed")
    bn_line = (f"lr {lr:g}, learning phase (steps ≥ {start}), BN vs no BN: " + "; ".join(parts) + ". "
               f"BN {'smooths' if smooths else 'does not smooth'} the landscape and "
               f"{'reduces' if ratios['drift_rel'] < 1 else 'does not reduce'} the drift of layer inputs; "
               f"Santurkar's ICS is {ics} with BN.")

    drift_text, drift_ratio = _versus(runs["BN + noise"], runs["no BN"], "drift_rel", start)
    noisy_losses, plain_losses = ([final_train_loss(r) for r in runs[label]] for label in ("BN + noise", "no BN"))
    loss_gap, loss_verdict = difference(noisy_losses, plain_losses)
    trains_better = loss_gap < 0
    landscape = "; ".join(_versus(runs["BN + noise"], runs["no BN"], m, start)[0] for m in SMOOTHNESS)
    noise_line = (f"lr {lr:g}, BN + noise vs no BN: {drift_text} — "
                  f"{'more' if drift_ratio > 1 else 'less'} drift than without BN; final training loss "
                  f"{fmt(noisy_losses)} vs {fmt(plain_losses)} ({loss_gap:+.3f}, {loss_verdict}; BN: "
                  f"{fmt([final_train_loss(r) for r in runs['BN']])}); landscape: {landscape}.")

    if ratios["drift_rel"] >= 1:
        shift_refuted = "BN does not lower the drift"
    elif drift_ratio > 1 and trains_better:
        shift_refuted = "BN + noise drifts more than no BN yet trains better"
    else:
        shift_refuted = None
    smooth_refuted = None if smooths else "BN does not lower all of loss variation, gradient change and β-smoothness"
    return [bn_line, noise_line], {"smoothness": smooth_refuted, "covariate_shift": shift_refuted}


def overall(verdicts: dict) -> list[str]:
    compared = [lr for lr, v in verdicts.items() if v is not None]
    if not compared:
        return ["No learning rate has a learning phase in every network: the explanations cannot be told apart here."]
    listed = "lr " + ", ".join(f"{lr:g}" for lr in compared)

    def refutations(key):
        return [f"lr {lr:g} ({verdicts[lr][key]})" for lr in compared if verdicts[lr][key]]

    against_smooth, against_shift = refutations("smoothness"), refutations("covariate_shift")
    lines = [
        f"Smoothness explanation: refuted at {'; '.join(against_smooth)}." if against_smooth else
        f"Smoothness explanation: not refuted — at every compared rate ({listed}) BN lowered loss variation, "
        "gradient change and β-smoothness; any of them not lower would have refuted it.",
        f"Covariate-shift explanation: refuted at {'; '.join(against_shift)}." if against_shift else
        f"Covariate-shift explanation: not refuted — at every compared rate ({listed}) BN lowered the drift, and "
        "BN + noise did not both drift more and train better than no BN; either would have refuted it.",
    ]
    if not against_smooth and against_shift:
        lines.append("The numbers support the smoothness explanation over internal covariate shift.")
    elif not against_smooth:
        lines.append("Both explanations survive these measurements: they do not separate them.")
    elif against_shift:
        lines.append("Neither explanation survives these measurements consistently.")
    else:
        lines.append("The numbers support reduced covariate shift rather than a smoother landscape.")
    return lines


def plot_curves(results, rates, settings):
    panels = ("loss", "loss_variation", "grad_change", "beta_smoothness", "drift_rel", "drift_abs", "ics_l2", "ics_cos")
    fig, axes = subplots(2, 4, figsize=(15, 6.6), sharex=True)
    for ax, metric in zip(axes.flat, panels):
        for i, label in enumerate(MODELS):
            for j, lr in enumerate(rates):
                style = dict(color=f"C{i}", ls=("-", "--", ":", "-.")[j % 4], lw=1.2, label=f"{label}, lr {lr:g}")
                curve = _mean_curve(results[(label, lr)], lambda record: record.get(metric))
                if curve:
                    ax.plot(*zip(*curve), **style)
                if metric == "loss":  # the band of losses along the step, as in Santurkar et al.'s figure 4
                    lows = _mean_curve(results[(label, lr)], lambda record: min(record["losses"]))
                    highs = _mean_curve(results[(label, lr)], lambda record: max(record["losses"]))
                    if lows:
                        ax.fill_between([s for s, _ in lows], [v for _, v in lows], [v for _, v in highs],
                                        color=f"C{i}", alpha=0.15)
        for j, lr in enumerate(rates):
            start = learning_start([r for label in MODELS for r in results[(label, lr)]])
            if not math.isinf(start):
                ax.axvline(start, color="gray", lw=0.8, ls=("-", "--", ":", "-.")[j % 4],
                           label=f"learning phase from, lr {lr:g}")
        ax.set_title(METRICS.get(metric, "loss at θ (band: min–max over θ − η·k·g)"), fontsize=9)
        if metric != "ics_cos":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("training step")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, -0.06))
    return saved_plot(fig, settings, "smoothness_curves.png",
                      "The probes over training (mean over seeds; log scale except the cosine; gray "
                      "lines: start of the learning phase). Lower loss variation, gradient change and "
                      "β-smoothness mean a smoother landscape; drift and ICS measure how much the "
                      "layers' inputs move.")


def _mean_curve(rs: list[dict], value) -> list[tuple[int, float]]:
    """(step, mean over seeds of value(record)) at the probe steps where every seed has a value."""
    by_step = defaultdict(list)
    for r in rs:
        for record in r["probes"]:
            v = value(record)
            if v is not None:
                by_step[record["step"]].append(v)
    return [(step, statistics.fmean(v)) for step, v in sorted(by_step.items()) if len(v) == len(rs)]
