"""The chapter's claims and exercises answered by reproducible studies: `bnlab study NAME`.

Each study module defines one `Study` (its runs, the run functions they use, and how to analyse
them); `STUDIES` maps the fixed names to them. `bnlab.studies.engine` holds what they are built on:
the cache and the parallel runner, statistics over seeds, the report and the plots.
"""

from bnlab.studies.compare import Compare
from bnlab.studies.engine import Settings, Study, run_study
from bnlab.studies.lr_sweep import LrSweep
from bnlab.studies.bias import Bias
from bnlab.studies.dropout import Dropout
from bnlab.studies.fixed_affine import FixedAffine
from bnlab.studies.lite import Lite
from bnlab.studies.placement import Placement
from bnlab.studies.batch_size import BatchSize
from bnlab.studies.depth import Depth
from bnlab.studies.layer_norm import LayerNormStudy
from bnlab.studies.population_stats import PopulationStats
from bnlab.studies.research import Research
from bnlab.studies.smoothness import Smoothness

STUDIES: dict[str, Study] = {study.name: study for study in (Compare(), LrSweep(), Placement(), Bias(), Lite(), FixedAffine(), Dropout(), BatchSize(), PopulationStats(), Depth(), LayerNormStudy(), Research(), Smoothness())}


def get(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; valid: {', '.join(STUDIES)} (see `bnlab study list`)")
    return STUDIES[name]


__all__ = ["STUDIES", "Settings", "Study", "get", "run_study"]
