"""MBPP: write a Python function from a description and its first test assertion; run all tests.

Splits as the reference: the official train split (374 items) shuffled with seed 16 into 200
train / 100 validation. Code runs only in `transformer2.sandbox`.
"""
from __future__ import annotations

import re
from typing import Optional

from .answers import CODE_SYSTEM_PROMPT, extract_code
from .base import HarnessMapping, HarnessTask, Source, Task, code_scorer, register, shuffled

_FUNCTIONS = "transformer2.harness.functions.code"


def entry_point(doc: dict) -> Optional[str]:
    m = re.match(r"\s*assert\s*\(?\s*(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", doc["test_list"][0])
    return m.group(1) if m else None


def checks(doc: dict, completion: str) -> dict:
    """The completion's code against the doc's assertions (setup code first, as MBPP runs them)."""
    entry = entry_point(doc)
    return {"candidate": extract_code(completion, entry), "tests": "\n".join(doc["test_list"]) + "\n",
            "setup": doc.get("test_setup_code") or "", "entry_points": [entry] if entry else []}


score = code_scorer(checks)


def question(doc: dict) -> str:
    test = doc["test_list"][0].replace("\r\n", "\n").strip()
    return f"{doc['text'].strip()} Your code should satisfy this assertion:\n```python\n{test}\n```"


def reference_answer(doc: dict) -> str:
    return f"```python\n{doc['code'].replace(chr(13) + chr(10), chr(10)).strip()}\n```"


MBPP = register(Task(
    name="mbpp", title="MBPP", category="code", system_prompt=CODE_SYSTEM_PROMPT, question=question,
    reference_answer=reference_answer, score=score, checks=checks,
    source=Source(("train", "test"), "google-research-datasets/mbpp", "full"),
    make_splits=shuffled(train=200, validation=100, seed=16),
    harness=HarnessMapping("mbpp", "pass_at_1,none", {"mbpp": HarnessTask("mbpp/mbpp.yaml", {
        "utils.pass_at_1": f"{_FUNCTIONS}.pass_at_1", "utils.list_fewshot_samples": f"{_FUNCTIONS}.mbpp_fewshot_samples"})}),
))
