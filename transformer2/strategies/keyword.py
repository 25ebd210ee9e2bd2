"""`keyword`: route each request by keywords in its context to a named expert (a cheap baseline router)."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from ..svf import Expert
from .base import Key, StrategyError, register_strategy


def keyword_route(routes: Mapping[str, Sequence[str]], default: Optional[str] = None,
                  case_sensitive: bool = False) -> Callable[[str], Optional[str]]:
    """context -> the first expert (in `routes` order) one of whose keywords occurs, else `default`."""
    table = [(name, [w if case_sensitive else w.lower() for w in ([words] if isinstance(words, str) else words)])
             for name, words in routes.items()]

    def route(context: str) -> Optional[str]:
        text = context if case_sensitive else context.lower()
        for name, words in table:
            if any(w in text for w in words):
                return name
        return default

    return route


@register_strategy("keyword")
class RouterStrategy:
    """Routes each request by a function of its context string to a named expert (None = base)."""

    def __init__(self, route: Callable[[str], Optional[str]], experts: Mapping[str, Expert]):
        self.route = route
        self.experts = dict(experts)

    @classmethod
    def from_args(cls, model, tokenizer, experts: Mapping[str, Expert], routes: Mapping[str, Sequence[str]],
                  default: Optional[str] = None, case_sensitive: bool = False) -> "RouterStrategy":
        unknown = sorted((set(routes) | ({default} if default else set())) - set(experts))
        if unknown:
            raise StrategyError(f"strategy keyword routes to experts {unknown} that were not given "
                                f"(experts: {sorted(experts)})")
        return cls(keyword_route(routes, default, case_sensitive), experts)

    def assign(self, requests: Sequence) -> list[Key]:
        keys = [self.route(request.args[0]) for request in requests]
        unknown = sorted({k for k in keys if k is not None and k not in self.experts})
        if unknown:
            raise StrategyError(f"the router chose experts {unknown} that were not given "
                                f"(known: {sorted(self.experts)})")
        return keys

    def expert(self, key: Key) -> Optional[Expert]:
        return None if key is None else self.experts[key]
