"""What every section shares: strict types, known task names, per-task overrides."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import UserError
from ..tasks import PAPER_TRAIN_TASKS as TRAIN_TASKS, PAPER_UNSEEN_TASKS as UNSEEN_TASKS, benchmark_names

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
