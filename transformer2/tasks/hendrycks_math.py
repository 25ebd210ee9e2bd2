"""MATH (unseen): competition problems in seven subjects, the answer in \\boxed{}, compared
symbolically with math_verify. The hub keeps one config per subject; the mirror one file with
a `type` column; lm-eval evaluates it as the hendrycks_math group of seven subject tasks."""
from __future__ import annotations

import re
import threading

from .answers import extract_boxed
from .base import HarnessMapping, HarnessTask, Source, Subset, Task, register

SUBJECTS = (
    Subset("algebra", "algebra", "Algebra"),
    Subset("counting_and_probability", "counting_and_prob", "Counting & Probability"),
    Subset("geometry", "geometry", "Geometry"),
    Subset("intermediate_algebra", "intermediate_algebra", "Intermediate Algebra"),
    Subset("number_theory", "num_theory", "Number Theory"),
    Subset("prealgebra", "prealgebra", "Prealgebra"),
    Subset("precalculus", "precalc", "Precalculus"),
)
_FUNCTIONS = "transformer2.harness.functions.hendrycks"


def _strip(s: str) -> str:
    s = re.sub(r"\\(?:left|right|!|,|;|:|\s)|\s|\$|\\text\{\s*\}", "", s)
    return s.replace("dfrac", "frac").replace("tfrac", "frac").rstrip(".")


def score(doc: dict, completion: str) -> bool:
    gold, pred = extract_boxed(doc["solution"]), extract_boxed(completion)
    if not gold or not pred:
        return False
    if _strip(gold) == _strip(pred):
        return True
    from math_verify import parse, verify  # heavy (sympy): only when needed

    # math_verify's timeouts use SIGALRM, which only works in the main thread
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"\\boxed{{{gold}}}", parsing_timeout=limit)
        p = parse(f"\\boxed{{{pred}}}", parsing_timeout=limit)
        return bool(g and p and verify(g, p, timeout_seconds=limit))
    except Exception:  # a parser crash on garbage is a wrong answer, not a crash of training
        return False


MATH = register(Task(
    name="math", title="MATH", category="math",
    system_prompt=("Solve the following math problem. Reason step by step, and put the final answer "
                   "within \\boxed{}."),
    question=lambda doc: doc["problem"], reference_answer=lambda doc: doc["solution"], score=score,
    source=Source(("train", "test"), "EleutherAI/hendrycks_math"), max_new_tokens=1024,
    subsets=SUBJECTS, subset_column="type",
    harness=HarnessMapping(
        "hendrycks_math", "exact_match,none",
        {f"hendrycks_math_{s.lm_eval}": HarnessTask(f"hendrycks_math/hendrycks_math_{s.lm_eval}.yaml",
                                                    local_functions={"process_docs": f"{_FUNCTIONS}.process_docs_{s.lm_eval}"})
         for s in SUBJECTS},
        {"hendrycks_math": "hendrycks_math/hendrycks_math.yaml"}),
))
