from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import Params
from transformer2.files import atomic_write_json
from transformer2.models import prepare_model
from transformer2.runtime import resource_metrics, timed

from .tracking import record_metrics, stage_run, tag_output


def portable_model_json(out_dir: str) -> None:
    """Name the checkpoint relative to the project root when it lies inside it: an absolute path differs
    between checkouts (so would the DVC output) and breaks after `dvc pull` on another machine. Stages
    run from the project root, where the relative path loads."""
    path = Path(out_dir) / "model.json"
    info = json.loads(path.read_text())
    checkpoint = Path(info["path"])
    if checkpoint.is_absolute() and checkpoint.is_relative_to(Path.cwd().resolve()):
        info["path"] = str(checkpoint.relative_to(Path.cwd().resolve()))
        atomic_write_json(path, info, sort_keys=False)


@task(name="prepare-model", cache_policy=NO_CACHE)
def prepare_model_task(params: Params, out_dir: str, metrics_path: str) -> dict:
    """Resolve `model.name`, convert built-ins/GGUF once, record the base fingerprint."""
    log = get_run_logger()
    with stage_run(params, "model") as stage:
        with timed() as t:
            info = prepare_model(params.model.name, out_dir, revision=params.model.revision, progress=log.info)
            portable_model_json(out_dir)
        metrics = {"num_parameters": info.num_parameters, "fingerprint": info.fingerprint,
                   "architecture": info.architecture, **resource_metrics(t["seconds"])}
        tag_output(out_dir)
        metrics = record_metrics(metrics_path, metrics, stage)
        log.info(f"{info.name}: {info.num_parameters:,} parameters, fingerprint {info.fingerprint[:12]}…")
    return metrics
