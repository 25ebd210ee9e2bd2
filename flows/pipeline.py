"""The whole pipeline as one Prefect flow, in DAG order; `t2 serve` schedules it from the UI.

By default each stage runs as `dvc repro --single-item <stage>`: DVC skips what is up to date,
records dvc.lock and caches the outputs, while each stage still appears in Prefect as its own
flow run (DVC holds a repository lock, so stages run one at a time). `use_dvc=False` runs the
stage flows in-process, without git or DVC; there `parallel=True` trains the experts of the
different tasks concurrently (several copies of the model in memory: for multi-GPU or big-RAM hosts).
"""
from __future__ import annotations

import subprocess

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import load_params

from . import layout
from .stages import STAGES, cem_flow, classifier_flow, eval_flow, expert_args, expert_flow, lora_flow

# DAG order; must agree with dvc.yaml (tests/test_pipeline.py checks it does).
STAGE_ORDER = ("model", "data", "decompose", "expert", "lora", "classifier", "cem", "eval-base", "eval-svf",
               "eval-lora", "eval-prompt", "eval-classifier", "eval-few-shot", "report")
EVAL_KINDS = {"eval-base": "base", "eval-svf": "svf", "eval-lora": "lora", "eval-prompt": "prompt",
              "eval-classifier": "classifier", "eval-few-shot": "few_shot"}  # stage -> `t2 eval --kind`


def eval_tasks(params, kind: str) -> list[str]:
    """The tasks of one eval stage's foreach (mirrors dvc.yaml)."""
    if kind == "base":
        return params.eval.tasks
    if kind in ("svf", "lora"):
        return getattr(params, "rl" if kind == "svf" else "lora").tasks
    return params.eval.adapt_tasks


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro_task(stage: str) -> None:
    log = get_run_logger()
    proc = subprocess.run(["dvc", "repro", "--single-item", stage], capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).strip().splitlines()[-20:]:
        log.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc repro --single-item {stage}` failed with exit code {proc.returncode}")


@flow(name="transformer2-pipeline")
def pipeline_flow(params_path: str = str(layout.PARAMS), use_dvc: bool = True, parallel: bool = False) -> None:
    for stage in STAGE_ORDER:
        if use_dvc:
            dvc_repro_task.with_options(name=f"dvc-repro-{stage}")(stage)
        elif stage == "expert":
            from tasks.expert import train_expert_task

            params = load_params(params_path)
            if parallel:
                futures = [train_expert_task.submit(params, resume=True, **expert_args(t)) for t in params.rl.tasks]
                for future in futures:
                    future.result()
            else:
                for name in params.rl.tasks:
                    expert_flow(task=name, params_path=params_path, resume=True)
        elif stage == "lora":
            for name in load_params(params_path).lora.tasks:
                lora_flow(task=name, params_path=params_path, resume=True)
        elif stage == "classifier":
            classifier_flow(params_path=params_path, resume=True)
        elif stage == "cem":
            for name in load_params(params_path).cem.tasks:
                cem_flow(task=name, params_path=params_path, resume=True)
        elif stage in EVAL_KINDS:
            kind = EVAL_KINDS[stage]
            for name in eval_tasks(load_params(params_path), kind):
                eval_flow(kind=kind, task=name, params_path=params_path)
        else:
            STAGES[stage](params_path=params_path)
