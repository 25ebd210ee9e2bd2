from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import Params
from transformer2.files import atomic_write_json, atomic_write_text
from transformer2.report import build_report, measured, plot_cells, read_cells, read_stage_metrics, write_tables

from .stage_params import settings_hash, stage_settings, unit_name
from .tracking import METHODS, metric_name, stage_run


def expected_hashes(params: Params, units: list[tuple[str, str | None]]) -> dict[str, str]:
    """unit name (`eval_svf_gsm8k`) -> the params_hash its metrics file must carry under the current params."""
    return {unit_name(stage, item): settings_hash(stage_settings(params, stage, item)) for stage, item in units}


def write_report(params: Params, metrics_dir: str, cells: list[tuple[str, str, str]],
                 units: list[tuple[str, str | None]], report_path: str, plot_path: str,
                 summary_path: str | None = None, tables_dir: str | None = None,
                 stale_plots: list[str] | None = None) -> dict:
    """Table-1/Table-2-style Markdown, the same tables as CSV (`table1.csv`, `table2.csv`, `table3.csv` in
    `tables_dir`, by default beside the report) and a bar chart from exactly the evaluation cells of this run's DAG,
    the headline numbers as score.<method>.<task> in `summary_path` (short column names for `dvc exp show`),
    and the MLflow report run (its comparison table: task × method, metric, value, 95% interval, n).

    `cells`: (dvc stage, kind, task) of every eval cell the DAG produces; `units`: its classifier and
    cem units. Metrics files of other profiles are never read; a cell written under other settings
    is shown as stale, one not yet run as missing. `stale_plots`: curve files dvc.yaml draws that this DAG
    does not write (another profile's), named in the report so `dvc plots show` cannot pass them off as this run's."""
    import mlflow

    hashes = expected_hashes(params, [(stage, t) for stage, _, t in cells] + units)
    found = read_cells(metrics_dir, {(kind, t): hashes[unit_name(stage, t)] for stage, kind, t in cells})
    classifier, cem, trained = read_stage_metrics(metrics_dir, {unit_name(s, i): hashes[unit_name(s, i)]
                                                                for s, i in units})
    notes = {"Profile": f"eval.style={params.eval.style}, eval.limit={params.eval.limit} "
                        f"(overrides: {params.eval.overrides or 'none'}), model {params.model.name}, trained in "
                        f"{params.model.dtype}, evaluated in {params.cell_dtype()}.",
             "Two-pass cells": f"prompt / classifier dispatch with a `{params.eval.dispatch_mode}` first pass; "
                               "routes code→MBPP, math→GSM8K, reasoning→ARC-Easy expert, other→base weights. "
                               "Few-shot CEM shots come from each task's training split; HumanEval has none, so "
                               f"{params.data.fewshot_holdout} of its test docs are held out as shots and every "
                               "HumanEval cell (base included) is evaluated on the rest."}
    if stale_plots:
        notes["Stale plot files"] = (f"{', '.join(f'`{p}`' for p in stale_plots)} are drawn by `dvc plots show` but not "
                                     "written by this profile's DAG (another run's curves); `git rm` them, or ignore "
                                     "those curves.")
    atomic_write_text(report_path, build_report(found, notes, classifier, cem, trained))
    tables = write_tables(found, tables_dir if tables_dir is not None else Path(report_path).parent)
    plot_cells(found, plot_path)
    done = measured(found)
    headline = {f"{METHODS[kind]}.{t}": c["value"] for (kind, t), c in done.items()}
    if summary_path is not None:  # `score.svf.gsm8k`: a column name of its own in `dvc exp show`
        scores: dict = {}
        for (kind, t), c in done.items():
            scores.setdefault(METHODS[kind], {})[t] = c["value"]
        atomic_write_json(summary_path, {"score": scores})
    with stage_run(params, "report"):
        mlflow.log_artifact(report_path)
        mlflow.log_artifact(plot_path)
        for path in tables:
            mlflow.log_artifact(str(path), artifact_path="tables")
        mlflow.log_metrics({k: float(v) for k, v in headline.items()})
        mlflow.log_table({"task": [t for _, t in found], "method": [METHODS[k] for k, _ in found],
                          "metric": [metric_name(c.get("metric", "")) for c in found.values()],
                          "value": [c.get("value") for c in found.values()],
                          "ci95_low": [(c.get("ci95") or [None])[0] for c in found.values()],
                          "ci95_high": [(c.get("ci95") or [None, None])[1] for c in found.values()],
                          "n": [c.get("n_docs") for c in found.values()],
                          "status": [c.get("status", "measured") for c in found.values()]},
                         artifact_file="comparison.json")
    return {"cells": len(done), "expected": len(found)}


@task(name="report", cache_policy=NO_CACHE)
def report_task(params: Params, metrics_dir: str, cells: list[tuple[str, str, str]],
                units: list[tuple[str, str | None]], report_path: str, plot_path: str, summary_path: str,
                stale_plots: list[str] | None = None) -> dict:
    out = write_report(params, metrics_dir, cells, units, report_path, plot_path, summary_path, stale_plots=stale_plots)
    log = get_run_logger()
    log.info(f"{out['cells']} of {out['expected']} cells measured -> {report_path}, {plot_path}")
    if stale_plots:
        log.warning(f"not written by this profile's DAG, still drawn by `dvc plots show`: {', '.join(stale_plots)}")
    return out
