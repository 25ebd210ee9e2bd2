"""What every stage shares: MLflow at the edge (one run per stage unit, params flattened), metrics
files for DVC, training curves, progress. Stage tasks import these; they never import each other."""
from __future__ import annotations

import csv
import io
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from transformer2.config import Params
from transformer2.files import atomic_write_json, atomic_write_text


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
    atomic_write_json(path, data)


def record_metrics(path: str | Path, metrics: dict) -> None:
    """Write the stage's metrics file (read by `dvc metrics`) and log its numbers to MLflow."""
    import mlflow

    write_json(path, metrics)
    numeric = {_metric_name(k): float(v) for k, v in _flatten(metrics).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(numeric)
    mlflow.log_artifact(str(path))


CURVE_FIELDS = ("step", "reward", "accuracy", "kl", "loss", "grad_norm", "val_accuracy", "rollout_tokens_per_s",
                "seconds_rollout", "seconds_logprob", "seconds_forward", "seconds_backward")


def write_curve(path: str | Path, history: list[dict], fields: tuple[str, ...] = CURVE_FIELDS) -> None:
    """A curve for `dvc plots`: one row per step (or generation), blank where a field did not run."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in fields})
    atomic_write_text(path, out.getvalue())


def progress_logger(desc: str, steps: int):
    """A terminal progress bar plus per-step MLflow metrics; returns (callback, bar)."""
    import mlflow

    bar = tqdm(total=steps, desc=desc, unit="step")

    def progress(m: dict) -> None:
        bar.n = m["step"]
        shown = {k: f"{m[k]:+.3f}" for k in ("reward", "loss") if k in m}
        if "val_accuracy" in m:
            shown["val"] = f"{m['val_accuracy']:.3f}"
        bar.set_postfix(**shown)
        bar.refresh()
        mlflow.log_metrics({k: float(v) for k, v in m.items() if k != "step" and isinstance(v, (int, float))},
                           step=m["step"])

    return progress, bar


def record_training_run(result, metrics: dict, out_dir: str, metrics_path: str, curve_path: str,
                        artifact_path: str) -> None:
    """A finished run's validations, curve (for `dvc plots`), metrics file and MLflow artifacts."""
    import mlflow

    write_json(Path(out_dir) / "validations.json", {"validations": result.validations})
    write_curve(curve_path, result.history)
    record_metrics(metrics_path, metrics)
    mlflow.log_artifacts(out_dir, artifact_path=artifact_path)
    mlflow.log_artifact(curve_path)
