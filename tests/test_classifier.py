"""Classification expert: leak-free balanced data, the "classify" pseudo-task, RL training, confusion."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from transformer2.classifier import (ClassifierDataError, classifier_docs, dispatch_confusion, dispatch_metrics,
                                     evaluate_dispatch, plot_confusion, train_classifier_expert)
from transformer2.prompts import CATEGORIES, CLASSIFY_TASK, build_classify_messages, build_messages, reference_answer
from transformer2.scoring import score_batch



def _doc(task, split, i):
    tag = f"{task}-{split}-{i}"
    if task == "gsm8k":
        return {"question": f"Q {tag}: 2+{i}?", "answer": f"#### {2 + i}"}
    if task == "mbpp":
        return {"text": f"Write f {tag}.", "test_list": [f"assert f({i}) == {i}"], "code": "def f(x): return x"}
    return {"id": tag, "question": f"Q {tag}?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    sizes = {"train": 12, "validation": 6, "test": 9}
    for task in ("gsm8k", "mbpp", "arc_easy", "arc_challenge"):
        for split, n in sizes.items():
            n = n + (5 if task == "gsm8k" else 0)  # unequal pools: balance must not follow pool sizes
            path = root / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(_doc(task, split, i)) + "\n" for i in range(n)))
    return root


def test_classifier_data_uses_only_training_splits_and_is_balanced(data_root):
    train = classifier_docs(data_root, "train", seed=0)
    assert Counter(d["label"] for d in train) == {"math": 12, "code": 12, "reasoning": 12}  # capped by the smallest
    assert {d["source"] for d in train} == {"gsm8k", "mbpp", "arc_easy"}
    assert all("-train-" in d["question"] for d in train)  # never validation/test, never arc_challenge
    assert not any("arc_challenge" in d["question"] for d in train)
    val = classifier_docs(data_root, "validation", per_class=4, seed=0)
    assert Counter(d["label"] for d in val) == {"math": 4, "code": 4, "reasoning": 4}
    assert all("-validation-" in d["question"] for d in val)
    assert classifier_docs(data_root, "validation", per_class=4, seed=0) == val  # seeded
    assert classifier_docs(data_root, "validation", per_class=4, seed=1) != val
    with pytest.raises(ClassifierDataError, match="splits"):
        classifier_docs(data_root, "test")
    with pytest.raises(ClassifierDataError, match="expert tasks"):
        classifier_docs(data_root, "train", sources=("gsm8k", "arc_challenge"))


def test_classify_pseudo_task_prompt_and_reward():
    doc = {"question": "What is 2+2?", "label": "math"}
    assert build_messages(CLASSIFY_TASK, doc) == build_classify_messages("What is 2+2?")
    assert score_batch(CLASSIFY_TASK, [doc] * 3, ["Classification: \\boxed{math}", "\\boxed{code}", "math"]) == [
        True, False, False]
    assert score_batch(CLASSIFY_TASK, [doc], [reference_answer(CLASSIFY_TASK, doc)]) == [True]


def test_confusion_matrix_metrics_and_png(tmp_path):
    true = ["math", "math", "code", "reasoning", "reasoning", "other"]
    pred = ["math", "code", "code", "reasoning", None, "other"]
    m = dispatch_confusion(pred, true)
    assert m.shape == (4, 4) and m.sum() == 6 and np.trace(m) == 4
    pos = {c: i for i, c in enumerate(CATEGORIES)}
    assert m[pos["math"], pos["code"]] == 1 and m[pos["reasoning"], pos["other"]] == 1  # None counts as other
    metrics = dispatch_metrics(m)
    assert metrics["accuracy"] == pytest.approx(4 / 6) and metrics["recall_math"] == 0.5
    path = plot_confusion(m, tmp_path / "plots" / "dispatch.png", title="prompt/loglik")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_classifier_expert_runs_the_rl_trainer_on_classify(data_root, tmp_path):
    from transformer2.models import build_tiny_random, fingerprint
    from transformer2.rl import RLObjectiveConfig
    from transformer2.svd import decompose, load_factors
    from transformer2.svf import SVFConfig, apply_svf, find_targets
    from transformer2.training import LoopConfig

    model, tokenizer = build_tiny_random("llama")
    tokenizer.padding_side = "left"
    fp = fingerprint(model)
    names = find_targets(model, "mlp")
    decompose(model, names, tmp_path / "svd", fp)
    apply_svf(model, load_factors(tmp_path / "svd", fp), SVFConfig())
    train = classifier_docs(data_root, "train", per_class=2)
    val = classifier_docs(data_root, "validation", per_class=1)
    expert, result = train_classifier_expert(
        model, tokenizer, fp, SVFConfig(), train, val, LoopConfig(steps=1, batch_size=2, eval_every=1),
        RLObjectiveConfig(max_new_tokens=3), tmp_path / "run", eval_batch_size=3)
    assert expert.provenance["task"] == CLASSIFY_TASK and expert.provenance["sources"] == ["arc_easy", "gsm8k", "mbpp"]
    assert set(expert.vectors) == set(names) and result.best_step == 1
    out = evaluate_dispatch(model, tokenizer, val, mode="loglik", classifier=expert)
    assert len(out["pred"]) == 3 and np.array(out["confusion"]).sum() == 3 and out["metrics"]["classifier"]


def test_heldout_docs_come_from_test_splits_with_categories(data_root):
    from transformer2.classifier import heldout_docs, per_source_accuracy

    docs = heldout_docs(data_root, ["gsm8k", "arc_challenge"], per_task=4, seed=1)
    assert [d["source"] for d in docs] == ["gsm8k"] * 4 + ["arc_challenge"] * 4
    assert {d["label"] for d in docs} == {"math", "reasoning"}
    assert all("-test-" in d["question"] for d in docs)  # test prompts, never training ones
    assert docs == heldout_docs(data_root, ["gsm8k", "arc_challenge"], per_task=4, seed=1)
    assert len(heldout_docs(data_root, ["mbpp"], per_task=None)) == 9  # whole split
    pred = ["math", "other", "math", "math", "reasoning", None, "math", "reasoning"]
    assert per_source_accuracy(docs, pred) == {"gsm8k": 0.75, "arc_challenge": 0.5}
