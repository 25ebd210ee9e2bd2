"""The pipeline's single config (`params.yaml`), as a typed schema.

Every section rejects unknown keys and wrong types, and the error names the key
(`svf.targets: ...`), so a typo never silently falls back to a default.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from dataclasses import fields

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)
from .errors import UserError
from .settings import (BASELINES, CLASSIFIER_LOOP, CLASSIFIER_OBJECTIVE, LORA_LOOP, CEMConfig, LoopConfig,
                       NextTokenConfig, RLObjectiveConfig, rl_sampling_problem)
from .tasks import PAPER_TRAIN_TASKS as TRAIN_TASKS, PAPER_UNSEEN_TASKS as UNSEEN_TASKS, TaskError, benchmark_names
from .tasks import load_task_modules

ALL_TASKS = TRAIN_TASKS + UNSEEN_TASKS  # the paper's six; any registered task is accepted


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message names the offending key."""


class Section(BaseModel):
    """Strict: YAML's "0.002", `true` or "yes" never become a float, an int or a bool behind the user's back,
    and .inf / .nan are refused (a grad_clip of .inf is no clipping, never what a config means)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)


def _known_tasks(v: list[str]) -> list[str]:
    unknown = sorted(set(v) - set(benchmark_names()))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {benchmark_names()} (a task of your own: task_modules)")
    return v


PARTIAL = {"partial": True}  # validation context of one task's overrides on their own


def _check_overrides(section: type[BaseModel], v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-task overrides must name known tasks and be valid values of the section's own keys."""
    for task, changes in v.items():
        if task not in benchmark_names():
            raise ValueError(f"unknown task {task!r}; known: {benchmark_names()}")
        bad = sorted(set(changes) & {"tasks", "overrides"})
        if bad:
            raise ValueError(f"{task}: {bad} cannot be overridden per task")
        try:
            section.model_validate(changes, context=PARTIAL)  # checks across keys run on the merged section
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
        from .svf import SVFConfig

        return SVFConfig(**self.model_dump())


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
        from .lora import lora_config

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


class ExecutionParams(Section):
    """How stage tasks run, not what they compute: in no stage's settings, so changing it reruns nothing."""
    retries: int = Field(default=0, ge=0, le=10)
    """Prefect retries of a stage's task after an unexpected error (a `t2: error:` of bad input is not
    retried); resumable stages continue from their checkpoint. A killed process is never retried."""
    retry_delay_s: float = Field(default=10.0, ge=0, le=3600)


class Params(Section):
    seed: int = 0
    task_modules: list[str] = Field(default_factory=list)
    """Task files of your own (paths of .py files or module names) registered before anything else is read."""
    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams = Field(default_factory=DataParams)
    svf: SVFParams = Field(default_factory=SVFParams)
    rl: RLParams = Field(default_factory=RLParams)
    lora: LoRAParams = Field(default_factory=LoRAParams)
    classifier: ClassifierParams = Field(default_factory=ClassifierParams)
    cem: CEMParams = Field(default_factory=CEMParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    execution: ExecutionParams = Field(default_factory=ExecutionParams)

    @model_validator(mode="after")
    def _few_shot_needs_cem(self) -> "Params":
        missing = [t for t in self.eval.adapt_tasks if t not in self.cem.tasks]
        if missing:
            raise ValueError(f"eval.adapt_tasks: {missing} have no few-shot CEM result; add them to cem.tasks")
        for name, tasks in (("rl.tasks", self.rl.tasks), ("lora.tasks", self.lora.tasks),
                            ("eval.adapt_tasks", self.eval.adapt_tasks)):
            unbased = [t for t in tasks if t not in self.eval.tasks]  # every adapted cell is paired with its base
            if unbased:
                raise ValueError(f"{name}: {unbased} have no base cell to compare with; add them to eval.tasks")
        leaked = sorted(set(self.classifier.sources) & set(self.eval.adapt_tasks))
        if leaked:
            raise ValueError(f"classifier.sources: {leaked} are unseen tasks (eval.adapt_tasks), not training data")
        return self


def _yaml_hint(value: Any) -> str:
    """PyYAML reads 2e-3 (no dot) as a string, and "1.0" in quotes is one too: say how to write a number."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return "; write the number without quotes, with a dot before any exponent (2.0e-3)"
    return ""


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if not key:  # a check across sections: its message names the keys
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}{got}{_yaml_hint(e.get('input'))}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    modules = data.get("task_modules") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"{source}: invalid config\n  task_modules: must be a list of module names or .py paths")
    try:
        load_task_modules(modules)
    except TaskError as err:
        raise ConfigError(f"{source}: {err}") from None
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
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({err})") from None
    if data is None:  # an empty or truncated file is a mistake far more often than a wish for every default
        raise ConfigError(f"{path}: the file is empty; write `{{}}` to run with every default, or copy profiles/")
    return parse_params(data, str(path))
