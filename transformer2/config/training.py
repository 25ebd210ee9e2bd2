"""The sections that train something (SVF experts, LoRA baselines, the classifier expert z_c): their loop
and REINFORCE keys are built from the library's `settings` dataclasses, so a default lives in one place."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal, Optional

from pydantic import Field, ValidationInfo, create_model, field_validator

from ..settings import (BASELINES, CLASSIFIER_LOOP, CLASSIFIER_OBJECTIVE, LORA_LOOP, LoopConfig, NextTokenConfig,
                        RLObjectiveConfig, rl_sampling_problem)
from .base import TRAIN_TASKS, PerTaskSection, Section, _known_tasks


def _loop_fields(d: LoopConfig, micro_batch_size: int) -> dict[str, Any]:
    """The loop's keys as pydantic fields, with their defaults from the library's `d`."""
    return {
        "steps": (int, Field(default=d.steps, ge=1)),
        "batch_size": (int, Field(default=d.batch_size, ge=1)),
        "micro_batch_size": (int, Field(default=micro_batch_size, ge=1)),
        "lr": (float, Field(default=d.lr, gt=0)),
        "optimizer": (Literal["adam", "adamw"], d.optimizer),
        "weight_decay": (float, Field(default=d.weight_decay, ge=0)),
        "lr_schedule": (Literal["constant", "cosine"], d.lr_schedule),
        "warmup_steps": (int, Field(default=d.warmup_steps, ge=0)),
        "grad_clip": (float, Field(default=d.grad_clip, gt=0)),
        "eval_every": (int, Field(default=d.eval_every, ge=1)),
        "checkpoint_every": (int, Field(default=d.checkpoint_every, ge=1)),
    }


def _reinforce_fields(d: RLObjectiveConfig) -> dict[str, Any]:
    return {
        "kl_coef": (float, Field(default=d.kl_coef, ge=0)),
        "entropy_coef": (float, Field(default=d.entropy_coef, ge=0)),
        "max_new_tokens": (int, Field(default=d.max_new_tokens, ge=1)),
        "do_sample": (bool, d.do_sample),
        "temperature": (float, Field(default=d.temperature, gt=0)),
        "eval_batch_size": (int, Field(default=16, ge=1)),
        "baseline": (Literal[BASELINES], d.baseline),
        # after do_sample and baseline: its check reads them (also when the default is used)
        "samples_per_prompt": (int, Field(default=d.samples_per_prompt, ge=1, validate_default=True)),
    }


def _sampling_checked(v: int, info: ValidationInfo) -> int:
    """samples_per_prompt against do_sample and baseline (the section's own values)."""
    if not (info.context or {}).get("partial") and "do_sample" in info.data and "baseline" in info.data:
        problem = rl_sampling_problem(v, info.data["do_sample"], info.data["baseline"])
        if problem:
            raise ValueError(problem.removeprefix("samples_per_prompt: "))
    return v


def _overrides_sampling_checked(v: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
    """The same check for each task's section with its overrides applied."""
    own = {k: info.data[k] for k in ("samples_per_prompt", "do_sample", "baseline") if k in info.data}
    if len(own) < 3:
        return v  # an own value is invalid: reported under its key
    for task, changes in v.items():
        merged = {**own, **{k: changes[k] for k in own if k in changes}}
        if not (isinstance(merged["samples_per_prompt"], int) and merged["baseline"] in BASELINES):
            continue  # a wrong type: _check_overrides reports it
        problem = rl_sampling_problem(merged["samples_per_prompt"], bool(merged["do_sample"]), merged["baseline"])
        if problem:
            raise ValueError(f"{task}.{problem}")
    return v


_REINFORCE_VALIDATORS = {
    "_sampling": field_validator("samples_per_prompt")(_sampling_checked),
    "_overrides_sampling": field_validator("overrides", check_fields=False)(_overrides_sampling_checked),
}


class _LoopMethods:
    def loop_config(self, seed: int) -> LoopConfig:
        """The training loop's settings (`training.fit`)."""
        return LoopConfig(**{f.name: getattr(self, f.name) for f in fields(LoopConfig) if f.name != "seed"},
                          seed=seed)


class _ReinforceMethods(_LoopMethods):
    def objective_config(self, micro_batch_size: Optional[int] = None) -> RLObjectiveConfig:
        """REINFORCE's settings (`rl.reinforce_objective`)."""
        return RLObjectiveConfig(**{f.name: getattr(self, f.name) for f in fields(RLObjectiveConfig)
                                    if f.name != "micro_batch_size"},
                                 micro_batch_size=micro_batch_size or self.micro_batch_size)


LoopSection = create_model("LoopSection", __base__=(Section, _LoopMethods),
                           __doc__="The training loop's knobs (`settings.LoopConfig`).",
                           **_loop_fields(LoopConfig(), NextTokenConfig().micro_batch_size))
ReinforceSection = create_model("ReinforceSection", __base__=(LoopSection, _ReinforceMethods),
                                __doc__="REINFORCE's knobs (`settings.RLObjectiveConfig`).",
                                __validators__=_REINFORCE_VALIDATORS, **_reinforce_fields(RLObjectiveConfig()))


class TrainingSection(PerTaskSection, LoopSection):
    """A loop trained once per task (SVF experts, LoRA baselines), with per-task overrides."""


class RLParams(PerTaskSection, ReinforceSection):
    """SVF expert training: REINFORCE (objective: reinforce, the paper's method) or next-token
    prediction on the reference answers (objective: next_token, the Table-4 ablation).
    Defaults are the CPU profile: each expert of the built-in SmolLM2-135M trains in ~10-15 min
    on 2 cores (paper profile: 256 prompts/step, ~200 steps, 512 new tokens, validation every 10
    steps). Validation settings here are shared by the LoRA baseline of the same task."""

    objective: Literal["reinforce", "next_token"] = "reinforce"
    val_size: Optional[int] = Field(default=24, ge=1)

    def next_token_config(self) -> NextTokenConfig:
        """The Table-4 ablation "SVF + next-token"."""
        return NextTokenConfig(micro_batch_size=self.micro_batch_size)


_LoRALoop = create_model("_LoRALoop", __base__=TrainingSection, **_loop_fields(LORA_LOOP, 8))


class LoRAParams(_LoRALoop):
    """The paper's LoRA baseline: PEFT LoRA on q/v, rank 16, alpha 32, dropout 0.05, trained with
    next-token prediction on the same training split as the SVF expert, validated the same way
    (rl.max_new_tokens, rl.val_size, same scorers). objective: reinforce is the Table-4 ablation
    "LoRA + policy gradient" (it then also uses rl.kl_coef, rl.do_sample, rl.temperature)."""

    rank: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    objective: Literal["next_token", "reinforce"] = "next_token"
    max_answer_tokens: Optional[int] = Field(default=NextTokenConfig().max_answer_tokens, ge=1)
    """next_token: cut longer reference answers (tokens); None keeps them whole."""

    def lora_config(self):
        """PEFT's LoraConfig of this baseline."""
        from ..lora import lora_config

        return lora_config(self.rank, self.alpha, self.dropout, self.target_modules)

    def next_token_config(self) -> NextTokenConfig:
        return NextTokenConfig(micro_batch_size=self.micro_batch_size, max_answer_tokens=self.max_answer_tokens)


_ClassifierLoop = create_model("_ClassifierLoop", __base__=ReinforceSection,
                               **_loop_fields(CLASSIFIER_LOOP, CLASSIFIER_OBJECTIVE.micro_batch_size),
                               **_reinforce_fields(CLASSIFIER_OBJECTIVE))


class ClassifierParams(_ClassifierLoop):
    """The classification expert z_c: REINFORCE (reward +-1 for the right \\boxed{label}) on prompts of
    the TRAINING splits of the expert tasks, balanced per category; validated on their validation
    splits. Dispatch accuracy of the base prompt and of z_c is then measured on held-out prompts:
    the test splits of every task in data.tasks (`heldout_per_task` each), in every mode of `modes`."""

    per_class: Optional[int] = Field(default=None, ge=1)
    """Training prompts per category (null: as many as the smallest expert task's training split)."""
    val_per_class: int = Field(default=8, ge=1)
    heldout_per_task: Optional[int] = Field(default=10, ge=1)
    """Held-out test prompts per task for the dispatch confusion matrices (null: whole test splits)."""
    modes: list[Literal["generate", "loglik"]] = Field(default_factory=lambda: ["generate", "loglik"])
    sources: list[str] = Field(default_factory=lambda: list(TRAIN_TASKS))
    """Tasks whose training prompts z_c learns from, labelled by their category (never an eval.adapt_tasks task)."""
    train_mode: Literal["generate", "loglik"] = "generate"
    """generate (the paper): the decoded \\boxed{label} is rewarded; loglik: the most likely of the four
    label continuations is (no decoding), validated by loglik dispatch accuracy."""


    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        return _known_tasks(v)
