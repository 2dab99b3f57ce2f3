"""Benchmarks: bnlab measured against its peers in the same process, never against a stored number.

`bnlab bench op` times one training-mode forward + backward of batch normalization for bnlab, torch's
native kernel and the D2L chapter's naive code (autograd through elementwise ops), float32 on CPU, on
the LeNet shapes and a ResNet stage. The implementations take turns, in a shuffled order each round, so
a noisy, shared machine slows them alike; each figure is a median. Besides milliseconds it prints:

- the ratio to native (native time / bnlab time: above 1 means bnlab is faster);
- the share of the memory-bandwidth floor reached. The floor is 8 passes over the tensor (forward:
  read x for the statistics, read x and write y; backward: read x and dy for the sums, read x and dy
  and write dx) at the bandwidth of a copy (read + write) timed in the same run: floor = 4 x copy time;
- the bytes each implementation saves for backward, per input element.

With ``--compile`` it also times ``torch.compile`` (default backend, fullgraph) of torch's native
``F.batch_norm`` and of bnlab's, each forward compiled with its backward, in the same rotation: the
peers a user who compiles a model would otherwise pick. A second, identical compile of native (the
twin, an A/A control) runs with them: the ratio of the twins is the run's resolution, and compiled
bnlab's ratio is read against it.

`bnlab bench train` measures training throughput end to end (data batches, forward, loss, backward,
SGD step) of LeNets that differ only in their batch-norm layer: bnlab's, torch's built-in, and the
chapter's naive one, plus the plain LeNet; ``NAME+compile`` is the model under ``torch.compile``
(bn-lenet+compile and bn-lenet-torch+compile are in the default set), and the summary names each
model's faster mode. The models take turns for rounds of a few batches on the
real Fashion-MNIST; each figure is the median examples per second over the rounds.

`bnlab bench infer` times eval-mode forward passes of a trained-shape BN LeNet before and after
`bnlab.nn.fold_batchnorm`, interleaved, at several batch sizes, and reports the speed-up.

Run:  bnlab bench op [--repeats 30] [--threads N] [--channels-last] [--compile] [--json out.json]
      bnlab bench train [--rounds 15] [--batches 20] [--batch-size 128]
      bnlab bench infer [--batch-sizes 1 64 1024]
"""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as torch_F

from bnlab import files, kernels
from bnlab import functional as bnlab_F
from bnlab.baselines import naive_batch_norm

LENET_SHAPES = [(256, 6, 24, 24), (256, 16, 8, 8), (256, 120), (128, 84)]
RESNET_SHAPE = (32, 64, 56, 56)
OP_SHAPES = [*LENET_SHAPES, RESNET_SHAPE]


def turns(names, rounds: int):
    """The names, once per round, in a new random order each round (seeded, so a run can be repeated).

    What ran just before changes a small call's time (the state of the caches and of the OpenMP
    threads). In a fixed or rotated order each function would always follow the same one: that was a
    bias of 16% to 24% between two identical compiled graphs in `bench op --compile`."""
    order, shuffle = list(names), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        yield from order


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, sample_seconds: float = 0.002, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns.

    Each sample runs a function enough times to last about `sample_seconds` (calibrated once), so
    the timer's resolution does not dominate tiny calls; `repeats` samples of each are taken in
    `turns`.
    """
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, math.ceil(sample_seconds / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for name in turns(fns, repeats):
        fn, n = fns[name], calls[name]
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def saved_bytes_per_element(forward: Callable[[], torch.Tensor], numel: int) -> float:
    """Bytes of the distinct tensors autograd keeps for backward after `forward`, per input element."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values()) / numel


@dataclass
class OpResult:
    shape: tuple[int, ...]
    layout: str
    bnlab_ms: float
    native_ms: float
    chapter_ms: float
    copy_ms: float
    floor_ms: float
    speedup_vs_native: float  # native / bnlab
    native_vs_chapter: float  # chapter / native
    bnlab_floor_share: float
    native_floor_share: float
    saved_bytes_bnlab: float
    saved_bytes_native: float
    saved_bytes_chapter: float
    max_abs_diff: float  # bnlab vs native output, a sanity check that both computed the same thing
    compiled_native_ms: Optional[float] = None  # torch.compile(native), with --compile
    compiled_bnlab_ms: Optional[float] = None  # torch.compile(bnlab), with --compile
    compiled_speedup: Optional[float] = None  # compiled native / compiled bnlab
    compiled_twin_ratio: Optional[float] = None  # compiled native / its twin (A/A): the run's resolution


def _op_case(shape: Sequence[int], channels_last: bool, compile: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    dy = torch.randn(*shape, generator=gen)
    if channels_last and len(shape) == 4:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    x.requires_grad_(True)
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    stats = [torch.zeros(channels), torch.ones(channels)]
    param_shape = (1, channels) + (1,) * (len(shape) - 2)
    gamma = torch.ones(param_shape, requires_grad=True)
    beta = torch.zeros(param_shape, requires_grad=True)
    moving = [torch.zeros(param_shape), torch.ones(param_shape)]

    def bnlab_forward():
        return bnlab_F.batch_norm(x, stats[0], stats[1], weight, bias, True, 0.1, 1e-5)

    def native_forward():
        return torch_F.batch_norm(x, stats[0], stats[1], weight, bias, True, 0.1, 1e-5)

    def chapter_forward():
        y, moving[0], moving[1] = naive_batch_norm(x, gamma, beta, moving[0], moving[1])
        return y

    forwards = {"bnlab": (bnlab_forward, (x, weight, bias)), "native": (native_forward, (x, weight, bias)),
                "chapter": (chapter_forward, (x, gamma, beta))}
    if compile:
        forwards.update(_compiled_forwards(x, weight, bias))
    steps = {
        name: (lambda f=f, inputs=inputs: torch.autograd.grad(f(), inputs, dy))
        for name, (f, inputs) in forwards.items()
    }
    steps["copy"] = lambda: x.detach().clone()
    with torch.no_grad():
        diff = (bnlab_forward() - native_forward()).abs().max().item()
    saved = {name: saved_bytes_per_element(forwards[name][0], x.numel()) for name in ("bnlab", "native", "chapter")}
    return steps, saved, diff


def _native_training_step(x, weight, bias, mean, var):
    return torch_F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)


def _native_twin_training_step(x, weight, bias, mean, var):
    """`_native_training_step` once more, as a code object of its own: the A/A control. Two identical
    compiled graphs timed in the same run differ only by the machine's noise, so their ratio is the
    resolution against which the compiled ratio is read."""
    return torch_F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)


def _bnlab_training_step(x, weight, bias, mean, var):
    return bnlab_F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)


def _compiled_forwards(x, weight, bias) -> dict:
    """torch.compile'd training forwards of native and bnlab batch norm, each with its own running
    statistics; the first call (in the warm-up) compiles them.

    Each peer is a function of its own, compiled afresh for this shape with static shapes: Dynamo
    caches compiled code per code object, so peers sharing one (a lambda made in a loop) would each
    pay for checking the other's guards first, and a second shape on the same code would be compiled
    with dynamic dims, a slower kernel than a model of fixed shape gets."""
    torch._dynamo.reset()
    channels = x.shape[1]
    forwards = {}
    peers = (("compiled_native", _native_training_step), ("compiled_native_twin", _native_twin_training_step),
             ("compiled_bnlab", _bnlab_training_step))
    for name, step in peers:
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        stats = (torch.zeros(channels), torch.ones(channels))
        forwards[name] = (lambda compiled=compiled, stats=stats: compiled(x, weight, bias, *stats), (x, weight, bias))
    return forwards


def bench_op(
    shapes: Sequence[Sequence[int]] = OP_SHAPES, repeats: int = 30, channels_last: bool = False,
    progress: Optional[Callable[[str], None]] = None, compile: bool = False,
) -> list[OpResult]:
    """Time bnlab, native and chapter forward + backward on each shape (and, with `compile`, both
    under torch.compile); see the module docstring."""
    results = []
    for shape in shapes:
        shape = tuple(shape)
        steps, saved, diff = _op_case(shape, channels_last, compile)
        t = time_interleaved(steps, repeats)
        floor = 4 * t["copy"]  # 8 passes at the copy's 2-pass bandwidth
        layout = "channels_last" if channels_last and len(shape) == 4 else "contiguous"
        results.append(OpResult(
            shape, layout, t["bnlab"] * 1e3, t["native"] * 1e3, t["chapter"] * 1e3, t["copy"] * 1e3,
            floor * 1e3, t["native"] / t["bnlab"], t["chapter"] / t["native"], floor / t["bnlab"],
            floor / t["native"], saved["bnlab"], saved["native"], saved["chapter"], diff,
            *((t["compiled_native"] * 1e3, t["compiled_bnlab"] * 1e3, t["compiled_native"] / t["compiled_bnlab"],
               t["compiled_native"] / t["compiled_native_twin"]) if compile else ()),
        ))
        if progress:
            progress(format_op_row(results[-1]))
    return results


COMPILED = "+compile"  # suffix of a model name: the model under torch.compile
TRAIN_MODELS = ("bn-lenet", "bn-lenet-torch", "bn-lenet-chapter", "lenet", "bn-lenet+compile",
                "bn-lenet-torch+compile")


@dataclass
class TrainSpeed:
    model: str
    examples_per_sec: float
    vs_torch: float  # examples/s relative to bn-lenet-torch (above 1: faster)
    final_loss: float  # the last batch's loss: all models did train


def bench_train(
    dataset, models: Sequence[str] = TRAIN_MODELS, batch_size: int = 128, rounds: int = 15,
    batches_per_round: int = 20, lr: float = 0.1, seed: int = 0,
) -> list[TrainSpeed]:
    """Training examples per second of each model, measured in turns; see the module docstring."""
    from bnlab import data
    from bnlab.models import build_model

    def endless_batches(epoch_seed: int):
        while True:
            yield from data.batches(dataset.train_images, dataset.train_labels, batch_size, shuffle=True, seed=epoch_seed)
            epoch_seed += 1

    runners = {}
    for name in models:
        torch.manual_seed(seed)
        net = build_model(name.removesuffix(COMPILED))
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        forward = torch.compile(net) if name.endswith(COMPILED) else net
        runners[name] = (forward, optimizer, endless_batches(seed), [float("nan")])

    def steps(name: str, count: int) -> None:
        net, optimizer, batches, last = runners[name]
        for _ in range(count):
            x, y = next(batches)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last[0] = loss.item()

    for name in models:  # warm-up: allocator, kernels, first-touch, compilation
        steps(name, 3)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for name in turns(models, rounds):
        start = time.perf_counter()
        steps(name, batches_per_round)
        samples[name].append(batches_per_round * batch_size / (time.perf_counter() - start))
    speed = {name: statistics.median(s) for name, s in samples.items()}
    reference = speed.get("bn-lenet-torch", float("nan"))
    return [TrainSpeed(name, speed[name], speed[name] / reference, runners[name][3][0]) for name in models]


def best_modes(results: Sequence[TrainSpeed]) -> dict[str, str]:
    """For each model measured both ways, the faster mode: "eager" or "compiled"."""
    speed = {r.model: r.examples_per_sec for r in results}
    return {name: "compiled" if speed[name + COMPILED] > speed[name] else "eager"
            for name in speed if name + COMPILED in speed}


@dataclass
class InferSpeed:
    model: str
    batch_size: int
    unfolded_ms: float
    folded_ms: float
    speedup: float  # unfolded / folded
    max_abs_diff: float  # folded vs unfolded output: folding must not change the function


def bench_infer(models: Sequence[str] = ("bn-lenet", "bn-lenet-torch"), batch_sizes: Sequence[int] = (1, 64, 1024),
                repeats: int = 30, seed: int = 0) -> list[InferSpeed]:
    """Eval-mode forward time of each model before and after folding its batch norms."""
    from bnlab.models import build_model
    from bnlab.nn import fold_batchnorm

    results = []
    for name in models:
        torch.manual_seed(seed)
        net = build_model(name)
        with torch.no_grad():  # a few training-mode batches give the BN layers non-trivial statistics
            for _ in range(5):
                net(torch.rand(256, 1, 28, 28))
        net.eval()
        folded = fold_batchnorm(net)
        for batch_size in batch_sizes:
            x = torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                diff = (net(x) - folded(x)).abs().max().item()
                t = time_interleaved({"unfolded": lambda: net(x), "folded": lambda: folded(x)}, repeats)
            results.append(InferSpeed(name, batch_size, t["unfolded"] * 1e3, t["folded"] * 1e3,
                                      t["unfolded"] / t["folded"], diff))
    return results


def environment() -> dict:
    """What a reader needs to reproduce a figure: versions, threads, CPU, which kernels ran."""
    status = kernels.status()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "bnlab_backend": status["backend"],
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


OP_HEADER = (
    f"{'shape':>20} {'bnlab ms':>9} {'native ms':>9} {'chapter ms':>10} {'vs native':>9} "
    f"{'chap/nat':>8} {'floor ms':>8} {'bnlab %floor':>12} {'native %floor':>13} {'saved B/elem b/n/c':>19}"
)


COMPILED_HEADER = f" {'c-native ms':>11} {'c-bnlab ms':>10} {'c vs c':>7} {'A/A':>6}"


def format_op_row(r: OpResult) -> str:
    shape = "x".join(map(str, r.shape)) + (" CL" if r.layout == "channels_last" else "")
    saved = f"{r.saved_bytes_bnlab:.1f}/{r.saved_bytes_native:.1f}/{r.saved_bytes_chapter:.1f}"
    compiled = "" if r.compiled_bnlab_ms is None else (
        f" {r.compiled_native_ms:11.3f} {r.compiled_bnlab_ms:10.3f} {r.compiled_speedup:6.2f}x"
        f" {r.compiled_twin_ratio:5.2f}x")
    return (
        f"{shape:>20} {r.bnlab_ms:9.3f} {r.native_ms:9.3f} {r.chapter_ms:10.3f} {r.speedup_vs_native:8.2f}x "
        f"{r.native_vs_chapter:7.2f}x {r.floor_ms:8.3f} {r.bnlab_floor_share:11.0%} {r.native_floor_share:12.0%} "
        f"{saved:>19}" + compiled
    )


def compiled_summary(results: Sequence[OpResult]) -> str:
    """One line on the compiled columns: where compiled bnlab is behind compiled native, beside how far
    apart the identical twins (A/A) came out in the same run, so a gap is read against the resolution."""
    behind = [r for r in results if r.compiled_speedup < 1.0]
    twins = [r.compiled_twin_ratio for r in results]
    resolution = f"the identical twins (A/A) came out {min(twins):.2f}x to {max(twins):.2f}x apart in this run"
    if not behind:
        return f"compiled bnlab is at least as fast as compiled native on every shape; {resolution}"
    shapes = ", ".join(f"{'x'.join(map(str, r.shape))} ({r.compiled_speedup:.2f}x)" for r in behind)
    return f"compiled bnlab is behind compiled native on: {shapes}; {resolution}"


def op_markdown(results: Sequence[OpResult]) -> str:
    compiled = results and results[0].compiled_bnlab_ms is not None
    lines = [
        "| shape | bnlab ms | native ms | chapter ms | bnlab vs native | native vs chapter | bnlab % of floor | native % of floor | saved for backward, B/element (bnlab / native / chapter) |"
        + (" compiled native ms | compiled bnlab ms | compiled bnlab vs compiled native | compiled native vs its twin (A/A) |"
           if compiled else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|---:|---:|" if compiled else ""),
    ]
    for r in results:
        lines.append(
            f"| {'×'.join(map(str, r.shape))}{' (channels-last)' if r.layout == 'channels_last' else ''} "
            f"| {r.bnlab_ms:.3f} | {r.native_ms:.3f} | {r.chapter_ms:.3f} | {r.speedup_vs_native:.2f}× "
            f"| {r.native_vs_chapter:.2f}× | {r.bnlab_floor_share:.0%} | {r.native_floor_share:.0%} "
            f"| {r.saved_bytes_bnlab:.1f} / {r.saved_bytes_native:.1f} / {r.saved_bytes_chapter:.1f} |"
            + (f" {r.compiled_native_ms:.3f} | {r.compiled_bnlab_ms:.3f} | {r.compiled_speedup:.2f}× "
               f"| {r.compiled_twin_ratio:.2f}× |" if compiled else "")
        )
    return "\n".join(lines)


def save_results(path, kind: str, results: Sequence, extra: Optional[dict] = None) -> None:
    files.write_json(path, {"benchmark": kind, "environment": environment(), **(extra or {}),
                            "results": [asdict(r) for r in results]})
