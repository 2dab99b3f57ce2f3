"""bnlab's math, stateless: one module per family, over one home for what they share.

- `core`: the momentum conventions (`convert_momentum`), the input checks, torch's empty-batch rule,
  the graph test (`in_graph`), the per-channel helpers and the one running-average update;
- `batch_norm`: the batch-norm transform, its hand-derived backward, the compiled and pure-PyTorch
  paths and their graph forms (`batch_norm`, `batch_norm_with_stats`);
- `norms`: layer, group and instance normalization, as batch norm of a reshaped view;
- `lite`: mean-only and variance-only batch norm; `renorm`: batch renormalization; `ghost`: ghost
  batch norm; `whitening`: ZCA and Newton-Schulz whitening; `pit`: the probability integral transform;
- `sync`: batch statistics over the processes of a torch.distributed group (SyncBatchNorm's math).

Imports point one way: every family module imports `core` (and `batch_norm` where it normalizes by
it); nothing here imports `bnlab.nn`.
"""

from bnlab.functional.batch_norm import *  # noqa: F401,F403
from bnlab.functional.core import *  # noqa: F401,F403
from bnlab.functional.ghost import *  # noqa: F401,F403
from bnlab.functional.lite import *  # noqa: F401,F403
from bnlab.functional.norms import *  # noqa: F401,F403
from bnlab.functional.pit import *  # noqa: F401,F403
from bnlab.functional.renorm import *  # noqa: F401,F403
from bnlab.functional.sync import *  # noqa: F401,F403
from bnlab.functional.whitening import *  # noqa: F401,F403

# The public API: torch.nn.functional's peers and the family's functions (the shared helpers stay in
# their modules' namespaces, importable from bnlab.functional.core).
__all__ = [
    "batch_norm",
    "batch_norm_with_stats",
    "BatchNormFunction",
    "convert_momentum",
    "MOMENTUM_CONVENTIONS",
    "check_input",
    "in_graph",
    "empty_batch",
    "per_channel_affine",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "mean_only_batch_norm",
    "variance_only_batch_norm",
    "MeanOnlyBatchNormFunction",
    "VarianceOnlyBatchNormFunction",
    "batch_renorm",
    "ghost_batch_norm",
    "ghost_batch_sizes",
    "zca_whitening_matrix",
    "newton_schulz_whitening_matrix",
    "decorrelated_batch_norm",
    "iterative_normalization",
    "gaussian_levels",
    "pit_norm",
    "sync_batch_norm",
    "SyncBatchNormFunction",
]
