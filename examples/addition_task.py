"""A task of your own in one file: two-digit addition on generated data.

Register it by naming this file in params.yaml (`task_modules: [examples/addition_task.py]`)
and use `addition` like any built-in task (data.tasks, rl.tasks, eval.tasks with
eval.style: paper, cem.tasks, ...). Nothing else in the library changes.
"""
import random
import re

from transformer2.tasks import Source, Task, even_odd, register


def make_docs(split: str) -> list[dict]:
    """Seeded questions, different per split; the official splits are train and test."""
    rng = random.Random(f"addition-{split}")
    docs = []
    for i in range(200 if split == "train" else 100):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        docs.append({"id": f"{split}-{i}", "question": f"What is {a} + {b}?", "answer": str(a + b)})
    return docs


def score(doc: dict, completion: str) -> bool:
    """The last integer of the completion is the sum."""
    numbers = re.findall(r"-?\d+", completion)
    return bool(numbers) and numbers[-1] == doc["answer"]


ADDITION = register(Task(
    name="addition", title="Addition", category="math",
    system_prompt="Add the two numbers. End with \"The answer is N.\"",
    question=lambda doc: doc["question"],
    reference_answer=lambda doc: f"The answer is {doc['answer']}.",
    score=score,
    source=Source(("train", "test"), generate=make_docs), make_splits=even_odd, max_new_tokens=16,
))
