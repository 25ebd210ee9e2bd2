"""The paper's LoRA baseline, through PEFT: config, attachment, parameter count, training.

Paper recipe: LoRA on the q/v projections, rank 16, alpha 32, dropout 0.05, trained with
next-token prediction on the same training split as the SVF experts. The ablation "LoRA +
policy gradient" (Table 4) is the same LoRA adapter trained with `rl.reinforce_objective`.
Both run through `training.fit` (the loop SVF experts use) and validate with
`generation.accuracy` (the same scorers). Adapters are saved in PEFT's own format, so
`PeftModel.from_pretrained(base, folder)` and lm-eval's `peft=folder` load them.
"""
from __future__ import annotations

import copy
from typing import Literal, Sequence

import torch
from torch import nn

from .adapters import LoRAAdapter
from .errors import UserError

PAPER_TARGET_MODULES = ("q_proj", "v_proj")
OBJECTIVES = ("next_token", "reinforce")


def lora_config(rank: int = 16, alpha: int = 32, dropout: float = 0.05,
                target_modules: Sequence[str] = PAPER_TARGET_MODULES):
    """A PEFT LoraConfig for a causal LM; defaults are the paper's baseline (q/v, r 16, α 32, p 0.05).

    `target_modules` are PEFT's module-name suffixes (e.g. "q_proj" matches every
    `...self_attn.q_proj`). No bias is trained.
    """
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM")


def attach_lora(model: nn.Module, cfg, *, seed: int = 0):
    """Wrap `model` (in place) in a PEFT LoRA model with freshly initialised adapters; eval mode.

    PEFT freezes every base weight. lora_A's random init is drawn from a generator seeded
    with `seed` (B starts at 0, so the adapted model equals the base at step 0), without
    touching the caller's global RNG.
    """
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, copy.deepcopy(cfg))
    peft_model.eval()
    return peft_model


def _meta_model(model_or_config) -> nn.Module:
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_or_config)
    if all(p.is_meta for p in model_or_config.parameters()):
        return copy.deepcopy(model_or_config)  # weightless: copying is free
    config = getattr(model_or_config, "config", None)
    if isinstance(config, PretrainedConfig):  # same architecture, no weights
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return copy.deepcopy(model_or_config).to("meta")


def count_lora_parameters(model_or_config, cfg=None) -> int:
    """Trainable LoRA parameters PEFT would create, counted on a weightless (meta-device) twin.

    `model_or_config` is a model (any device; never modified) or a transformers config, so
    Llama-3-8B is counted without its weights. Default cfg: the paper's q/v r16 LoRA.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(_meta_model(model_or_config), copy.deepcopy(cfg or lora_config()))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def train_lora(model, tokenizer, task: str, train_docs: Sequence[dict], val_docs: Sequence[dict], loop, *,
               run_dir, objective: Literal["next_token", "reinforce"] = "next_token", lora=None,
               next_token=None, reinforce=None, resume: bool = False, max_new_tokens: int = 256,
               eval_batch_size: int = 8, seed: int = 0, base_fingerprint: str = "", run_id: str = "",
               progress=None):
    """Train a LoRA adapter on `task` with `objective`; returns (TrainResult, LoRAAdapter).

    `model` is the base model (LoRA is attached here with `lora`, default the paper's) or a
    PEFT model already carrying the adapter. `next_token` (sft.NextTokenConfig) and
    `reinforce` (rl.RLObjectiveConfig) configure the objective; `max_new_tokens` bounds the
    validation answers. The result's best_state is the adapter with the best validation
    accuracy; `adapter.load_state(best_state); adapter.save(folder, provenance)` writes it
    in PEFT's format.
    """
    from peft import PeftModel

    from .generation import accuracy
    from .rl import RLObjectiveConfig, reinforce_objective
    from .sft import NextTokenConfig, next_token_objective
    from .training import fit

    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    cfg = lora or lora_config()
    peft_model = model if isinstance(model, PeftModel) else attach_lora(model, cfg, seed=seed)
    cfg = peft_model.peft_config[peft_model.active_adapter]
    adapter = LoRAAdapter(peft_model)
    if objective == "next_token":
        objective_cfg = next_token or NextTokenConfig()
        fn = next_token_objective(peft_model, tokenizer, adapter, task, objective_cfg)
    else:
        objective_cfg = reinforce or RLObjectiveConfig()
        fn = reinforce_objective(peft_model, tokenizer, adapter, task, objective_cfg)

    def validate() -> float:
        return accuracy(peft_model, tokenizer, task, val_docs, max_new_tokens=max_new_tokens,
                        batch_size=eval_batch_size)[0]

    lora_id = dict(r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=sorted(cfg.target_modules))
    result = fit(adapter, fn, validate, train_docs, loop, run_dir, resume=resume, inputs=val_docs,
                 run_id=f"lora-{objective}|{task}|{lora_id}|{objective_cfg}|{max_new_tokens}|{base_fingerprint}"
                        f"|{seed}|{run_id}", progress=progress, val_n=len(val_docs))
    return result, adapter
