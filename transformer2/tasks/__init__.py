"""The task registry: one declarative `Task` record per benchmark, one file per task.

Built-in: the paper's training tasks (GSM8K, MBPP, ARC-Easy), its unseen tasks (MATH,
HumanEval, ARC-Challenge) and the dispatch pseudo-task "classify". A task of your own is one
Python file that builds a `Task` and calls `register`; name it in `task_modules` of
params.yaml (or import it before use) and every stage can split, train, score, dispatch, mix
and evaluate it (see the README, "Add your own task").
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from .base import (CATEGORIES, TASKS, Doc, HarnessMapping, HarnessTask, Source, Splits, Subset, Task, TaskError,
                   benchmark_names, code_scorer, build_messages, even_odd, get_task, official, question_text, reference_answer,
                   register, score_batch, shuffled)
from .data import (DATA_ENV, FEWSHOT_SPLIT, DataError, check_docs, check_split, data_dir, export_splits, export_tasks,
                   hold_out_shots, load_source, load_split, prepare_splits, prepare_tasks, read_jsonl, shot_pool,
                   stratified_order, write_jsonl)
from . import gsm8k, mbpp, arc, hendrycks_math, humaneval, classify  # noqa: E402,F401  (registers them)
from .classify import CLASSIFY_TASK, build_classify_messages, parse_category

PAPER_TRAIN_TASKS = ("gsm8k", "mbpp", "arc_easy")
PAPER_UNSEEN_TASKS = ("math", "humaneval", "arc_challenge")


def load_task_modules(specs: Sequence[str]) -> None:
    """Import task modules (dotted names, or paths of .py files) so their `register` calls run."""
    for spec in specs:
        try:
            if spec.endswith(".py"):
                path = Path(spec).resolve()
                name = f"transformer2_user_task_{path.stem}"
                if name in sys.modules:
                    continue
                module_spec = importlib.util.spec_from_file_location(name, path)
                if module_spec is None or not path.is_file():
                    raise FileNotFoundError(path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except TaskError:
            raise
        except Exception as err:
            raise TaskError(f"task_modules: cannot import {spec!r} ({type(err).__name__}: {err})") from None


__all__ = ["CATEGORIES", "CLASSIFY_TASK", "DATA_ENV", "FEWSHOT_SPLIT", "PAPER_TRAIN_TASKS", "PAPER_UNSEEN_TASKS",
           "TASKS", "DataError", "Doc", "HarnessMapping", "HarnessTask", "Source", "Splits", "Subset", "Task",
           "TaskError", "benchmark_names", "build_classify_messages", "code_scorer", "build_messages", "data_dir", "even_odd",
           "export_splits", "export_tasks", "check_docs", "check_split", "prepare_tasks", "get_task", "hold_out_shots", "load_source", "load_split", "load_task_modules",
           "official", "parse_category", "prepare_splits", "question_text", "read_jsonl", "reference_answer",
           "register", "score_batch", "shot_pool", "shuffled", "write_jsonl"]
