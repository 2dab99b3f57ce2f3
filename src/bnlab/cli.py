"""The `bnlab` command.

    bnlab train          train a LeNet of the family on Fashion-MNIST (the chapter's experiment)
    bnlab inspect RUN    the learned gamma and beta, and the running statistics, of every BN layer
    bnlab evaluate RUN   recompute a run's test metrics from its checkpoint
    bnlab data ...       status, download or verify the Fashion-MNIST files
    bnlab study NAME     run a study answering one of the chapter's questions (`bnlab study list`)
    bnlab bench op       time bnlab's batch norm against torch's native kernel and the chapter's code
    bnlab kernels        show (or build) the compiled CPU kernels
    bnlab doctor RUN     diagnose batch-norm pitfalls of a run or (--model) of any PyTorch model

A user's mistake (a bad value, a missing file) ends with a one-line error and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

import torch


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what was wrong, and where to look), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class UsageError(ValueError):
    """A mistake in what the user asked for; the CLI prints it on one line and exits with code 2."""


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str):
    """`text` as a `kind` (int or float) for which `ok` holds; ArgumentTypeError saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def finite_float(text: str) -> float:
    return _number(text, float, math.isfinite, "a number")


def seed_arg(text: str) -> int:
    from bnlab.training.config import SEED_LIMIT

    return _number(text, int, lambda v: 0 <= v < SEED_LIMIT, f"an integer from 0 to {SEED_LIMIT - 1}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def shape_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 256x6x24x24, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected (N, C, ...) with positive sizes, got {text!r}")
    return shape


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


# ---- train, inspect, evaluate ----------------------------------------------------------------------

# Options of `bnlab train` that map onto TrainConfig fields of the same name.
_TRAIN_FIELDS = ("model", "pool", "epochs", "lr", "batch_size", "seed", "device", "momentum", "weight_decay",
                 "bn_momentum", "bn_eps", "threads", "nproc", "data_dir", "train_subset", "test_subset", "out")


def _train_config(args):
    from bnlab.training import TrainConfig, load_config, with_preset

    given = {name: getattr(args, name) for name in _TRAIN_FIELDS if getattr(args, name) is not None}
    if args.no_download:
        given["download"] = False
    if args.precise_stats:
        given["precise_stats"] = True
    if args.compile:
        given["compile"] = True
    if args.resume:
        if not args.out:
            raise UsageError("--resume needs --out RUN_DIR: the run to continue")
        if args.preset:
            raise UsageError("--preset cannot change a run being resumed; drop it")
        base = load_config(args.out)
    else:
        base = with_preset(TrainConfig(), args.preset or "current")
    return dataclasses.replace(base, **given)


def cmd_train(args) -> int:
    from bnlab.training import Diverged, train

    config = _train_config(args)
    try:
        result = train(config, resume=args.resume)
    except Diverged as exc:
        print(f"bnlab: {exc}", file=sys.stderr)
        return 3
    final = result.final
    print(f"done: {config.model} ({config.pool} pooling), {plural(len(result.history), 'epoch')}, final test acc "
          f"{final.test_acc:.4f}; run saved in {result.run_dir}")
    return 0


def _load_run(run_dir):
    """(config, the model in eval mode with the checkpoint's weights, the checkpoint) of a run; ValueError
    naming the file when any of it is missing, damaged or inconsistent."""
    from pathlib import Path

    from bnlab.models import build_model
    from bnlab.training import rundir
    from bnlab.training.loop import set_bn_hyperparameters

    config = rundir.load_config(run_dir)
    state = rundir.load_checkpoint(run_dir)
    rundir.check_fits(Path(run_dir), state, config)
    net = build_model(config.model, pool=config.pool, **config.model_options)
    set_bn_hyperparameters(net, config.bn_momentum, config.bn_eps)  # eps is not in the state dict
    rundir.load_weights(net, state["model"], Path(run_dir) / "checkpoint.pt")
    return config, net.eval(), state


def _vector(t: torch.Tensor, full: bool) -> str:
    values = t.detach().flatten().tolist()
    shown = values if full or len(values) <= 16 else values[:8]
    text = " ".join(f"{v:+.4f}" for v in shown)
    if len(shown) < len(values):
        text += f" ... ({len(values)} values; min {min(values):+.4f}, mean {sum(values) / len(values):+.4f}, max {max(values):+.4f}; --full shows all)"
    return text


def cmd_inspect(args) -> int:
    from bnlab.models import norm_layers

    config, net, state = _load_run(args.run)
    layers = norm_layers(net)
    print(f"{args.run}: {config.model}, {plural(len(state['history']), 'epoch')}, {len(layers)} normalization layers")
    for name, layer in layers:
        print(f"\nlayer {name}: {layer.__class__.__name__}({layer.num_features})")
        for label, attr in (("gamma (weight)", "weight"), ("beta (bias)", "bias"),
                            ("running mean", "running_mean"), ("running var", "running_var")):
            value = getattr(layer, attr, None)
            if value is not None:
                print(f"  {label:>15}: {_vector(value, args.full)}")
    return 0


def cmd_evaluate(args) -> int:
    from bnlab import data
    from bnlab.training import EpochMetrics, evaluate, resolve_device

    config, net, state = _load_run(args.run)
    device = resolve_device(args.device or config.device)
    dataset = data.load(args.data_dir or config.data_dir, download=not args.no_download)
    dataset = dataset.subset(None, config.test_subset, seed=config.seed)
    loss, acc = evaluate(net.to(device), dataset.test_images, dataset.test_labels, device)
    recorded = EpochMetrics(**state["history"][-1])  # the checkpoint's: metrics.csv is a copy of it
    statistics = "precise BN statistics" if state.get("precise_stats") else "BN moving averages"
    print(f"{args.run}: test loss {loss:.4f}, test acc {acc:.4f} with {statistics} "
          f"(recorded after epoch {recorded.epoch} with moving averages: test loss {recorded.test_loss:.4f}, "
          f"test acc {recorded.test_acc:.4f})")
    return 0


def sample_shape_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected one sample's shape like 1x28x28 or 784, got {text!r}")
    return shape


def cmd_doctor(args) -> int:
    """Diagnose a run (its training data) or an importable model; exit 0 healthy, 1 with warnings/errors."""
    from bnlab import doctor

    if (args.run is None) == (args.model is None):
        raise UsageError("give either a run directory or --model module:factory (not both)")
    shape = args.input_shape or (1, 28, 28)
    if args.run:
        config, net, _ = _load_run(args.run)
        data_dir, batch = args.data_dir or config.data_dir, config.batch_size // config.nproc
        batches = doctor.fashion_batches(data_dir, download=not args.no_download, examples=args.examples,
                                         seed=config.seed, input_shape=shape)
    else:
        net = doctor.load_factory(args.model)
        if args.weights:
            doctor.load_weights(net, args.weights)
        net.eval()
        batch = args.per_device_batch
        batches = None if args.data_dir is None else doctor.fashion_batches(
            args.data_dir, download=not args.no_download, examples=args.examples, input_shape=shape)
    diagnosis = doctor.diagnose(net, batches, per_device_batch=batch)
    print(diagnosis.to_json() if args.json else diagnosis.to_markdown() if args.markdown else diagnosis)
    return 0 if diagnosis.healthy else 1


# ---- data -----------------------------------------------------------------------------------------


def cmd_data(args) -> int:
    from bnlab import data

    if args.action == "download":
        root = data.download(args.data_dir, progress=None)
        print(f"Fashion-MNIST is in {root}")
        return 0
    if args.action == "verify":
        results = data.verify(args.data_dir)  # DataError when there is nothing to verify
        for key, path, ok, message in results:
            print(f"{'ok ' if ok else 'BAD'} {path}: {message}")
        return 0 if all(ok for _, _, ok, _ in results) else 1
    root = data.locate(args.data_dir)
    for place in data.search_path(args.data_dir):
        print(f"{'found' if root == place else 'looked'}: {place}")
    print(f"Fashion-MNIST: {root}" if root else "Fashion-MNIST not found; get it with `bnlab data download`")
    return 0 if root else 1


# ---- study ----------------------------------------------------------------------------------------


def cmd_study(args) -> int:
    from pathlib import Path

    from bnlab import studies

    if args.name == "list":
        for study in studies.STUDIES.values():
            print(f"{study.name:>17}  {study.question}")
            print(f"{'':>17}  full run: {study.full_runtime}; --quick: about 2 minutes")
        return 0
    study = studies.get(args.name)
    out = Path(args.out) if args.out else Path("studies") / (study.name + ("-quick" if args.quick else ""))
    settings = studies.Settings(out=out, quick=args.quick, seeds=args.seeds, jobs=args.jobs,
                                data_dir=args.data_dir, download=not args.no_download)
    command = " ".join(["bnlab study", study.name] + (["--quick"] if args.quick else [])
                       + ([f"--seeds {args.seeds}"] if args.seeds else []) + [f"--jobs {args.jobs}"]
                       + ([f"--out {args.out}"] if args.out else []))
    path = studies.run_study(study, settings, command)
    print(f"report written to {path}")
    return 0


# ---- bench ----------------------------------------------------------------------------------------


def _bench_start(args, what: str) -> None:
    """Set the threads and print the benchmark's header line: what is measured, and where."""
    from bnlab import bench

    _set_threads(args.threads)
    env = bench.environment()
    print(f"bnlab bench {what}, {env['threads']} threads, torch {env['torch']}, {env['cpu']}, "
          f"bnlab kernels: {env['bnlab_backend']}")


def _bench_save(args, kind: str, results, extra: Optional[dict] = None) -> None:
    from bnlab import bench

    if args.json:
        bench.save_results(args.json, kind, results, extra)
        print(f"results written to {args.json}")


def cmd_bench_op(args) -> int:
    from bnlab import bench

    _bench_start(args, "op: training forward + backward, float32")
    print(bench.OP_HEADER + (bench.COMPILED_HEADER if args.compile else ""))
    results = bench.bench_op(args.shapes or bench.OP_SHAPES, args.repeats, args.channels_last, progress=print,
                             compile=args.compile)
    if args.markdown:
        print()
        print(bench.op_markdown(results))
    _bench_save(args, "op", results)
    slower = [r for r in results if r.speedup_vs_native < 1.0]
    print("bnlab is at least as fast as native on every shape" if not slower else
          "bnlab is slower than native on: " + ", ".join("x".join(map(str, r.shape)) for r in slower))
    if args.compile:
        print(bench.compiled_summary(results))
    return 0


def cmd_bench_train(args) -> int:
    from bnlab import bench, data

    _bench_start(args, f"train: batch {args.batch_size}, {args.rounds} rounds of {args.batches} batches per model")
    dataset = data.load(args.data_dir, download=not args.no_download)
    results = bench.bench_train(dataset, args.models or bench.TRAIN_MODELS, args.batch_size, args.rounds, args.batches)
    print(f"{'model':>24} {'examples/s':>11} {'vs bn-lenet-torch':>18} {'last loss':>10}")
    for r in results:
        print(f"{r.model:>24} {r.examples_per_sec:11,.0f} {r.vs_torch:17.2f}x {r.final_loss:10.3f}")
    for model, mode in bench.best_modes(results).items():
        print(f"best mode for {model}: {mode}")
    _bench_save(args, "train", results, {"batch_size": args.batch_size})
    return 0


def cmd_bench_infer(args) -> int:
    from bnlab import bench

    _bench_start(args, "infer: eval-mode forward before and after fold_batchnorm")
    print(f"{'model':>15} {'batch':>6} {'unfolded ms':>12} {'folded ms':>10} {'speed-up':>9} {'max |diff|':>11}")
    results = bench.bench_infer(args.models, args.batch_sizes, args.repeats)
    for r in results:
        print(f"{r.model:>15} {r.batch_size:6d} {r.unfolded_ms:12.3f} {r.folded_ms:10.3f} {r.speedup:8.2f}x {r.max_abs_diff:11.1e}")
    _bench_save(args, "infer", results)
    return 0


# ---- kernels ----------------------------------------------------------------------------------------


def cmd_kernels(args) -> int:
    from bnlab import kernels

    if args.action == "build":
        lib = kernels.build(force=args.force)
        print(f"built {lib.path}")
        return 0
    for key, value in kernels.status().items():
        print(f"{key:>10}: {value}")
    return 0


# ---- parser -----------------------------------------------------------------------------------------


def _add_train_parser(sub) -> None:
    from bnlab.models import MODELS
    from bnlab.training import PRESETS, TrainConfig

    p = sub.add_parser("train", help="train a LeNet on Fashion-MNIST (defaults: the chapter's current edition)",
                       description="Train a LeNet of the family on Fashion-MNIST. Defaults are the current "
                                   "edition's: bn-lenet, average pooling, lr 0.1, batch 128, 10 epochs.")
    default = TrainConfig()
    p.add_argument("--model", choices=sorted(MODELS), help=f"the network (default {default.model})")
    p.add_argument("--pool", choices=["avg", "max"], help="pooling: avg (current edition, default) or max (older)")
    p.add_argument("--epochs", type=positive_int, help=f"epochs to train (default: the preset's, {default.epochs})")
    p.add_argument("--lr", type=positive_float, help=f"SGD learning rate (default: the preset's, {default.lr:g})")
    p.add_argument("--batch-size", type=positive_int, help=f"minibatch size (default: the preset's, {default.batch_size})")
    p.add_argument("--momentum", type=finite_float, help=f"SGD momentum, not BN's (default {default.momentum:g})")
    p.add_argument("--weight-decay", type=finite_float, help=f"SGD weight decay (default {default.weight_decay:g})")
    p.add_argument("--bn-momentum", type=finite_float, metavar="M",
                   help="every BN layer's momentum in torch's convention, running = (1-M)*running + M*batch "
                        "(default: the layers' own, 0.1)")
    p.add_argument("--bn-eps", type=positive_float, metavar="EPS",
                   help="every BN layer's eps, added to the variance (default: the layers' own, 1e-5)")
    p.add_argument("--seed", type=seed_arg, help=f"seed of the initialization and the data order (default {default.seed})")
    p.add_argument("--device", help=f"cpu, cuda[:N] or auto (default {default.device}: CUDA when there is one)")
    p.add_argument("--threads", type=positive_int,
                   help="torch CPU threads per process (default: torch's; with --nproc, cores / N)")
    p.add_argument("--nproc", type=positive_int, metavar="N",
                   help="train data-parallel in N processes with synchronized batch norm (gloo on CPU, NCCL on "
                        f"CUDA; default {default.nproc})")
    p.add_argument("--compile", action="store_true",
                   help="train the model wrapped in torch.compile (default: eager)")
    p.add_argument("--data-dir", help="where the Fashion-MNIST files are, or go (default: the lookup order of "
                                      "`bnlab data status`)")
    p.add_argument("--no-download", action="store_true",
                   help="fail instead of downloading missing data (default: download)")
    p.add_argument("--train-subset", type=positive_int, metavar="N",
                   help="train on a random N examples (default: all 60000)")
    p.add_argument("--test-subset", type=positive_int, metavar="N",
                   help="test on a random N examples (default: all 10000)")
    p.add_argument("--out", help="run directory (default runs/<model>-...-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (default: start a new run)")
    p.add_argument("--precise-stats", action="store_true",
                   help="after the last epoch, replace the BN moving averages by exact training-set statistics "
                        "(default: keep the moving averages)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="current (lr 0.1, batch 128; the default) or classic (lr 1.0, batch 256)")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bnlab", description="Batch normalization done properly.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    _add_train_parser(sub)

    inspect = sub.add_parser("inspect", help="print the learned gamma/beta and running statistics of a run")
    inspect.add_argument("run", help="a run directory")
    inspect.add_argument("--full", action="store_true", help="print every value (default: the first 8 of long ones)")
    inspect.set_defaults(func=cmd_inspect)

    evaluate = sub.add_parser("evaluate", help="recompute a run's test metrics from its checkpoint")
    evaluate.add_argument("run", help="a run directory")
    evaluate.add_argument("--device", help="cpu, cuda[:N] or auto (default: the run's)")
    evaluate.add_argument("--data-dir", help="where the Fashion-MNIST files are (default: the run's)")
    evaluate.add_argument("--no-download", action="store_true", help="fail instead of downloading (default: download)")
    evaluate.set_defaults(func=cmd_evaluate)

    data = sub.add_parser("data", help="the Fashion-MNIST files: status, download, verify")
    data.add_argument("action", nargs="?", choices=["status", "download", "verify"], default="status",
                      help="where the files are (default), fetch them, or check their sha256")
    data.add_argument("--data-dir", help="a directory to use instead of the lookup order (default: the lookup order)")
    data.set_defaults(func=cmd_data)

    study = sub.add_parser("study", help="run a study that answers one of the chapter's questions",
                           description="Run a study and write DIR/report.md; `bnlab study list` names them.")
    study.add_argument("name", help="a study name, or `list`")
    study.add_argument("--quick", action="store_true",
                       help="the reduced version: subset, fewer epochs, one seed (default: the full study)")
    study.add_argument("--seeds", type=positive_int, help="seeds per configuration (default: the study's; 1 with --quick)")
    study.add_argument("--jobs", type=positive_int, default=1, help="runs in parallel processes (default 1)")
    study.add_argument("--out", help="output directory (default studies/NAME, or studies/NAME-quick)")
    study.add_argument("--data-dir", help="where the Fashion-MNIST files are (default: the lookup order)")
    study.add_argument("--no-download", action="store_true", help="fail instead of downloading (default: download)")
    study.set_defaults(func=cmd_study)

    bench = sub.add_parser("bench", help="benchmarks against peers measured in the same run")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH", parser_class=OneLineParser)
    op = bench_sub.add_parser("op", help="batch norm forward+backward: bnlab vs native vs the chapter's code")
    op.add_argument("--shapes", type=shape_arg, nargs="+", help="shapes like 256x6x24x24 (default: LeNet + ResNet)")
    op.add_argument("--repeats", type=positive_int, default=30, help="timed samples per implementation (default 30)")
    op.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    op.add_argument("--channels-last", action="store_true",
                    help="4D inputs in channels-last layout (default: contiguous)")
    op.add_argument("--compile", action="store_true",
                    help="also time torch.compile of native and of bnlab batch norm (default: off)")
    op.add_argument("--markdown", action="store_true", help="also print a Markdown table (default: off)")
    op.add_argument("--json", help="write the results to this JSON file (default: none)")
    op.set_defaults(func=cmd_bench_op)
    tr = bench_sub.add_parser("train", help="training examples/s: bn-lenet vs bn-lenet-torch vs the chapter's code")
    tr.add_argument("--models", nargs="+", default=None,
                    help="models to compare; NAME+compile runs NAME under torch.compile (default: the BN LeNets, "
                         "lenet, bn-lenet+compile and bn-lenet-torch+compile)")
    tr.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (default 128)")
    tr.add_argument("--rounds", type=positive_int, default=15, help="turns each model gets (default 15)")
    tr.add_argument("--batches", type=positive_int, default=20, help="batches per turn (default 20)")
    tr.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    tr.add_argument("--data-dir", help="where the Fashion-MNIST files are (default: the lookup order)")
    tr.add_argument("--no-download", action="store_true", help="fail instead of downloading (default: download)")
    tr.add_argument("--json", help="write the results to this JSON file (default: none)")
    tr.set_defaults(func=cmd_bench_train)
    inf = bench_sub.add_parser("infer", help="eval forward before/after folding BN into the conv/linear layers")
    inf.add_argument("--models", nargs="+", default=["bn-lenet", "bn-lenet-torch"],
                     help="models to compare (default bn-lenet bn-lenet-torch)")
    inf.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 64, 1024],
                     help="batch sizes (default 1 64 1024)")
    inf.add_argument("--repeats", type=positive_int, default=30, help="timed samples per case (default 30)")
    inf.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    inf.add_argument("--json", help="write the results to this JSON file (default: none)")
    inf.set_defaults(func=cmd_bench_infer)

    kern = sub.add_parser("kernels", help="the compiled CPU kernels: status, or build them now")
    kern.add_argument("action", nargs="?", choices=["status", "build"], default="status",
                      help="show the kernels' state (default) or build them now")
    kern.add_argument("--force", action="store_true", help="rebuild even if cached (default: reuse the cache)")
    kern.set_defaults(func=cmd_kernels)

    doc = sub.add_parser("doctor", help="diagnose batch-norm pitfalls of a run or any PyTorch model",
                         description="Diagnose batch-norm pitfalls with evidence and a fix. Exit 0 when healthy, "
                                     "1 with warnings or errors, 2 on a usage error.")
    doc.add_argument("run", nargs="?", help="a bnlab run directory (its training data feeds the data checks)")
    doc.add_argument("--model", help="module:factory returning a torch.nn.Module (default: none; give RUN or this)")
    doc.add_argument("--weights", help="a state dict for --model, loaded with weights_only=True (default: none)")
    doc.add_argument("--input-shape", type=sample_shape_arg, help="one sample's shape, e.g. 784 or 1x28x28, for the "
                     "Fashion-MNIST images (default 1x28x28)")
    doc.add_argument("--per-device-batch", type=positive_int,
                     help="training batch size per device, for --model (default: unknown, check skipped)")
    doc.add_argument("--examples", type=positive_int, default=10000,
                     help="training images the data checks use (default 10000)")
    doc.add_argument("--data-dir", help="where the Fashion-MNIST files are (default: the run's; none for --model)")
    doc.add_argument("--no-download", action="store_true", help="fail instead of downloading (default: download)")
    out = doc.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output (default: a short report)")
    out.add_argument("--markdown", action="store_true", help="a Markdown report (default: a short report)")
    doc.set_defaults(func=cmd_doctor)
    return parser


def _one_line_warnings(default_format):
    """warnings.formatwarning for the CLI: bnlab's own notices (a cache rebuilt, a fallback taken) as the
    one line they are written as, not a pointer into bnlab's source; other warnings as usual."""

    def format(message, category, filename, lineno, line=None) -> str:
        text = str(message)
        if text.startswith("bnlab: "):
            return f"bnlab: notice: {text.removeprefix('bnlab: ')}\n"
        return default_format(message, category, filename, lineno, line)

    return format


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    default_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings(default_format)
    try:
        return func(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:  # a user's mistake or a missing file: one line, no traceback
        print(f"bnlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
