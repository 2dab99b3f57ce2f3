"""Beyond per-channel standardization: whitening (the chapter's "full-rank covariance estimate") and the
probability integral transform. Bookkeeping only; the math lives in `bnlab.functional`.

- `DecorrelatedBatchNorm2d`: ZCA whitening per group of channels, by eigendecomposition.
- `IterNorm2d`: whitening by Newton–Schulz iterations, matrix products only.
- `PITNorm1d/2d`: each channel mapped through its batch's empirical CDF and the Gaussian inverse CDF.

They keep batch norm's parameters and momentum convention (`BatchNormBase`), but their running state is
their own: a running whitening matrix, or running quantiles. Their gradients are autograd's through
torch ops (eigh, matrix products, a piecewise-linear map), except PIT's straight-through surrogate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNormBase, RankFamily, batch_norm_arguments, document

__all__ = ["DecorrelatedBatchNorm2d", "IterNorm2d", "PITNorm1d", "PITNorm2d"]


class _OwnRunningStats(BatchNormBase):
    """BatchNormBase whose running statistics are the subclass's (`initial_running_stats`), installed by
    `_install_running_stats` once the subclass knows their shapes."""

    eval_is_batch_norm = False

    def __init__(self, *, track_running_stats: bool, **arguments) -> None:
        """`arguments`: batch norm's others, by name (`batch_norm_arguments`)."""
        # Built without batch norm's running buffers; ours come once the subclass's configuration is set.
        super().__init__(track_running_stats=False, **arguments)
        self.track_running_stats = track_running_stats

    def initial_running_stats(self, device=None, dtype=None) -> dict[str, Tensor]:
        raise NotImplementedError

    def _install_running_stats(self, device, dtype) -> None:
        if self.track_running_stats:
            for name, value in self.initial_running_stats(device, dtype).items():
                self.register_buffer(name, value)
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            with torch.no_grad():
                for name, value in self.initial_running_stats().items():
                    getattr(self, name).copy_(value)
            self.num_batches_tracked.zero_()


def _checked_group_size(num_features: int, group_size: int, layer: str) -> int:
    """The group size actually used: at most num_features, and dividing it."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (channels per whitened group), got {group_size!r}")
    group_size = min(group_size, num_features) if num_features else group_size
    if num_features % group_size:
        divisors = [g for g in range(1, num_features + 1) if num_features % g == 0]
        raise ValueError(
            f"{layer} whitens groups of group_size channels, which must divide num_features: "
            f"group_size={group_size} does not divide {num_features}; choose one of {divisors}"
        )
    return group_size


class GroupWhitening(RankFamily, _OwnRunningStats):
    """Whitening per group of channels: running mean (C,) and running whitening matrix (G, m, m)."""

    family_suffixes = ("2d",)
    input_dims = (4,)
    repr_options = ("group_size",)

    def __init__(self, num_features: int, *args, group_size: int, **kwargs) -> None:
        arguments = batch_norm_arguments(num_features, *args, **kwargs)
        super().__init__(**arguments)
        self.group_size = _checked_group_size(num_features, group_size, type(self).__name__)
        self._install_running_stats(arguments["device"], arguments["dtype"])

    def initial_running_stats(self, device=None, dtype=None) -> dict[str, Tensor]:
        groups = self.num_features // self.group_size
        eye = torch.eye(self.group_size, device=device, dtype=dtype)
        return {
            "running_mean": torch.zeros(self.num_features, device=device, dtype=dtype),
            "running_whitening": eye.repeat(groups, 1, 1),
        }

    def whitening_matrix(self, covariance: Tensor) -> Tensor:
        """The layer's whitening matrix of (G, m, m) covariances (eps already on the diagonal)."""
        raise NotImplementedError

    def set_population_statistics(self, mean: Tensor, covariance: Tensor) -> None:
        """Running mean := `mean` (C,); running whitening := the whitening matrix of `covariance`
        (G, m, m, the biased 1/n covariance of each group, as training uses) + eps I. In float64."""
        eye = torch.eye(self.group_size, dtype=torch.float64, device=covariance.device)
        whitening = self.whitening_matrix(covariance.double() + self.eps * eye)
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_whitening.copy_(whitening)

    def running_state(self, running_mean: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(running mean, running whitening) to use or update; none when BatchNormBase passes none."""
        return (running_mean, self.running_whitening) if running_mean is not None else (None, None)


_WHITENING_ARGS = """num_features: C.
        eps: added to the covariance's diagonal. Default: 1e-5.
        momentum: torch's convention, the weight of each batch in the running mean and whitening
            matrix; None for a cumulative average. Default: 0.1.
        affine: learn a per-channel scale `weight` (init 1) and shift `bias` (init 0). Default: True.
        track_running_stats: keep the running mean and whitening matrix for evaluation; without them
            evaluation whitens with the batch's. Default: True.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; False drops the shift. Default: True."""


class DecorrelatedBatchNorm2d(GroupWhitening):
    r"""Decorrelated batch normalization (Huang et al., 2018): ZCA whitening per group of channels.

    Per group of `group_size` channels, with X the group's (group_size x n) matrix of values over the
    batch and positions (n = N * H * W):

    .. math::
        \mu = \tfrac{1}{n} X \mathbf{1}, \quad
        \Sigma = \tfrac{1}{n} (X - \mu)(X - \mu)^T + \epsilon I = D \Lambda D^T, \quad
        \hat X = D \Lambda^{-1/2} D^T (X - \mu), \quad y = \gamma \hat x + \beta

    (per-channel :math:`\gamma, \beta`). In training the output of each group has covariance
    :math:`I - \epsilon \Sigma^{-1} \approx I`, and the running mean and running whitening matrix
    :math:`\Sigma^{-1/2}` take a momentum step (torch's convention; buffers ``running_mean`` (C,) and
    ``running_whitening`` (C / group_size, group_size, group_size), identity at first); evaluation
    uses them. The gradient is autograd's through ``torch.linalg.eigh`` (fine for distinct
    eigenvalues, which real data has almost surely).

    Args:
        $args
        group_size: keyword-only, channels whitened together (capped at num_features; must divide it).
            Larger groups decorrelate more at O(group_size^3) cost. Default: 16.

    Shape:
        - Input: (N, C, H, W)
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> dbn = bnlab.nn.DecorrelatedBatchNorm2d(4, group_size=2)
        >>> x = torch.randn(16, 4, 6, 6)
        >>> x[:, 1] += 0.9 * x[:, 0]          # correlated channels
        >>> y = dbn(x).detach()
        >>> groups = y.transpose(0, 1).reshape(2, 2, -1)
        >>> bool(torch.allclose(groups[0].cov(correction=0), torch.eye(2), atol=1e-3))
        True

    Reference::

        @inproceedings{huang2018decorrelated,
          title={Decorrelated Batch Normalization},
          author={Huang, Lei and Yang, Dawei and Lang, Bo and Deng, Jia},
          booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
          year={2018},
          note={arXiv:1804.08450}
        }
    """

    family = "DecorrelatedBatchNorm"

    def __init__(self, num_features: int, *args, group_size: int = 16, **kwargs) -> None:
        super().__init__(num_features, *args, group_size=group_size, **kwargs)

    def whitening_matrix(self, covariance: Tensor) -> Tensor:
        return F.zca_whitening_matrix(covariance)

    def normalize(self, input, running_mean, running_var, use_batch_stats, momentum):
        mean, whitening = self.running_state(running_mean)
        return F.decorrelated_batch_norm(
            input, mean, whitening, self.weight, self.bias, use_batch_stats, momentum, self.eps, self.group_size
        )


class IterNorm2d(GroupWhitening):
    r"""Iterative normalization (Huang et al., 2019): whitening per group of channels by Newton–Schulz.

    As `DecorrelatedBatchNorm2d`, with the whitening matrix computed by T Newton–Schulz iterations
    instead of an eigendecomposition:

    .. math::
        \Sigma_N = \Sigma / \mathrm{tr}(\Sigma), \quad P_0 = I, \quad
        P_k = \tfrac{1}{2}(3 P_{k-1} - P_{k-1}^3 \Sigma_N), \quad
        \hat X = \frac{P_T}{\sqrt{\mathrm{tr}(\Sigma)}} (X - \mu), \quad y = \gamma \hat x + \beta

    Few iterations whiten only partly (the output covariance approaches the identity as T grows,
    slowest along small-eigenvalue directions): the paper's trade-off between standardization and full
    whitening, with matrix products only. Running mean and running whitening matrix as in
    `DecorrelatedBatchNorm2d`. The gradient is autograd's through the iterations.

    Deviation from the paper's Algorithm 1: :math:`P_T` is computed by the coupled Newton–Schulz
    iteration (`bnlab.functional.newton_schulz_whitening_matrix`), equal to the paper's in exact
    arithmetic but numerically stable, so large T converges to ZCA instead of diverging on
    ill-conditioned covariances.

    Args:
        $args
        group_size: keyword-only, channels whitened together (capped at num_features; must divide it).
            Default: 64.
        iterations: keyword-only, T, the Newton–Schulz steps. Default: 5 (the paper's).

    Shape:
        - Input: (N, C, H, W)
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> itn = bnlab.nn.IterNorm2d(8, group_size=4, iterations=5)
        >>> itn(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])

    Reference::

        @inproceedings{huang2019iterative,
          title={Iterative Normalization: Beyond Standardization towards Efficient Whitening},
          author={Huang, Lei and Zhou, Yi and Zhu, Fan and Liu, Li and Shao, Ling},
          booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
          year={2019},
          note={arXiv:1904.03441}
        }
    """

    family = "IterNorm"
    repr_options = ("group_size", "iterations")

    def __init__(self, num_features: int, *args, group_size: int = 64, iterations: int = 5, **kwargs) -> None:
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int (T, the Newton-Schulz steps), got {iterations!r}")
        super().__init__(num_features, *args, group_size=group_size, **kwargs)
        self.iterations = iterations

    def whitening_matrix(self, covariance: Tensor) -> Tensor:
        return F.newton_schulz_whitening_matrix(covariance, self.iterations)

    def normalize(self, input, running_mean, running_var, use_batch_stats, momentum):
        mean, whitening = self.running_state(running_mean)
        return F.iterative_normalization(
            input, mean, whitening, self.weight, self.bias, use_batch_stats, momentum, self.eps, self.group_size,
            self.iterations,
        )


for _layer in (DecorrelatedBatchNorm2d, IterNorm2d):
    document(_layer.__doc__, {_layer: {}}, args=_WHITENING_ARGS)


# ---- the probability integral transform ------------------------------------------------------------------


class _PITNorm(RankFamily, _OwnRunningStats):
    family = "PITNorm"
    repr_options = ("num_quantiles",)

    def __init__(self, num_features: int, *args, num_quantiles: int = 64, **kwargs) -> None:
        arguments = batch_norm_arguments(num_features, *args, **kwargs)
        F.gaussian_levels(num_quantiles)  # validates it
        super().__init__(**arguments)
        self.num_quantiles = num_quantiles
        self._install_running_stats(arguments["device"], arguments["dtype"])

    def initial_running_stats(self, device=None, dtype=None) -> dict[str, Tensor]:
        c = self.num_features
        dtype = dtype or torch.get_default_dtype()
        return {
            "running_mean": torch.zeros(c, device=device, dtype=dtype),
            "running_var": torch.ones(c, device=device, dtype=dtype),
            # Standard normal quantiles: the evaluation map starts as the identity.
            "running_quantiles": F.gaussian_levels(self.num_quantiles, dtype, device).repeat(c, 1),
        }

    def normalize(self, input, running_mean, running_var, use_batch_stats, momentum):
        quantiles = self.running_quantiles if running_mean is not None else None
        return F.pit_norm(
            input, running_mean, running_var, quantiles, self.weight, self.bias, use_batch_stats, momentum,
            self.eps,
        )


class PITNorm1d(_PITNorm):
    input_dims = (2, 3)


class PITNorm2d(_PITNorm):
    input_dims = (4,)


_PIT_DOC = r"""Normalization by the probability integral transform (rank-Gauss) of $shape input.

    **Training**, per channel over its n values (batch and positions), with :math:`R_i` the rank of
    :math:`x_i` among them (tied values share the average of their ranks):

    .. math:: y_i = \gamma \, \Phi^{-1}\left(\frac{R_i - 1/2}{n}\right) + \beta

    the empirical CDF (ranks) followed by the standard normal inverse CDF :math:`\Phi^{-1}`. The
    marginal of each channel is then exactly Gaussian: without ties, the n outputs are the n quantiles
    :math:`\Phi^{-1}((k - 1/2)/n)` whatever the input's distribution (skewed, heavy-tailed,
    multimodal), where batch norm only fixes the first two moments. The map is monotone per channel.

    **Gradient.** Ranks are piecewise constant: the true derivative is 0 almost everywhere. The input
    gradient is instead batch normalization's (straight-through surrogate): the backward of
    :math:`(x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon}`, the map the transform tends to for Gaussian input.
    The gradients of :math:`\gamma` and :math:`\beta` are exact.

    **Evaluation** needs no batch: training keeps per-channel running quantiles (buffer
    ``running_quantiles``, (C, num_quantiles)) at the levels :math:`p_j = (j - 1/2)/K`, each a momentum
    step towards the batch's, and ``running_mean``/``running_var`` as batch norm does. Evaluation maps
    x through the piecewise-linear curve :math:`(q_j, \Phi^{-1}(p_j))` (the smoothed inverse of the
    running quantile function, composed with :math:`\Phi^{-1}`); beyond the outer knots it continues
    straight with the outer segment's slope, capped at batch norm's
    :math:`1/\sqrt{\mathrm{running\_var} + \epsilon}` (ties at the outer knots, light tails).
    Knots start at the standard
    normal quantiles, so the untrained map is the identity. Autograd differentiates the curve. On a
    non-Gaussian input, training and evaluation thus agree in distribution where batch norm's
    evaluation would keep the input's shape.

    Momentum follows torch (None: a cumulative average).

    Args:
        num_features: C.
        eps: added to the variance of the surrogate and of the tails. Default: 1e-5.
        momentum: the weight of each batch in the running quantiles and moments. Default: 0.1.
        affine: learn a per-channel scale `weight` and shift `bias`. Default: True.
        track_running_stats: keep running quantiles for evaluation; without them evaluation ranks
            the batch too. Default: True.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; False drops the shift. Default: True.
        num_quantiles: keyword-only, K, the knots of the evaluation map per channel (at least 2).
            Default: 64 (the outer knots at the 1/128 and 127/128 quantiles).

    Shape:
        - Input: $shape
        - Output: the same shape.

    Example:
        >>> import torch, bnlab.nn
        >>> norm = bnlab.nn.$name(3)
        >>> x = torch.randn($example_shape).exp()          # log-normal: skewed
        >>> y = norm(x).detach()
        >>> skew = lambda t: float(((t - t.mean()) ** 3).mean() / t.std(correction=0) ** 3)
        >>> round(skew(x[:, 0]), 1) > 1, abs(skew(y[:, 0])) < 0.05
        (True, True)
    """

document(_PIT_DOC, {
    PITNorm1d: dict(shape="(N, C) or (N, C, L)", example_shape="512, 3"),
    PITNorm2d: dict(shape="(N, C, H, W)", example_shape="32, 3, 8, 8"),
})


class PooledCovariance:
    """Exact per-group count, mean and scatter matrix of (N, C, ...) inputs over several batches, for
    groups of `group_size` consecutive channels (Chan's merge, in float64)."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        self.count, self.mean, self.scatter = 0, None, None

    def add(self, x: Tensor) -> None:
        if x.numel() == 0:  # nothing to pool, as for PooledMoments
            return
        with torch.no_grad():
            columns = F.grouped(x.detach().double(), self.group_size)  # (G, group_size, values)
            mean = columns.mean(-1)
            centered = columns - mean[..., None]
            scatter = centered @ centered.transpose(-1, -2)
        self.count, self.mean, self.scatter = F.chan_merge(
            self.count, self.mean, self.scatter, columns.shape[-1], mean, scatter,
            lambda delta: delta[..., :, None] * delta[..., None, :])
