"""MLflow, in one place: one run per stage unit, nested under one parent run per pipeline run (or per
`dvc exp`), with the tags that line runs up for comparison; plus the metrics files DVC reads,
training curves and progress. Stage tasks import these; they never import each other.

Tags on every run: stage, unit (`eval-svf@gsm8k`), task, kind, method (base / svf / lora /
t2-prompt / t2-classifier / t2-few-shot), base_model, profile (tracking.experiment), params_hash
(the whole config), stage_params_hash (what the unit reads), git_commit, dvc_exp. Run ids and
timings go to MLflow and the metrics files only, never into a DVC output.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional
from urllib.parse import urlparse

from transformer2.config import Params
from transformer2.errors import UserError
from transformer2.files import atomic_write_json, atomic_write_text
from transformer2.identity import file_bytes, run_fingerprint

from .stage_params import params_hash, settings_hash, stage_settings

PARENT_ENV = "MLFLOW_PARENT_RUN_ID"  # set by `t2 pipeline`; every stage run it starts nests under it
METHODS = {"base": "base", "svf": "svf", "lora": "lora", "prompt": "t2-prompt", "classifier": "t2-classifier",
           "few_shot": "t2-few-shot"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def metric_name(key: str) -> str:
    """lm-eval's `acc_norm,none` -> `acc_norm`, `exact_match,strict-match` -> `exact_match.strict-match`,
    `pass@1` -> `pass_at_1`: no `,` or `/`, which MLflow rejects or the UI splits into sections."""
    name, _, filt = key.partition(",")
    if filt and filt != "none":
        name = f"{name}.{filt}"
    return re.sub(r"[^\w\-. :]", "_", name.replace("@", "_at_"))


# ---------------------------------------------------------------- tracking server and tags

def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after MLflow's ~260 s of retries, when `tracking.uri` cannot be used."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # something answers (a proxy, a server without /health): MLflow reports the rest
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"tracking.uri {uri}: no MLflow server answers ({reason}); start one "
                            "(`mlflow server --host 127.0.0.1 --port 5000 --workers 1`) or use the local "
                            "default, tracking.uri: sqlite:///mlflow.db") from None
    elif scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:" and not Path(path).parent.is_dir():
            raise UserError(f"tracking.uri {uri}: folder {Path(path).parent} does not exist")


def git_commit() -> Optional[str]:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def run_tags(params: Params) -> dict[str, str]:
    """What every run (and parent run) of this config shares."""
    tags = {"base_model": params.model.name, "profile": params.tracking.experiment,
            "params_hash": params_hash(params), "git_commit": git_commit(),
            "dvc_exp": os.environ.get("DVC_EXP_NAME"), "dvc_exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV")}
    return {k: v for k, v in tags.items() if v}


def _experiment_id(params: Params) -> str:
    import mlflow

    mlflow.set_tracking_uri(params.tracking.uri)
    return mlflow.set_experiment(params.tracking.experiment).experiment_id


def _parent_run_id(params: Params, experiment_id: str) -> Optional[str]:
    """The pipeline run set by `t2 pipeline`; under `dvc exp run`, one parent per experiment name."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(params.tracking.uri)
    found = client.search_runs([experiment_id], f"tags.stage = 'pipeline' and tags.dvc_exp = '{name}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"dvc exp {name}", tags={**run_tags(params), "stage": "pipeline"})
    client.log_batch(run.info.run_id, params=_params_batch(params.model_dump()))
    client.set_terminated(run.info.run_id)  # its stages arrive one process at a time
    return run.info.run_id


def _params_batch(values: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:500]) for k, v in _flatten(values).items()]


@contextmanager
def pipeline_run(params: Params, name: str = "pipeline") -> Iterator[str]:
    """The parent run of one pipeline run; stage processes (dvc repro's or in-process) find it in PARENT_ENV."""
    from mlflow import MlflowClient

    client = MlflowClient(params.tracking.uri)
    run = client.create_run(_experiment_id(params), run_name=name, tags={**run_tags(params), "stage": "pipeline"})
    run_id = run.info.run_id
    client.log_batch(run_id, params=_params_batch(params.model_dump()))
    previous, status = os.environ.get(PARENT_ENV), "FAILED"
    os.environ[PARENT_ENV] = run_id
    try:
        yield run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


@dataclass
class StageRun:
    run_id: str
    unit: str
    settings_hash: str
    overhead_s: Optional[float] = None  # process start (or the previous unit's end) -> this unit's own work
    last_end = None  # (class attribute, not a field) time.monotonic() when this process's previous unit ended

    def provenance(self) -> dict:
        """What a metrics file records about the run that wrote it."""
        return {"mlflow_run_id": self.run_id, "params_hash": self.settings_hash}


@contextmanager
def stage_run(params: Params, stage: str, item: Optional[str] = None, *, kind: Optional[str] = None,
              method: Optional[str] = None, settings: Optional[dict] = None, **tags: str) -> Iterator[StageRun]:
    """The MLflow run of one unit of dvc.yaml (`stage`, `item`): its stage settings as params, the shared tags,
    nested under the pipeline's run when there is one. The unit's own work starts when this yields:
    `overhead_s` is the process's age then (in a process that runs several units, `t2 pipeline
    --no-dvc`, the time since the previous unit ended)."""
    import time

    import mlflow

    from transformer2.runtime import process_age_s

    settings = stage_settings(params, stage, item) if settings is None else settings
    unit = stage + (f"@{item}" if item is not None else "")
    experiment_id = _experiment_id(params)
    torch = sys.modules.get("torch")  # where it ran: the process (a Dask worker's, under execution.task_runner: dask)
    run_tags_ = {**run_tags(params), "stage": "eval" if stage.startswith("eval-") else stage, "unit": unit,
                 "task": item, "kind": kind, "method": method, "stage_params_hash": settings_hash(settings),
                 "pid": str(os.getpid()), "torch_threads": str(torch.get_num_threads()) if torch else None, **tags}
    run_tags_ = {k: v for k, v in run_tags_.items() if v is not None}
    with mlflow.start_run(run_name=unit, experiment_id=experiment_id, tags=run_tags_,
                          parent_run_id=_parent_run_id(params, experiment_id)) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(settings).items()})
        age = process_age_s()
        if age is not None and StageRun.last_end is not None:
            age = min(age, time.monotonic() - StageRun.last_end)
        try:
            yield StageRun(run.info.run_id, unit, run_tags_["stage_params_hash"],
                           None if age is None else round(age, 2))
        finally:
            StageRun.last_end = time.monotonic()


# ---------------------------------------------------------------- artifacts: identity and lineage

def artifact_fingerprint(folder: str | Path) -> str:
    """A stage output's identity: the base model by its weights (model.json), any other folder by its files."""
    folder = Path(folder)
    if (folder / "model.json").is_file():
        return json.loads((folder / "model.json").read_text())["fingerprint"][:16]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return run_fingerprint([str(p.relative_to(folder)) for p in files], file_bytes(files))


def tag_output(folder: str | Path) -> str:
    """Tag the active run with the fingerprint of what it wrote, so an evaluation can name the run."""
    import mlflow

    fingerprint = artifact_fingerprint(folder)
    mlflow.set_tag("output_fingerprint", fingerprint)
    return fingerprint


def log_inputs(params: Params, inputs: Mapping[str, str | Path]) -> dict[str, dict]:
    """What an evaluation measured: per input folder, its fingerprint and the run that wrote it
    (`unknown` when no run of this experiment did, e.g. an artifact from `dvc pull`)."""
    import mlflow
    from mlflow import MlflowClient

    client, experiment_id = MlflowClient(params.tracking.uri), _experiment_id(params)
    out = {}
    for name, folder in inputs.items():
        fingerprint = artifact_fingerprint(folder)
        found = client.search_runs([experiment_id], f"tags.output_fingerprint = '{fingerprint}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        out[name] = {"fingerprint": fingerprint, "run_id": found[0].info.run_id if found else "unknown"}
    mlflow.log_params({f"input.{name}.{k}": v for name, d in out.items() for k, v in d.items()})
    return out


# ---------------------------------------------------------------- metrics files, curves, progress

def write_json(path: str | Path, data: dict) -> None:
    atomic_write_json(path, data)


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics dict, nested keys joined by `.`; a 95% interval `x_ci95: [low, high]` becomes
    `x_ci95_low` / `x_ci95_high`."""
    flat = _flatten(dict(metrics))
    for key, v in list(flat.items()):
        if key.endswith("ci95") and isinstance(v, (list, tuple)) and len(v) == 2:
            flat[f"{key}_low"], flat[f"{key}_high"] = v
    return {metric_name(k): float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def record_metrics(path: str | Path, metrics: dict, stage: StageRun, logged: Optional[dict] = None) -> dict:
    """Write the unit's metrics file (read by `dvc metrics`; the run id and stage params hash included)
    and log its numbers (or `logged`) to MLflow."""
    import mlflow

    overhead = {} if stage.overhead_s is None else {"overhead_s": stage.overhead_s}
    metrics = {**metrics, **overhead, **stage.provenance()}
    write_json(path, metrics)
    mlflow.log_metrics(_numeric(metrics) if logged is None else {**logged, **overhead})
    mlflow.log_artifact(str(path))
    return metrics


def cell_metrics(cell: dict) -> tuple[str, dict[str, float]]:
    """An evaluation cell's headline metric name (the run's `metric` tag) and its MLflow metrics: every
    lm-eval metric under a name the UI keeps whole, `n` (test docs) and timings."""
    headline = metric_name(cell["metric"])
    logged = {metric_name(k): float(v) for k, v in cell["metrics"].items()}
    logged["n"] = float(cell["n_docs"])
    # The headline's 95% interval and, for an adapted cell, its paired Δ vs base (tasks/eval.py).
    if cell.get("ci95"):
        logged[f"{headline}_ci95_low"], logged[f"{headline}_ci95_high"] = map(float, cell["ci95"])
    if cell.get("delta_ci95"):
        logged["delta_vs_base_ci95_low"], logged["delta_vs_base_ci95_high"] = map(float, cell["delta_ci95"])
    second = cell.get("secondary")
    if second:  # the same cell in its other style: `<style>_<metric>`, its interval, Δ and p
        style = second["style"]
        logged[f"{style}_{metric_name(second['metric'])}"] = float(second["value"])
        logged[f"{style}_n"] = float(second["n_docs"])
        for key, name in (("ci95", f"{style}_{metric_name(second['metric'])}_ci95"),
                          ("delta_ci95", f"{style}_delta_vs_base_ci95")):
            if second.get(key):
                logged[f"{name}_low"], logged[f"{name}_high"] = map(float, second[key])
        for key in ("delta_vs_base", "p_value"):
            if isinstance(second.get(key), (int, float)):
                logged[f"{style}_{key}"] = float(second[key])
    for key in ("delta_vs_base", "p_value", "paired_n", "first_pass_s", "second_pass_s", "first_to_second", "adaptation_search_s", "resumed_responses",
                "seconds", "peak_rss_mb", "peak_cuda_mb"):
        if isinstance(cell.get(key), (int, float)):
            logged[key] = float(cell[key])
    return headline, logged


CURVE_FIELDS = ("step", "reward", "accuracy", "kl", "loss", "grad_norm", "val_accuracy", "rollout_tokens_per_s",
                "seconds_rollout", "seconds_logprob", "seconds_forward", "seconds_backward", "seconds_validation")


def write_curve(path: str | Path, history: list[dict], fields: tuple[str, ...] = CURVE_FIELDS) -> None:
    """A curve for `dvc plots`: one row per step (or generation), blank where a field did not run."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in fields})
    atomic_write_text(path, out.getvalue())


def progress_bar(total: int, desc: str, unit: str = "step"):
    """A tqdm bar on a terminal only (logs and CI get no carriage-return noise)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty())


def progress_logger(desc: str, steps: int, log: Optional[Callable[[str], None]] = None):
    """A progress bar (terminal) or one log line per step (`log`, elsewhere), plus per-step MLflow
    metrics; returns (callback, bar)."""
    import mlflow

    bar = progress_bar(steps, desc)

    def progress(m: dict) -> None:
        shown = {k: f"{m[k]:+.3f}" for k in ("reward", "loss") if k in m}
        if "val_accuracy" in m:
            shown["val"] = f"{m['val_accuracy']:.3f}"
        if bar.disable and log is not None:
            log(f"{desc}: step {m['step']}/{steps} " + " ".join(f"{k} {v}" for k, v in shown.items()))
        bar.n = m["step"]
        bar.set_postfix(**shown)
        bar.refresh()
        mlflow.log_metrics({metric_name(k): float(v) for k, v in m.items()
                            if k != "step" and isinstance(v, (int, float))}, step=m["step"])

    return progress, bar


def record_training_run(result, metrics: dict, out_dir: str, metrics_path: str, curve_path: str,
                        artifact_path: str, stage: StageRun) -> dict:
    """A finished run's curve (for `dvc plots`), output fingerprint, metrics file and MLflow artifacts. Its
    validations are in the output already: the stage saves them with the adapter, as one unit
    (`TrainResult.output_files`)."""
    import mlflow

    write_curve(curve_path, result.history)
    metrics = record_metrics(metrics_path, {**metrics, "output_fingerprint": tag_output(out_dir)}, stage)
    mlflow.log_artifacts(out_dir, artifact_path=artifact_path)
    mlflow.log_artifact(curve_path)
    return metrics
