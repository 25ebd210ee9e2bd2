from __future__ import annotations


from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import Params
from transformer2.files import atomic_write_text
from transformer2.report import build_report, plot_cells, read_cells, read_stage_metrics

from .tracking import stage_run


@task(name="report", cache_policy=NO_CACHE)
def report_task(params: Params, metrics_dir: str, report_path: str, plot_path: str) -> dict:
    """Table-1/Table-2-style Markdown and a bar chart from every evaluation cell that has run."""
    import mlflow

    cells = read_cells(metrics_dir)
    classifier, cem = read_stage_metrics(metrics_dir)
    notes = {"Profile": f"eval.style={params.eval.style}, eval.limit={params.eval.limit} "
                        f"(overrides: {params.eval.overrides or 'none'}), model {params.model.name}.",
             "Two-pass cells": f"prompt / classifier dispatch with a `{params.eval.dispatch_mode}` first pass; "
                               "routes code→MBPP, math→GSM8K, reasoning→ARC-Easy expert, other→base weights. "
                               "Few-shot CEM shots come from each task's training split; HumanEval has none, so "
                               f"{params.data.fewshot_holdout} of its test docs are held out as shots and every "
                               "HumanEval cell (base included) is evaluated on the rest."}
    atomic_write_text(report_path, build_report(cells, notes, classifier, cem))
    plot_cells(cells, plot_path)
    with stage_run(params, "report", sections=("eval",)):
        mlflow.log_artifact(report_path)
        mlflow.log_artifact(plot_path)
        mlflow.log_metrics({f"{kind}.{t}": float(c["value"]) for (kind, t), c in cells.items()})
    get_run_logger().info(f"{len(cells)} cells -> {report_path}, {plot_path}")
    return {"cells": len(cells)}
