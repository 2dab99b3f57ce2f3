"""Fault injection on bnlab's two caches: the compiled-kernel cache and the study cache (issue 11).

A damaged cache entry is rebuilt with a one-line notice naming it: never trusted, never fatal. For each
fault of the table (truncated, zero-length, random bytes, bytes flipped with the length kept, a foreign
valid file, missing, unreadable, a directory where the file should be) the entry is damaged, and the code
that reads it runs.

Kernel cache: a good library is compiled once (into a temporary BNLAB_CACHE_DIR, by rebuilding a damaged
entry through `bnlab kernels`: the real rebuild); every other rebuild copies that library instead of
compiling again. Loading a second copy of the library into one process would register the `bnlab`
operators twice, so every case that loads runs in a subprocess: it must exit 0, print one notice naming
the damaged file, and run the kernels. The in-process table checks the decision itself: the damaged
entry is never handed to the loader, the rebuilt one is.

Permissions: as root, chmod 000 does not stop reading, so the readers run under `setpriv` without
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, where the permission bits bite for root too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bnlab import kernels
from bnlab.studies.engine import runner

FAULTS = ("truncated", "zero-length", "random-bytes", "flipped-bytes", "foreign", "missing", "unreadable",
          "directory")
# The permission bits do not stop root: drop the capabilities that bypass them.
DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
            "--inh-caps", "-dac_override,-dac_read_search"]


def unprivileged() -> list[str]:
    """The command prefix under which chmod 000 makes a file unreadable (empty unless we are root)."""
    if os.geteuid() != 0:
        return []
    assert shutil.which("setpriv"), "running as root: the permission faults need setpriv (util-linux)"
    return DROP_DAC


def damage(path: Path, fault: str, foreign: bytes) -> None:
    """Apply `fault` to the file at `path` (which exists)."""
    data = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "zero-length":
        path.write_bytes(b"")
    elif fault == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(max(len(data), 64)))
    elif fault == "flipped-bytes":  # a block in the middle inverted, the length kept
        start, stop = len(data) // 3, min(len(data), len(data) // 3 + 4096)
        path.write_bytes(data[:start] + bytes(b ^ 0xFF for b in data[start:stop]) + data[stop:])
        assert path.stat().st_size == len(data)
    elif fault == "foreign":
        path.write_bytes(foreign)
    elif fault == "missing":
        path.unlink()
    elif fault == "unreadable":
        path.chmod(0)
    elif fault == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("not a cache entry\n")
    else:  # pragma: no cover
        raise ValueError(fault)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# ---- the kernel cache ---------------------------------------------------------------------------------


def cache_key() -> str:
    compiler = kernels._compiler()
    assert compiler, "the kernel-cache tests need a C++ compiler"
    return kernels._build_key(compiler)


def entry(cache: Path) -> Path:
    return cache / "kernels" / cache_key() / kernels.LIBRARY_NAME


def subprocess_env(cache: Path, backend: str = "compiled") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_")}
    return {**env, "BNLAB_CACHE_DIR": str(cache), "BNLAB_KERNELS": backend, "PYTHONWARNINGS": "default"}


# In the subprocess: `bnlab kernels` (status), then one batch norm through the loaded kernels, checked
# against torch. With a GOOD library path as argv[1], a rebuild copies it instead of compiling.
KERNELS_SCRIPT = textwrap.dedent("""
    import shutil, sys
    from pathlib import Path
    import torch
    from bnlab import cli, kernels
    from bnlab import functional as F

    if len(sys.argv) > 1:
        good = Path(sys.argv[1])
        def copy_build(compiler, target, key):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kernels.sidecar(good), kernels.sidecar(target))
            shutil.copyfile(good, target)
        kernels._compile = copy_build
    code = cli.main(["kernels"])
    assert kernels.library() is not None
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    mean, var = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
    y = F.batch_norm(x, mean, var, None, None, True, 0.1, 1e-5)
    torch_mean, torch_var = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
    expected = torch.nn.functional.batch_norm(x, torch_mean, torch_var, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close((mean, var), (torch_mean, torch_var))
    print("kernels ran")
    sys.exit(code)
""")


def run_kernels(cache: Path, good: Path = None, prefix=()) -> subprocess.CompletedProcess:
    args = [*prefix, sys.executable, "-c", KERNELS_SCRIPT, *([str(good)] if good else [])]
    return subprocess.run(args, env=subprocess_env(cache), capture_output=True, text=True, timeout=900)


def notices(stderr: str, path: Path) -> list[str]:
    return [line for line in stderr.splitlines() if str(path) in line and "damaged" in line]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A good library and its sidecar, made by the real rebuild of a damaged (zero-length) entry
    through `bnlab kernels`: (library path, that command's result)."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    target = entry(cache)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    proc = run_kernels(cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target, proc


def foreign_library() -> bytes:
    """A valid shared object that is not bnlab's: the smallest library torch ships."""
    libraries = sorted((Path(torch.__file__).parent / "lib").glob("*.so*"), key=lambda p: p.stat().st_size)
    assert libraries, "torch ships no shared library to use as a foreign one"
    return libraries[0].read_bytes()


def foreign_sidecar(built_library: Path) -> bytes:
    """A valid sidecar of another entry: another key (another machine or torch), another library."""
    record = json.loads(kernels.sidecar(built_library).read_text())
    record.update(key="0123456789abcdef", sha256=hashlib.sha256(b"another library").hexdigest())
    return json.dumps(record).encode()


def cache_copy(tmp_path: Path, good: Path) -> Path:
    """A fresh cache holding a copy of the good entry; the copy's library path."""
    target = entry(tmp_path / "cache")
    target.parent.mkdir(parents=True)
    shutil.copyfile(good, target)
    shutil.copyfile(kernels.sidecar(good), kernels.sidecar(target))
    return target


def test_a_damaged_library_is_really_rebuilt(built):
    """The one real compile: a zero-length library is reported, recompiled, verified and loaded."""
    target, proc = built
    no_traceback(proc.stdout + proc.stderr)
    assert len(notices(proc.stderr, target)) == 1, proc.stderr
    assert "rebuilding" in proc.stderr
    assert "backend: compiled" in proc.stdout and f"library: {target}" in proc.stdout
    assert "kernels ran" in proc.stdout
    assert kernels.check_entry(target, cache_key()) is None
    assert target.stat().st_size > 10_000


# In process, every fault on the library and on its sidecar but "unreadable" (root reads a chmod-000
# file in process; the subprocess table drops the capability for it).
CASES = [(part, fault) for part in ("library", "sidecar") for fault in FAULTS if fault != "unreadable"]
# In a subprocess that really loads: every fault on the library, and the sidecar unreadable or missing.
CASES_END_TO_END = [("library", fault) for fault in FAULTS] + [("sidecar", "unreadable"), ("sidecar", "missing")]


@pytest.mark.parametrize("part,fault", CASES, ids=[f"{p}-{f}" for p, f in CASES])
def test_kernel_cache_fault_is_detected_before_loading(part, fault, built, tmp_path, monkeypatch):
    """In process: the damaged entry is reported, never loaded, rebuilt, and the rebuilt one loaded."""
    good = built[0]
    target = cache_copy(tmp_path, good)
    victim = target if part == "library" else kernels.sidecar(target)
    damage(victim, fault, foreign_library() if part == "library" else foreign_sidecar(good))
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path / "cache"))
    compiled, loaded = [], []

    def copy_build(compiler, path, key):
        compiled.append(path)
        shutil.copyfile(kernels.sidecar(good), kernels.sidecar(path))
        shutil.copyfile(good, path)

    class Loader:  # stands in for torch.ops.load_library: records what it would have loaded
        def __init__(self, path):
            assert path.is_file() and sha256(path) == sha256(good), f"a damaged library reached the loader: {path}"
            loaded.append(path)
            self.path = path

    monkeypatch.setattr(kernels, "_compile", copy_build)
    monkeypatch.setattr(kernels, "KernelLibrary", Loader)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels.build()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if (part, fault) == ("library", "missing"):  # a first build: nothing to report
        assert messages == []
    else:
        assert len(messages) == 1, messages
        assert str(target) in messages[0] and "damaged" in messages[0] and "rebuilding" in messages[0]
        assert "\n" not in messages[0]
    assert compiled == [target]
    assert loaded == [target]
    assert kernels.check_entry(target, cache_key()) is None


@pytest.mark.parametrize("part,fault", CASES_END_TO_END, ids=[f"{p}-{f}" for p, f in CASES_END_TO_END])
def test_kernel_cache_fault_end_to_end(part, fault, built, tmp_path):
    """In a subprocess that really loads: exit 0, one notice naming the file, and the kernels run."""
    good = built[0]
    target = cache_copy(tmp_path, good)
    victim = target if part == "library" else kernels.sidecar(target)
    damage(victim, fault, foreign_library() if part == "library" else foreign_sidecar(good))
    proc = run_kernels(tmp_path / "cache", good, prefix=unprivileged() if fault == "unreadable" else ())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    no_traceback(output)
    assert len(notices(proc.stderr, target)) == (0 if (part, fault) == ("library", "missing") else 1), output
    assert "backend: compiled" in proc.stdout and "kernels ran" in proc.stdout, output
    assert kernels.check_entry(target, cache_key()) is None


@pytest.mark.parametrize("requested", ["auto", "compiled"])
def test_a_failed_rebuild_falls_back(requested, built, tmp_path, monkeypatch):
    """A damaged entry whose rebuild fails: the pure-PyTorch path with a warning under auto, and
    KernelBuildError under BNLAB_KERNELS=compiled; the damaged library is never loaded."""
    target = cache_copy(tmp_path, built[0])
    damage(target, "flipped-bytes", b"")
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path / "cache"))

    def failing_build(compiler, path, key):
        raise OSError("c++ failed: simulated")

    def never_load(path):  # pragma: no cover - the test fails if reached
        raise AssertionError(f"loaded {path}")

    monkeypatch.setattr(kernels, "_compile", failing_build)
    monkeypatch.setattr(kernels, "KernelLibrary", never_load)
    monkeypatch.setenv("BNLAB_KERNELS", requested)
    kernels.reset()
    try:
        with pytest.warns(RuntimeWarning) as record:
            if requested == "auto":
                assert kernels.library() is None
            else:
                with pytest.raises(kernels.KernelBuildError, match="simulated"):
                    kernels.library()
    finally:
        kernels.reset()
    texts = [str(w.message) for w in record]
    assert any(str(target) in t and "rebuilding" in t for t in texts), texts
    if requested == "auto":
        assert any("pure-PyTorch path" in t and "simulated" in t for t in texts), texts


def test_a_foreign_library_is_never_loaded_even_with_its_own_checksum(built, tmp_path, monkeypatch):
    """A foreign .so whose sidecar was rewritten to match it (but for another key) is still refused."""
    good = built[0]
    target = cache_copy(tmp_path, good)
    target.write_bytes(foreign_library())
    kernels.sidecar(target).write_text(json.dumps({"key": "feedfacefeedface", "sha256": sha256(target),
                                                   "size": target.stat().st_size}))
    problem = kernels.check_entry(target, cache_key())
    assert problem and "another configuration" in problem


# ---- the study cache ----------------------------------------------------------------------------------


RUN = runner.Run("fault-probe", {"lr": 0.1, "sizes": (2, 3), "seed": 0})
OTHER = runner.Run("fault-probe", {"lr": 0.2, "sizes": (2, 3), "seed": 0})


def probe(params: dict, context) -> dict:
    return {"score": params["lr"] * 10 + params["seed"], "history": [{"test_acc": 0.5}]}


def execute(out: Path, calls: list) -> tuple[runner.Outcome, list[str]]:
    lines: list[str] = []

    def counted(params, context):
        calls.append(params)
        return probe(params, context)

    settings = runner.Settings(out=out, progress=lines.append)
    [outcome] = runner.execute([RUN], settings, {"fault-probe": counted})
    return outcome, lines


def good_study(tmp_path: Path) -> Path:
    """A study output directory with RUN done and cached; the entry's path."""
    out = tmp_path / "study"
    calls: list = []
    execute(out, calls)
    assert len(calls) == 1
    return runner._cache_path(out, RUN)


def foreign_entry(tmp_path: Path) -> bytes:
    """A valid entry of another run (what copying cache files between studies can do)."""
    out = tmp_path / "other"
    runner.execute([OTHER], runner.Settings(out=out, progress=lambda _: None), {"fault-probe": probe})
    return runner._cache_path(out, OTHER).read_bytes()


def entry_with(tmp_path, change) -> bytes:
    """The good entry's JSON changed in place by `change(dict)`, without its sha256 (as entries written
    before it was recorded are): the structure check alone must catch it."""
    stored = json.loads(good_study(tmp_path / "template").read_text())
    change(stored)
    stored.pop("sha256", None)
    return json.dumps(stored).encode()


def digit_flipped(data: bytes) -> bytes:
    """One digit of the result changed, the length and the JSON validity kept."""
    text = data.decode()
    at = text.index('"score": ') + len('"score": ')
    return (text[:at] + ("2" if text[at] != "2" else "3") + text[at + 1:]).encode()


# (name, the fault or a function making the damaged bytes, whether a notice is expected)
STUDY_CASES = [(fault, fault, fault != "missing") for fault in FAULTS] + [
    ("digit-flipped", lambda tmp, data: digit_flipped(data), True),
    ("json-list", lambda tmp, data: b"[1, 2, 3]", True),
    ("json-null", lambda tmp, data: b"null", True),
    ("no-result", lambda tmp, data: entry_with(tmp, lambda d: d.pop("result")), True),
    ("no-seconds", lambda tmp, data: entry_with(tmp, lambda d: d.pop("seconds")), True),
    ("result-not-object", lambda tmp, data: entry_with(tmp, lambda d: d.update(result=[1])), True),
    ("seconds-a-string", lambda tmp, data: entry_with(tmp, lambda d: d.update(seconds="3")), True),
    ("seconds-nan", lambda tmp, data: entry_with(tmp, lambda d: d.update(seconds=float("nan"))), True),
    ("other-kind", lambda tmp, data: entry_with(tmp, lambda d: d.update(kind="other")), True),
    ("other-params", lambda tmp, data: entry_with(tmp, lambda d: d["params"].update(lr=0.5)), True),
    ("not-utf8", lambda tmp, data: b'{"kind": "\xff\xfe"}', True),
]


@pytest.mark.parametrize("name,fault,noticed", STUDY_CASES, ids=[c[0] for c in STUDY_CASES])
def test_study_cache_fault_is_redone_with_a_notice(name, fault, noticed, tmp_path):
    path = good_study(tmp_path)
    good = json.loads(path.read_text())
    if fault == "unreadable":
        return check_unreadable_study_entry(path, good)
    if callable(fault):
        path.write_bytes(fault(tmp_path, path.read_bytes()))
    else:
        damage(path, fault, foreign_entry(tmp_path))
    calls: list = []
    outcome, lines = execute(path.parent.parent, calls)
    assert len(calls) == 1, "a damaged entry must be redone"
    assert not outcome.cached and outcome.result == probe(RUN.params, None)
    found = [line for line in lines if str(path) in line]
    if noticed:
        assert len(found) == 1 and "damaged" in found[0] and "redoing" in found[0], lines
    else:
        assert found == [], lines
    rewritten = json.loads(path.read_text())
    assert {k: rewritten[k] for k in ("kind", "params", "result")} == {k: good[k] for k in ("kind", "params", "result")}
    # and the redone entry is trusted again
    calls.clear()
    outcome, lines = execute(path.parent.parent, calls)
    assert calls == [] and outcome.cached


STUDY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from bnlab.studies.engine import runner
    calls, lines = [], []
    run = runner.Run("fault-probe", json.loads(sys.argv[2]))
    def probe(params, context):
        calls.append(params)
        return {"score": params["lr"] * 10 + params["seed"], "history": [{"test_acc": 0.5}]}
    [outcome] = runner.execute([run], runner.Settings(out=Path(sys.argv[1]), progress=lines.append),
                               {"fault-probe": probe})
    print(json.dumps({"calls": len(calls), "cached": outcome.cached, "result": outcome.result, "lines": lines}))
""")


def check_unreadable_study_entry(path: Path, good: dict) -> None:
    damage(path, "unreadable", b"")
    proc = subprocess.run([*unprivileged(), sys.executable, "-c", STUDY_SCRIPT, str(path.parent.parent),
                           json.dumps(RUN.params)], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(path.parent, "torch"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc.stdout + proc.stderr)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["calls"] == 1 and not report["cached"], report
    found = [line for line in report["lines"] if str(path) in line]
    assert len(found) == 1 and "cannot be read" in found[0], report
    assert json.loads(path.read_text())["result"] == good["result"]


def test_an_intact_entry_is_served_and_a_legacy_one_without_checksum_too(tmp_path):
    path = good_study(tmp_path)
    calls: list = []
    outcome, lines = execute(path.parent.parent, calls)
    assert calls == [] and outcome.cached and not [line for line in lines if "damaged" in line]
    stored = json.loads(path.read_text())
    del stored["sha256"]  # entries written before the checksum was recorded keep their value
    path.write_text(json.dumps(stored))
    outcome, lines = execute(path.parent.parent, calls)
    assert calls == [] and outcome.cached and outcome.result == stored["result"]
