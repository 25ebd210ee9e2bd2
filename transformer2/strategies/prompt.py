"""`prompt`: the model itself classifies each question (code / math / reasoning / other) and the
category's expert answers it; "other" (or a category without an expert) gets the base weights."""
from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence

from ..dispatch import MODES, DispatchError, classify, default_routes, route
from ..svf import Expert
from ..tasks import CATEGORIES
from .base import StrategyError, register_strategy


@register_strategy("prompt")
class PromptStrategy:
    """`assign` classifies each distinct request context (the question as lm-eval formats it, its
    last `max_question_chars` characters) in the first-pass `mode` (generate | loglik) and returns
    expert names (None = base weights). `last` keeps the categories, `seconds` the first pass's time.
    """

    name = "prompt"

    def __init__(self, model, tokenizer, experts: Mapping[str, Expert], *, mode: str = "loglik",
                 classifier: Optional[Expert] = None, routes: Optional[Mapping[str, Optional[str]]] = None,
                 batch_size: int = 8, max_new_tokens: int = 32, max_question_chars: Optional[int] = 4000):
        if mode not in MODES:
            raise DispatchError(f"dispatch mode must be one of {MODES}, got {mode!r}")
        self.routes = dict(default_routes(list(experts)) if routes is None else routes)
        unknown = sorted(set(self.routes) - set(CATEGORIES))
        missing = sorted({n for n in self.routes.values() if n is not None} - set(experts))
        if unknown or missing:
            raise DispatchError(f"routes: unknown categories {unknown} / experts not given {missing} "
                                f"(categories: {list(CATEGORIES)}, experts: {sorted(experts)})")
        self.model, self.tokenizer, self.experts = model, tokenizer, dict(experts)
        self.mode, self.classifier = mode, classifier
        self.batch_size, self.max_new_tokens, self.max_question_chars = batch_size, max_new_tokens, max_question_chars
        self.last: list[str] = []
        self.seconds = 0.0

    @classmethod
    def from_args(cls, model, tokenizer, experts: Mapping[str, Expert], **args) -> "PromptStrategy":
        """experts named by task (gsm8k, mbpp, arc_easy); args: mode, routes, batch_size, max_new_tokens, ..."""
        try:
            return cls(model, tokenizer, experts, **args)
        except DispatchError as err:
            raise StrategyError(f"strategy {cls.name}: {err}") from None

    def question(self, context: str) -> str:
        text = context.strip()
        if self.max_question_chars is not None and len(text) > self.max_question_chars:
            text = text[-self.max_question_chars:]
        return text

    def assign(self, requests: Sequence) -> list[Optional[str]]:
        t = time.perf_counter()
        questions = [self.question(r.args[0]) for r in requests]
        self.last = classify(self.model, self.tokenizer, questions, mode=self.mode, batch_size=self.batch_size,
                             max_new_tokens=self.max_new_tokens, classifier=self.classifier)
        self.seconds = time.perf_counter() - t
        return [route(c, self.routes) for c in self.last]

    def expert(self, key: Optional[str]) -> Optional[Expert]:
        return None if key is None else self.experts[key]
