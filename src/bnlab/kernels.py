"""The compiled CPU kernels of batch normalization: build, cache and load the `bnlab::batch_norm` operator.

`csrc/batch_norm.cpp` holds the kernels and registers them as a torch operator whose autograd function
is written in C++ (`TORCH_LIBRARY`): called from Python it costs a few microseconds, where a Python
torch.autograd.Function costs about twenty. It is compiled against the installed torch's headers with
the system C++ compiler (about 20 seconds; no Python headers needed) on first use, or ahead of time
with `bnlab kernels build`, cached under ``$BNLAB_CACHE_DIR`` (default ``~/.cache/bnlab``) in a folder
named by a hash of the source, the compiler, torch's version and the CPU, and loaded with
``torch.ops.load_library``. It shares torch's OpenMP runtime.

The cache is untrusted: loading a damaged shared object can crash the process, so the library is
checked before it is loaded. Each build records the library's size and sha256 (and its key) in a
sidecar, ``libbnlab_ops.so.sha256``, written before the library is renamed into place. An entry whose
library or sidecar is missing, unreadable, truncated, altered, foreign or not a file is removed and
rebuilt, with one RuntimeWarning naming it; if the rebuild fails, the fallback below applies.

The environment variable ``BNLAB_KERNELS`` picks the implementation:

- ``auto`` (default): the compiled kernels when they build, else the pure-PyTorch path (with one warning);
- ``compiled``: the compiled kernels, and an error if they cannot be built;
- ``torch``: always the pure-PyTorch path.

Both paths compute the same function; the tests hold them to each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from bnlab import files
from bnlab.paths import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "batch_norm.cpp"
CHOICES = ("auto", "compiled", "torch")
DTYPES = (torch.float32, torch.float64)  # what the kernels take; anything else goes the pure-PyTorch way
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]  # -w: torch's headers are noisy
_OPENMP = ["-fopenmp"]
_TORCH = Path(torch.__file__).parent
LIBRARY_NAME = "libbnlab_ops.so"


class KernelBuildError(RuntimeError):
    """The compiled kernels were required (BNLAB_KERNELS=compiled) but could not be built."""


def requested_backend() -> str:
    choice = os.environ.get("BNLAB_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(
            f"BNLAB_KERNELS must be one of {', '.join(CHOICES)}, got {choice!r}; "
            "unset it to use the compiled kernels when they build"
        )
    return choice


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _cpu_signature() -> str:
    # -march=native ties the binary to this CPU: a cache shared between machines must not mix them.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    parts = (SOURCE.read_bytes(), " ".join(_FLAGS).encode(), version.encode(), _cpu_signature().encode(),
             torch.__version__.encode(), str(_TORCH).encode())  # the library is tied to this torch
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def _compile(compiler: str, target: Path, key: str) -> None:
    """Compile into a temporary file beside `target`, record its checksum in the sidecar, then rename:
    a reader never sees half a library, nor a library without its checksum."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors = []
        torch_flags = [
            f"-I{_TORCH / 'include'}", f"-I{_TORCH / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            f"-L{_TORCH / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{_TORCH / 'lib'}",
        ]
        for extra in (_OPENMP, []):  # a compiler without OpenMP still gets single-threaded kernels
            proc = subprocess.run(
                [compiler, *_FLAGS, *extra, "-o", tmp, str(SOURCE), *torch_flags], capture_output=True, text=True
            )
            if proc.returncode == 0:
                files.write_json(sidecar(target), {"key": key, "sha256": _sha256(Path(tmp)),
                                                   "size": os.path.getsize(tmp)})
                os.replace(tmp, target)
                return
            errors.append(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
        raise OSError(f"{compiler} failed: {' / '.join(errors)}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sidecar(target: Path) -> Path:
    """The file that records what was built at `target`: {"key", "sha256", "size"} as JSON."""
    return target.with_name(target.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_entry(target: Path, key: str) -> Optional[str]:
    """None when `target` holds exactly the library that was built for `key` (its sidecar says so and
    its bytes agree), else what is wrong with the cache entry. Reads the files; loads nothing."""
    if target.is_dir():
        return "a directory stands where the library should be"
    if not target.is_file():
        return "it is not a regular file" if os.path.lexists(target) else "it is missing"
    record_path = sidecar(target)
    try:
        record = json.loads(record_path.read_bytes().decode())
        recorded = (str(record["key"]), str(record["sha256"]), int(record["size"]))
    except FileNotFoundError:
        return f"its checksum file {record_path.name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or UTF-8
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return f"its checksum file {record_path.name} is unreadable or damaged ({reason})"
    recorded_key, expected, size = recorded
    if recorded_key != key:
        return f"it was built for another configuration ({recorded_key}, not {key})"
    try:
        actual = os.path.getsize(target)
        digest = _sha256(target)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if actual != size:
        return f"it holds {actual} bytes where {size} were built"
    if digest != expected:
        return "its bytes differ from the library that was built (sha256 mismatch)"
    return None


def _remove(path: Path) -> None:
    """Remove a cache file, link or directory (a damaged entry); bnlab's cache only, see `build`."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@contextmanager
def _entry_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry while it is checked, rebuilt and loaded, so that no
    other process removes or replaces the library in between. Best effort: a read-only cache or a
    system without flock goes unlocked (the checksum check still holds)."""
    try:
        import fcntl

        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)


class KernelLibrary:
    """The loaded operator library.

    - `batch_norm` (torch.ops.bnlab.batch_norm, with torch's signature): the eager operator, its
      autograd node in C++ and the running statistics updated in place by the kernel;
    - `batch_norm_forward` / `batch_norm_backward`: the same kernels as pure functions, for graphs
      (torch.compile, torch.export), with their autograd in C++ and fake kernels registered here on load.
    """

    def __init__(self, path: Path):
        self.path = path
        torch.ops.load_library(str(path))
        self.batch_norm = torch.ops.bnlab.batch_norm
        self.batch_norm_forward = torch.ops.bnlab.batch_norm_forward
        self.batch_norm_backward = torch.ops.bnlab.batch_norm_backward
        self.max_threads = torch.ops.bnlab.max_threads
        _register_graph_operators()


_graph_operators_registered = False


def _register_graph_operators() -> None:
    """Fake kernels for the functional operators: what torch.compile and torch.export need to trace them
    without data (shapes only). Their autograd is registered in C++ (csrc/batch_norm.cpp,
    ForwardFunction), where it costs no Python call per step; `torch.library.opcheck` tests the whole
    contract. Once per process."""
    global _graph_operators_registered
    if _graph_operators_registered:
        return
    torch.library.register_fake("bnlab::batch_norm_forward")(_forward_fake)
    torch.library.register_fake("bnlab::batch_norm_backward")(_backward_fake)
    _graph_operators_registered = True


def _forward_fake(input, weight, bias, running_mean, running_var, training, eps):
    # (y, stats): y in the input's layout (callers pass contiguous or channels-last input, which the
    # kernels write in place), stats the (3, C) mean, inverse std and unbiased variance.
    return torch.empty_like(input), input.new_empty((3, input.shape[1]))


def _backward_fake(grad, input, weight, stats, training, input_grad):
    channels = input.shape[1]
    dx = torch.empty_like(input) if input_grad else input.new_empty((0,))
    return dx, input.new_empty((channels,)), input.new_empty((channels,))


@dataclass
class _State:
    library: Optional[KernelLibrary] = None
    error: Optional[str] = None
    tried: bool = False


_state = _State()
_lock = threading.Lock()


def build(force: bool = False) -> KernelLibrary:
    """Build (unless cached) and load the kernels; raises OSError with the reason when that fails."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C++ compiler found (tried $CXX, c++, g++, clang++); install g++ or clang++")
    if not SOURCE.exists():
        raise OSError(f"kernel source {SOURCE} is missing from the installed package")
    key = _build_key(compiler)
    target = cache_dir() / "kernels" / key / LIBRARY_NAME
    with _entry_lock(target.parent):
        # Check before loading: a damaged shared object can crash the process that loads it.
        problem = check_entry(target, key) if os.path.lexists(target) else None
        if problem is not None:
            warnings.warn(f"bnlab: the cached kernel library {target} is damaged ({problem}); rebuilding it",
                          RuntimeWarning, stacklevel=2)
            for path in (target, sidecar(target)):  # both inside cache_dir()/kernels/KEY, bnlab's own
                _remove(path)
        if force or problem is not None or not os.path.lexists(target):
            _compile(compiler, target, key)
        try:
            return KernelLibrary(target)
        except (RuntimeError, AttributeError) as exc:  # loaded, but not the operators expected
            raise OSError(f"the kernel library {target} could not be loaded: {exc}") from exc


def library() -> Optional[KernelLibrary]:
    """The compiled kernels, or None when the pure-PyTorch path is in use (see BNLAB_KERNELS)."""
    if _state.tried:
        return _state.library
    with _lock:
        if not _state.tried:
            choice = requested_backend()
            if choice != "torch":
                try:
                    _state.library = build()
                except OSError as exc:
                    _state.error = str(exc)
                    if choice == "compiled":
                        raise KernelBuildError(
                            f"BNLAB_KERNELS=compiled but the kernels could not be built: {exc}"
                        ) from exc
                    warnings.warn(
                        f"bnlab: compiled kernels unavailable ({exc}); using the pure-PyTorch path",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _state.tried = True
    return _state.library


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the compiled kernels are in use: `library() is not None`, as a constant that torch.compile
    evaluates once while tracing (it cannot trace the loader's lock and build)."""
    return library() is not None


def status() -> dict:
    """What `bnlab kernels` prints: the chosen backend, the library path or why there is none."""
    lib = library()
    return {
        "requested": requested_backend(),
        "backend": "compiled" if lib else "torch",
        "library": str(lib.path) if lib else None,
        "threads": lib.max_threads() if lib else torch.get_num_threads(),
        "error": _state.error,
    }


def reset() -> None:
    """Forget the loaded library so the next call re-reads BNLAB_KERNELS (used by tests)."""
    with _lock:
        _state.library, _state.error, _state.tried = None, None, False
