"""Prompts as data: per task a system prompt and the user turn built from a doc.

Formats follow the reference implementation (SakanaAI/self-adaptive-llms): ARC lists the
options as "A. ..." under "Options:" and asks for "the answer is (X)"; MATH asks for
\\boxed{}; MBPP shows the task with its first test assertion; HumanEval shows the stub; the
dispatch classifier answers \\boxed{code|math|reasoning|other}. Wording is our own, and every
answer format is exactly what scoring.py reads. GSM8K differs from the reference (which
scores the last number of a free answer): we ask for a closing "The answer is N."
"""
from __future__ import annotations

import re
from typing import Optional

from .scoring import arc_letters, extract_boxed

_CODE_SYSTEM = ("You are an expert Python programmer who writes correct, efficient code. Reply "
                "with a complete, self-contained solution in a single ```python code block.")
SYSTEM_PROMPTS: dict[str, str] = {
    "gsm8k": ("Solve the following grade-school math problem. Reason step by step, then end "
              "with a final line of the form \"The answer is N.\" where N is just the number."),
    "arc_easy": ("The following are multiple choice questions. Think step by step, then finish "
                 "your answer with \"the answer is (X)\" where X is the letter of the correct option."),
    "math": ("Solve the following math problem. Reason step by step, and put the final answer "
             "within \\boxed{}."),
    "mbpp": _CODE_SYSTEM,
    "humaneval": _CODE_SYSTEM,
}
SYSTEM_PROMPTS["arc_challenge"] = SYSTEM_PROMPTS["arc_easy"]


def question_text(task: str, doc: dict) -> str:
    """The question as the user sees it; also what the dispatch classifier reads."""
    if task == CLASSIFY_TASK:
        return doc["question"]
    if task == "gsm8k":
        return doc["question"]
    if task in ("arc_easy", "arc_challenge"):
        options = "".join(f"{letter}. {text}\n"
                          for letter, text in zip(arc_letters(doc), doc["choices"]["text"]))
        return f"{doc['question']}\nOptions:\n{options}"
    if task == "math":
        return doc["problem"]
    if task == "mbpp":
        test = doc["test_list"][0].replace("\r\n", "\n").strip()
        return f"{doc['text'].strip()} Your code should satisfy this assertion:\n```python\n{test}\n```"
    if task == "humaneval":
        return f"Complete the following Python function:\n```python\n{doc['prompt'].strip()}\n```"
    raise KeyError(f"no prompt for task {task!r}")


def build_messages(task: str, doc: dict) -> list[dict]:
    if task == CLASSIFY_TASK:  # pseudo-task: docs {"question", "label"} (see classifier.py)
        return build_classify_messages(doc["question"])
    return [{"role": "system", "content": SYSTEM_PROMPTS[task]},
            {"role": "user", "content": question_text(task, doc)}]


def reference_answer(task: str, doc: dict) -> str:
    """The gold answer in the format the scorer reads: the target for next-token training."""
    if task == "gsm8k":
        steps, final = doc["answer"].rsplit("####", 1)
        steps = re.sub(r"<<[^>]*>>", "", steps).strip()  # drop calculator annotations
        return f"{steps}\nThe answer is {final.strip()}."
    if task in ("arc_easy", "arc_challenge"):
        letter = arc_letters(doc)[doc["choices"]["label"].index(doc["answerKey"])]
        return f"The answer is ({letter})."
    if task == "math":
        return doc["solution"]
    if task == "mbpp":
        return f"```python\n{doc['code'].replace(chr(13) + chr(10), chr(10)).strip()}\n```"
    if task == "humaneval":
        return f"```python\n{doc['prompt']}{doc['canonical_solution'].rstrip()}\n```"
    if task == CLASSIFY_TASK:
        return f"Classification: \\boxed{{{doc['label']}}}"
    raise KeyError(f"no reference answer for task {task!r}")


# ---------------------------------------------------------------- dispatch classification

CATEGORIES = ("code", "math", "reasoning", "other")
# Pseudo-task for training the classification expert z_c with the RL trainer unchanged: docs are
# {"question": str, "label": category}; the prompt is the classification prompt, the reward
# whether parse_category(answer) == label (scoring.score_classify). Not a benchmark.
CLASSIFY_TASK = "classify"
CLASSIFY_SYSTEM_PROMPT = """Classify the user's question into exactly one of four categories:
- code: asks for a program, function or algorithm, or about programming languages, syntax or data structures.
- math: asks for a calculation or a mathematical result: arithmetic, word problems, algebra, geometry, probability, statistics.
- reasoning: asks for logical thinking, scientific knowledge or critical judgement, such as choosing the correct statement among options.
- other: fits none of the above.
If the question spans several categories, choose the dominant one. Do not answer the question itself.
Reply with your classification in \\boxed{}, for example: Classification: \\boxed{reasoning}"""


def build_classify_messages(question_text: str) -> list[dict]:
    return [{"role": "system", "content": CLASSIFY_SYSTEM_PROMPT},
            {"role": "user", "content": question_text}]


def parse_category(text: str) -> Optional[str]:
    """The category in the last \\boxed{}, or None when missing or not one of CATEGORIES."""
    boxed = extract_boxed(text)
    if boxed is None:
        return None
    label = re.sub(r"\\text(?:bf|tt)?\{([^}]*)\}", r"\1", boxed).strip(" '\"`*.").lower()
    return label if label in CATEGORIES else None
