"""Batched generation and accuracy, shared by RL rollouts, validation and the LoRA baselines.

Prompts are the model's chat template applied to the task's messages (`tasks`); completions
are scored by `tasks.score_batch`, so training reward and evaluation accuracy are one function.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from .decoding.kernels import MAX_ROWS

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

    def rows(self, start: int, stop: int) -> "Rollout":
        """Rows start:stop, without the columns that are padding in all of them (a chunk of short
        prompts or short answers does not pay for the longest row of the whole rollout)."""
        attn = self.attention_mask[start:stop]
        used = attn.any(0).nonzero().squeeze(1)
        first = min(int(used[0]), self.prompt_length) if len(used) else self.prompt_length
        last = max(int(used[-1]) + 1, self.prompt_length) if len(used) else self.prompt_length
        cols = slice(first, last)
        return Rollout(self.input_ids[start:stop, cols], attn[:, cols], self.completion_mask[start:stop, cols],
                       self.texts[start:stop], self.prompt_length - first)


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
            temperature: float = 1.0, top_p: float = 1.0, row_z=None, row_group=None, max_batch: int = MAX_ROWS,
            progress: Progress = None) -> Rollout:
    """One completion per prompt through the decoding engine (`decoding.generate`), kept as token ids
    for a log-prob pass. `row_z`/`row_group`: one SVF z per row (CEM's population)."""
    from .decoding import generate, pad_batch

    device = next(model.parameters()).device
    ids = [list(p) for p in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    stop = _stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    completions = generate(model, ids, max_new_tokens=max_new_tokens, stop_ids=stop, pad_id=pad, do_sample=do_sample,
                           temperature=temperature, top_p=top_p, row_z=row_z, row_group=row_group,
                           max_batch=max_batch, progress=progress)
    input_ids, attention, completion_mask, prompt_len = (t if isinstance(t, int) else t.to(device)
                                                         for t in pad_batch(ids, completions, pad))
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    return Rollout(input_ids, attention, completion_mask, texts, prompt_len)


def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                   row_z=None, row_group=None, progress: Progress = None) -> list[str]:
    """Greedy completions for many prompts: one engine call, at most `batch_size` rows decoding at once."""
    if not prompts:
        return []
    return rollout(model, tokenizer, prompts, max_new_tokens=max_new_tokens, row_z=row_z, row_group=row_group,
                   max_batch=batch_size, progress=progress).texts


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
