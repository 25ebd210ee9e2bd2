"""The pipeline's single config (`params.yaml`), as a typed schema.

Every section rejects unknown keys and wrong types, and the error names the key
(`svf.targets: ...`), so a typo never silently falls back to a default. `base` holds what every section
shares, `training` the sections that train (rl, lora, classifier), `sections` the others; this module
puts them together and loads a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from ..tasks import TaskError, load_task_modules
from .base import ALL_TASKS, TRAIN_TASKS, UNSEEN_TASKS, ConfigError, PerTaskSection, Section
from .sections import (CEMParams, DataParams, EvalParams, ExecutionParams, ModelParams, SVFParams,
                       TrackingParams)
from .training import ClassifierParams, LoopSection, LoRAParams, ReinforceSection, RLParams, TrainingSection

__all__ = ["ALL_TASKS", "TRAIN_TASKS", "UNSEEN_TASKS", "ConfigError", "Section", "PerTaskSection", "ModelParams",
           "DataParams", "SVFParams", "LoopSection", "ReinforceSection", "TrainingSection", "RLParams",
           "LoRAParams", "ClassifierParams", "CEMParams", "EvalParams", "TrackingParams", "ExecutionParams",
           "Params", "parse_params", "load_params"]


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

    def cell_dtype(self, task: Optional[str] = None) -> str:
        """What the eval cells (of `task`, its overrides applied) compute in: eval.dtype, else model.dtype."""
        ev = self.eval if task is None else self.eval.for_task(task)
        return ev.dtype or self.model.dtype

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
        for task in [None, *self.eval.overrides]:  # a cell's second style must be the other one
            ev = self.eval if task is None else self.eval.for_task(task)
            if ev.secondary_style is not None and ev.secondary_style == ev.style:
                where = "eval.secondary_style" if task is None else f"eval.overrides.{task}.secondary_style"
                raise ValueError(f"{where}: {ev.style!r} is the cell's own style (eval.style); use the other one or null")
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
