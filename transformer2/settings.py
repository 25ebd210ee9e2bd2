"""The library's settings dataclasses, in one light module (no torch), and their defaults.

Each `params.yaml` section builds one of these in one method (`config/`), and takes its
defaults from here, so a default is written once. Defaults follow the reference implementation
where it has one; the CPU profiles set their own values in params.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass
class LoopConfig:
    """The one training loop (`training.fit`)."""

    steps: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    optimizer: str = "adam"          # adam (reference) | adamw (paper)
    weight_decay: float = 0.0
    lr_schedule: str = "constant"    # constant | cosine
    warmup_steps: int = 0
    grad_clip: float = 1e-3
    eval_every: int = 5
    checkpoint_every: int = 1
    seed: int = 0


# The paper's LoRA baseline trains with other loop defaults than SVF's REINFORCE.
LORA_LOOP = replace(LoopConfig(), lr=5e-4, optimizer="adamw", lr_schedule="cosine", grad_clip=1.0)
# The classification expert z_c: 4 prompts per category per step on average, short answers.
CLASSIFIER_LOOP = replace(LoopConfig(), steps=8, batch_size=12, eval_every=4)


@dataclass
class RLObjectiveConfig:
    """REINFORCE (`rl.reinforce_objective`)."""

    kl_coef: float = 0.0
    entropy_coef: float = 0.0     # β: loss − β · mean answer-token entropy (reference: 0); against collapse
    max_new_tokens: int = 256
    do_sample: bool = False       # reference: greedy, one sample per prompt
    temperature: float = 1.0
    micro_batch_size: int = 8     # rollout / log-prob / backward chunk; the step still sees the whole batch
    samples_per_prompt: int = 1   # k completions per prompt (reference: 1)
    baseline: str = "none"        # none (reference) | mean | rloo (per prompt) | batch (over the step)

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        problem = rl_sampling_problem(self.samples_per_prompt, self.do_sample, self.baseline)
        if problem:
            raise ValueError(problem)


BASELINES = ("none", "mean", "rloo", "batch")


def rl_sampling_problem(samples_per_prompt: int, do_sample: bool, baseline: str) -> str | None:
    """Why these REINFORCE settings give no learning signal, or None: k greedy copies of one
    completion are identical, and a per-prompt baseline of one sample cancels its reward."""
    if samples_per_prompt > 1 and not do_sample:
        return (f"samples_per_prompt: {samples_per_prompt} samples need do_sample: true "
                "(greedy decoding gives the same completion k times)")
    if baseline in ("mean", "rloo") and samples_per_prompt < 2:
        return (f"baseline: {baseline} needs samples_per_prompt >= 2 "
                "(with one sample per prompt the advantage is always 0)")
    return None


CLASSIFIER_OBJECTIVE = replace(RLObjectiveConfig(), max_new_tokens=32, micro_batch_size=12)


@dataclass
class NextTokenConfig:
    """Next-token prediction (`sft.next_token_objective`)."""

    micro_batch_size: int = 8                # forward/backward chunk; the step still sees the whole batch
    max_answer_tokens: Optional[int] = None  # cut longer reference answers (EOS included); None: whole


@dataclass
class CEMConfig:
    """Few-shot CEM's search (`cem.cem_search`); the reference's values."""

    population: int = 32
    elite_ratio: float = 0.2
    generations: int = 10
    init_std: float = 0.5
    per_matrix: bool = False  # α per expert and matrix (K, M) instead of per expert (K,)
    keep_best: bool = True    # member 0 of each population is the best α so far (reference: re_eval_best)
    seed: int = 0

    @property
    def num_elites(self) -> int:
        return max(1, int(self.elite_ratio * self.population))  # reference: int(elite_ratio * pop_size)
