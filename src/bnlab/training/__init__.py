"""Training: the one loop every run in bnlab goes through.

- `config`: `TrainConfig` (every setting of a run), the chapter's presets, validation;
- `rundir`: the run directory (lock, config.json, metrics.csv, checkpoint with RNG state, curves.png)
  and the history row `EpochMetrics`;
- `loop`: `Loop`, the one epoch loop with `Hooks` (one process or DDP), and `train`, `bnlab train`.

Imports go one way: models <- training <- studies, bench, cli.

Example::

    from bnlab.training import TrainConfig, train
    result = train(TrainConfig(model="bn-lenet", epochs=1, out="runs/demo"))
    print(result.final.test_acc)
"""

from bnlab.training.config import PRESETS, TrainConfig, resolve_device, with_preset
from bnlab.training.loop import (EVAL_BATCH_SIZE, Diverged, Hooks, Loop, RunResult, data_parallel_step, evaluate,
                                 epoch_seed, train)
from bnlab.training.rundir import EpochMetrics, load_checkpoint, load_config, read_metrics

__all__ = ["PRESETS", "TrainConfig", "resolve_device", "with_preset", "EVAL_BATCH_SIZE", "Diverged", "Hooks", "Loop",
           "RunResult", "data_parallel_step", "evaluate", "epoch_seed", "train", "EpochMetrics", "load_checkpoint",
           "load_config", "read_metrics"]
