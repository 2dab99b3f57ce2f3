"""Normalization layers. Every layer keeps only bookkeeping (parameters, buffers, modes, checks); the math
lives in `bnlab.functional`.

- `bnlab.nn.batchnorm`: BatchNorm1d/2d/3d, the chapter's BatchNorm, the lazy forms, and `convert`
  between bnlab and torch layers; `BatchNormBase` is the shared base of the batch-norm family.
"""

from bnlab.nn.batchnorm import *  # noqa: F401,F403
from bnlab.nn.batchnorm import __all__ as _batchnorm_all

__all__ = [*_batchnorm_all]
