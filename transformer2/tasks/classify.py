"""The pseudo-task "classify": the paper's first-pass classification prompt and its label parser.

Docs are {"question": str, "label": category}; the reward is whether the last \\boxed{} names
the doc's label. Not a benchmark (no data of its own): the classification expert z_c is trained
on it with the RL trainer unchanged (see classifier.py), and dispatch reads with it.
"""
from __future__ import annotations

import re
from typing import Optional

from .answers import extract_boxed
from .base import CATEGORIES, Task, register

CLASSIFY_TASK = "classify"
CLASSIFY_SYSTEM_PROMPT = """Classify the user's question into exactly one of four categories:
- code: asks for a program, function or algorithm, or about programming languages, syntax or data structures.
- math: asks for a calculation or a mathematical result: arithmetic, word problems, algebra, geometry, probability, statistics.
- reasoning: asks for logical thinking, scientific knowledge or critical judgement, such as choosing the correct statement among options.
- other: fits none of the above.
If the question spans several categories, choose the dominant one. Do not answer the question itself.
Reply with your classification in \\boxed{}, for example: Classification: \\boxed{reasoning}"""


def build_classify_messages(question_text: str) -> list[dict]:
    return [{"role": "system", "content": CLASSIFY_SYSTEM_PROMPT}, {"role": "user", "content": question_text}]


def parse_category(text: str) -> Optional[str]:
    """The category in the last \\boxed{}, or None when missing or not one of CATEGORIES."""
    boxed = extract_boxed(text)
    if boxed is None:
        return None
    label = re.sub(r"\\text(?:bf|tt)?\{([^}]*)\}", r"\1", boxed).strip(" '\"`*.").lower()
    return label if label in CATEGORIES else None


CLASSIFY = register(Task(
    name=CLASSIFY_TASK, title="dispatch", category="other", system_prompt=CLASSIFY_SYSTEM_PROMPT,
    question=lambda doc: doc["question"], reference_answer=lambda doc: f"Classification: \\boxed{{{doc['label']}}}",
    score=lambda doc, completion: parse_category(completion) == doc["label"],
))
