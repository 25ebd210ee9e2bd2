"""The task record: everything the pipeline knows about one benchmark, in one declarative object.

A task module builds a `Task` and calls `register(task)`; every other part of the library
(data stage, trainers, scorers, dispatch, CEM, lm-eval configs, report) reads the registry.
Docs keep their source's column names (the Hugging Face ones for the paper's benchmarks).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..errors import UserError

Doc = dict
Splits = dict[str, list[Doc]]
CATEGORIES = ("code", "math", "reasoning", "other")  # what first-pass dispatch can call a question


class TaskError(UserError, KeyError):
    """An unknown or inconsistent task; the message lists what is known."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# ---------------------------------------------------------------- how a task's docs are split

def even_odd(source: dict[str, list[Doc]]) -> Splits:
    """GSM8K, ARC-Easy (reference): the official train split halved by even/odd index."""
    train = source["train"]
    return {"train": train[0::2], "validation": train[1::2], "test": source["test"]}


def shuffled(train: int, validation: int, seed: int) -> Callable[[dict[str, list[Doc]]], Splits]:
    """MBPP (reference): the official train split shuffled with a fixed seed, then cut."""
    def make(source: dict[str, list[Doc]]) -> Splits:
        pool = list(source["train"])
        random.Random(seed).shuffle(pool)
        return {"train": pool[:train], "validation": pool[train:train + validation], "test": source["test"]}

    return make


def official(source: dict[str, list[Doc]]) -> Splits:
    return dict(source)


# ---------------------------------------------------------------- the record

@dataclass(frozen=True)
class Subset:
    """One part of a task kept apart by its source (MATH's subjects): hub config, lm-eval name, column value."""

    hub_config: str
    lm_eval: str
    value: str


@dataclass(frozen=True)
class Source:
    """Where docs come from: a hub dataset (one config, or one per subset) or a function of the split."""

    splits: tuple[str, ...]  # the official splits that exist
    hub_path: Optional[str] = None
    hub_config: Optional[str] = None
    generate: Optional[Callable[[str], list[Doc]]] = None  # docs made in code (toy tasks): no mirror, no hub


@dataclass(frozen=True)
class HarnessTask:
    """A built-in lm-eval task YAML and how our copy reads local data."""

    builtin: str  # YAML path under lm_eval/tasks
    functions: Optional[dict[str, str]] = None  # code tasks: built-in !function -> ours (standalone copy)
    local_functions: Optional[dict[str, str]] = None  # keys set to `!function <path>` when the data is local


@dataclass(frozen=True)
class HarnessMapping:
    """The task in lm-eval's own style: its task (or group) name, YAMLs and headline metric."""

    name: str  # what lm-eval calls it (a group for MATH)
    headline: str  # e.g. "exact_match,flexible-extract"
    configs: dict[str, HarnessTask] = field(default_factory=dict)  # lm-eval task name -> built-in YAML
    groups: dict[str, str] = field(default_factory=dict)  # lm-eval group name -> built-in group YAML


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # display name in reports
    category: str  # what dispatch should call its questions (one of CATEGORIES)
    system_prompt: str
    question: Callable[[Doc], str]  # the user turn; also what the dispatch classifier reads
    reference_answer: Callable[[Doc], str]  # the gold answer in the format `score` reads (next-token target)
    score: Callable[[Doc, str], bool]  # did the completion answer the doc? (RL reward and accuracy)
    source: Optional[Source] = None  # None: a pseudo-task with no data of its own (dispatch's "classify")
    make_splits: Callable[[dict[str, list[Doc]]], Splits] = official
    checks: Optional[Callable[[Doc, str], dict]] = None  # code tasks: `sandbox.run_tests` arguments (candidate, tests, ...)
    choices: Optional[Callable[[Doc], tuple[list[str], int]]] = None  # multiple choice: option continuations, gold
    # the answer a completion states and the gold one (multiple choice: letters), for `stats.answer_spread`
    stated: Optional[Callable[[Doc, str], Optional[str]]] = None
    gold: Optional[Callable[[Doc], str]] = None
    max_new_tokens: int = 512  # paper-style generation length (the reference's)
    subsets: tuple[Subset, ...] = ()
    subset_column: Optional[str] = None  # the column that names a doc's subset
    harness: Optional[HarnessMapping] = None  # lm-eval's own version of the task, if it has one

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise TaskError(f"task {self.name!r}: category must be one of {CATEGORIES}, got {self.category!r}")

    @property
    def multiple_choice(self) -> bool:
        return self.choices is not None

    @property
    def benchmark(self) -> bool:
        """A task with data (not a pseudo-task): it can be split, trained on and evaluated."""
        return self.source is not None

    def messages(self, doc: Doc) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": self.question(doc)}]


def code_scorer(checks: Callable[[Doc, str], dict]) -> Callable[..., bool]:
    """The scorer of a code task: the benchmark's tests pass against the completion's code, judged
    outside the candidate's process (`sandbox.run_tests`), so the code cannot forge its verdict."""
    def score(doc: Doc, completion: str, limits=None) -> bool:
        from ..sandbox import SandboxLimits, run_tests

        return run_tests(**checks(doc, completion), limits=limits or SandboxLimits()).passed

    return score


# ---------------------------------------------------------------- the registry

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the registry (re-registering the same name replaces it: reloading a module is fine)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(benchmark_names())}") from None


def benchmark_names() -> list[str]:
    """Every registered task with data, in registration order."""
    return [name for name, task in TASKS.items() if task.benchmark]


def build_messages(task: str, doc: Doc) -> list[dict]:
    return get_task(task).messages(doc)


def question_text(task: str, doc: Doc) -> str:
    return get_task(task).question(doc)


def reference_answer(task: str, doc: Doc) -> str:
    return get_task(task).reference_answer(doc)


def score_batch(task: str, docs: Sequence[Doc], completions: Sequence[str], workers: int = 2,
                limits=None) -> list[bool]:
    """Scores in input order; code tasks run `workers` sandboxes at a time."""
    from ..sandbox import SandboxLimits, run_tests_many

    if len(docs) != len(completions):
        raise ValueError(f"{len(docs)} docs but {len(completions)} completions")
    spec = get_task(task)
    if spec.checks is not None:
        items = [spec.checks(d, c) for d, c in zip(docs, completions)]
        return [r.passed for r in run_tests_many(items, limits or SandboxLimits(), workers=workers)]
    return [spec.score(d, c) for d, c in zip(docs, completions)]
