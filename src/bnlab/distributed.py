"""bnlab on torch.distributed, the plumbing of data-parallel training: processes, ranks, shards and the loss.

The synchronized batch statistics themselves (SyncBatchNorm's math) live in `bnlab.functional.sync`.

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
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor


__all__ = [
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


def _die_with_parent(parent: int) -> None:
    """End this process when the launcher `parent` dies, however it dies (even by SIGKILL, which runs no
    cleanup there): an orphaned worker would go on writing into the run and holding its lock. Linux's
    PR_SET_PDEATHSIG does it at once; a thread watching the parent id covers other systems."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="bnlab-parent-watch", daemon=True).start()


def _run_rank(fn, args, rank: int, world_size: int, port: int, backend: str, inbox, parent: int) -> None:
    """The body of a launched process: join the group, run fn(*args), send the result or the error."""
    global _launcher_inbox
    _die_with_parent(parent)
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

    The processes end with the launcher: killed (even by SIGKILL), it leaves no orphan behind.
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
        context.Process(target=_run_rank, args=(fn, args, rank, nproc, port, backend, inbox, os.getpid()),
                        daemon=True)
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
