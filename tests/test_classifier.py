"""Classification expert: leak-free balanced data, the "classify" pseudo-task, RL training, confusion."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from transformer2.stats import wilson_interval
from transformer2.classifier import (ClassifierDataError, classifier_docs, dispatch_confusion, dispatch_metrics,
                                     evaluate_dispatch, plot_confusion, train_classifier_expert)
from transformer2.tasks import (CATEGORIES, CLASSIFY_TASK, build_classify_messages, build_messages, reference_answer,
                               score_batch)



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
    assert metrics["ci95"] == pytest.approx(list(wilson_interval(4, 6))) and metrics["n"] == 6
    path = plot_confusion(m, tmp_path / "plots" / "dispatch.png", title="prompt/loglik")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_classifier_expert_runs_the_rl_trainer_on_classify(data_root, tmp_path):
    from transformer2.models import build_tiny_random, fingerprint
    from transformer2.rl import RLObjectiveConfig
    from transformer2.svd import decompose, load_factors
    from transformer2.svf import SVFConfig, apply_svf, find_targets, init_expert
    from transformer2.training import LoopConfig

    model, tokenizer = build_tiny_random("llama")
    tokenizer.padding_side = "left"
    fp = fingerprint(model)
    names = find_targets(model, "mlp")
    decompose(model, names, tmp_path / "svd", fp)
    apply_svf(model, load_factors(tmp_path / "svd", fp), SVFConfig())
    train = classifier_docs(data_root, "train", per_class=2)
    val = classifier_docs(data_root, "validation", per_class=1)
    expert, result, start = train_classifier_expert(
        model, tokenizer, fp, SVFConfig(), train, val, LoopConfig(steps=1, batch_size=2, eval_every=1),
        RLObjectiveConfig(max_new_tokens=3), tmp_path / "run", eval_batch_size=3, init_seed=5)
    assert expert.provenance["task"] == CLASSIFY_TASK and expert.provenance["sources"] == ["arc_easy", "gsm8k", "mbpp"]
    assert set(expert.vectors) == set(names) and result.best_step == 1
    # `start` is z_c's seeded reference init, untouched by training (the stage measures movement from it)
    fresh = init_expert(model, fp, SVFConfig(), torch.Generator().manual_seed(5))
    assert set(start.vectors) == set(names) and all(torch.equal(start.vectors[n], fresh.vectors[n]) for n in names)
    assert any(not torch.equal(start.vectors[n], result.best_state[n]) for n in names)
    out = evaluate_dispatch(model, tokenizer, val, mode="loglik", classifier=expert)
    assert len(out["pred"]) == 3 and np.array(out["confusion"]).sum() == 3 and out["metrics"]["classifier"]


def _patched_tiny(tmp_path):
    from transformer2.models import build_tiny_random, fingerprint
    from transformer2.svd import decompose, load_factors
    from transformer2.svf import SVFConfig, apply_svf, find_targets

    model, tokenizer = build_tiny_random("llama")
    fp = fingerprint(model)
    decompose(model, find_targets(model, "mlp"), tmp_path / "svd", fp)
    apply_svf(model, load_factors(tmp_path / "svd", fp), SVFConfig())
    return model, tokenizer, fp


def test_label_logprobs_match_the_loglik_first_pass(tmp_path):
    from transformer2.dispatch import LABEL_CONTINUATIONS, classification_prompts, label_logprobs
    from transformer2.loglik import continuation_logprobs

    model, tokenizer, _ = _patched_tiny(tmp_path)
    questions = ["What is 2 + 2?", "Write a function that sorts a list of numbers in Python.", "Hi"]
    scores, mask, _ = label_logprobs(model, tokenizer, questions)
    want = continuation_logprobs(model, tokenizer, classification_prompts(tokenizer, questions),
                                 list(LABEL_CONTINUATIONS)).logprob
    assert scores.shape == (3, len(CATEGORIES))
    assert scores.detach().tolist() == [pytest.approx(row, abs=1e-4) for row in want]


@pytest.mark.parametrize("right", [True, False])
def test_loglik_objective_raises_a_rewarded_label_and_lowers_a_punished_one(tmp_path, right):
    from transformer2.adapters import SVFAdapter
    from transformer2.classifier import loglik_objective
    from transformer2.dispatch import label_logprobs
    from transformer2.svf import SVFConfig, init_expert

    model, tokenizer, fp = _patched_tiny(tmp_path)
    adapter = SVFAdapter(model, init_expert(model, fp, SVFConfig(), torch.Generator().manual_seed(0)))
    questions = ["What is 2 + 2?", "Name a mammal."]
    with torch.no_grad():
        before = label_logprobs(model, tokenizer, questions)[0]
    chosen = before.argmax(1)
    labels = [CATEGORIES[int(c)] if right else CATEGORIES[(int(c) + 1) % len(CATEGORIES)] for c in chosen]
    metrics = loglik_objective(model, tokenizer, adapter)([{"question": q, "label": lab}
                                                           for q, lab in zip(questions, labels)])
    assert metrics["reward"] == (1.0 if right else -1.0)
    assert metrics["seconds_logprob"] > 0 and metrics["seconds_backward"] > 0  # the RL steps' phases, for the curves
    with torch.no_grad():
        for z in adapter.trainable():
            z -= 0.05 * z.grad  # one plain gradient step on the loss
        after = label_logprobs(model, tokenizer, questions)[0]
    moved = after.gather(1, chosen[:, None]) - before.gather(1, chosen[:, None])
    assert bool((moved > 0).all()) if right else bool((moved < 0).all())


def test_loglik_training_validates_by_loglik_dispatch_accuracy(data_root, tmp_path):
    from transformer2.errors import UserError
    from transformer2.rl import RLObjectiveConfig
    from transformer2.svf import SVFConfig
    from transformer2.training import LoopConfig

    model, tokenizer, fp = _patched_tiny(tmp_path)
    train = classifier_docs(data_root, "train", per_class=2)
    val = classifier_docs(data_root, "validation", per_class=2)
    expert, result, _ = train_classifier_expert(
        model, tokenizer, fp, SVFConfig(), train, val, LoopConfig(steps=2, batch_size=3, eval_every=1, lr=0.05),
        RLObjectiveConfig(kl_coef=0.1, micro_batch_size=2), tmp_path / "run", eval_batch_size=4, mode="loglik")
    assert expert.provenance["train_mode"] == "loglik" and len(result.history) == 2
    assert all(-1 <= h["reward"] <= 1 and h["kl"] >= 0 for h in result.history) and result.history[-1]["kl"] > 0
    base = evaluate_dispatch(model, tokenizer, val, mode="loglik")["metrics"]["accuracy"]
    best = evaluate_dispatch(model, tokenizer, val, mode="loglik", classifier=expert)["metrics"]["accuracy"]
    assert result.base_val_accuracy == pytest.approx(base) and result.best_val_accuracy == pytest.approx(best)
    with pytest.raises(UserError, match="train_mode"):
        train_classifier_expert(model, tokenizer, fp, SVFConfig(), train, val, LoopConfig(steps=1),
                                RLObjectiveConfig(), tmp_path / "run2", mode="vote")


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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_shared_instructions_run_once_with_the_same_scores_and_gradients(tmp_path, arch):
    """The prompts' common prefix (the classification instructions) runs once for every prompt in the
    differentiable label scoring: the same log-probs and z-gradients, to float rounding, as running
    each prompt whole, on every architecture's cache. Within a sliding window (gemma3's tiny one is
    64 tokens) the prefix is shared only while the whole row fits in it: the suffixes' padding then
    sits after the prefix, where the window would count it."""
    from transformer2.adapters import SVFAdapter
    from transformer2.dispatch import LABEL_CONTINUATIONS, classification_prompts
    from transformer2.loglik import continuation_logprobs_grad
    from transformer2.models import build_tiny_random, fingerprint
    from transformer2.svd import decompose, load_factors
    from transformer2.svf import SVFConfig, apply_svf, find_targets, init_expert

    model, tokenizer = build_tiny_random(arch)
    fp = fingerprint(model)
    decompose(model, find_targets(model, "mlp"), tmp_path, fp)
    apply_svf(model, load_factors(tmp_path, fp), SVFConfig())
    adapter = SVFAdapter(model, init_expert(model, fp, SVFConfig(), torch.Generator().manual_seed(0)))
    questions = ["What is 2 + 2?", "Write a function that sorts a list.", "Hi", "Which gas do plants take in?"]
    calls = []
    model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)

    def scores_and_grads(prompts, **kw):
        for z in adapter.trainable():
            z.grad = None
        calls.clear()
        scores, _, _ = continuation_logprobs_grad(model, tokenizer, prompts, LABEL_CONTINUATIONS, **kw)
        scores.sum().backward()
        return scores.detach(), torch.cat([z.grad.flatten() for z in adapter.trainable()]), list(calls)

    long_prompts = classification_prompts(tokenizer, questions)  # ~200 tokens, most of them shared
    short_prompts = ["Which category is this? " + q for q in ("2 + 2?", "Sort a list.", "Hi", "Plants?")]  # < 64
    for prompts in (long_prompts, short_prompts):
        shared, shared_grad, shared_calls = scores_and_grads(prompts)
        whole, whole_grad, whole_calls = scores_and_grads(prompts, min_shared_tokens=10**9)
        if arch == "gemma3" and prompts is long_prompts:
            assert shared_calls == whole_calls  # longer than its window: each prompt runs whole
            continue
        assert shared_calls[0][0] == 1 and len(shared_calls) == len(whole_calls) + 1  # the prefix: one row, once
        assert shared_calls[1][1] < whole_calls[0][1] - 8  # the prompts' pass no longer carries it
        assert torch.allclose(shared, whole, atol=1e-4, rtol=0)
        assert torch.allclose(shared_grad, whole_grad, atol=1e-6, rtol=1e-3)
