"""The sections that train nothing: model, data, SVF, CEM, eval, tracking, execution."""
from __future__ import annotations

import re
from dataclasses import fields
from typing import Literal, Optional, Union

from pydantic import Field, field_validator

from ..settings import CEMConfig
from .base import ALL_TASKS, UNSEEN_TASKS, PerTaskSection, Section, _known_tasks


class ModelParams(Section):
    name: str = "builtin:smollm2-135m-instruct"
    """An HF hub id, a local checkpoint directory, a local .gguf file, or `builtin:<name>`."""
    revision: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("cpu", "cuda", "auto", "mps") and not v.startswith("cuda:"):
            raise ValueError("must be cpu, cuda, cuda:N, mps or auto")
        return v


class DataParams(Section):
    dir: Optional[str] = None
    """Local JSON Lines mirror (layout of shared/data); overrides T2_DATA_DIR. None: T2_DATA_DIR, else the HF hub."""
    tasks: list[str] = Field(default_factory=lambda: list(ALL_TASKS))
    max_rows: Optional[int] = Field(default=None, ge=1)
    """Cap on every split (tiny profiles for tests); None keeps the paper's splits whole."""
    fewshot_holdout: int = Field(default=10, ge=0)
    """Docs of a task without a training split (HumanEval) held out of its test split as few-shot
    shots (split `fewshot`); every evaluation of that task runs on the rest."""

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return _known_tasks(v)


class SVFParams(Section):
    targets: Union[Literal["mlp", "attn", "qv", "all"], list[str]] = "mlp"
    """Named set, or regular expressions matched against full module names."""
    init_mean: float = 0.1
    init_std: float = Field(default=0.01, ge=0)
    max_mult: float = Field(default=1.0, gt=0)
    keep_norm: bool = True

    @field_validator("targets")
    @classmethod
    def _patterns(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list targets nothing; name a set (mlp, attn, qv, all) or regular expressions")
            for pattern in v:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{pattern!r} is not a valid regular expression ({err})") from None
        return v

    def config(self):
        """The library's `svf.SVFConfig`."""
        from ..svf import SVFConfig

        return SVFConfig(**self.model_dump())


class CEMParams(PerTaskSection):
    """Few-shot adaptation: alpha of z' = sum_k alpha_k z_k by the Cross-Entropy Method on `shots`
    labelled docs of each task (its training split; for a task without one, HumanEval, the
    `data.fewshot_holdout` docs held out of its test split). Reference config: population 32,
    elite_ratio 0.2, init_std 0.5, per_matrix true; paper: 10 shots, up to 100 generations."""

    tasks: list[str] = Field(default_factory=lambda: list(UNSEEN_TASKS))
    population: int = Field(default=CEMConfig.population, ge=2)
    elite_ratio: float = Field(default=CEMConfig.elite_ratio, gt=0, le=1)
    generations: int = Field(default=CEMConfig.generations, ge=1)
    shots: int = Field(default=10, ge=1)
    init_std: float = Field(default=CEMConfig.init_std, ge=0)
    per_matrix: bool = CEMConfig.per_matrix
    keep_best: bool = CEMConfig.keep_best
    method: Literal["batched", "naive"] = "batched"
    batch_size: int = Field(default=16, ge=1)
    max_new_tokens: int = Field(default=128, ge=1)
    """Generation tasks (MATH, HumanEval): the shots are answered greedily up to this many tokens."""

    def cem_config(self, seed: int) -> CEMConfig:
        """The search's settings (`cem.cem_search`)."""
        return CEMConfig(**{f.name: getattr(self, f.name) for f in fields(CEMConfig) if f.name != "seed"}, seed=seed)


class EvalParams(PerTaskSection):
    """lm-evaluation-harness cells: base on every task, each expert / LoRA adapter on its own task."""

    tasks: list[str] = Field(default_factory=lambda: list(ALL_TASKS))
    style: Literal["harness", "paper"] = "harness"
    """harness: lm-eval's own prompts and metrics; paper: the paper's chat prompts and scorers (t2_* tasks)."""
    secondary_style: Optional[Literal["harness", "paper"]] = None
    """The other style, also measured by each cell on the same docs (the report's secondary tables);
    null: none. Per task, e.g. {arc_easy: {secondary_style: harness}}."""
    limit: Optional[int] = Field(default=10, ge=1)
    """Docs per task (per subject for MATH); null runs the full test sets."""
    batch_size: int = Field(default=8, ge=1)
    num_fewshot: Optional[int] = Field(default=None, ge=0)
    apply_chat_template: bool = False
    max_gen_toks: Optional[int] = Field(default=192, ge=1)
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """The cells' dtype; null: model.dtype (what the experts were trained in). Inference only, so a CPU
    with AMX can score fp32-trained experts in bf16 (README "Profiles")."""
    adapt_tasks: list[str] = Field(default_factory=lambda: list(UNSEEN_TASKS))
    """Table 2: tasks every two-pass strategy (prompt, classifier, few_shot) is evaluated on."""
    dispatch_mode: Literal["generate", "loglik"] = "loglik"
    """First pass of prompt / classifier dispatch: generate (as the paper) or loglik (one forward, no decoding)."""
    dispatch_max_new_tokens: int = Field(default=32, ge=1)

    @field_validator("adapt_tasks")
    @classmethod
    def _adapt_tasks(cls, v: list[str]) -> list[str]:
        return _known_tasks(v)

class TrackingParams(Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "transformer2"


class ExecutionParams(Section):
    """How stage tasks run, not what they compute: in no stage's settings, so changing it reruns nothing."""
    retries: int = Field(default=0, ge=0, le=10)
    """Prefect retries of a stage's task after an unexpected error (a `t2: error:` of bad input is not
    retried); resumable stages continue from their checkpoint. A killed process is never retried."""
    retry_delay_s: float = Field(default=10.0, ge=0, le=3600)
    task_runner: Literal["thread", "dask"] = "thread"
    """Where `t2 pipeline --no-dvc --parallel` runs the items of a foreach training stage: threads of this
    process (thread), or a local Dask cluster of `dask_workers` worker processes (dask: needs prefect-dask)."""
    dask_workers: int = Field(default=2, ge=1, le=256)
    """Worker processes of the local Dask cluster (one task each at a time, torch threads = cores // workers)."""
