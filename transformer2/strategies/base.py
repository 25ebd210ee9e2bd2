"""The first pass of Transformer²: an adaptation strategy decides which expert answers which request.

`assign` sees one request per distinct context (requests sharing a context, like the choices of
one multiple-choice question, always get the same key) and returns one key per request;
`expert(key)` is the z for that key (None = the exact base weights). Requests only need
`.args[0]`, the context string (lm-eval's `Instance`), so strategies do not depend on lm-eval.
A strategy class is registered by name and built from the model, tokenizer, the named experts
and keyword arguments (`from_args`), as the lm-eval model and `t2 eval` do.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Optional, Protocol, Sequence, runtime_checkable

from ..errors import UserError
from ..svf import Expert

Key = Hashable


class StrategyError(UserError, ValueError):
    """A strategy or its arguments that cannot work; the message says what to change."""


@runtime_checkable
class AdaptationStrategy(Protocol):
    def assign(self, requests: Sequence[Any]) -> list[Key]: ...

    def expert(self, key: Key) -> Optional[Expert]: ...


STRATEGIES: dict[str, type] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: the class (with a `from_args(model, tokenizer, experts, **kwargs)` classmethod) is `name`."""
    def register(cls: type) -> type:
        STRATEGIES[name] = cls
        return cls

    return register


def build_strategy(name: str, model, tokenizer, experts: Mapping[str, Expert], args: Mapping[str, Any]):
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name].from_args(model, tokenizer, experts, **args)
    except TypeError as err:  # a keyword the strategy does not take
        raise StrategyError(f"strategy {name}: {err}") from None
