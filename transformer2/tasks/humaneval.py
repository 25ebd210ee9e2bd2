"""HumanEval (unseen): complete a Python function stub; run its `check` tests in the sandbox.

It has no training split, so `data.fewshot_holdout` seeded test docs become its `fewshot`
split (the shots of few-shot adaptation) and every evaluation runs on the rest.
"""
from __future__ import annotations

import re

from .answers import CODE_SYSTEM_PROMPT, extract_code
from .base import HarnessMapping, HarnessTask, Source, Task, code_scorer, register

_FUNCTIONS = "transformer2.harness.functions.code"
_BODY_STOPS = re.compile(r"\n(?:def |class |if |print\(|#)")


def checks(doc: dict, completion: str) -> dict:
    """The prompt (imports, helpers, stub) is the trusted prelude, then the model's code: a full
    function redefines the stub; otherwise the completion is the stub's body, cut at the usual
    stop sequences. The doc's `check` runs in the checker against the entry point."""
    entry = doc["entry_point"]
    code = extract_code(completion, entry)
    if not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        code = _BODY_STOPS.split(code, maxsplit=1)[0]
    else:
        code = "\n" + code
    return {"candidate": code, "prelude": doc["prompt"], "tests": f"{doc['test']}\n\ncheck({entry})\n",
            "entry_points": [entry]}


score = code_scorer(checks)


def question(doc: dict) -> str:
    return f"Complete the following Python function:\n```python\n{doc['prompt'].strip()}\n```"


def reference_answer(doc: dict) -> str:
    return f"```python\n{doc['prompt']}{doc['canonical_solution'].rstrip()}\n```"


HUMANEVAL = register(Task(
    name="humaneval", title="HumanEval", category="code", system_prompt=CODE_SYSTEM_PROMPT, question=question,
    reference_answer=reference_answer, score=score, checks=checks,
    source=Source(("test",), "openai/openai_humaneval"),
    harness=HarnessMapping("humaneval", "pass@1,create_test", {"humaneval": HarnessTask("humaneval/humaneval.yaml", {
        "utils.pass_at_k": f"{_FUNCTIONS}.pass_at_k", "utils.build_predictions": f"{_FUNCTIONS}.humaneval_build_predictions"})}),
))
