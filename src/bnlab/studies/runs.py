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


def trained_network(params: dict, context: RunContext):
    """Train as the "train" run kind does (resumable), then rebuild the trained network from its checkpoint.

    Returns (result, the network in eval mode), or (result, None) when the run diverged: its checkpoint
    would hold an earlier epoch, not a trained model.
    """
    from bnlab.models import build_model
    from bnlab.train import load_checkpoint

    result = train_run(params, context)
    if result["status"] != "ok":
        return result, None
    net = build_model(params["model"], pool=params.get("pool", "avg"), **params.get("model_options", {}))
    net.load_state_dict(load_checkpoint(context.run_dir)["model"])
    return result, net.eval()


def with_precise_statistics(net, images, labels, batch_size: int):
    """A copy of `net` whose BN running statistics are recomputed exactly over (images, labels), taken in
    order in batches of `batch_size` (`bnlab.nn.recompute_stats`): the chapter's "standard practice" for
    prediction, free of the moving averages' lag. `net` itself is left as it was."""
    import copy

    from bnlab import data
    from bnlab.nn import recompute_stats

    return recompute_stats(copy.deepcopy(net), data.batches(images, labels, batch_size, shuffle=False))


def training_data(params: dict, context: RunContext):
    """The data set exactly as the training run saw it (the same seeded subsets)."""
    return context.dataset().subset(params.get("train_subset"), params.get("test_subset"), seed=params["seed"])


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
