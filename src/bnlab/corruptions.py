"""Synthetic distribution shifts for image batches, made by bnlab itself (no external data).

Every corruption maps float images (N, C, H, W) in [0, 1] to images of the same shape in [0, 1], at a
severity 1, 2 or 3 (`SEVERITIES` gives each level's parameter), deterministically (noise is seeded):

    gaussian-noise  x + σ·ε, ε ~ N(0, 1)                    σ = 0.1, 0.2, 0.4
    blur            Gaussian blur of standard deviation s   s = 0.7, 1.2, 2.0 pixels
    contrast        m + c·(x − m), m the image's mean       c = 0.5, 0.3, 0.15
    brightness      x + b                                   b = 0.2, 0.4, 0.6
    translation     shift right and down by d pixels, zero fill   d = 2, 4, 6
    inversion       (1 − a)·x + a·(1 − x)                   a = 0.2, 0.35, 1.0

The results are clipped to [0, 1], as a saved image would be.

Example:
    >>> import torch
    >>> from bnlab.corruptions import corrupt
    >>> x = torch.rand(4, 1, 28, 28)
    >>> corrupt(x, "inversion", 3).add(x).allclose(torch.ones_like(x))
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _noise(x: Tensor, sigma: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _blur(x: Tensor, sigma: float, seed: int) -> Tensor:
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    rows = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), padding=(radius, 0), groups=c)
    return torch.nn.functional.conv2d(rows, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), padding=(0, radius), groups=c)


def _contrast(x: Tensor, factor: float, seed: int) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (x - mean)


def _brightness(x: Tensor, offset: float, seed: int) -> Tensor:
    return x + offset


def _translation(x: Tensor, pixels: float, seed: int) -> Tensor:
    d = int(pixels)
    shifted = torch.zeros_like(x)
    shifted[..., d:, d:] = x[..., : x.shape[-2] - d, : x.shape[-1] - d]
    return shifted


def _inversion(x: Tensor, amount: float, seed: int) -> Tensor:
    return (1 - amount) * x + amount * (1 - x)


CORRUPTIONS = {
    "gaussian-noise": _noise,
    "blur": _blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "translation": _translation,
    "inversion": _inversion,
}
SEVERITIES: dict[str, tuple[float, float, float]] = {
    "gaussian-noise": (0.1, 0.2, 0.4),
    "blur": (0.7, 1.2, 2.0),
    "contrast": (0.5, 0.3, 0.15),
    "brightness": (0.2, 0.4, 0.6),
    "translation": (2, 4, 6),
    "inversion": (0.2, 0.35, 1.0),
}


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """`images` (N, C, H, W) in [0, 1] under corruption `name` at `severity` 1–3 (0: unchanged), clipped
    to [0, 1]; the noise is drawn from a generator seeded with `seed`. `images` is not modified."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if severity not in (0, 1, 2, 3):
        raise ValueError(f"severity must be 0 (none), 1, 2 or 3, got {severity!r}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected float images (N, C, H, W) in [0, 1], got {images.dtype} {tuple(images.shape)}; "
                         "convert uint8 images with bnlab.data.to_input")
    if severity == 0:
        return images.clone()
    return CORRUPTIONS[name](images, SEVERITIES[name][severity - 1], seed).clamp(0, 1)


__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt"]
