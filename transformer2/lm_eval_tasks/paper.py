"""The paper-style tasks `t2_<task>`: the project's chat prompts (`transformer2.prompts`: the
system prompt is the task's `description`, the user turn `question_text`), greedy generation,
and the project's scorers (`transformer2.scoring`; code runs in the sandbox). Docs come from
`transformer2.benchmarks.load_source`, so evaluation reads exactly what training reads.
Run them with `--apply_chat_template`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def load_dataset(t2_task: str, t2_data_root: Optional[str] = None, **_: Any) -> dict:
    """lm-eval `custom_dataset`: {"test": Dataset} from `<root>/<task>/test.jsonl`, else the hub.
    (lm-eval also passes the task metadata and model args as keywords; they are ignored.)"""
    import datasets

    from ..benchmarks import load_source

    docs = load_source(t2_task, "test", Path(t2_data_root) if t2_data_root else None)
    return {"test": datasets.Dataset.from_list(docs)}


def _bind(task: str):
    def doc_to_text(doc: dict) -> str:
        from ..prompts import question_text

        return question_text(task, doc)

    def doc_to_target(doc: dict) -> str:
        from ..prompts import reference_answer

        return reference_answer(task, doc)

    def process_results(doc: dict, results: list[str]) -> dict[str, float]:
        from ..scoring import SCORERS

        return {"acc": float(SCORERS[task](doc, results[0]))}

    for fn in (doc_to_text, doc_to_target, process_results):
        fn.__name__ = f"{fn.__name__}_{task}"
    return doc_to_text, doc_to_target, process_results


doc_to_text_gsm8k, doc_to_target_gsm8k, process_results_gsm8k = _bind("gsm8k")
doc_to_text_arc_easy, doc_to_target_arc_easy, process_results_arc_easy = _bind("arc_easy")
doc_to_text_arc_challenge, doc_to_target_arc_challenge, process_results_arc_challenge = _bind("arc_challenge")
doc_to_text_math, doc_to_target_math, process_results_math = _bind("math")
doc_to_text_mbpp, doc_to_target_mbpp, process_results_mbpp = _bind("mbpp")
doc_to_text_humaneval, doc_to_target_humaneval, process_results_humaneval = _bind("humaneval")
