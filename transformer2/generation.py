"""Batched generation and accuracy, shared by RL rollouts, validation and the LoRA baselines.

Prompts are the model's chat template applied to the task's messages (`tasks`); completions
are scored by `tasks.score_batch`, so training reward and evaluation accuracy are one function.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

Progress = Optional[Callable[[int, int], None]]  # (done, total)


@dataclass
class Rollout:
    """One batch of prompts and their completions, as token ids ready for a log-prob pass."""

    input_ids: torch.Tensor       # (B, P + C), left-padded prompt then completion
    attention_mask: torch.Tensor  # (B, P + C)
    completion_mask: torch.Tensor  # (B, P + C): 1 on completion tokens up to and including EOS
    texts: list[str]
    prompt_length: int            # P

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


@contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Batched generation continues from the right edge: pad prompts on the left meanwhile."""
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


def chat_prompts(tokenizer, task: str, docs: Sequence[dict]) -> list[str]:
    from .tasks import build_messages

    return [tokenizer.apply_chat_template(build_messages(task, doc), tokenize=False, add_generation_prompt=True)
            for doc in docs]


def _stop_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def rollout(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
            temperature: float = 1.0, top_p: float = 1.0) -> Rollout:
    """Generate one completion per prompt (KV cache, left padding) and keep the token ids."""
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    stop = _stop_ids(tokenizer, model)
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=stop,
                  pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # explicit, so a checkpoint's generation_config cannot switch sampling on
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    prompt_len = enc["input_ids"].shape[1]
    completion = out[:, prompt_len:]
    # keep tokens up to and including the first stop token; what follows is padding
    is_stop = torch.isin(completion, torch.tensor(stop, device=device))
    after_stop = (is_stop.cumsum(dim=1) - is_stop.long()) > 0
    completion_mask = (~after_stop).long()
    texts = [tokenizer.decode(c[m.bool()], skip_special_tokens=True)
             for c, m in zip(completion, completion_mask)]
    attention = torch.cat([enc["attention_mask"], completion_mask], dim=1)
    full_mask = torch.cat([torch.zeros_like(enc["attention_mask"]), completion_mask], dim=1)
    return Rollout(out, attention, full_mask, texts, prompt_len)


def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                   progress: Progress = None) -> list[str]:
    """Greedy completions for many prompts, batched by length to waste little padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = rollout(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens)
        for i, text in zip(idx, batch.texts):
            texts[i] = text
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return texts


def accuracy(model, tokenizer, task: str, docs: Sequence[dict], *, max_new_tokens: int, batch_size: int = 8,
             progress: Progress = None) -> tuple[float, list[bool], list[str]]:
    """Greedy answers scored by the task's scorer: (accuracy, per-doc correctness, completions)."""
    from .tasks import score_batch

    if not docs:
        raise ValueError(f"{task}: no documents to evaluate")
    texts = generate_texts(model, tokenizer, chat_prompts(tokenizer, task, docs), max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)
    correct = score_batch(task, list(docs), texts)
    return sum(correct) / len(correct), correct, texts
