"""The chapter's claims and exercises answered by reproducible studies: `bnlab study NAME`.

Each study module defines one `Study` (its runs and how to analyse them); `STUDIES` maps the fixed
names to them, and `RUN_KINDS` maps every kind of run they name to its function, explicitly (nothing
registers itself on import). `bnlab.studies.engine` holds what they are built on: the cache and the
parallel runner, statistics over seeds, the report and the plots.
"""

from pathlib import Path

from bnlab.studies import (batch_size, bias, depth, dropout, engine, fixed_affine, lite, population_stats, research,
                           shift, smoothness)
from bnlab.studies.batch_size import BatchSize
from bnlab.studies.bias import Bias
from bnlab.studies.compare import Compare
from bnlab.studies.depth import Depth
from bnlab.studies.dropout import Dropout
from bnlab.studies.engine import SHARED_RUN_KINDS, RunFunction, Settings, Study
from bnlab.studies.fixed_affine import FixedAffine
from bnlab.studies.layer_norm import LayerNormStudy
from bnlab.studies.lite import Lite
from bnlab.studies.lr_sweep import LrSweep
from bnlab.studies.placement import Placement
from bnlab.studies.population_stats import PopulationStats
from bnlab.studies.research import Research
from bnlab.studies.shift import Shift
from bnlab.studies.smoothness import Smoothness

STUDIES: dict[str, Study] = {study.name: study for study in (Compare(), LrSweep(), Placement(), Bias(), Lite(), FixedAffine(), Dropout(), BatchSize(), PopulationStats(), Depth(), LayerNormStudy(), Research(), Smoothness(), Shift())}

RUN_KINDS: dict[str, RunFunction] = {
    **SHARED_RUN_KINDS,  # "train"
    "batch-size-train": batch_size.train_with_validation,
    "batch-one-refusal": batch_size.batch_one_refusal,
    "bias-gradients": bias.bias_gradients_run,
    "deep-mlp": depth.deep_mlp_run,
    "train-set-accuracy": dropout.train_set_accuracy_run,
    "affine-parameters": fixed_affine.affine_parameters_run,
    "sigmoid-inputs": lite.sigmoid_inputs_run,
    "population-stats": population_stats.train_and_predict,
    "research": research.research_run,
    "smoothness": smoothness.smoothness_run,
    "shift": shift.shift_run,
}


def get(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; valid: {', '.join(STUDIES)} (see `bnlab study list`)")
    return STUDIES[name]


def run_study(study: Study, settings: Settings, command: str) -> Path:
    """`engine.run_study` with every registered run kind."""
    return engine.run_study(study, settings, command, RUN_KINDS)


__all__ = ["RUN_KINDS", "STUDIES", "Settings", "Study", "get", "run_study"]
