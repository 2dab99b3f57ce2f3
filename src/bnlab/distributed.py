"""bnlab on torch.distributed: batch statistics over every process, and the plumbing of data-parallel training.

Synchronized batch normalization. In data-parallel training each process sees only its shard of the
global batch; plain batch norm would normalize every shard by its own statistics. `sync_batch_norm`
(and the layer `bnlab.nn.SyncBatchNorm` built on it) normalizes by the statistics of the whole global
batch, so the result equals single-process batch norm on the concatenated batch, for shards of any
size, an empty one included. Per channel, with process p holding n_p values, mean_p and
M2_p = sum (x - mean_p)^2:

    n    = sum_p n_p
    mean = sum_p n_p * mean_p / n
    M2   = sum_p M2_p + sum_p n_p * (mean_p - mean)^2      (Chan et al.; every term >= 0)
    var  = M2 / n                                           (the running variance gets M2 / (n - 1))

merged in float64, so there is no E[x^2] - E[x]^2 cancellation. With xc = x - mean, invstd =
1 / sqrt(var + eps) and the sums over all processes, the hand-derived backward is

    dx          = weight * invstd * (dy - sum(dy) / n - xc * invstd^2 * sum(dy * xc) / n)
    d weight_p  = invstd * sum_p(dy * xc)        (this process's share: see below)
    d bias_p    = sum_p(dy)

Collectives per training step and layer: one all_gather of the packed (n_p, mean_p, M2_p), 2C + 1
float64 values, in the forward; one all_reduce of (sum dy, sum dy * xc), 2C float64 values, in the
backward (none if the input needs no gradient). Evaluation mode uses the running statistics and
communicates nothing.

The gradient convention. Let every process p backpropagate its own loss L_p, and S = sum_p L_p. The
backward all-reduces the sums of dy, so each process's input gradient is dS/dx_p, the coupling through
the global statistics included; the weight and bias gradients are this process's share of dS/dweight
and dS/dbias (the shares sum to them), exactly as every other parameter's gradient is its share. DDP
averages over the W processes: every parameter gets dS/dtheta / W. The gradient of the global mean
loss L = (1 / B) sum_i loss_i over a global batch of B samples is therefore what DDP produces when
S = W * L, i.e. when process p backpropagates

    L_p = (W / B) * sum over its own samples of loss_i            (`ddp_loss`)

With equal shards of B / W samples that is the usual per-process mean loss; with unequal shards the
per-process mean would weight the samples of a small shard more, and is wrong. (Returning all-reduced
weight and bias gradients instead of shares would make DDP's average W times too large for them.)

Data-parallel plumbing. `launch` runs a function in N spawned processes that form a process group on
127.0.0.1 (gloo on CPU, NCCL on CUDA), every wait bounded by an optional timeout, and returns what each
returned or re-raises the first error; `rank_environment` reads the rank a launcher such as torchrun
set; `shard_bounds` cuts a global batch into contiguous shards. `bnlab train --nproc N` is built on
these (see `bnlab.training.loop`). To run under torchrun instead:

    torchrun --nproc-per-node 2 -m bnlab.cli train --device cpu --epochs 10

`launch` starts its processes with torch.multiprocessing (spawn) but not with `torch.multiprocessing.spawn`
or torch's elastic agent: `spawn` neither returns the functions' results nor bounds the wait with a
timeout, and it reports a failure as a ProcessRaisedException holding the child's traceback as text,
where `launch` re-raises the child's own exception (a ValueError stays a ValueError, so the CLI prints
it on one line); the elastic agent (torchrun's) restarts and rendezvouses workers, which a run of one
machine does not need, and it is a command to start, not a function that returns results.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnlab import functional as F
from bnlab.functional import _compute_dtype, _per_channel, _reduce_dims

__all__ = [
    "SyncBatchNormFunction",
    "sync_batch_norm",
    "group_size",
    "ddp_loss",
    "shard_bounds",
    "RankEnvironment",
    "rank_environment",
    "joined_process_group",
    "backend_for",
    "free_loopback_port",
    "launch",
    "report",
]


# ---- synchronized batch normalization ----------------------------------------------------------------


def group_size(process_group=None) -> int:
    """The number of processes in `process_group` (default: the whole world); 1 outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    size = dist.get_world_size(process_group)
    if size < 1:  # torch answers -1 to a process outside the group
        raise ValueError(
            f"this process (rank {dist.get_rank()}) is not a member of the process group it was given; "
            "pass a group it belongs to (every rank calls torch.distributed.new_group for every group)"
        )
    return size


def _check_backend(input: Tensor, process_group) -> None:
    backend = dist.get_backend(process_group)
    if backend == "nccl" and not input.is_cuda:
        raise ValueError(
            f"the process group's backend is NCCL, which reduces CUDA tensors only, but the input is on "
            f"{input.device}; move the model and data to the GPU, or use a gloo process group for CPU"
        )


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> Tensor:
    r"""Training-mode batch normalization with the statistics of the batch over every process of the group.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    where E and Var (biased) run over the concatenation of every process's input. The running
    statistics, if given, are updated in place with torch's momentum convention,
    ``running = (1 - momentum) * running + momentum * batch``, the variance entering unbiased with the
    global count. Every process of the group must call this (in the same order as its other
    collectives), also with an empty input (0 samples), which then contributes nothing; when every
    process's input is empty, each gets an empty output and the running statistics stay, as batch
    norm's on an empty batch (`bnlab.functional.empty_batch`). Outside an initialized process group, or
    in a group of one, this is `bnlab.functional.batch_norm` in training.

    See the module docstring for the backward and the gradient convention under DDP.

    Args:
        input: (N, C, ...) with 2 to 5 dims, floating; N may be 0.
        running_mean, running_var: (C,) running statistics, or None.
        weight, bias: (C,) scale and shift, or None.
        momentum: the weight of the batch statistics in the running update.
        eps: added to the variance for stability.
        process_group: the processes to synchronize over; default the whole world.

    Returns:
        A tensor of the input's shape and dtype.

    Example::

        # in every process of an initialized process group
        y = sync_batch_norm(x_shard, running_mean, running_var, weight, bias)
    """
    if group_size(process_group) == 1:
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    F.check_input(
        input,
        tensors=(("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)),
    )
    _check_backend(input, process_group)
    if F.in_graph(input):
        return _sync_batch_norm_in_graph(input, running_mean, running_var, weight, bias, momentum, eps, process_group)
    return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps, process_group)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the processes, by functional collectives that torch.compile puts in its
    graph: the gradient of a sum over processes is the sum over processes of the gradient."""

    @staticmethod
    def forward(ctx, local, process_group):
        ctx.process_group = process_group
        return funcol.all_reduce(local, "sum", process_group or dist.group.WORLD)

    @staticmethod
    def backward(ctx, grad):
        return funcol.all_reduce(grad.contiguous(), "sum", ctx.process_group or dist.group.WORLD), None


def _sync_batch_norm_in_graph(input, running_mean, running_var, weight, bias, momentum, eps, process_group):
    """`sync_batch_norm` for torch.compile (fullgraph included): the global statistics by two
    differentiable all_reduces — count and sum, then the sum of squares about the global mean (an exact
    two-pass variance) — and the rest in tensor ops, which autograd differentiates into the module
    docstring's backward. The eager path's single-value check reads the count back from the tensor,
    which a graph cannot; every shard empty leaves the running statistics as they are, as eagerly."""
    x = input.to(_compute_dtype(input.dtype))
    dims, channels = _reduce_dims(x), x.shape[1]
    count = x.new_full((1,), x.numel() // channels)
    sums = _AllReduceSum.apply(torch.cat([count, x.sum(dims)]), process_group)
    total = sums[0]
    mean = sums[1:] / total.clamp(min=1)
    centered = x - _per_channel(mean, x)
    m2 = _AllReduceSum.apply((centered * centered).sum(dims), process_group)
    var = m2 / total.clamp(min=1)
    if running_mean is not None:
        seen = total > 0
        running_mean.copy_(torch.where(seen, F._moved(running_mean, mean, momentum), running_mean))
        running_var.copy_(torch.where(seen, F._moved(running_var, m2 / (total - 1).clamp(min=1), momentum),
                                      running_var))
    y = F.per_channel_affine(centered * _per_channel(torch.rsqrt(var + eps), x), weight, bias)
    return y.to(input.dtype)


def _all_gather_rows(local: Tensor, process_group) -> Tensor:
    """(world, len(local)): every process's `local`, in rank order, from one all_gather."""
    world = group_size(process_group)
    if world == 1:
        return local.unsqueeze(0)
    rows = local.new_empty(world, local.numel())
    # The list form of all_gather: gloo, NCCL and older torch versions all support it.
    dist.all_gather(list(rows.unbind(0)), local, group=process_group)
    return rows


def _all_reduce_sum(local: Tensor, process_group) -> Tensor:
    if group_size(process_group) > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    return local


def _update_running(running: Optional[Tensor], batch: Tensor, momentum: float) -> None:
    if running is not None:
        with torch.no_grad():
            running.mul_(1.0 - momentum).add_(batch.to(running.dtype), alpha=momentum)


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the processes of a group, with the hand-derived backward of the module
    docstring. Arguments as `sync_batch_norm` (weight and bias may be None). Without a process group it
    computes plain training-mode batch norm, which gradcheck can hold it to.

    Saves the input, the weight and the per-channel global mean and inverse standard deviation. First
    derivatives only: a double backward raises.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, process_group):
        x = input.to(_compute_dtype(input.dtype))
        dims, channels = _reduce_dims(x), x.shape[1]
        count = x.numel() // channels
        local = torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device)
        local[0] = count
        if count:
            # var_mean reduces with Welford's algorithm; the merge below is in float64.
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            local[1 : channels + 1] = mean
            local[channels + 1 :] = var.double() * count
        gathered = _all_gather_rows(local, process_group)
        counts, means, m2s = gathered[:, :1], gathered[:, 1 : channels + 1], gathered[:, channels + 1 :]
        total = int(counts.sum().item())
        if total == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {total} over all "
                f"{gathered.shape[0]} processes (this process's input size {tuple(input.shape)}); use a larger "
                "global batch, or call .eval() to normalize with the running statistics"
            )
        # Every shard empty (total 0, seen by every process alike): torch's empty batch. The output is
        # empty, the running statistics stay, and mean 0 and var 1 keep the weight gradient 0, not NaN.
        mean = (counts * means).sum(0) / max(total, 1)
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        var = m2 / total if total else torch.ones_like(m2)
        if total:
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, m2 / (total - 1), momentum)

        mean, invstd = mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        y = (x - _per_channel(mean, x)) * _per_channel(scale, x)
        if bias is not None:
            y = y + _per_channel(bias.to(x.dtype), x)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total, ctx.process_group = total, process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        input, weight, mean, invstd = ctx.saved_tensors
        x = input.to(mean.dtype)
        dy = dy.to(mean.dtype)
        dims, channels = _reduce_dims(x), x.shape[1]
        xc = x - _per_channel(mean, x)
        sum_dy = dy.sum(dims)
        sum_dy_xc = (dy * xc).sum(dims)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            totals = _all_reduce_sum(torch.cat([sum_dy, sum_dy_xc]).double(), ctx.process_group)
            total_dy, total_dy_xc = totals.to(x.dtype).split(channels)
            scale = invstd if weight is None else invstd * weight.to(x.dtype)
            count = max(ctx.total, 1)  # 0 only when every shard is empty, and dy with them
            centered = dy - _per_channel(total_dy / count, x)
            centered = centered - xc * _per_channel(invstd.square() * total_dy_xc / count, x)
            grad_input = (centered * _per_channel(scale, x)).to(input.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xc * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


# ---- data parallel: sharding and the loss ------------------------------------------------------------


def shard_bounds(batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous shard of a global batch of `batch_size` samples.

    Shards differ by at most one sample, the first ``batch_size % world_size`` ranks taking one more;
    a batch smaller than the world leaves the last ranks empty.

    Example:
        >>> [shard_bounds(7, 3, r) for r in range(3)]
        [(0, 3), (3, 5), (5, 7)]
        >>> shard_bounds(1, 2, 1)
        (1, 1)
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 0:
        raise ValueError(
            f"expected batch_size >= 0, world_size >= 1 and 0 <= rank < world_size, got batch_size "
            f"{batch_size}, world_size {world_size}, rank {rank}"
        )
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def ddp_loss(local_loss_sum: Tensor, global_batch_size: int, world_size: int) -> Tensor:
    """The loss a process backpropagates so that DDP's averaged gradient is that of the global mean loss.

    `local_loss_sum` is the sum of the per-sample losses of this process's shard. DDP averages the
    processes' gradients, so every process scales by ``world_size / global_batch_size`` (see the module
    docstring); this is right for unequal and empty shards, where the per-shard mean is not.

    Example:
        >>> float(ddp_loss(torch.tensor(6.0), global_batch_size=3, world_size=2))
        4.0
    """
    if global_batch_size < 1:
        raise ValueError(f"the global batch must hold at least one sample, got {global_batch_size}")
    return local_loss_sum * (world_size / global_batch_size)


# ---- process groups ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankEnvironment:
    """Where a launcher placed this process: its rank among all and among those on this machine."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def rank_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[RankEnvironment]:
    """The rank a launcher (torchrun, or `launch`) gave this process through RANK, WORLD_SIZE and
    LOCAL_RANK (and LOCAL_WORLD_SIZE, default WORLD_SIZE); None when none of them is set.

    Example:
        >>> rank_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
        RankEnvironment(rank=1, world_size=2, local_rank=1, local_world_size=2)
        >>> rank_environment({}) is None
        True
    """
    environ = os.environ if environ is None else environ
    present = [name for name in _LAUNCHER_VARIABLES if name in environ]
    if not present:
        return None
    missing = [name for name in _LAUNCHER_VARIABLES if name not in environ]
    if missing:
        raise ValueError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}: a launcher such as "
            "torchrun sets RANK, WORLD_SIZE and LOCAL_RANK together; unset them to run without one"
        )
    try:
        values = {name: int(environ[name]) for name in (*_LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE") if name in environ}
    except ValueError:
        shown = {name: environ[name] for name in (*_LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE") if name in environ}
        raise ValueError(f"the launcher variables must be integers, got {shown}") from None
    env = RankEnvironment(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"],
                          values.get("LOCAL_WORLD_SIZE", values["WORLD_SIZE"]))
    if not (0 <= env.rank < env.world_size and 0 <= env.local_rank < env.local_world_size <= env.world_size):
        raise ValueError(f"inconsistent launcher variables {env}: expected 0 <= RANK < WORLD_SIZE and "
                         "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE")
    return env


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on `device`: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def joined_process_group(backend: str) -> Iterator[None]:
    """Be in the default process group for the block: join it from the environment (torchrun's
    MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE) unless this process is already in one, and leave it
    afterwards only if it was joined here."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group(backend, init_method="env://")
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS's pick), for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface() -> Optional[str]:
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((name for name in ("lo", "lo0") if name in names), None)


# ---- launching processes -----------------------------------------------------------------------------

# How long the launcher lets the other processes finish once one has failed, before ending them: they
# are usually blocked in a collective with the failed one and fail on their own.
PEER_GRACE_SECONDS = 5.0

_launcher_inbox = None  # in a process started by `launch`: the queue back to the launcher


def report(message: str) -> None:
    """Show `message` to the user: in a process started by `launch` the launcher's `on_message` gets
    it (the launcher's log, its terminal); in any other process it is printed."""
    if _launcher_inbox is None:
        print(message, flush=True)
    else:
        _launcher_inbox.put((None, "message", message))


def _portable_error(exc: BaseException) -> tuple[bytes, str]:
    """(the exception pickled, its traceback): the exception itself if it survives pickling, else a
    RuntimeError naming it."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)
    except Exception:
        payload = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return payload, text


def _run_rank(fn, args, rank: int, world_size: int, port: int, backend: str, inbox) -> None:
    """The body of a launched process: join the group, run fn(*args), send the result or the error."""
    global _launcher_inbox
    _launcher_inbox = inbox
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    loopback = _loopback_interface()
    if backend == "gloo" and loopback:
        # Without it gloo connects through the interface the host name resolves to, not 127.0.0.1.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        try:
            result = fn(*args)
            dist.barrier()  # rank 0 hosts the rendezvous store: nobody leaves while another still needs it
        finally:
            dist.destroy_process_group()
        inbox.put((rank, "result", pickle.dumps(result)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the launcher, which re-raises it
        inbox.put((rank, "error", _portable_error(exc)))
        sys.exit(1)


def launch(
    fn: Callable[..., Any],
    nproc: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout: Optional[float] = None,
    on_message: Optional[Callable[[str], None]] = None,
) -> list:
    """Run ``fn(*args)`` in `nproc` new processes that form the default process group; return the list
    of their results, in rank order.

    The processes are started with the "spawn" method and meet at a free TCP port on 127.0.0.1 (gloo
    also talks over the loopback interface). In each, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE
    are set as torchrun sets them, and with backend "nccl" the current CUDA device is the rank's. `fn`
    must be a module-level function, and `fn`, `args` and the results picklable (tensors in `args` travel
    through shared memory). Messages sent with `report` go to `on_message` (default: print).

    If a process raises, the others get PEER_GRACE_SECONDS to finish, are then ended, and the first
    error is re-raised here (its traceback in the process attached as a note). With `timeout`, processes
    still running after that many seconds are ended and TimeoutError is raised.

    Example::

        def double(x):
            return 2 * x * (torch.distributed.get_rank() + 1)

        launch(double, 2, args=(3,))    # [6, 12]
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}")
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    inbox = context.Queue()
    port = free_loopback_port()
    processes = [
        context.Process(target=_run_rank, args=(fn, args, rank, nproc, port, backend, inbox), daemon=True)
        for rank in range(nproc)
    ]
    started: list = []
    results: dict[int, Any] = {}
    errors: list[tuple[int, BaseException]] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    failed_at: Optional[float] = None

    def receive(block_seconds: float) -> bool:
        try:
            rank, kind, payload = inbox.get(timeout=block_seconds) if block_seconds else inbox.get_nowait()
        except queue.Empty:
            return False
        if kind == "message":
            (on_message or print)(payload)
        elif kind == "result":
            results[rank] = pickle.loads(payload)
        else:
            error, text = pickle.loads(payload[0]), payload[1]
            if hasattr(error, "add_note"):
                error.add_note(f"raised in launched process rank {rank} of {nproc}:\n{text}")
            errors.append((rank, error))
        return True

    try:
        for process in processes:
            try:
                process.start()
                started.append(process)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise ValueError(
                    f"cannot start the processes: fn and args must be picklable and fn defined at module level "
                    f"({exc})"
                ) from None
        while any(p.is_alive() for p in started):
            receive(0.1)
            now = time.monotonic()
            if errors and failed_at is None:
                failed_at = now
            if failed_at is not None and now - failed_at > PEER_GRACE_SECONDS:
                break
            if deadline is not None and now > deadline:
                running = [rank for rank, p in enumerate(processes) if p.is_alive()]
                raise TimeoutError(
                    f"the {nproc} launched processes did not finish within {timeout:g} s; ranks {running} were "
                    "still running and have been ended (a hang in a collective, or too short a timeout)"
                )
        while receive(0):
            pass
    finally:
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        inbox.close()
    if errors:
        raise errors[0][1]
    silent = [(rank, p.exitcode) for rank, p in enumerate(processes) if rank not in results]
    if silent:
        raise RuntimeError(
            "launched processes ended without a result (killed, or out of memory?): "
            + ", ".join(f"rank {rank} exit code {code}" for rank, code in silent)
        )
    return [results[rank] for rank in range(nproc)]
