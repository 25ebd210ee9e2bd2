"""The pipeline's single config (`params.yaml`), as a typed schema.

Every section rejects unknown keys and wrong types, and the error names the key
(`svf.targets: ...`), so a typo never silently falls back to a default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from .errors import UserError

TRAIN_TASKS = ("gsm8k", "mbpp", "arc_easy")
UNSEEN_TASKS = ("math", "humaneval", "arc_challenge")
ALL_TASKS = TRAIN_TASKS + UNSEEN_TASKS


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


def _known_tasks(v: list[str]) -> list[str]:
    unknown = sorted(set(v) - set(ALL_TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(ALL_TASKS)}")
    return v


def _check_overrides(section: type[BaseModel], v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-task overrides must name known tasks and be valid values of the section's own keys."""
    for task, changes in v.items():
        if task not in ALL_TASKS:
            raise ValueError(f"unknown task {task!r}; known: {list(ALL_TASKS)}")
        bad = sorted(set(changes) & {"tasks", "overrides"})
        if bad:
            raise ValueError(f"{task}: {bad} cannot be overridden per task")
        try:
            section.model_validate(changes)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
            raise ValueError(f"{task}.{key}: {msg}") from None
    return v


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


class PerTaskSection(Section):
    """A section that runs once per task, with per-task overrides of its own keys."""

    tasks: list[str] = Field(default_factory=lambda: list(TRAIN_TASKS))
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-task changes, e.g. {arc_easy: {max_new_tokens: 64}}; same keys as the section."""

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return _known_tasks(v)

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return _check_overrides(cls, v)

    def for_task(self, task: str):
        """This section with `task`'s overrides applied."""
        return self.model_copy(update=self.overrides.get(task, {}))


class LoopSection(Section):
    """The training loop's knobs (`training.LoopConfig`), shared by every trained adapter."""

    steps: int = Field(default=8, ge=1)
    batch_size: int = Field(default=8, ge=1)
    micro_batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float = Field(default=1e-3, gt=0)
    eval_every: int = Field(default=4, ge=1)
    checkpoint_every: int = Field(default=1, ge=1)


class ReinforceSection(LoopSection):
    """REINFORCE's knobs (`rl.RLObjectiveConfig`): the task experts and the classification expert."""

    kl_coef: float = Field(default=0.0, ge=0)
    max_new_tokens: int = Field(default=128, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    eval_batch_size: int = Field(default=16, ge=1)


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


class LoRAParams(TrainingSection):
    """The paper's LoRA baseline: PEFT LoRA on q/v, rank 16, alpha 32, dropout 0.05, trained with
    next-token prediction on the same training split as the SVF expert, validated the same way
    (rl.max_new_tokens, rl.val_size, same scorers). objective: reinforce is the Table-4 ablation
    "LoRA + policy gradient" (it then also uses rl.kl_coef, rl.do_sample, rl.temperature)."""

    rank: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    objective: Literal["next_token", "reinforce"] = "next_token"
    lr: float = Field(default=5e-4, gt=0)
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = Field(default=1.0, gt=0)
    max_answer_tokens: Optional[int] = Field(default=None, ge=1)
    """next_token: cut longer reference answers (tokens); None keeps them whole."""


class ClassifierParams(ReinforceSection):
    """The classification expert z_c: REINFORCE (reward +-1 for the right \\boxed{label}) on prompts of
    the TRAINING splits of the expert tasks, balanced per category; validated on their validation
    splits. Dispatch accuracy of the base prompt and of z_c is then measured on held-out prompts:
    the test splits of every task in data.tasks (`heldout_per_task` each), in every mode of `modes`."""

    steps: int = Field(default=8, ge=1)
    batch_size: int = Field(default=12, ge=1)
    micro_batch_size: int = Field(default=12, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)
    per_class: Optional[int] = Field(default=None, ge=1)
    """Training prompts per category (null: as many as the smallest expert task's training split)."""
    val_per_class: int = Field(default=8, ge=1)
    heldout_per_task: Optional[int] = Field(default=10, ge=1)
    """Held-out test prompts per task for the dispatch confusion matrices (null: whole test splits)."""
    modes: list[Literal["generate", "loglik"]] = Field(default_factory=lambda: ["generate", "loglik"])
    train_mode: Literal["generate", "loglik"] = "generate"
    """generate (the paper): the decoded \\boxed{label} is rewarded; loglik: the most likely of the four
    label continuations is (no decoding), validated by loglik dispatch accuracy."""


class CEMParams(PerTaskSection):
    """Few-shot adaptation: alpha of z' = sum_k alpha_k z_k by the Cross-Entropy Method on `shots`
    labelled docs of each task (its training split; for a task without one, HumanEval, the
    `data.fewshot_holdout` docs held out of its test split). Reference config: population 32,
    elite_ratio 0.2, init_std 0.5, per_matrix true; paper: 10 shots, up to 100 generations."""

    tasks: list[str] = Field(default_factory=lambda: list(UNSEEN_TASKS))
    population: int = Field(default=32, ge=2)
    elite_ratio: float = Field(default=0.2, gt=0, le=1)
    generations: int = Field(default=10, ge=1)
    shots: int = Field(default=10, ge=1)
    init_std: float = Field(default=0.5, ge=0)
    per_matrix: bool = False
    keep_best: bool = True
    method: Literal["batched", "naive"] = "batched"
    batch_size: int = Field(default=16, ge=1)
    max_new_tokens: int = Field(default=128, ge=1)
    """Generation tasks (MATH, HumanEval): the shots are answered greedily up to this many tokens."""


class EvalParams(PerTaskSection):
    """lm-evaluation-harness cells: base on every task, each expert / LoRA adapter on its own task."""

    tasks: list[str] = Field(default_factory=lambda: list(ALL_TASKS))
    style: Literal["harness", "paper"] = "harness"
    """harness: lm-eval's own prompts and metrics; paper: the paper's chat prompts and scorers (t2_* tasks)."""
    limit: Optional[int] = Field(default=10, ge=1)
    """Docs per task (per subject for MATH); null runs the full test sets."""
    batch_size: int = Field(default=8, ge=1)
    num_fewshot: Optional[int] = Field(default=None, ge=0)
    apply_chat_template: bool = False
    max_gen_toks: Optional[int] = Field(default=192, ge=1)
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


class Params(Section):
    seed: int = 0
    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams = Field(default_factory=DataParams)
    svf: SVFParams = Field(default_factory=SVFParams)
    rl: RLParams = Field(default_factory=RLParams)
    lora: LoRAParams = Field(default_factory=LoRAParams)
    classifier: ClassifierParams = Field(default_factory=ClassifierParams)
    cem: CEMParams = Field(default_factory=CEMParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @model_validator(mode="after")
    def _few_shot_needs_cem(self) -> "Params":
        missing = [t for t in self.eval.adapt_tasks if t not in self.cem.tasks]
        if missing:
            raise ValueError(f"eval.adapt_tasks: {missing} have no few-shot CEM result; add them to cem.tasks")
        return self


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if not key:  # a check across sections: its message names the keys
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(data, str(path))
