"""`fixed`: one expert (or the base weights) for every request: no first pass at all."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from ..svf import Expert
from .base import Key, StrategyError, register_strategy


@register_strategy("fixed")
class FixedStrategy:
    KEY = "fixed"

    def __init__(self, expert: Optional[Expert] = None):
        self._expert = expert

    @classmethod
    def from_args(cls, model, tokenizer, experts: Mapping[str, Expert], key: Optional[str] = None) -> "FixedStrategy":
        if not experts:
            return cls(None)
        if key is None:
            if len(experts) != 1:
                raise StrategyError(f"strategy fixed with {len(experts)} experts: say which one with "
                                    f"strategy_args={{\"key\": ...}} (one of {sorted(experts)})")
            key = next(iter(experts))
        if key not in experts:
            raise StrategyError(f"strategy fixed: no expert named {key!r} (known: {sorted(experts)})")
        return cls(experts[key])

    def assign(self, requests: Sequence) -> list[Key]:
        return [self.KEY] * len(requests)

    def expert(self, key: Key) -> Optional[Expert]:
        return self._expert
