"""Shared fixtures: the kernel backend switch.

Every test that takes the `backend` fixture runs twice, once with ``BNLAB_KERNELS=compiled`` and once
with ``BNLAB_KERNELS=torch``. Under "compiled" the compiled kernels must really be loaded: if they
cannot be built the test fails with the build error, it is never skipped.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# The table of cases and the helpers live in tests/cases.py; make it importable whatever the import mode.
sys.path.insert(0, os.path.dirname(__file__))

from bnlab import kernels  # noqa: E402

BACKENDS = ("compiled", "torch")


def activate_backend(name: str) -> None:
    """Re-read BNLAB_KERNELS (already set to `name`) and check that the backend asked for is in use."""
    kernels.reset()
    if name == "compiled":
        try:
            lib = kernels.library()
        except kernels.KernelBuildError as exc:  # pragma: no cover - only when the build breaks
            pytest.fail(f"BNLAB_KERNELS=compiled but the kernels did not build: {exc}")
        assert lib is not None, (
            f"BNLAB_KERNELS=compiled but no compiled library is loaded: {kernels.status()['error']}"
        )
        assert kernels.status()["backend"] == "compiled"
    else:
        assert kernels.library() is None, "BNLAB_KERNELS=torch must not load the compiled kernels"
        assert kernels.status()["backend"] == "torch"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test under the compiled kernels and under the pure-PyTorch path."""
    monkeypatch.setenv("BNLAB_KERNELS", request.param)
    activate_backend(request.param)
    yield request.param
    kernels.reset()  # monkeypatch restores the variable; the next library() call re-reads it


@pytest.fixture
def switch_backend(monkeypatch):
    """A function that switches the backend inside a test (for backend-against-backend comparisons)."""

    def switch(name: str) -> None:
        monkeypatch.setenv("BNLAB_KERNELS", name)
        activate_backend(name)

    yield switch
    kernels.reset()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Small tensors run on one thread: on a loaded 2-core machine every multi-threaded op can wait
    tens of milliseconds at a barrier for a descheduled thread. The compiled kernels share torch's
    OpenMP setting; tests of their threaded paths raise it with `cases.threads`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fresh_kernel_state():
    """No test sees a backend chosen by an earlier test's environment."""
    kernels.reset()
    yield
    kernels.reset()


@pytest.fixture
def forbid_computing_runs(monkeypatch):
    """A function that, once called, makes computing any study run fail the test: a rerun that should be
    served from the cache is checked by what it does, not by how long it takes (a timed check fails on
    a loaded machine). Call it after the first run, which does compute."""
    from bnlab.studies.engine import runner

    def refuse(*args, **kwargs):
        pytest.fail("a run was computed although every run should come from the cache")

    def forbid() -> None:
        monkeypatch.setattr(runner, "_execute", refuse)
        monkeypatch.setattr(runner, "ProcessPoolExecutor", refuse)

    return forbid
