"""MLflow at the edge: one run per stage unit, params flattened, metrics also written for DVC."""
from __future__ import annotations

import json
import re
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformer2.config import Params


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextmanager
def stage_run(params: Params, stage: str, sections: tuple[str, ...] = (), **tags: str) -> Iterator[Any]:
    """An MLflow run tagged with the stage, logging the config sections the stage depends on."""
    import mlflow

    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_experiment(params.tracking.experiment)
    name = "-".join([stage, *tags.values()])
    with mlflow.start_run(run_name=name, tags={"stage": stage, **tags}) as run:
        logged = {"seed": params.seed, "model.name": params.model.name}
        for section in sections:
            logged.update(_flatten(getattr(params, section).model_dump(), section + "."))
        mlflow.log_params({k: str(v)[:500] for k, v in logged.items()})
        yield run


def _metric_name(key: str) -> str:
    """MLflow allows only alphanumerics and _-. :/ in names; lm-eval's are like 'exact_match,strict-match'."""
    return re.sub(r"[^\w\-. :/]", "/", key)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def record_metrics(path: str | Path, metrics: dict) -> None:
    """Write the stage's metrics file (read by `dvc metrics`) and log its numbers to MLflow."""
    import mlflow

    write_json(path, metrics)
    numeric = {_metric_name(k): float(v) for k, v in _flatten(metrics).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(numeric)
    mlflow.log_artifact(str(path))
