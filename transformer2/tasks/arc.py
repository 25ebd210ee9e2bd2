"""ARC-Easy (a training task) and ARC-Challenge (unseen): multiple choice, "the answer is (X)".

Options are shown lettered A, B, C... whatever the doc's own labels ("1".."4" too), under
"Options:", as in the reference. Few-shot CEM scores each option's continuation instead of decoding.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from .base import HarnessMapping, HarnessTask, Source, Task, even_odd, official, register


def arc_letters(doc: dict) -> list[str]:
    """Option letters shown in the prompt; docs labelled "1".."4" are shown as A..D too."""
    return [chr(ord("A") + i) for i in range(len(doc["choices"]["label"]))]


def extract_choice(text: str, labels: Sequence[str]) -> Optional[str]:
    """The chosen label, or None (never a guess) when no explicit choice is found: "the
    answer is (X)" first, then \\boxed{X}, an "Answer: X" line, a lone label on the last line."""
    alt = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    opt = rf"[\s*:]*(?i:option|choice)?\s*[(\[]?\s*({alt})\s*[)\]]?(?!\w)"
    patterns = (
        rf"(?i:answer\s+is){opt}",
        rf"\\(?:boxed|fbox)\{{\s*(?:\\text(?:bf)?\{{)?\s*\(?({alt})\)?\s*\}}",
        rf"(?:^|\n)[\s*#]*(?i:(?:final\s+)?answer)\**\s*:{opt}",
    )
    for pattern in patterns:
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    lines = [line for line in text.splitlines() if line.strip()]
    m = re.fullmatch(rf"\W*({alt})\W*", lines[-1]) if lines else None
    return m.group(1) if m else None


def _gold(doc: dict) -> int:
    return doc["choices"]["label"].index(doc["answerKey"])


def score(doc: dict, completion: str) -> bool:
    letters = arc_letters(doc)
    return extract_choice(completion, letters) == letters[_gold(doc)]


def question(doc: dict) -> str:
    options = "".join(f"{letter}. {text}\n" for letter, text in zip(arc_letters(doc), doc["choices"]["text"]))
    return f"{doc['question']}\nOptions:\n{options}"


def stated(doc: dict, completion: str) -> Optional[str]:
    return extract_choice(completion, arc_letters(doc))


def gold(doc: dict) -> str:
    return arc_letters(doc)[_gold(doc)]


def reference_answer(doc: dict) -> str:
    return f"The answer is ({arc_letters(doc)[_gold(doc)]})."


def choices(doc: dict) -> tuple[list[str], int]:
    """Each option's continuation "The answer is (X" and the gold option's index."""
    return [f"The answer is ({letter}" for letter in arc_letters(doc)], _gold(doc)


SYSTEM_PROMPT = ("The following are multiple choice questions. Think step by step, then finish "
                 "your answer with \"the answer is (X)\" where X is the letter of the correct option.")


def _arc(name: str, title: str, config: str, splits: tuple[str, ...], make_splits) -> Task:
    return register(Task(
        name=name, title=title, category="reasoning", system_prompt=SYSTEM_PROMPT, question=question,
        reference_answer=reference_answer, score=score, choices=choices, stated=stated, gold=gold,
        source=Source(splits, "allenai/ai2_arc", config), make_splits=make_splits,
        harness=HarnessMapping(name, "acc_norm,none", {name: HarnessTask(f"arc/{name}.yaml")}),
    ))


ARC_EASY = _arc("arc_easy", "ARC-Easy", "ARC-Easy", ("train", "test"), even_odd)
ARC_CHALLENGE = _arc("arc_challenge", "ARC-Challenge", "ARC-Challenge", ("train", "validation", "test"), official)
