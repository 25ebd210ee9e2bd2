from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.tasks import data_dir, export_tasks
from transformer2.config import Params
from transformer2.runtime import resource_metrics, timed

from .tracking import record_metrics, stage_run


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data_task(params: Params, out_dir: str, metrics_path: str) -> dict:
    """Write the paper's train/validation/test splits of every configured task."""
    log = get_run_logger()
    mirror = data_dir(params.data.dir)
    log.info(f"loading from {mirror or 'the Hugging Face hub'}")
    with stage_run(params, "data") as stage:
        with timed() as t:
            counts = export_tasks(params.data.tasks, out_dir, mirror, params.data.max_rows,
                                  params.data.fewshot_holdout)  # every task read and checked before any write
            for name, rows in counts.items():
                log.info(f"{name}: {rows}")
        metrics = {"rows": counts, **resource_metrics(t["seconds"])}
        metrics = record_metrics(metrics_path, metrics, stage)
    return metrics
