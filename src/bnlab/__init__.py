"""bnlab: batch normalization done properly.

- `bnlab.functional.batch_norm` and `bnlab.nn.BatchNorm1d/2d/3d`: a from-scratch, hand-differentiated
  peer of torch's batch norm, with compiled CPU kernels (`bnlab.kernels`) and a pure-PyTorch fallback;
- `bnlab.reference`: a NumPy float64 oracle;
- the D2L chapter's pipeline and studies (`bnlab train`, `bnlab study`, `bnlab bench`).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`bnlab.adapt(model, batches, method=...)` and `bnlab.doctor` without importing them first (they
    import torch, which `import bnlab` alone does not)."""
    if name in ("adapt", "doctor"):
        import importlib

        return importlib.import_module(f"bnlab.{name}")
    raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
