"""Next-token prediction (supervised fine-tuning): prompt → reference answer, loss on the answer only.

    loss = −(1/N) Σ_i Σ_t log π(a_it | x_i, a_i<t),   N = answer tokens in the whole batch

where x_i is the chat prompt the model sees at evaluation (`generation.chat_prompts`) and a_i
is the task's `reference_answer` (the gold answer in the format the scorer reads) followed by
the stop token rollouts end at. Prompt tokens carry no loss. This is the paper's LoRA
baseline objective and its "SVF + next-token" ablation (Table 4): the objective is written
against `Adapter`, so the same function trains an SVF expert or a LoRA adapter.

A batch is laid out exactly like an RL rollout (left-padded prompt, then the answer,
right-padded), so the log-probs come from the same `rl.completion_logits` / `rl.token_logprobs`
as the REINFORCE objective: the two objectives differ only in where the answer comes from
(the dataset vs the model) and how each answer's log-prob is weighted.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from .adapters import Adapter
from .generation import Rollout, chat_prompts
from .tasks import reference_answer
from .rl import completion_logits, token_logprobs
from .settings import NextTokenConfig


def stop_token_id(tokenizer, model=None) -> int:
    """The token an answer ends with: the tokenizer's EOS, which every rollout stops at."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none")
    return int(eos)


def teacher_forced_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str], *, eos_id: int,
                         max_answer_tokens: Optional[int] = None, device="cpu") -> Rollout:
    """Prompts and reference answers as a `Rollout`: answer tokens are the completion.

    Prompt and answer are tokenised separately, so the prompt tokens are exactly those the
    model sees when it generates at evaluation (no merge across the boundary).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    a_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos_id] for a in answers]
    if max_answer_tokens is not None:
        a_ids = [a[:max_answer_tokens] for a in a_ids]
    P, C = max(map(len, p_ids)), max(map(len, a_ids))
    ids, attn, comp = [], [], []
    for p, a in zip(p_ids, a_ids):
        lp, rp = P - len(p), C - len(a)
        ids.append([pad] * lp + p + a + [pad] * rp)
        attn.append([0] * lp + [1] * (len(p) + len(a)) + [0] * rp)
        comp.append([0] * P + [1] * len(a) + [0] * rp)
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)
    return Rollout(as_tensor(ids), as_tensor(attn), as_tensor(comp), list(answers), P)


@contextmanager
def adapter_dropout(model) -> Iterator[None]:
    """Train mode for the adapter's own dropout (PEFT LoRA's `lora_dropout`), nothing else.

    The rest of the model stays in eval mode, as in the RL objective: the base model's own
    dropout (0 in Llama/Qwen2/Mistral/Gemma-3 configs) stays off, so SVF and LoRA see the
    same base network. SVF has no dropout, so for an SVF model this is a no-op.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()
    dropouts = [m.lora_dropout for m in model.modules() if isinstance(m, LoraLayer)]
    before = [d.training for d in dropouts]
    for d in dropouts:
        d.train()
    try:
        yield
    finally:
        for d, mode in zip(dropouts, before):
            d.train(mode)


def answer_nll(model, batch: Rollout) -> tuple[torch.Tensor, int]:
    """(Σ over answer tokens of −log π, number of answer tokens); differentiable."""
    logp, mask = token_logprobs(completion_logits(model, batch), batch)
    return -(logp * mask).sum(), int(mask.sum())


def next_token_objective(model, tokenizer, adapter: Adapter, task: str, cfg: NextTokenConfig):
    """The next-token objective for `training.fit`: mean cross-entropy on answer tokens, backward.

    Micro-batches are normalised by the whole batch's answer-token count, so the accumulated
    gradient is that of the batch's token-mean loss whatever the micro-batch size.
    """
    eos_id = stop_token_id(tokenizer, model)
    device = next(model.parameters()).device

    def objective(docs: Sequence[dict]) -> dict:
        t0 = time.perf_counter()
        prompts = chat_prompts(tokenizer, task, docs)
        answers = [reference_answer(task, d) for d in docs]
        chunks = [teacher_forced_batch(tokenizer, prompts[i:i + cfg.micro_batch_size],
                                       answers[i:i + cfg.micro_batch_size], eos_id=eos_id,
                                       max_answer_tokens=cfg.max_answer_tokens, device=device)
                  for i in range(0, len(docs), cfg.micro_batch_size)]
        total = sum(c.completion_tokens for c in chunks)
        nll, t_fwd, t_bwd = 0.0, 0.0, 0.0
        for chunk in chunks:
            t1 = time.perf_counter()
            with adapter_dropout(model):
                loss_sum, _ = answer_nll(model, chunk)
            t2 = time.perf_counter()
            (loss_sum / total).backward()
            t3 = time.perf_counter()
            nll += float(loss_sum.detach())
            t_fwd, t_bwd = t_fwd + t2 - t1, t_bwd + t3 - t2
        seconds = time.perf_counter() - t0
        prompt_tokens = sum(int(c.attention_mask[:, :c.prompt_length].sum()) for c in chunks)
        return {"loss": nll / max(total, 1), "tokens": total, "prompt_tokens": prompt_tokens,
                "tokens_per_s": total / max(seconds, 1e-9), "seconds": round(seconds, 4),
                "seconds_forward": round(t_fwd, 4), "seconds_backward": round(t_bwd, 4)}

    return objective


def train_next_token(model, tokenizer, adapter: Adapter, task: str, train_docs: Sequence[dict],
                     val_docs: Sequence[dict], loop, cfg: NextTokenConfig, run_dir, *, resume: bool = False,
                     max_new_tokens: int = 256, eval_batch_size: int = 8, run_id: str = "", progress=None):
    """Train `adapter` (SVF or LoRA) with next-token prediction on `task`; returns (TrainResult, adapter).

    Validation is greedy accuracy with the task's scorer (`generation.accuracy`), the same as
    for RL experts; `max_new_tokens` bounds those validation answers. The result's best_state
    is the adapter state with the highest validation accuracy.
    """
    from .generation import accuracy
    from .training import fit

    objective = next_token_objective(model, tokenizer, adapter, task, cfg)

    def validate() -> float:
        return accuracy(model, tokenizer, task, val_docs, max_new_tokens=max_new_tokens,
                        batch_size=eval_batch_size)[0]

    result = fit(adapter, objective, validate, train_docs, loop, run_dir, resume=resume, inputs=val_docs,
                 run_id=f"{adapter.kind}-next_token|{task}|{cfg}|{max_new_tokens}|{run_id}", progress=progress,
                 val_n=len(val_docs))
    return result, adapter
