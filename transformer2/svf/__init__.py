"""Singular Value Fine-tuning, organised like a PEFT tuner: config, layer, model-level code."""
from .config import TARGET_SETS, SVFConfig, count_svf_parameters, find_targets, match_targets
from .layer import SVFLinear
from .model import (Expert, ExpertError, RowZ, apply_svf, check_expert, check_same_base, expert_movement, init_expert,
                    mix_experts, preserved_svf_state, read_expert_meta, remove_svf, set_expert, set_row_z, svf_layers)

__all__ = ["TARGET_SETS", "SVFConfig", "SVFLinear", "Expert", "ExpertError", "apply_svf", "check_expert", "check_same_base",
           "RowZ", "count_svf_parameters", "expert_movement", "find_targets", "match_targets", "init_expert", "mix_experts",
           "preserved_svf_state", "read_expert_meta", "remove_svf", "set_expert", "set_row_z", "svf_layers"]
