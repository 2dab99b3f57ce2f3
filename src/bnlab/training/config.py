"""Every setting of a training run: `TrainConfig`, the chapter's presets and their validation.

Example::

    from bnlab.training import TrainConfig, with_preset
    config = with_preset(TrainConfig(model="bn-lenet", bn_momentum=0.05), "classic")   # lr 1.0, batch 256
    config.validate()
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from bnlab.models import LeNetConfig, model_config

# Seeds are 0 .. 2**32 - 1 (numpy's range): the per-epoch seeds derived from them stay within torch's.
SEED_LIMIT = 2**32
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

PRESETS = {
    "current": {"lr": 0.1, "batch_size": 128, "epochs": 10},  # the current edition's settings
    "classic": {"lr": 1.0, "batch_size": 256, "epochs": 10},  # the older edition's
}


@dataclass
class TrainConfig:
    """Every setting of a run. `model_options` are LeNetConfig overrides (pool goes through `pool`).

    bn_momentum, bn_eps: set on every batch norm layer of the model, in torch's momentum convention
        (running = (1 - m) * running + m * batch); None keeps the layers' defaults (0.1 and 1e-5).
    compile: train the model wrapped in `torch.compile` (checkpoints keep the plain module's keys).
    """

    model: str = "bn-lenet"
    pool: str = "avg"
    epochs: int = PRESETS["current"]["epochs"]
    lr: float = PRESETS["current"]["lr"]
    batch_size: int = PRESETS["current"]["batch_size"]
    momentum: float = 0.0
    weight_decay: float = 0.0
    bn_momentum: Optional[float] = None
    bn_eps: Optional[float] = None
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None  # per process; with nproc > 1 the default is cores // nproc
    nproc: int = 1  # processes training data-parallel
    compile: bool = False
    precise_stats: bool = False  # after the last epoch, set BN statistics exactly over the training set
    data_dir: Optional[str] = None
    download: bool = True
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    model_options: dict = field(default_factory=dict)
    out: Optional[str] = None

    def validate(self) -> None:
        """ValueError naming the first bad setting, before anything is built or written."""
        chapter_bn = self.network_config().norm == "batchnorm-chapter"
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive and finite, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be non-negative, got {self.weight_decay}"),
            (self.bn_momentum is None or 0 <= self.bn_momentum <= 1,
             f"BN momentum must be in [0, 1] (torch's convention: the weight of the new batch), got {self.bn_momentum}"),
            (self.bn_eps is None or (self.bn_eps > 0 and math.isfinite(self.bn_eps)),
             f"BN eps must be positive and finite, got {self.bn_eps}"),
            (not chapter_bn or (self.bn_momentum is None and self.bn_eps is None),
             f"{self.model} uses the chapter's batch norm, whose momentum and eps are fixed in its code; "
             "drop --bn-momentum/--bn-eps or use bn-lenet"),
            (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT,
             f"seed must be an integer from 0 to {SEED_LIMIT - 1}, got {self.seed!r}"),
            (isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device) is not None,
             f"device must be cpu, cuda, cuda:N (N a GPU index) or auto, got {self.device!r}"),
            (self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}"),
            (isinstance(self.nproc, int) and self.nproc >= 1, f"nproc must be a positive integer, got {self.nproc!r}"),
            (self.nproc == 1 or not chapter_bn,
             f"{self.model} uses the chapter's naive batch norm, which cannot merge statistics across "
             "processes; use bn-lenet or bn-lenet-torch with --nproc, or --nproc 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.bn_momentum is not None or self.bn_eps is not None:
            self._check_bn_layers_exist()

    def _check_bn_layers_exist(self) -> None:
        from bnlab.models import build_model
        from bnlab.training.loop import set_bn_hyperparameters

        with torch.random.fork_rng(devices=[]):  # building initializes weights: keep the run's random stream
            set_bn_hyperparameters(build_model(self.model, pool=self.pool, **self.model_options),
                                   self.bn_momentum, self.bn_eps)

    def network_config(self) -> LeNetConfig:
        """The model's LeNetConfig; ValueError for an unknown model or option."""
        return model_config(self.model, pool=self.pool, **self.model_options)


def with_preset(config: TrainConfig, preset: str) -> TrainConfig:
    """`config` with the preset's lr, batch size and epochs."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    return dataclasses.replace(config, **PRESETS[preset])


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when there is one, else the CPU; ValueError for a malformed name, for CUDA on a
    machine without it, or for a GPU index it does not have."""
    if DEVICE_PATTERN.fullmatch(name or "") is None:
        raise ValueError(f"device must be cpu, cuda, cuda:N (N a GPU index) or auto, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible; "
                         f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device
