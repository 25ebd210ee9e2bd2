"""The paper-style tasks `t2_<task>` of every registered task: its chat prompt (the system
prompt is the YAML's `description`, the user turn `Task.question`), greedy generation, and its
own scorer (code runs in the sandbox). Docs come from `transformer2.tasks.load_source`, so
evaluation reads exactly what training reads. Run them with `--apply_chat_template`.

`doc_to_text_<task>`, `doc_to_target_<task>` and `process_results_<task>` are made on demand
(module `__getattr__`), so a task registered in its own file gets them too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def load_dataset(t2_task: str, t2_data_root: Optional[str] = None, **_: Any) -> dict:
    """lm-eval `custom_dataset`: {"test": Dataset} from `<root>/<task>/test.jsonl`, else the hub,
    MATH's subjects interleaved (`tasks.stratified_order`) so `--limit` keeps every subject.
    (lm-eval also passes the task metadata and model args as keywords; they are ignored.)"""
    import datasets

    from ...tasks import load_source, stratified_order

    docs = stratified_order(t2_task, load_source(t2_task, "test", Path(t2_data_root) if t2_data_root else None))
    return {"test": datasets.Dataset.from_list(docs)}


def _bind(kind: str, name: str):
    from ...tasks import get_task

    task = get_task(name)
    if kind == "doc_to_text":
        def fn(doc: dict) -> str:
            return task.question(doc)
    elif kind == "doc_to_target":
        def fn(doc: dict) -> str:
            return task.reference_answer(doc)
    else:
        def fn(doc: dict, results: list[str]) -> dict[str, float]:
            return {"acc": float(task.score(doc, results[0]))}
    fn.__name__ = f"{kind}_{name}"
    return fn


def __getattr__(attr: str):
    for kind in ("doc_to_text", "doc_to_target", "process_results"):
        if attr.startswith(kind + "_"):
            from ...tasks import TaskError

            try:
                return _bind(kind, attr[len(kind) + 1:])
            except TaskError:
                break
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
