from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import Params
from transformer2.harness import evaluate_task
from transformer2.runtime import resource_metrics, timed

from .tracking import record_metrics, stage_run, write_json

KINDS = ("base", "svf", "lora")


def model_args(kind: str, model_dir: str, svd_dir: str, adapter_dir: str | None) -> dict:
    """lm-eval model_args of one cell: the base, the base + an SVF expert, or the base + a LoRA adapter."""
    args = {"pretrained": model_dir}
    if kind == "svf":
        args.update(svd=svd_dir, expert=adapter_dir)
    elif kind == "lora":
        args.update(peft=adapter_dir)
    elif kind != "base":
        raise ValueError(f"unknown model kind {kind!r}; use one of {KINDS}")
    return args


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_cell_task(params: Params, kind: str, task_name: str, model_dir: str, svd_dir: str, data_dir: str,
                       adapter_dir: str | None, out_dir: str, metrics_path: str) -> dict:
    """One cell of the evaluation matrix through lm-eval; results and per-sample outputs kept."""
    log = get_run_logger()
    ev = params.eval.for_task(task_name)
    with stage_run(params, "eval", sections=("eval",), task=task_name, kind=kind):
        with timed() as t:
            out = evaluate_task(model_args(kind, model_dir, svd_dir, adapter_dir), task_name,
                                data_root=Path(data_dir), style=ev.style, limit=ev.limit,
                                batch_size=ev.batch_size, num_fewshot=ev.num_fewshot,
                                apply_chat_template=ev.apply_chat_template,
                                gen_kwargs={"max_gen_toks": ev.max_gen_toks} if ev.max_gen_toks else None,
                                device=params.model.device, dtype=params.model.dtype, seed=params.seed)
        out_path = Path(out_dir)
        write_json(out_path / "results.json", {"results": out["results"], "adaptation": out["adaptation"],
                                               "n_samples": out["n_samples"]})
        n_docs = 0
        with open(out_path / "samples.jsonl", "w") as f:
            for sub, rows in out["samples"].items():
                n_docs += len({row.get("doc_id") for row in rows})
                for row in rows:
                    f.write(json.dumps({"task": sub, **row}, default=str) + "\n")
        metrics = {"kind": kind, "task": task_name, "lm_eval_task": out["task"], "style": ev.style,
                   "limit": ev.limit, "n_docs": n_docs, "metric": out["headline"]["metric"], "value": out["headline"]["value"],
                   "metrics": out["metrics"], **resource_metrics(t["seconds"])}
        record_metrics(metrics_path, metrics)
        log.info(f"{kind} on {task_name}: {out['headline']['metric']} = {out['headline']['value']:.4f}")
    return metrics
