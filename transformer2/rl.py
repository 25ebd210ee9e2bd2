"""REINFORCE with a KL penalty, as in the paper (§2 of paper-notes), readable top to bottom.

    loss = −mean_ij[ A_ij · Σ_t log π_W'(y_ijt | x_i, y_ij<t) ] + λ · KL(π_W' ‖ π_W) − β · H(π_W') on answer tokens

for k completions y_i1..y_ik of each prompt x_i, with r ∈ {+1, −1} from the task's scorer and
the advantage A = r − b_i. The reference is k = 1, greedy, b = 0 (`baseline: none`). A small
model that gets almost every prompt wrong gets no signal from that (every r = −1 just pushes
all answers down); k sampled answers with a per-prompt baseline (`mean` of the k rewards, or
`rloo`: the mean of the other k − 1) reward the answers better than their siblings instead;
`batch` subtracts the mean of every other sample of the step, so a prompt whose k answers are all
wrong still pushes its answer down (a per-prompt baseline gives it A = 0).
A small policy that finds one answer that scores collapses onto it (every sample identical, so
every advantage 0); β > 0 (`entropy_coef`, reference 0) pays for keeping its answers spread.
One step: rollout (frozen adapted weights, KV cache) → score → log-probs with gradients → loss → backward.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from .adapters import Adapter
from .generation import Rollout, chat_prompts, rollout
from .loglik import prompt_once_logits
from .settings import RLObjectiveConfig


def completion_logits(model, ro: Rollout, copies: int = 1) -> torch.Tensor:
    """Logits that predict each completion token: (B, C, V), computed only where needed.

    `copies` = k: rows come as k consecutive copies of each prompt (k samples per prompt). The
    prompt then runs once per distinct prompt and its KV cache (gradients included) is repeated
    k times for the completions: the same logits as the plain forward up to float rounding, at
    P + k·C tokens per prompt instead of k·(P + C).
    """
    P, C = ro.prompt_length, ro.input_ids.shape[1] - ro.prompt_length
    if copies == 1 or C == 0:
        out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, logits_to_keep=C + 1)
        return out.logits[:, :-1].float()  # position t predicts token t+1
    B = ro.input_ids.shape[0]
    if B % copies or not torch.equal(ro.input_ids[:, :P].view(B // copies, copies, P),
                                     ro.input_ids[::copies, :P].unsqueeze(1).expand(-1, copies, -1)):
        raise ValueError(f"rows are not {copies} consecutive copies of each prompt")
    rows = torch.arange(B // copies, device=ro.input_ids.device).repeat_interleave(copies)
    return prompt_once_logits(model, ro.input_ids[::copies, :P], ro.attention_mask[::copies, :P], rows,
                              ro.input_ids[:, P:], ro.attention_mask[:, P:])


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


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of the policy's entropy over the vocabulary: it falls to 0 when
    the k samples of every prompt become one answer (no reward differences, no gradient)."""
    logp = F.log_softmax(logits, dim=-1)
    return (-(logp.exp() * logp).sum(-1) * mask).sum() / mask.sum().clamp_min(1)


def advantages(rewards: torch.Tensor, baseline: str) -> torch.Tensor:
    """A = r − b, for rewards (prompts, k): b = 0 (none), the prompt's mean reward (mean), the mean
    of its other k − 1 rewards (rloo: leave-one-out, unbiased), or the mean of every other reward
    of the step (batch: leave-one-out over all prompts; b = 0 for a step of one sample)."""
    k = rewards.shape[1]
    if baseline == "none":
        return rewards
    if baseline == "batch":
        n = rewards.numel()
        return rewards if n < 2 else rewards - (rewards.sum() - rewards) / (n - 1)
    if baseline == "mean":
        return rewards - rewards.mean(1, keepdim=True)
    if baseline == "rloo":
        if k < 2:
            raise ValueError("the rloo baseline needs at least 2 samples per prompt")
        return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    raise ValueError(f"unknown baseline {baseline!r}; use none, mean, rloo or batch")


def reinforce_objective(model, tokenizer, adapter: Adapter, task: str, cfg: RLObjectiveConfig):
    """The RL objective for `training.fit`: rollout → score → log-probs → loss → backward.

    A step is one rollout call of every prompt's k = cfg.samples_per_prompt samples (side by side);
    the gradient pass runs in chunks of whole prompts (cfg.micro_batch_size rows), each prompt's
    tokens once for its k samples (`completion_logits(copies=k)`). Besides
    reward and KL, a step reports what says whether there was a signal at all: the share of
    prompts whose k rewards differ (`mixed_reward_fraction`), of samples with A ≠ 0
    (`nonzero_advantage_fraction`) and the mean |A| (`mean_abs_advantage`).
    """
    from .tasks import score_batch

    k = cfg.samples_per_prompt
    prompts_per_chunk = max(1, cfg.micro_batch_size // k)

    def objective(docs: Sequence[dict]) -> dict:
        totals = dict(reward=0.0, kl=0.0, entropy=0.0, completion_tokens=0, mixed=0, nonzero=0, abs_adv=0.0,
                      seconds_rollout=0.0, seconds_score=0.0, seconds_logprob=0.0, seconds_backward=0.0)
        prompts = chat_prompts(tokenizer, task, docs)
        n = len(docs)
        samples = n * k

        def learn(ro, rewards: torch.Tensor, adv: torch.Tensor):
            """log-probs → loss → backward for one chunk, and its share of the step's totals."""
            t2 = time.perf_counter()
            logits = completion_logits(model, ro, k)
            logp, mask = token_logprobs(logits, ro)
            loss = -((logp * mask).sum(1) * adv).sum() / samples
            if cfg.entropy_coef > 0:
                entropy = mean_entropy(logits, mask)
                loss = loss - cfg.entropy_coef * entropy * (len(ro.texts) / samples)
            else:
                with torch.no_grad():
                    entropy = mean_entropy(logits, mask)
            kl = torch.zeros(())
            if cfg.kl_coef > 0:
                with torch.no_grad(), adapter.disabled():
                    base_logits = completion_logits(model, ro, k)
                kl = kl_to_base(logits, base_logits, mask)
                loss = loss + cfg.kl_coef * kl * (len(ro.texts) / samples)
            t3 = time.perf_counter()
            loss.backward()
            t4 = time.perf_counter()
            totals["reward"] += float(rewards.sum())
            totals["mixed"] += int((rewards.max(1).values != rewards.min(1).values).sum())
            totals["nonzero"] += int((adv != 0).sum())
            totals["abs_adv"] += float(adv.abs().sum())
            totals["kl"] += float(kl.detach()) * len(ro.texts)
            totals["entropy"] += float(entropy.detach()) * len(ro.texts)
            totals["completion_tokens"] += ro.completion_tokens
            totals["seconds_logprob"] += t3 - t2
            totals["seconds_backward"] += t4 - t3

        # One rollout for the whole step (the engine batches by its own token budget and shares each
        # prompt's prefill among its k copies); chunks of whole prompts bound the gradient pass's memory.
        t0 = time.perf_counter()
        with adapter.inference():
            everything = rollout(model, tokenizer, [p for p in prompts for _ in range(k)],
                                 max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature)
        t1 = time.perf_counter()
        rewards = torch.tensor([1.0 if ok else -1.0 for ok in score_batch(task, [d for d in docs for _ in range(k)],
                                                                         everything.texts)],
                               device=everything.input_ids.device).view(n, k)
        adv = advantages(rewards, cfg.baseline)
        totals["seconds_rollout"], totals["seconds_score"] = t1 - t0, time.perf_counter() - t1
        for start in range(0, n, prompts_per_chunk):
            stop = min(n, start + prompts_per_chunk)
            learn(everything.rows(start * k, stop * k), rewards[start:stop], adv[start:stop].reshape(-1))
        reward = totals["reward"] / samples
        return {"reward": reward, "accuracy": (reward + 1) / 2, "kl": totals["kl"] / samples,
                "entropy": totals["entropy"] / samples, "samples": samples,
                "mixed_reward_fraction": totals["mixed"] / n, "nonzero_advantage_fraction": totals["nonzero"] / samples,
                "mean_abs_advantage": totals["abs_adv"] / samples, "completion_tokens": totals["completion_tokens"],
                "rollout_tokens_per_s": totals["completion_tokens"] / max(totals["seconds_rollout"], 1e-9),
                **{k_: round(v, 4) for k_, v in totals.items() if k_.startswith("seconds_")}}

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
                 run_id=f"svf-rl|{task}|{expert.base_fingerprint}|{objective_cfg}|{run_id}", progress=progress,
                 val_n=len(val_docs))
    return result, adapter
