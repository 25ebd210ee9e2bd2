import json
from pathlib import Path

import pytest

from transformer2.tasks import benchmark_names, get_task, score_batch
from transformer2.tasks.answers import extract_boxed, extract_code
from transformer2.tasks.arc import extract_choice, score as score_arc
from transformer2.tasks.gsm8k import extract_answer as extract_gsm8k_answer, score as score_gsm8k
from transformer2.tasks.hendrycks_math import score as score_math
from transformer2.tasks.humaneval import checks as humaneval_checks, score as score_humaneval
from transformer2.tasks.mbpp import checks as mbpp_checks, score as score_mbpp


def load(mirror: Path, task: str, split: str = "test", n: int | None = None) -> list[dict]:
    path = mirror / task / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} missing from the data mirror")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n or 10**9))]


# ---------------------------------------------------------------- GSM8K

@pytest.mark.parametrize("text, expected", [
    ("So she makes 9 * 2 = 18 dollars.\nThe answer is 18.", "18"),
    ("#### 72", "72"),
    ("The answer is $1,200.", "1200"),
    ("The total is $18.00", "18"),
    ("The answer is: **42** apples", "42"),
    ("The answer is -5.", "-5"),
    ("Final answer: 7\nCheck: 7 * 2 = 14", "7"),
    ("First 3 + 4 = 7, then 7 * 10 = 70", "70"),
    ("The answer is \\boxed{1,000}", "1000"),
    ("so we get $\\boxed{35}$ in the end, after 2 steps", "35"),
    ("It is 25%.", "25"),
    ("He ran 0.5 miles.", "0.5"),
    ("I do not know.", None),
    ("", None),
])
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_score_gsm8k():
    doc = {"question": "?", "answer": "Some work <<2*3=6>>6\n#### 1,080"}
    assert score_gsm8k(doc, "The answer is 1080.")
    assert score_gsm8k(doc, "... so 1,080 in total.\nThe answer is $1,080.00")
    assert not score_gsm8k(doc, "The answer is 1081.")
    assert not score_gsm8k(doc, "The answer is 540, half of 1080.")
    assert not score_gsm8k(doc, "no idea")


def test_gsm8k_gold_answers_score_true(mirror):
    docs = load(mirror, "gsm8k")
    assert all(score_gsm8k(d, d["answer"]) for d in docs)
    assert not any(score_gsm8k(d, f"The answer is {extract_gsm8k_answer(d['answer'])}1.") for d in docs[:50])


# ---------------------------------------------------------------- ARC

@pytest.mark.parametrize("text, expected", [
    ("Photosynthesis needs light... so the answer is (B).", "B"),
    ("The answer is C.", "C"),
    ("The answer is: **D**", "D"),
    ("the answer is option A", "A"),
    ("First I thought the answer is (A), but no: the answer is (C)", "C"),
    ("Therefore $\\boxed{B}$", "B"),
    ("\\boxed{\\text{D}}", "D"),
    ("Reasoning...\nAnswer: (A)", "A"),
    ("(C)", "C"),
    ("Let me think.\n**B**", "B"),
    ("The answer is (E).", None),  # not an option
    ("The answer is a plant.", None),  # lower-case article, not a label
    ("B. Most ecosystems are found on land", None),  # an option echoed, not a choice
    ("I am not sure which one.", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, ["A", "B", "C", "D"]) == expected


def test_extract_choice_numeric_labels():
    assert extract_choice("the answer is (3)", ["1", "2", "3", "4"]) == "3"
    assert extract_choice("the answer is (5)", ["1", "2", "3", "4"]) is None


def test_score_arc_letters_and_numeric_labels():
    doc = {"id": "x", "question": "?", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
           "answerKey": "C"}
    assert score_arc(doc, "the answer is (C)")
    assert not score_arc(doc, "the answer is (B)")
    assert not score_arc(doc, "C or B, hard to say, maybe both")
    numeric = {**doc, "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    assert score_arc(numeric, "The answer is (B).")  # the prompt shows options as A, B, C
    assert not score_arc(numeric, "The answer is (D).")


def test_arc_real_docs(mirror):
    for task in ("arc_easy", "arc_challenge"):
        for d in load(mirror, task, n=200):
            letter = "ABCDE"[d["choices"]["label"].index(d["answerKey"])]
            wrong = "ABCDE"[(d["choices"]["label"].index(d["answerKey"]) + 1) % len(d["choices"]["label"])]
            assert get_task(task).score(d, f"Thinking...\nthe answer is ({letter})")
            assert not get_task(task).score(d, f"the answer is ({wrong})")


# ---------------------------------------------------------------- MATH

@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\sqrt{x^{2}+1}}", "\\sqrt{x^{2}+1}"),
    ("\\fbox{42}", "42"),
    ("the answer is $\\boxed 5$.", "5"),
    ("\\boxed{\\text{(A)}}", "\\text{(A)}"),
    ("no box here", None),
    ("\\boxed{unbalanced", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("gold, pred, same", [
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "\\dfrac12", True),
    ("\\frac{1}{2}", "1/2", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("5", "6", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("x+1", "x-1", False),
])
def test_math_equivalence(gold, pred, same):
    doc = {"problem": "?", "solution": f"Work. The answer is $\\boxed{{{gold}}}$."}
    assert score_math(doc, f"so the answer is $\\boxed{{{pred}}}$") is same


def test_math_unparseable_or_unboxed_is_wrong():
    doc = {"problem": "?", "solution": "$\\boxed{2}$"}
    assert not score_math(doc, "The answer is 2")  # the format asks for \boxed{}
    assert not score_math(doc, "\\boxed{}")
    assert not score_math(doc, "\\boxed{\\frac{{{}")


def test_math_real_docs(mirror):
    docs = load(mirror, "math", n=20)
    assert all(score_math(d, d["solution"]) for d in docs)
    assert not any(score_math(d, f"\\boxed{{{extract_boxed(d['solution'])}+1}}") for d in docs[:5])


# ---------------------------------------------------------------- code

def test_extract_code():
    assert extract_code("    return x + 1\n") == "    return x + 1\n"  # raw body kept, indentation too
    text = "Here:\n```python\nimport math\n```\nand\n```python\ndef f(x):\n    return x\n```\n```text\noutput\n```"
    assert extract_code(text) == "import math\n\n\ndef f(x):\n    return x\n"
    two = "```python\ndef f(x):\n    return 0\n```\nBetter:\n```python\ndef f(x):\n    return 1\n```\n```python\nprint(f(2))\n```"
    assert extract_code(two, "f") == "def f(x):\n    return 1\n"
    assert extract_code("```python\ndef g():\n    pass\n", "g") == "def g():\n    pass\n"  # unterminated fence


MBPP_DOC = {"task_id": 1, "text": "Add one.", "code": "def add_one(x):\r\n  return x + 1",
            "test_setup_code": "", "test_list": ["assert add_one(1) == 2", "assert add_one(-1) == 0"],
            "challenge_test_list": []}


def test_mbpp_checks_and_score():
    checks = mbpp_checks(MBPP_DOC, "Sure!\n```python\ndef add_one(x):\n    return x + 1\n```\nDone.")
    assert checks["candidate"].strip() == "def add_one(x):\n    return x + 1" and checks["entry_points"] == ["add_one"]
    assert checks["tests"].endswith("assert add_one(1) == 2\nassert add_one(-1) == 0\n")
    assert score_mbpp(MBPP_DOC, "```python\ndef add_one(x):\n    return x + 1\n```")
    assert not score_mbpp(MBPP_DOC, "```python\ndef add_one(x):\n    return x + 2\n```")
    assert not score_mbpp(MBPP_DOC, "```python\nimport sys\ndef add_one(x):\n    return 0\nsys.exit(0)\n```")
    assert not score_mbpp(MBPP_DOC, "I cannot solve this.")


def test_mbpp_canonical_solutions_pass(mirror):
    docs = load(mirror, "mbpp", n=10)
    assert score_batch("mbpp", docs, [d["code"] for d in docs]) == [True] * 10
    wrong = ["```python\ndef %s(*args):\n    return None\n```" % d["test_list"][0].split()[1].split("(")[0]
             for d in docs]
    assert score_batch("mbpp", docs, wrong) == [False] * 10


def test_humaneval_body_and_full_function(mirror):
    docs = load(mirror, "humaneval", n=10)
    bodies = [d["canonical_solution"] for d in docs]
    full = [f"Here you go:\n```python\n{d['prompt']}{d['canonical_solution']}```\nExplanation..." for d in docs]
    assert score_batch("humaneval", docs, bodies) == [True] * 10
    assert score_batch("humaneval", docs, full) == [True] * 10
    d = docs[0]
    assert not score_humaneval(d, "    return None\n")
    assert not score_humaneval(d, f"```python\ndef {d['entry_point']}(*a):\n    import os\n    os._exit(0)\n```")
    checks = humaneval_checks(d, d["canonical_solution"] + "\n\ndef unrelated():\n    pass\n")
    assert "unrelated" not in checks["candidate"] and checks["tests"].rstrip().endswith(f"check({d['entry_point']})")
    assert checks["prelude"] == d["prompt"] and checks["entry_points"] == [d["entry_point"]]
    forged = "```python\nclass Yes:\n    def __eq__(self, other):\n        return True\n" \
             f"def {d['entry_point']}(*a, **k):\n    return Yes()\n```"
    assert not score_humaneval(d, forged)  # an always-equal object is no answer


def test_score_batch_order_and_errors():
    doc = {"question": "?", "answer": "#### 3"}
    assert score_batch("gsm8k", [doc] * 3, ["The answer is 3.", "The answer is 4.", "3"]) == [True, False, True]
    assert score_batch("mbpp", [MBPP_DOC] * 2, ["def add_one(x): return 0", "def add_one(x): return x+1"]) \
        == [False, True]
    with pytest.raises(ValueError):
        score_batch("gsm8k", [doc], [])
    assert set(benchmark_names()) == {"gsm8k", "arc_easy", "arc_challenge", "math", "mbpp", "humaneval"}
