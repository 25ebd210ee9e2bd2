import json
from pathlib import Path

import pytest

from transformer2.tasks import (CATEGORIES, benchmark_names, build_classify_messages, build_messages, get_task,
                               parse_category, question_text, reference_answer, score_batch)
from transformer2.tasks.classify import CLASSIFY_SYSTEM_PROMPT

TASKS = ("gsm8k", "arc_easy", "arc_challenge", "math", "mbpp", "humaneval")
SYSTEM_PROMPTS = {t: get_task(t).system_prompt for t in benchmark_names()}


def load(mirror: Path, task: str, n: int) -> list[dict]:
    path = mirror / task / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} missing from the data mirror")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


ARC_NUMERIC = {"id": "x", "question": "Which is a liquid?",
               "choices": {"text": ["rock", "water", "ice"], "label": ["1", "2", "3"]}, "answerKey": "2"}


def test_every_task_has_a_system_prompt_with_its_answer_format():
    assert set(SYSTEM_PROMPTS) == set(TASKS)
    assert "The answer is" in SYSTEM_PROMPTS["gsm8k"]
    assert "the answer is (X)" in SYSTEM_PROMPTS["arc_easy"] == SYSTEM_PROMPTS["arc_challenge"]
    assert "\\boxed{}" in SYSTEM_PROMPTS["math"]
    assert "```python" in SYSTEM_PROMPTS["mbpp"] and "```python" in SYSTEM_PROMPTS["humaneval"]


@pytest.mark.parametrize("task", TASKS)
def test_build_messages_on_real_docs(mirror, task):
    for doc in load(mirror, task, 3):
        messages = build_messages(task, doc)
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[0]["content"] == SYSTEM_PROMPTS[task]
        assert messages[1]["content"] == question_text(task, doc) and messages[1]["content"].strip()


def test_arc_options_are_lettered():
    text = question_text("arc_easy", ARC_NUMERIC)
    assert text == "Which is a liquid?\nOptions:\nA. rock\nB. water\nC. ice\n"
    assert reference_answer("arc_easy", ARC_NUMERIC) == "The answer is (B)."
    assert get_task("arc_easy").score(ARC_NUMERIC, reference_answer("arc_easy", ARC_NUMERIC))


def test_code_prompts_show_what_the_tests_need(mirror):
    mbpp = load(mirror, "mbpp", 1)[0]
    text = question_text("mbpp", mbpp)
    assert mbpp["text"].strip() in text and mbpp["test_list"][0].strip() in text and "\r" not in text
    he = load(mirror, "humaneval", 1)[0]
    assert he["prompt"].strip() in question_text("humaneval", he)


def test_gsm8k_reference_drops_calculator_annotations():
    doc = {"question": "?", "answer": "9 * 2 = $<<9*2=18>>18 a day.\n#### 18"}
    assert reference_answer("gsm8k", doc) == "9 * 2 = $18 a day.\nThe answer is 18."


@pytest.mark.parametrize("task", ("gsm8k", "arc_easy", "arc_challenge", "math"))
def test_reference_answers_score_true(mirror, task):
    docs = load(mirror, task, 30)
    assert all(get_task(task).score(d, reference_answer(task, d)) for d in docs)


@pytest.mark.parametrize("task", ("mbpp", "humaneval"))
def test_code_reference_answers_pass_in_sandbox(mirror, task):
    docs = load(mirror, task, 8)
    answers = [reference_answer(task, d) for d in docs]
    assert all(a.startswith("```python\n") and a.endswith("\n```") for a in answers)
    assert score_batch(task, docs, answers) == [True] * len(docs)


def test_unknown_task_raises():
    with pytest.raises(KeyError):
        build_messages("nope", {})
    with pytest.raises(KeyError):
        reference_answer("nope", {})


def test_classify_messages():
    messages = build_classify_messages("What is 2 + 2?")
    assert messages == [{"role": "system", "content": CLASSIFY_SYSTEM_PROMPT},
                        {"role": "user", "content": "What is 2 + 2?"}]
    assert all(c in CLASSIFY_SYSTEM_PROMPT for c in CATEGORIES) and "\\boxed{" in CLASSIFY_SYSTEM_PROMPT


@pytest.mark.parametrize("text, expected", [
    ("Classification: \\boxed{math}", "math"),
    ("\\boxed{Code}", "code"),
    ("Classification: \\boxed{\\text{reasoning}}", "reasoning"),
    ("\\boxed{'other'}", "other"),
    ("first \\boxed{math}, no wait: \\boxed{code}", "code"),
    ("\\boxed{science}", None),
    ("It is a math question.", None),
])
def test_parse_category(text, expected):
    assert parse_category(text) == expected
