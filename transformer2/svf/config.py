"""SVF config: which matrices get an expert vector, and how z scales their singular values."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence, Union

import torch
from torch import nn

from ..config import ConfigError

# Named target sets, as regular expressions over full module names. The projection names are
# shared by Llama, Qwen2, Mistral and Gemma-3 decoder layers.
TARGET_SETS = {
    "mlp": r".*\.mlp\.(gate_proj|up_proj|down_proj)",  # reference default
    "attn": r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "qv": r".*\.self_attn\.(q_proj|v_proj)",  # the paper's "attention only" (0.16M on Llama-3-8B)
}
TARGET_SETS["all"] = f"(?:{TARGET_SETS['mlp']})|(?:{TARGET_SETS['attn']})"


@dataclass
class SVFConfig:
    targets: Union[str, list[str]] = "mlp"
    init_mean: float = 0.1
    init_std: float = 0.01
    max_mult: float = 1.0
    keep_norm: bool = True  # rescale so that the sum of singular values is unchanged

    def patterns(self) -> list[str]:
        if isinstance(self.targets, str):
            if self.targets not in TARGET_SETS:
                raise ConfigError(f"svf.targets: unknown target set {self.targets!r}; "
                                 f"use one of {sorted(TARGET_SETS)} or a list of regular expressions")
            return [TARGET_SETS[self.targets]]
        return list(self.targets)

    def to_dict(self) -> dict:
        return asdict(self)

    def multiplier(self, z: torch.Tensor) -> torch.Tensor:
        """f(z): the factor applied to each singular value (reference: sigmoid(z)·max_mult)."""
        return torch.sigmoid(z) * self.max_mult

    def scaled_singular_values(self, S: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """σ·f(z), renormalised to keep Σσ; z may be (r,) or a batch (B, r)."""
        s = S * self.multiplier(z)
        if self.keep_norm:
            s = s * (S.sum() / s.sum(dim=-1, keepdim=True))
        return s


def match_targets(linear_names: Sequence[str], targets: Union[str, Sequence[str]] = "mlp",
                  model_name: str = "the model") -> list[str]:
    """The names among `linear_names` (a model's nn.Linear modules) that `targets` selects, never the LM head;
    works from names alone, so a stage can check svf.targets against an SVD index without a model."""
    patterns = SVFConfig(targets=targets if isinstance(targets, str) else list(targets)).patterns()
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise ConfigError(f"svf.targets: invalid regular expression: {err}") from None
    names = [name for name in linear_names
             if not name.endswith("lm_head") and any(c.fullmatch(name) for c in compiled)]
    if not names:
        raise ConfigError(f"svf.targets {targets!r} matches no linear layer of {model_name}; module names look "
                          f"like {[n for n in linear_names if not n.endswith('lm_head')][:2]}")
    return names


def find_targets(model: nn.Module, targets: Union[str, Sequence[str]] = "mlp") -> list[str]:
    """Names of the nn.Linear modules an SVF expert patches (never the LM head)."""
    return match_targets([name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)], targets,
                         type(model).__name__)


def count_svf_parameters(model: nn.Module, targets: Union[str, Sequence[str]] = "mlp") -> int:
    """Trainable SVF parameters: min(out, in) per target. Works on a meta-device model."""
    modules = dict(model.named_modules())
    return sum(min(modules[n].out_features, modules[n].in_features) for n in find_targets(model, targets))


__all__ = ["SVFConfig", "TARGET_SETS", "find_targets", "match_targets", "count_svf_parameters"]
