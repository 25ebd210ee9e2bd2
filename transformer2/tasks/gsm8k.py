"""GSM8K: grade-school math word problems, answered with a closing "The answer is N."

The reference scores the last number of a free answer; we ask for a final line and read the
number after the last "answer is" / "####", else in the last \\boxed{}, else the last number.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

from .answers import extract_boxed
from .base import HarnessMapping, HarnessTask, Source, Task, even_odd, register

_NUM = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])\.\d+")
_ANSWER_IS = re.compile(r"answer\s+is|####|(?:^|\n)[\s*#]*(?:final\s+)?answer\**\s*:", re.IGNORECASE)


def _number(text: str) -> Optional[Fraction]:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def extract_answer(text: str) -> Optional[str]:
    """The final number: after the last "####" / "answer is", else in the last \\boxed{},
    else the last number in the text. Commas, `$`, units and a trailing period are ignored."""
    tails = [text[m.end():] for m in _ANSWER_IS.finditer(text)][-1:]
    boxed = extract_boxed(text)
    for tail, first in ((tails[0] if tails else None, True), (boxed, False), (text, False)):
        if tail is None:
            continue
        nums = _NUM.findall(tail.replace("\\!", "").replace("{,}", ","))
        value = _number(nums[0] if first else nums[-1]) if nums else None
        if value is not None:
            return _format(value)
    return None


def score(doc: dict, completion: str) -> bool:
    gold = _number(doc["answer"].split("####")[-1].strip())
    pred = extract_answer(completion)
    return gold is not None and pred is not None and _number(pred) == gold


def reference_answer(doc: dict) -> str:
    steps, final = doc["answer"].rsplit("####", 1)
    steps = re.sub(r"<<[^>]*>>", "", steps).strip()  # drop calculator annotations
    return f"{steps}\nThe answer is {final.strip()}."


GSM8K = register(Task(
    name="gsm8k", title="GSM8K", category="math",
    system_prompt=("Solve the following grade-school math problem. Reason step by step, then end "
                   "with a final line of the form \"The answer is N.\" where N is just the number."),
    question=lambda doc: doc["question"], reference_answer=reference_answer, score=score,
    source=Source(("train", "test"), "openai/gsm8k", "main"), make_splits=even_odd,
    harness=HarnessMapping("gsm8k", "exact_match,flexible-extract", {"gsm8k": HarnessTask("gsm8k/gsm8k.yaml")}),
))
