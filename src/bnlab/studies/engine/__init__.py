"""The studies' engine: what every study is built on, one concern per module.

- `runner`: `Run`, the cache and the process pool (`execute`), `Settings`, `Outcome`, `RunContext`;
- `study`: the `Study` base (its runs, its run functions, its analysis) and `run_study`;
- `runkinds`: the shared "train" run, the hooked training runs (`train_with_hooks`) and result shapes;
- `probes`: measuring a network without side effects;
- `stats`: mean ± std over seeds, `difference` with its `Verdict`, reading results, the share of a
  method's gain its variants recover (`gain_table`, `gain_findings`);
- `report`: `Report` and markdown tables;
- `plots`: the plot helpers;
- `presets`: the settings the studies share (both presets' runs and `PresetStudy`, the batch-size
  learning-rate rule).

Imports go one way: training <- engine <- the study modules. The names below are the engine's public
ones, so that a study imports what it needs from `bnlab.studies.engine`.
"""

from bnlab.studies.engine.plots import (LINE_STYLES, LOSS_AND_ACCURACY, TEST_ACCURACY, label_axes, mean_curve,
                                        plot_accuracy_and_curves_by_preset, plot_accuracy_by_preset,
                                        plot_against_batch_size, plot_bars, plot_curves_by_preset, plot_epoch_curves,
                                        save_figure, saved_plot, subplots)
from bnlab.studies.engine.presets import (FULL_SEEDS, MODEL, NO_NORM, QUICK_DATA, QUICK_EPOCHS, PresetStudy,
                                          by_preset_and_config, config_name, fixed_settings, preset_of, preset_runs,
                                          preset_title, round_lr, scaled_lr, training_params)
from bnlab.studies.engine.probes import activations_at, channel_columns, side_effect_free
from bnlab.studies.engine.report import Report, markdown_table
from bnlab.studies.engine.runkinds import (SHARED_RUN_KINDS, LoopOutcome, LoopSpec, train_run, train_with_hooks,
                                           trained_network, training_data, training_result, with_precise_statistics)
from bnlab.studies.engine.runner import Outcome, Run, RunContext, RunFunction, Settings, execute
from bnlab.studies.engine.stats import (GainRecovery, Verdict, best, difference, diverged_count, final, finals, fmt,
                                        gain_columns, gain_findings, gain_recovery, gain_table, group_results,
                                        history_of, mean_std, share_of_gain)
from bnlab.studies.engine.study import Study, run_study

__all__ = [
    "LINE_STYLES", "LOSS_AND_ACCURACY", "TEST_ACCURACY", "label_axes", "mean_curve",
    "plot_accuracy_and_curves_by_preset", "plot_accuracy_by_preset", "plot_against_batch_size", "plot_bars",
    "plot_curves_by_preset", "plot_epoch_curves", "save_figure", "saved_plot", "subplots",
    "FULL_SEEDS", "MODEL", "NO_NORM", "QUICK_DATA", "QUICK_EPOCHS", "PresetStudy", "by_preset_and_config",
    "config_name", "fixed_settings", "preset_of", "preset_runs", "preset_title", "round_lr", "scaled_lr",
    "training_params",
    "activations_at", "channel_columns",
    "side_effect_free", "Report", "markdown_table", "SHARED_RUN_KINDS", "LoopOutcome", "LoopSpec", "train_run",
    "train_with_hooks", "trained_network", "training_data", "training_result", "with_precise_statistics", "Outcome",
    "Run", "RunContext", "RunFunction", "Settings", "execute", "GainRecovery", "Verdict", "gain_recovery", "best", "difference", "diverged_count",
    "final", "finals", "fmt", "gain_columns", "gain_findings", "gain_table", "group_results", "history_of",
    "mean_std", "share_of_gain", "Study",
    "run_study",
]
