"""One scorer per benchmark: did the completion really answer the doc?

Scores are rewards for RL as well as test accuracy, so a scorer never guesses: an answer it
cannot parse is wrong. Docs keep their Hugging Face columns (see benchmarks.py). Answer
formats match what prompts.py asks for: GSM8K a final number ("The answer is N."), ARC
"the answer is (X)" with options lettered A, B, C... whatever the doc's own labels, MATH a
\\boxed{} answer compared symbolically with math_verify, code a ```python block run against
the benchmark's tests in the sandbox.
"""
from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Callable, Optional, Sequence

from .sandbox import SandboxLimits, run_many, run_python

# ---------------------------------------------------------------- GSM8K: a final number

_NUM = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])\.\d+")
_ANSWER_IS = re.compile(r"answer\s+is|####|(?:^|\n)[\s*#]*(?:final\s+)?answer\**\s*:", re.IGNORECASE)


def _number(text: str) -> Optional[Fraction]:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def extract_gsm8k_answer(text: str) -> Optional[str]:
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


def score_gsm8k(doc: dict, completion: str) -> bool:
    gold = _number(doc["answer"].split("####")[-1].strip())
    pred = extract_gsm8k_answer(completion)
    return gold is not None and pred is not None and _number(pred) == gold


# ------------------------------------------------------------ ARC: "the answer is (X)"

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


def score_arc(doc: dict, completion: str) -> bool:
    letters = arc_letters(doc)
    gold = letters[doc["choices"]["label"].index(doc["answerKey"])]
    return extract_choice(completion, letters) == gold


# ---------------------------------------------------------------- MATH: \boxed{} + math_verify

def extract_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces kept), or of `\\boxed 5`."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
        elif m.group(0).endswith(" "):
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                return word.group(0).rstrip(".")
    return None


def _strip_math(s: str) -> str:
    s = re.sub(r"\\(?:left|right|!|,|;|:|\s)|\s|\$|\\text\{\s*\}", "", s)
    return s.replace("dfrac", "frac").replace("tfrac", "frac").rstrip(".")


def score_math(doc: dict, completion: str) -> bool:
    gold, pred = extract_boxed(doc["solution"]), extract_boxed(completion)
    if not gold or not pred:
        return False
    if _strip_math(gold) == _strip_math(pred):
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


# ---------------------------------------------------------------- code: run the tests

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str, entry_point: Optional[str] = None) -> str:
    """Python from ```python fences: the last block defining `entry_point` if any, else all
    Python blocks joined; the raw text (indentation kept) when there is no fence."""
    blocks = [code for lang, code in _FENCE.findall(completion)
              if lang.lower() in ("", "python", "py", "python3")]
    if not blocks:
        return completion
    if entry_point:
        defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        if defining:
            return defining[-1]
    return "\n\n".join(blocks)


def mbpp_entry_point(doc: dict) -> Optional[str]:
    m = re.match(r"\s*assert\s*\(?\s*(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", doc["test_list"][0])
    return m.group(1) if m else None


def code_program_mbpp(doc: dict, completion: str) -> str:
    solution = extract_code(completion, mbpp_entry_point(doc))
    tests = "\n".join(doc["test_list"])
    return "\n\n".join((solution, doc.get("test_setup_code") or "", tests)).replace("\r\n", "\n") + "\n"


_BODY_STOPS = re.compile(r"\n(?:def |class |if |print\(|#)")


def code_program_humaneval(doc: dict, completion: str) -> str:
    """The prompt (imports, helpers, stub), then the model's code: a full function redefines
    the stub; otherwise the completion is the stub's body, cut at the usual stop sequences."""
    entry = doc["entry_point"]
    code = extract_code(completion, entry)
    if not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        code = _BODY_STOPS.split(code, maxsplit=1)[0]
        return f"{doc['prompt']}{code}\n\n{doc['test']}\n\ncheck({entry})\n"
    return f"{doc['prompt']}\n{code}\n\n{doc['test']}\n\ncheck({entry})\n"


def score_mbpp(doc: dict, completion: str, limits: Optional[SandboxLimits] = None) -> bool:
    return run_python(code_program_mbpp(doc, completion), limits or SandboxLimits()).passed


def score_humaneval(doc: dict, completion: str, limits: Optional[SandboxLimits] = None) -> bool:
    return run_python(code_program_humaneval(doc, completion), limits or SandboxLimits()).passed


def score_classify(doc: dict, completion: str) -> bool:
    """Pseudo-task "classify" (the dispatch classifier's RL reward): the \\boxed{} label is the doc's."""
    from .prompts import parse_category  # prompts imports this module

    return parse_category(completion) == doc["label"]


SCORERS: dict[str, Callable[[dict, str], bool]] = {
    "gsm8k": score_gsm8k,
    "arc_easy": score_arc,
    "arc_challenge": score_arc,
    "math": score_math,
    "mbpp": score_mbpp,
    "humaneval": score_humaneval,
}
_PROGRAMS = {"mbpp": code_program_mbpp, "humaneval": code_program_humaneval}
# Scorers of pseudo-tasks (not benchmarks, so not in SCORERS): score_batch serves them too.
PSEUDO_SCORERS: dict[str, Callable[[dict, str], bool]] = {"classify": score_classify}


def score_batch(task: str, docs: Sequence[dict], completions: Sequence[str], workers: int = 2,
                limits: Optional[SandboxLimits] = None) -> list[bool]:
    """Scores in input order; code tasks run `workers` sandboxes at a time."""
    if len(docs) != len(completions):
        raise ValueError(f"{len(docs)} docs but {len(completions)} completions")
    if task in _PROGRAMS:
        programs = [_PROGRAMS[task](d, c) for d, c in zip(docs, completions)]
        return [r.passed for r in run_many(programs, limits or SandboxLimits(), workers=workers)]
    scorer = SCORERS[task] if task in SCORERS else PSEUDO_SCORERS[task]
    return [scorer(d, c) for d, c in zip(docs, completions)]
