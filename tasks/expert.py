from __future__ import annotations

import csv
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from transformer2.adapters import SVFAdapter
from transformer2.benchmarks import load_split
from transformer2.config import LoopSection, Params
from transformer2.models import load_patched
from transformer2.rl import RLObjectiveConfig, train_svf_expert
from transformer2.runtime import resource_metrics, timed
from transformer2.sft import NextTokenConfig, train_next_token
from transformer2.svf import SVFConfig, init_expert
from transformer2.training import LoopConfig

from .tracking import record_metrics, stage_run, write_json

CURVE_FIELDS = ("step", "reward", "accuracy", "kl", "loss", "grad_norm", "val_accuracy", "rollout_tokens_per_s",
                "seconds_rollout", "seconds_logprob", "seconds_forward", "seconds_backward")


def loop_config(section: LoopSection, seed: int) -> LoopConfig:
    """The training loop's settings from `rl.*`, `lora.*` or `classifier.*` (they share these keys)."""
    return LoopConfig(**{name: getattr(section, name) for name in LoopSection.model_fields
                         if name in LoopConfig.__dataclass_fields__}, seed=seed)


def write_curve(path: str | Path, history: list[dict], fields: tuple[str, ...] = CURVE_FIELDS) -> None:
    """A curve for `dvc plots`: one row per step (or generation), blank where a field did not run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in fields})


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


@task(name="train-expert", cache_policy=NO_CACHE)
def train_expert_task(params: Params, task_name: str, model_dir: str, svd_dir: str, data_dir: str, out_dir: str,
                      run_dir: str, metrics_path: str, curve_path: str, resume: bool = False) -> dict:
    """Train one SVF expert on `task_name` with `rl.objective` (REINFORCE, or next-token for the
    Table-4 ablation); keeps the best expert by validation accuracy."""
    import mlflow

    log = get_run_logger()
    rl = params.rl.for_task(task_name)
    svf = SVFConfig(**params.svf.model_dump())
    with stage_run(params, "expert", sections=("svf", "rl"), task=task_name, kind="svf",
                   objective=rl.objective) as run:
        with timed() as t:
            model, tokenizer, info = load_patched(model_dir, svd_dir, svf, dtype=params.model.dtype,
                                                  device=params.model.device)
            expert = init_expert(model, info.fingerprint, svf, torch.Generator().manual_seed(params.seed),
                                 provenance={"task": task_name, "objective": rl.objective, "base": info.name})
            train = load_split(data_dir, task_name, "train")
            val = load_split(data_dir, task_name, "validation")[: rl.val_size]
            mlflow.log_params({"svf_parameters": expert.num_parameters, "train_docs": len(train),
                               "val_docs": len(val)})
            progress, bar = progress_logger(f"expert {task_name}", rl.steps)
            if rl.objective == "reinforce":
                objective = RLObjectiveConfig(kl_coef=rl.kl_coef, max_new_tokens=rl.max_new_tokens,
                                              do_sample=rl.do_sample, temperature=rl.temperature,
                                              micro_batch_size=rl.micro_batch_size)
                result, adapter = train_svf_expert(model, tokenizer, expert, task_name, train, val,
                                                   loop_config(rl, params.seed), objective, run_dir, resume=resume,
                                                   eval_batch_size=rl.eval_batch_size, progress=progress)
            else:
                result, adapter = train_next_token(
                    model, tokenizer, SVFAdapter(model, expert), task_name, train, val, loop_config(rl, params.seed),
                    NextTokenConfig(micro_batch_size=rl.micro_batch_size), run_dir, resume=resume,
                    max_new_tokens=rl.max_new_tokens, eval_batch_size=rl.eval_batch_size,
                    run_id=f"{info.fingerprint}|{svf}", progress=progress)
            bar.close()
            adapter.load_state(result.best_state)
            adapter.save(out_dir, {"best_step": result.best_step, "best_val_accuracy": result.best_val_accuracy,
                                   "mlflow_run_id": run.info.run_id})
        metrics = {"task": task_name, "objective": rl.objective, "base_val_accuracy": result.base_val_accuracy,
                   "best_val_accuracy": result.best_val_accuracy, "best_step": result.best_step,
                   "steps": rl.steps, "val_docs": len(val), "svf_parameters": expert.num_parameters,
                   "resumed_from_step": result.resumed_from, **resource_metrics(t["seconds"])}
        record_training_run(result, metrics, out_dir, metrics_path, curve_path, artifact_path="expert")
        log.info(f"{task_name}: validation accuracy base {result.base_val_accuracy:.3f} -> "
                 f"best {result.best_val_accuracy:.3f} (step {result.best_step})")
    return metrics
