from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import Params
from transformer2.models import prepare_model
from transformer2.runtime import resource_metrics, timed

from .tracking import record_metrics, stage_run, tag_output


@task(name="prepare-model", cache_policy=NO_CACHE)
def prepare_model_task(params: Params, out_dir: str, metrics_path: str) -> dict:
    """Resolve `model.name`, convert built-ins/GGUF once, record the base fingerprint."""
    log = get_run_logger()
    with stage_run(params, "model") as stage:
        with timed() as t:
            info = prepare_model(params.model.name, out_dir, revision=params.model.revision, progress=log.info)
        metrics = {"num_parameters": info.num_parameters, "fingerprint": info.fingerprint,
                   "architecture": info.architecture, **resource_metrics(t["seconds"])}
        tag_output(out_dir)
        metrics = record_metrics(metrics_path, metrics, stage)
        log.info(f"{info.name}: {info.num_parameters:,} parameters, fingerprint {info.fingerprint[:12]}…")
    return metrics
