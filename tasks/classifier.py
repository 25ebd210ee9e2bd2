from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.classifier import classifier_docs, heldout_docs, measure_dispatch, train_classifier_expert
from transformer2.config import Params
from transformer2.errors import UserError
from transformer2.models import load_patched
from transformer2.runtime import resource_metrics, timed
from transformer2.svd import load_singular_values
from transformer2.svf import expert_movement

from .tracking import progress_logger, record_training_run, stage_run


@task(name="train-classifier", cache_policy=NO_CACHE)
def train_classifier_task(params: Params, model_dir: str, svd_dir: str, data_dir: str, out_dir: str, run_dir: str,
                          metrics_path: str, curve_path: str, plots_dir: str, resume: bool = False) -> dict:
    """Train z_c on the expert tasks' training splits, then measure dispatch accuracy of the base
    prompt and of z_c on held-out test prompts (confusion matrices as metrics and PNGs)."""
    import mlflow

    log = get_run_logger()
    cfg = params.classifier
    missing = [t for t in cfg.sources if t not in params.data.tasks]
    if missing:
        raise UserError(f"the classifier trains on classifier.sources {cfg.sources}; add {missing} to data.tasks")
    svf = params.svf.config()
    with stage_run(params, "classifier", kind="classifier", method="t2-classifier") as stage:
        with timed() as t:
            model, tokenizer, info = load_patched(model_dir, svd_dir, svf, dtype=params.model.dtype,
                                                  device=params.model.device)
            train = classifier_docs(data_dir, "train", cfg.per_class, params.seed, cfg.sources, params.eval.adapt_tasks)
            val = classifier_docs(data_dir, "validation", cfg.val_per_class, params.seed, cfg.sources,
                                  params.eval.adapt_tasks)
            progress, bar = progress_logger("classifier", cfg.steps, log.info)
            expert, result, start = train_classifier_expert(
                model, tokenizer, info.fingerprint, svf, train, val, cfg.loop_config(params.seed), cfg.objective_config(),
                run_dir, resume=resume, eval_batch_size=cfg.eval_batch_size, init_seed=params.seed,
                progress=progress, mode=cfg.train_mode)
            bar.close()
            mlflow.log_params({"svf_parameters": expert.num_parameters, "train_docs": len(train),
                               "val_docs": len(val)})
        heldout = heldout_docs(data_dir, params.data.tasks, cfg.heldout_per_task, params.seed)
        dispatch, details, pngs = measure_dispatch(model, tokenizer, heldout, expert, cfg.modes, plots_dir,
                                                   batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                                                   progress=log.info)
        for png in pngs:
            mlflow.log_artifact(str(png))
        # z_c, its validations and its dispatch predictions as one unit: a kill never leaves a z_c folder
        # without them, or beside the predictions of another z_c
        expert.save(out_dir, extra={**result.output_files(), "dispatch.json": details})
        metrics = {"task": "classify", "train_mode": cfg.train_mode, "base_val_accuracy": result.base_val_accuracy,
                   "best_val_accuracy": result.best_val_accuracy, "best_step": result.best_step,
                   "steps": cfg.steps, "train_docs": len(train), "val_docs": len(val),
                   "heldout_docs": len(heldout), "svf_parameters": expert.num_parameters,
                   "resumed_from_step": result.resumed_from, "dispatch": dispatch, **result.validation_summary(),
                   "movement": expert_movement(expert, start, load_singular_values(svd_dir, info.fingerprint)),
                   **resource_metrics(t["seconds"])}
        metrics = record_training_run(result, metrics, out_dir, metrics_path, curve_path, "classifier", stage)
        log.info(f"classifier: validation accuracy base {result.base_val_accuracy:.3f} -> "
                 f"best {result.best_val_accuracy:.3f} (step {result.best_step})")
    return metrics
