from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.classifier import (CLASSIFIER_SOURCES, classifier_docs, evaluate_dispatch, heldout_docs,
                                     per_source_accuracy, plot_confusion, train_classifier_expert)
from transformer2.config import Params
from transformer2.errors import UserError
from transformer2.models import load_patched
from transformer2.rl import RLObjectiveConfig
from transformer2.runtime import resource_metrics, timed
from transformer2.svf import SVFConfig

from .expert import loop_config, progress_logger, record_training_run
from .tracking import stage_run, write_json

DISPATCHERS = ("prompt", "classifier")  # the base model's own answer / the classification expert z_c


@task(name="train-classifier", cache_policy=NO_CACHE)
def train_classifier_task(params: Params, model_dir: str, svd_dir: str, data_dir: str, out_dir: str, run_dir: str,
                          metrics_path: str, curve_path: str, plots_dir: str, resume: bool = False) -> dict:
    """Train z_c on the expert tasks' training splits, then measure dispatch accuracy of the base
    prompt and of z_c on held-out test prompts (confusion matrices as metrics and PNGs)."""
    import mlflow

    log = get_run_logger()
    cfg = params.classifier
    missing = [t for t in CLASSIFIER_SOURCES if t not in params.data.tasks]
    if missing:
        raise UserError(f"the classifier trains on {list(CLASSIFIER_SOURCES)}; add {missing} to data.tasks")
    svf = SVFConfig(**params.svf.model_dump())
    with stage_run(params, "classifier", sections=("svf", "classifier"), kind="svf") as run:
        with timed() as t:
            model, tokenizer, info = load_patched(model_dir, svd_dir, svf, dtype=params.model.dtype,
                                                  device=params.model.device)
            train = classifier_docs(data_dir, "train", cfg.per_class, params.seed)
            val = classifier_docs(data_dir, "validation", cfg.val_per_class, params.seed)
            objective = RLObjectiveConfig(kl_coef=cfg.kl_coef, max_new_tokens=cfg.max_new_tokens,
                                          do_sample=cfg.do_sample, temperature=cfg.temperature,
                                          micro_batch_size=cfg.micro_batch_size)
            progress, bar = progress_logger("classifier", cfg.steps)
            expert, result = train_classifier_expert(
                model, tokenizer, info.fingerprint, svf, train, val, loop_config(cfg, params.seed), objective,
                run_dir, resume=resume, eval_batch_size=cfg.eval_batch_size, init_seed=params.seed,
                progress=progress, mode=cfg.train_mode)
            bar.close()
            expert.provenance["mlflow_run_id"] = run.info.run_id
            expert.save(out_dir)
            mlflow.log_params({"svf_parameters": expert.num_parameters, "train_docs": len(train),
                               "val_docs": len(val)})
        heldout = heldout_docs(data_dir, params.data.tasks, cfg.heldout_per_task, params.seed)
        dispatch, details = {}, {}
        for who in DISPATCHERS:
            for mode in cfg.modes:
                out = evaluate_dispatch(model, tokenizer, heldout, mode=mode,
                                        classifier=expert if who == "classifier" else None,
                                        batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)
                name = f"{who}_{mode}"
                dispatch[name] = {**out["metrics"], "per_task_accuracy": per_source_accuracy(heldout, out["pred"])}
                details[name] = {"confusion": out["confusion"], "labels": out["labels"],
                                 "pred": out["pred"], "true": out["true"], "source": [d["source"] for d in heldout]}
                png = plot_confusion(np.array(out["confusion"]),
                                     Path(plots_dir) / f"{name}.png",
                                     title=f"{who} dispatch, {mode}")
                mlflow.log_artifact(str(png))
                log.info(f"dispatch {name}: accuracy {out['metrics']['accuracy']:.3f} on {len(heldout)} prompts")
        write_json(Path(out_dir) / "dispatch.json", details)
        metrics = {"task": "classify", "train_mode": cfg.train_mode, "base_val_accuracy": result.base_val_accuracy,
                   "best_val_accuracy": result.best_val_accuracy, "best_step": result.best_step,
                   "steps": cfg.steps, "train_docs": len(train), "val_docs": len(val),
                   "heldout_docs": len(heldout), "svf_parameters": expert.num_parameters,
                   "resumed_from_step": result.resumed_from, "dispatch": dispatch,
                   **resource_metrics(t["seconds"])}
        record_training_run(result, metrics, out_dir, metrics_path, curve_path, artifact_path="classifier")
        log.info(f"classifier: validation accuracy base {result.base_val_accuracy:.3f} -> "
                 f"best {result.best_val_accuracy:.3f} (step {result.best_step})")
    return metrics
