"""`classifier`: as `prompt`, but the first pass runs with the classification expert z_c active."""
from __future__ import annotations

from typing import Mapping

from ..svf import Expert
from .base import StrategyError, register_strategy
from .prompt import PromptStrategy


@register_strategy("classifier")
class ClassifierStrategy(PromptStrategy):
    name = "classifier"

    @classmethod
    def from_args(cls, model, tokenizer, experts: Mapping[str, Expert], classifier: str = "classifier",
                  **args) -> "ClassifierStrategy":
        """experts[classifier] is z_c (default name "classifier"); the rest are the task experts."""
        if classifier not in experts:
            raise StrategyError(f"strategy classifier: no expert named {classifier!r} (the classification "
                                f"expert z_c); known: {sorted(experts)}")
        rest = {k: v for k, v in experts.items() if k != classifier}
        return super().from_args(model, tokenizer, rest, classifier=experts[classifier], **args)
