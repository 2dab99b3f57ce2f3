"""Run kinds shared by the studies. Each takes JSON parameters and returns a JSON-able result dict."""

from __future__ import annotations

import dataclasses

from bnlab.studies.core import RunContext, run_kind


def history_of(result: dict) -> list[dict]:
    return result.get("history", [])


def final(result: dict, metric: str, default=float("nan")) -> float:
    """The last epoch's `metric` of a training result; `default` if it has no epoch (diverged at once)."""
    history = history_of(result)
    return history[-1][metric] if history else default


def best(result: dict, metric: str = "test_acc", default=float("nan")) -> float:
    history = history_of(result)
    return max(h[metric] for h in history) if history else default


@run_kind("train")
def train_run(params: dict, context: RunContext) -> dict:
    """`bnlab train` with `params` as TrainConfig fields, in a resumable run directory.

    Returns {"status": "ok", "history": [...]} or, when the loss blew up, {"status": "diverged",
    "diverged": {epoch, batch, loss}, "history": the epochs finished before}.
    """
    from bnlab.train import Diverged, TrainConfig, read_metrics, train

    config = TrainConfig(**params, out=str(context.run_dir), data_dir=context.data_dir, download=context.download)
    resume = (context.run_dir / "config.json").exists()
    try:
        result = train(config, resume=resume, dataset=context.dataset(), progress=False, log=lambda line: None)
    except Diverged as exc:
        finished = read_metrics(context.run_dir) if (context.run_dir / "metrics.csv").exists() else []
        return {"status": "diverged", "diverged": {"epoch": exc.epoch, "batch": exc.batch, "loss": exc.loss},
                "history": [dataclasses.asdict(m) for m in finished]}
    return {"status": "ok", "history": [dataclasses.asdict(m) for m in result.history]}
