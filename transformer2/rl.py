"""REINFORCE with a KL penalty, as in the paper (§2 of paper-notes), readable top to bottom.

    loss = −mean_i[ r_i · Σ_t log π_W'(y_it | x_i, y_i<t) ] + λ · KL(π_W' ‖ π_W) on answer tokens

with r ∈ {+1, −1} from the task's scorer and no baseline (the reference's choice). One step:
rollout (frozen adapted weights, KV cache) → score → log-probs with gradients → loss → backward.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from .adapters import Adapter
from .generation import Rollout, chat_prompts, rollout
from .settings import RLObjectiveConfig


def completion_logits(model, ro: Rollout) -> torch.Tensor:
    """Logits that predict each completion token: (B, C, V), computed only where needed."""
    C = ro.input_ids.shape[1] - ro.prompt_length
    out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, logits_to_keep=C + 1)
    return out.logits[:, :-1].float()  # position t predicts token t+1


def token_logprobs(logits: torch.Tensor, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y_t), mask) over the completion positions, both (B, C)."""
    C = logits.shape[1]
    targets = ro.input_ids[:, -C:]
    mask = ro.completion_mask[:, -C:].to(logits.dtype)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, mask


def kl_to_base(logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of the exact per-token KL(adapted ‖ base) over the vocabulary."""
    logp = F.log_softmax(logits, dim=-1)
    kl = (logp.exp() * (logp - F.log_softmax(base_logits, dim=-1))).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def reinforce_objective(model, tokenizer, adapter: Adapter, task: str, cfg: RLObjectiveConfig):
    """The RL objective for `training.fit`: rollout → score → log-probs → loss → backward."""
    from .tasks import score_batch

    def objective(docs: Sequence[dict]) -> dict:
        totals = dict(reward=0.0, kl=0.0, completion_tokens=0, seconds_rollout=0.0, seconds_score=0.0,
                      seconds_logprob=0.0, seconds_backward=0.0)
        prompts = chat_prompts(tokenizer, task, docs)
        n = len(docs)
        for start in range(0, n, cfg.micro_batch_size):
            chunk = slice(start, start + cfg.micro_batch_size)
            t0 = time.perf_counter()
            with adapter.inference():
                ro = rollout(model, tokenizer, prompts[chunk], max_new_tokens=cfg.max_new_tokens,
                             do_sample=cfg.do_sample, temperature=cfg.temperature)
            t1 = time.perf_counter()
            rewards = torch.tensor([1.0 if ok else -1.0 for ok in score_batch(task, list(docs[chunk]), ro.texts)],
                                   device=ro.input_ids.device)
            t2 = time.perf_counter()
            logits = completion_logits(model, ro)
            logp, mask = token_logprobs(logits, ro)
            loss = -((logp * mask).sum(1) * rewards).sum() / n
            kl = torch.zeros(())
            if cfg.kl_coef > 0:
                with torch.no_grad(), adapter.disabled():
                    base_logits = completion_logits(model, ro)
                kl = kl_to_base(logits, base_logits, mask)
                loss = loss + cfg.kl_coef * kl * (len(ro.texts) / n)
            t3 = time.perf_counter()
            loss.backward()
            t4 = time.perf_counter()
            totals["reward"] += float(rewards.sum())
            totals["kl"] += float(kl.detach()) * len(ro.texts)
            totals["completion_tokens"] += ro.completion_tokens
            for key, dt in (("rollout", t1 - t0), ("score", t2 - t1), ("logprob", t3 - t2), ("backward", t4 - t3)):
                totals[f"seconds_{key}"] += dt
        return {"reward": totals["reward"] / n, "accuracy": (totals["reward"] / n + 1) / 2,
                "kl": totals["kl"] / n, "completion_tokens": totals["completion_tokens"],
                "rollout_tokens_per_s": totals["completion_tokens"] / max(totals["seconds_rollout"], 1e-9),
                **{k: round(v, 4) for k, v in totals.items() if k.startswith("seconds_")}}

    return objective


def train_svf_expert(model, tokenizer, expert, task: str, train_docs: Sequence[dict], val_docs: Sequence[dict],
                     loop, objective_cfg: RLObjectiveConfig, run_dir, *, resume: bool = False,
                     eval_batch_size: int = 8, run_id: str = "", progress=None):
    """Train one SVF expert with REINFORCE on `task`; returns (TrainResult, adapter).

    `model` must already be SVF-patched (`apply_svf`) and `expert` its initial vectors. The
    result's best_state is the expert with the highest validation accuracy.
    """
    from .adapters import SVFAdapter
    from .generation import accuracy
    from .training import fit

    adapter = SVFAdapter(model, expert)
    objective = reinforce_objective(model, tokenizer, adapter, task, objective_cfg)

    def validate() -> float:
        return accuracy(model, tokenizer, task, val_docs, max_new_tokens=objective_cfg.max_new_tokens,
                        batch_size=eval_batch_size)[0]

    result = fit(adapter, objective, validate, train_docs, loop, run_dir, resume=resume, inputs=val_docs,
                 run_id=f"svf-rl|{task}|{expert.base_fingerprint}|{objective_cfg}|{run_id}", progress=progress)
    return result, adapter
