"""Normalization layers. Every layer keeps only bookkeeping (parameters, buffers, modes, checks); the math
lives in `bnlab.functional`.

- `bnlab.nn.batchnorm`: BatchNorm1d/2d/3d, the chapter's BatchNorm, the lazy forms, and `convert`
  between bnlab and torch layers; `BatchNormBase` is the shared base of the batch-norm family.
- `bnlab.nn.inference`: `fold_batchnorm` into the preceding conv/linear layer, and `recompute_stats`
  (precise BN) for prediction.
- `bnlab.nn.stateless`: `functional_call`, which returns the new running statistics instead of
  updating them (pure training steps under torch.func).
- `bnlab.nn.norms`: LayerNorm, GroupNorm, InstanceNorm1d/2d/3d, peers of torch's.
- `bnlab.nn.variants`: mean-only and variance-only BN, FrozenBatchNorm and `freeze`, BatchRenorm,
  GhostBatchNorm.
- `bnlab.nn.whitening`: DecorrelatedBatchNorm2d, IterNorm2d, and PITNorm (the probability integral
  transform).
"""

from bnlab.nn.batchnorm import *  # noqa: F401,F403
from bnlab.nn.batchnorm import __all__ as _batchnorm_all
from bnlab.nn.inference import *  # noqa: F401,F403
from bnlab.nn.inference import __all__ as _inference_all
from bnlab.nn.stateless import *  # noqa: F401,F403
from bnlab.nn.stateless import __all__ as _stateless_all
from bnlab.nn.sync import *  # noqa: F401,F403
from bnlab.nn.sync import __all__ as _sync_all
from bnlab.nn.norms import *  # noqa: F401,F403
from bnlab.nn.norms import __all__ as _norms_all
from bnlab.nn.variants import *  # noqa: F401,F403
from bnlab.nn.variants import __all__ as _variants_all
from bnlab.nn.whitening import *  # noqa: F401,F403
from bnlab.nn.whitening import __all__ as _whitening_all

__all__ = [*_batchnorm_all, *_inference_all, *_stateless_all, *_sync_all, *_norms_all, *_variants_all, *_whitening_all]
from bnlab.nn.guards import FiniteGuard, check_finite  # noqa: E402 - check_finite guards norm layers against NaN/inf
__all__ += ["check_finite", "FiniteGuard"]
