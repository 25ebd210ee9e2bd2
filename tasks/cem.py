from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.tasks import shot_pool
from transformer2.cem import CEMError, few_shot_cem, shot_indices
from transformer2.config import Params
from transformer2.models import ModelInfo, load_patched
from transformer2.runtime import resource_metrics, timed
from transformer2.stats import wilson_interval
from transformer2.svf import Expert, check_same_base

from .tracking import metric_name, progress_bar, record_metrics, stage_run, tag_output, write_curve

HISTORY_FIELDS = ("generation", "best_accuracy", "best_loglik", "mean_accuracy", "elite_accuracy",
                  "best_so_far_accuracy", "best_so_far_loglik", "mean_std", "seconds")


def load_task_experts(experts_dir: str, tasks: list[str], base_fingerprint: str) -> dict[str, Expert]:
    """The trained SVF experts, named by task (the names dispatch routes and CEM mixes use), each checked
    against the base model's fingerprint: a mix of experts of another base is refused."""
    experts = {t: Expert.load(Path(experts_dir) / t) for t in tasks}
    check_same_base(experts, base_fingerprint, f" ({experts_dir})")
    return experts


@task(name="few-shot-cem", cache_policy=NO_CACHE)
def cem_task(params: Params, task_name: str, model_dir: str, svd_dir: str, data_dir: str, experts_dir: str,
             out_dir: str, metrics_path: str, curve_path: str, run_dir: str | None = None,
             resume: bool = False) -> dict:
    """α of z' = Σ α_k z_k for `task_name` by CEM on `cem.shots` labelled docs that its evaluation never sees;
    checkpointed every generation in `run_dir` so that `resume` continues a killed search."""
    log = get_run_logger()
    cfg = params.cem.for_task(task_name)
    svf = params.svf.config()
    experts = load_task_experts(experts_dir, params.rl.tasks, ModelInfo.load(model_dir).fingerprint)
    pool_split, pool = shot_pool(data_dir, task_name)
    if cfg.shots > len(pool):
        raise CEMError(f"cem.shots={cfg.shots} but {task_name}'s {pool_split} split has {len(pool)} docs"
                       + (" (raise data.fewshot_holdout)" if pool_split == "fewshot" else ""))
    indices = shot_indices(len(pool), cfg.shots, params.seed)
    shots = [pool[i] for i in indices]
    config = cfg.cem_config(params.seed)
    with stage_run(params, "cem", task_name, kind="few_shot", method="t2-few-shot") as stage:
        with timed() as t:
            model, tokenizer, _ = load_patched(model_dir, svd_dir, svf, dtype=params.model.dtype,
                                               device=params.model.device)
            bar = progress_bar(cfg.generations, f"cem {task_name}", unit="gen")

            def progress(record: dict) -> None:
                bar.update(1)
                bar.set_postfix(acc=f"{record['best_so_far_accuracy']:.2f}", ll=f"{record['best_so_far_loglik']:.3f}")
                if bar.disable:
                    log.info(f"cem {task_name}: generation {record['generation']}/{cfg.generations} best accuracy "
                             f"{record['best_so_far_accuracy']:.2f}, log-likelihood {record['best_so_far_loglik']:.3f}")
                mlflow.log_metrics({metric_name(k): float(v) for k, v in record.items()
                                    if k != "generation" and isinstance(v, (int, float))}, step=record["generation"])

            result = few_shot_cem(model, tokenizer, experts, task_name, shots, config, method=cfg.method,
                                  batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, progress=progress,
                                  run_dir=run_dir, resume=resume)
            bar.close()
            # α, cem.json (without timings: a rerun that finds the same α writes the same bytes) and the
            # shots as one unit; the timings go to the metrics file and the curve
            result.save(out_dir, timings=False, extra={"shots.json": {"split": pool_split, "indices": indices}})
        write_curve(curve_path, result.history, HISTORY_FIELDS)
        metrics = {"task": task_name, "experts": result.keys, "shots": len(shots), "shot_split": pool_split,
                   "population": cfg.population, "generations": cfg.generations, "per_matrix": cfg.per_matrix,
                   "method": cfg.method, "accuracy": result.accuracy,
                   "ci95": list(wilson_interval(round(result.accuracy * len(shots)), len(shots))), "loglik": result.loglik,
                   "alpha": result.alpha if not cfg.per_matrix else None, "search_seconds": result.seconds,
                   "resumed_from_generation": result.resumed_from, "output_fingerprint": tag_output(out_dir),
                   **resource_metrics(t["seconds"])}
        metrics = record_metrics(metrics_path, metrics, stage)
        mlflow.log_artifacts(out_dir, artifact_path="cem")
        log.info(f"{task_name}: best α {result.alpha if not cfg.per_matrix else '(per matrix)'} — shot accuracy "
                 f"{result.accuracy:.3f}, gold log-likelihood {result.loglik:.3f} ({result.seconds:.0f} s)")
    return metrics
