"""Prefect task for the LoRA baseline: PEFT LoRA (q/v, r16, α32, p0.05 by default) on one task.

`lora.objective` = next_token (the paper's baseline) or reinforce (Table 4's "LoRA + policy
gradient"; "SVF + next-token" is the expert stage with `rl.objective: next_token`). Training
uses the library's one loop (`training.fit`) and objectives; validation is exactly the expert
stage's (the task's `rl` max_new_tokens, val_size and eval_batch_size, same scorers); MLflow
runs are tagged stage / task / kind / method / objective so they sit beside the SVF runs of the task.
"""
from __future__ import annotations

from typing import Callable, Optional

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.tasks import load_split
from transformer2.config import LoRAParams, Params
from transformer2.runtime import resource_metrics, timed

from .stage_params import lora_settings
from .tracking import progress_logger, record_training_run, stage_run


def run_lora_stage(params: Params, task_name: str, model_dir: str, data_dir: str, out_dir: str, run_dir: str,
                   metrics_path: str, curve_path: str, resume: bool = False,
                   settings: Optional[LoRAParams] = None, log: Callable[[str], None] = print) -> dict:
    """Train the LoRA adapter of `task_name`; saves the best one (PEFT format) in `out_dir`."""
    import mlflow

    from transformer2.lora import count_lora_parameters, train_lora
    from transformer2.models import load_base

    s = settings or params.lora.for_task(task_name)
    rl = params.rl.for_task(task_name)
    with stage_run(params, "lora", task_name, kind="lora", method="lora", objective=s.objective,
                   settings=lora_settings(params, task_name, s)) as stage:
        with timed() as t:
            model, tokenizer, info = load_base(model_dir, dtype=params.model.dtype, device=params.model.device)
            cfg = s.lora_config()
            train = load_split(data_dir, task_name, "train")
            val = load_split(data_dir, task_name, "validation")[: rl.val_size]
            mlflow.log_params({"trainable_parameters": count_lora_parameters(model, cfg), "train_docs": len(train),
                               "val_docs": len(val)})
            progress, bar = progress_logger(f"lora {task_name}", s.steps, log)
            result, adapter = train_lora(
                model, tokenizer, task_name, train, val, s.loop_config(params.seed), run_dir=run_dir,
                objective=s.objective, lora=cfg, next_token=s.next_token_config(),
                reinforce=rl.objective_config(micro_batch_size=s.micro_batch_size),
                resume=resume, max_new_tokens=rl.max_new_tokens, eval_batch_size=rl.eval_batch_size,
                seed=params.seed, base_fingerprint=info.fingerprint, progress=progress)
            bar.close()
            adapter.load_state(result.best_state)
            adapter.save(out_dir, {"task": task_name, "objective": s.objective, "base": info.name,
                                   "base_fingerprint": info.fingerprint, "best_step": result.best_step,
                                   "best_val_accuracy": result.best_val_accuracy},
                         extra=result.output_files())  # the adapter and its validations as one unit
        metrics = {"task": task_name, "kind": "lora", "objective": s.objective,
                   "base_val_accuracy": result.base_val_accuracy, "best_val_accuracy": result.best_val_accuracy,
                   "best_step": result.best_step, "steps": s.steps, "train_docs": len(train),
                   "val_docs": len(val), "trainable_parameters": adapter.num_parameters,
                   "train_seconds": result.seconds, "resumed_from_step": result.resumed_from, **result.validation_summary(),
                   **resource_metrics(t["seconds"])}
        metrics = record_training_run(result, metrics, out_dir, metrics_path, curve_path, "adapter", stage)
        log(f"{task_name} (lora, {s.objective}): validation accuracy base {result.base_val_accuracy:.3f} -> "
            f"best {result.best_val_accuracy:.3f} (step {result.best_step}), "
            f"{adapter.num_parameters:,} trainable parameters")
    return metrics


@task(name="train-lora", cache_policy=NO_CACHE)
def train_lora_task(params: Params, task_name: str, model_dir: str, data_dir: str, out_dir: str, run_dir: str,
                    metrics_path: str, curve_path: str, resume: bool = False,
                    settings: Optional[LoRAParams] = None) -> dict:
    """LoRA baseline of `task_name` (objective from params.lora); keeps the best adapter by validation."""
    return run_lora_stage(params, task_name, model_dir, data_dir, out_dir, run_dir, metrics_path, curve_path,
                          resume=resume, settings=settings, log=get_run_logger().info)
