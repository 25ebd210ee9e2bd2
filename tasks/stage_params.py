"""What each stage unit of dvc.yaml reads from params.yaml, resolved per task.

DVC can only track keys that exist in params.yaml, and a per-task override changes a task's
settings without touching another's. So the `params` stage writes these dicts to
`stage_params/<unit>.json` and every other stage depends on its own file: DVC reruns a stage
exactly when what it reads changes (an override of one expert reruns that expert, `rl.kl_coef`
reruns no LoRA baseline trained with next-token prediction). Keys that only change how a run is
executed, not its result (checkpoint_every, model.device, tracking, execution), are left out. The same dicts
are the MLflow params of each run and the `params_hash` in each metrics file.
"""
from __future__ import annotations

from typing import Any, Optional

from transformer2.config import Params
from transformer2.identity import run_fingerprint

PER_TASK = ("tasks", "overrides")  # list-level keys: a unit of one task does not read them
EXECUTION_ONLY = ("checkpoint_every",)  # resuming gives the same result, whatever the interval
REINFORCE_ONLY = ("kl_coef", "entropy_coef", "do_sample", "temperature", "samples_per_prompt", "baseline")
EVAL_CELL_KEYS = ("style", "limit", "batch_size", "num_fewshot", "apply_chat_template", "max_gen_toks")
DISPATCH_KEYS = ("dispatch_mode", "dispatch_max_new_tokens")
CELL_KINDS_BY_STAGE = {"eval-base": "base", "eval-svf": "svf", "eval-lora": "lora", "eval-prompt": "prompt",
                       "eval-classifier": "classifier", "eval-few-shot": "few_shot"}


def unit_name(stage: str, item: Optional[str] = None) -> str:
    """`expert` + `gsm8k` -> `expert_gsm8k`; the same stem as the unit's metrics file."""
    return stage.replace("-", "_") + (f"_{item}" if item is not None else "")


def _section(section, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in section.model_dump().items() if k not in PER_TASK + EXECUTION_ONLY + drop}


def expert_settings(params: Params, task: str) -> dict:
    rl = params.rl.for_task(task)
    return {"seed": params.seed, "model.dtype": params.model.dtype, "svf": params.svf.model_dump(),
            "rl": _section(rl, REINFORCE_ONLY if rl.objective == "next_token" else ())}


def lora_settings(params: Params, task: str, lora=None) -> dict:
    """The LoRA baseline reads the validation settings of its task's expert, and REINFORCE's only
    when it is trained with it (Table 4's LoRA + policy gradient)."""
    s = lora or params.lora.for_task(task)
    rl = params.rl.for_task(task)
    keys = ("max_new_tokens", "val_size", "eval_batch_size") + (REINFORCE_ONLY if s.objective == "reinforce" else ())
    return {"seed": params.seed, "model.dtype": params.model.dtype, "lora": _section(s),
            "rl": {k: getattr(rl, k) for k in keys}}


def cell_settings(params: Params, kind: str, task: str) -> dict:
    ev = params.eval.for_task(task)
    out: dict[str, Any] = {"seed": params.seed, "model.dtype": params.cell_dtype(task),  # what the cell computes in
                           "eval": {k: getattr(ev, k) for k in EVAL_CELL_KEYS}}
    if ev.secondary_style is not None:  # absent when unset: a cell without one keeps its settings hash
        out["eval"]["secondary_style"] = ev.secondary_style
    if kind in ("prompt", "classifier"):
        out["eval"].update({k: getattr(ev, k) for k in DISPATCH_KEYS})
    if kind in ("prompt", "classifier", "few_shot"):
        out["rl.tasks"] = params.rl.tasks  # the experts the strategy chooses among or mixes
    return out


def stage_settings(params: Params, stage: str, item: Optional[str] = None) -> dict:
    """The settings unit (`stage`, `item`) of dvc.yaml reads; a stage without an entry here is an error,
    so a new stage cannot silently depend on nothing."""
    p = params
    if stage == "params":
        return {}
    if stage == "model":
        return {"model.name": p.model.name, "model.revision": p.model.revision}
    if stage == "data":
        return {"data": p.data.model_dump()}
    if stage == "decompose":
        return {"svf.targets": p.svf.targets}
    if stage == "expert":
        return expert_settings(p, item)
    if stage == "lora":
        return lora_settings(p, item)
    if stage == "classifier":
        return {"seed": p.seed, "model.dtype": p.model.dtype, "svf": p.svf.model_dump(),
                "classifier": _section(p.classifier), "data.tasks": p.data.tasks}
    if stage == "cem":
        return {"seed": p.seed, "model.dtype": p.model.dtype, "svf": p.svf.model_dump(),
                "cem": _section(p.cem.for_task(item)), "rl.tasks": p.rl.tasks}
    if stage in CELL_KINDS_BY_STAGE:
        return cell_settings(p, CELL_KINDS_BY_STAGE[stage], item)
    if stage == "report":  # its notes, and which cells exist
        ev = p.eval
        return {"model.name": p.model.name, "model.dtype": p.model.dtype, "eval.dtype": p.eval.dtype,
                "data.fewshot_holdout": p.data.fewshot_holdout,
                "eval": {"style": ev.style, "limit": ev.limit, "overrides": ev.overrides,
                         "dispatch_mode": ev.dispatch_mode, "tasks": ev.tasks, "adapt_tasks": ev.adapt_tasks},
                "rl.tasks": p.rl.tasks, "lora.tasks": p.lora.tasks, "cem.tasks": p.cem.tasks}
    raise ValueError(f"no stage settings for dvc.yaml stage {stage!r}: add it to tasks/stage_params.py")


def settings_hash(settings: dict) -> str:
    return run_fingerprint(settings)


def params_hash(params: Params) -> str:
    """The whole validated config (tracking and execution excluded: where runs are logged and how often a
    failed task is retried change no result)."""
    return run_fingerprint(params.model_dump(exclude={"tracking", "execution"}))
