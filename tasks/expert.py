from __future__ import annotations


import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.adapters import SVFAdapter
from transformer2.tasks import load_split
from transformer2.config import Params
from transformer2.models import load_patched
from transformer2.rl import train_svf_expert
from transformer2.runtime import resource_metrics, timed
from transformer2.sft import train_next_token
from transformer2.svd import load_singular_values
from transformer2.svf import expert_movement, init_expert

from .tracking import progress_logger, record_training_run, stage_run


@task(name="train-expert", cache_policy=NO_CACHE)
def train_expert_task(params: Params, task_name: str, model_dir: str, svd_dir: str, data_dir: str, out_dir: str,
                      run_dir: str, metrics_path: str, curve_path: str, resume: bool = False) -> dict:
    """Train one SVF expert on `task_name` with `rl.objective` (REINFORCE, or next-token for the
    Table-4 ablation); keeps the best expert by validation accuracy."""
    import mlflow

    log = get_run_logger()
    rl = params.rl.for_task(task_name)
    svf = params.svf.config()
    with stage_run(params, "expert", task_name, kind="svf", method="svf", objective=rl.objective) as stage:
        with timed() as t:
            model, tokenizer, info = load_patched(model_dir, svd_dir, svf, dtype=params.model.dtype,
                                                  device=params.model.device)
            expert = init_expert(model, info.fingerprint, svf, torch.Generator().manual_seed(params.seed),
                                 provenance={"task": task_name, "objective": rl.objective, "base": info.name})
            train = load_split(data_dir, task_name, "train")
            val = load_split(data_dir, task_name, "validation")[: rl.val_size]
            mlflow.log_params({"svf_parameters": expert.num_parameters, "train_docs": len(train),
                               "val_docs": len(val)})
            progress, bar = progress_logger(f"expert {task_name}", rl.steps, log.info)
            if rl.objective == "reinforce":
                result, adapter = train_svf_expert(model, tokenizer, expert, task_name, train, val,
                                                   rl.loop_config(params.seed), rl.objective_config(), run_dir,
                                                   resume=resume,
                                                   eval_batch_size=rl.eval_batch_size, progress=progress)
            else:
                result, adapter = train_next_token(
                    model, tokenizer, SVFAdapter(model, expert), task_name, train, val, rl.loop_config(params.seed),
                    rl.next_token_config(), run_dir, resume=resume,
                    max_new_tokens=rl.max_new_tokens, eval_batch_size=rl.eval_batch_size,
                    run_id=f"{info.fingerprint}|{svf}", progress=progress)
            bar.close()
            adapter.load_state(result.best_state)
            # the expert and its validations as one unit (a kill never leaves one without the other)
            adapter.save(out_dir, {"best_step": result.best_step, "best_val_accuracy": result.best_val_accuracy},
                         extra=result.output_files())
        metrics = {"task": task_name, "objective": rl.objective, "base_val_accuracy": result.base_val_accuracy,
                   "best_val_accuracy": result.best_val_accuracy, "best_step": result.best_step,
                   "steps": rl.steps, "val_docs": len(val), "svf_parameters": expert.num_parameters,
                   "resumed_from_step": result.resumed_from, **result.validation_summary(),
                   "movement": expert_movement(adapter.to_expert({}), expert, load_singular_values(svd_dir, info.fingerprint)),
                   **resource_metrics(t["seconds"])}
        metrics = record_training_run(result, metrics, out_dir, metrics_path, curve_path, "expert", stage)
        log.info(f"{task_name}: validation accuracy base {result.base_val_accuracy:.3f} -> "
                 f"best {result.best_val_accuracy:.3f} (step {result.best_step})")
    return metrics
