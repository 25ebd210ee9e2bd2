import pytest
import torch
import torch.nn.functional as F

from transformer2.adapters import LoRAAdapter, SVFAdapter
from transformer2.generation import chat_prompts
from transformer2.lora import attach_lora, lora_config
from transformer2.models import build_tiny_random
from transformer2.tasks import reference_answer
from transformer2.sft import (NextTokenConfig, adapter_dropout, answer_nll, next_token_objective,
                              teacher_forced_batch, train_next_token)
from transformer2.training import LoopConfig

from .test_rl import DOCS, svf_model



def lora_model(dropout=0.05, seed=0):
    model, tokenizer = build_tiny_random("llama", seed=seed)
    return attach_lora(model, lora_config(dropout=dropout)), tokenizer


def make_adapter(kind, tmp_path):
    if kind == "svf":
        model, tokenizer, expert = svf_model(tmp_path)
        return model.eval(), tokenizer, SVFAdapter(model, expert)  # eval mode, as load_model leaves it
    model, tokenizer = lora_model()
    return model, tokenizer, LoRAAdapter(model)


def manual_answer_nll(model, tokenizer, doc) -> tuple[float, int]:
    """One doc, no padding, a full forward, labels −100 on the prompt: the textbook SFT loss."""
    prompt = tokenizer(chat_prompts(tokenizer, "gsm8k", [doc])[0], add_special_tokens=False)["input_ids"]
    answer = tokenizer(reference_answer("gsm8k", doc), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer + [tokenizer.eos_token_id]])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    return float(loss), len(answer) + 1


def test_batch_masks_exactly_the_answer_and_eos():
    model, tokenizer = build_tiny_random("llama")
    docs = DOCS[:3]
    answers = [reference_answer("gsm8k", d) for d in docs]
    batch = teacher_forced_batch(tokenizer, chat_prompts(tokenizer, "gsm8k", docs), answers,
                                 eos_id=tokenizer.eos_token_id)
    assert batch.completion_mask[:, :batch.prompt_length].sum() == 0  # prompt tokens carry no loss
    for ids, mask, answer in zip(batch.input_ids, batch.completion_mask, answers):
        target = ids[mask.bool()].tolist()
        assert target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]) == answer
    assert (batch.attention_mask >= batch.completion_mask).all()
    short = teacher_forced_batch(tokenizer, ["x"], ["abcdef"], eos_id=tokenizer.eos_token_id, max_answer_tokens=3)
    assert short.completion_tokens == 3


def test_answer_only_loss_matches_manual_computation():
    model, tokenizer = build_tiny_random("llama")
    docs = DOCS[:3]  # different prompt and answer lengths: left and right padding both exercised
    expected = [manual_answer_nll(model, tokenizer, d) for d in docs]
    batch = teacher_forced_batch(tokenizer, chat_prompts(tokenizer, "gsm8k", docs),
                                 [reference_answer("gsm8k", d) for d in docs], eos_id=tokenizer.eos_token_id)
    with torch.no_grad():
        total, n = answer_nll(model, batch)
    assert n == sum(k for _, k in expected)
    assert float(total) == pytest.approx(sum(v for v, _ in expected), rel=1e-4)
    # the objective reports the token mean over the whole batch, whatever the micro-batching
    adapter = LoRAAdapter(attach_lora(model, lora_config(dropout=0.0)))  # B = 0: same function as the base
    metrics = next_token_objective(model, tokenizer, adapter, "gsm8k", NextTokenConfig(micro_batch_size=2))(docs)
    assert metrics["tokens"] == n
    assert metrics["loss"] == pytest.approx(sum(v for v, _ in expected) / n, rel=1e-4)


def test_micro_batching_does_not_change_the_gradient(tmp_path):
    model, tokenizer, adapter = make_adapter("svf", tmp_path)
    grads = []
    for mb in (1, 4):
        for z in adapter.trainable():
            z.grad = None
        next_token_objective(model, tokenizer, adapter, "gsm8k", NextTokenConfig(micro_batch_size=mb))(DOCS[:4])
        grads.append(torch.cat([z.grad.flatten() for z in adapter.trainable()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["svf", "lora"])
def test_next_token_steps_reduce_loss_and_train_only_the_adapter(kind, tmp_path):
    model, tokenizer, adapter = make_adapter(kind, tmp_path)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    objective = next_token_objective(model, tokenizer, adapter, "gsm8k", NextTokenConfig(micro_batch_size=2))
    opt = torch.optim.Adam(adapter.trainable(), lr=0.5 if kind == "svf" else 0.01)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        losses.append(objective(DOCS[:4])["loss"])
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not any(m.training for m in model.modules())  # the objective leaves eval mode alone


def test_lora_dropout_is_on_only_inside_the_loss():
    model, tokenizer = lora_model(dropout=0.5)
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and not any(d.training for d in dropouts)
    with adapter_dropout(model):
        assert all(d.training for d in dropouts)
        assert not model.base_model.model.model.layers[0].mlp.training  # the base stays in eval mode
    assert not any(d.training for d in dropouts)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B != 0, so dropout on the LoRA path changes the output
    adapter = LoRAAdapter(model)
    objective = next_token_objective(model, tokenizer, adapter, "gsm8k", NextTokenConfig())
    assert objective(DOCS[:2])["loss"] != objective(DOCS[:2])["loss"]  # stochastic under dropout


def test_svf_next_token_ablation_runs_through_fit(tmp_path):
    model, tokenizer, expert = svf_model(tmp_path / "svd")
    adapter = SVFAdapter(model, expert)
    result, adapter = train_next_token(model, tokenizer, adapter, "gsm8k", DOCS, DOCS[:2],
                                       LoopConfig(steps=2, batch_size=2, eval_every=1, lr=0.05, grad_clip=1.0),
                                       NextTokenConfig(), tmp_path / "run", max_new_tokens=4, eval_batch_size=2)
    assert [v["step"] for v in result.validations] == [0, 1, 2]
    assert all("loss" in h and "tokens" in h for h in result.history)
    assert any(not torch.equal(result.best_state[k], expert.vectors[k]) for k in expert.vectors)
