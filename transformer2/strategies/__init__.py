"""Adaptation strategies, one class per file behind one Protocol, registered by name:
`fixed`, `keyword`, and the paper's two-pass `prompt`, `classifier` and `few_shot`."""
from .base import STRATEGIES, AdaptationStrategy, Key, StrategyError, build_strategy, register_strategy
from .fixed import FixedStrategy
from .keyword import RouterStrategy, keyword_route
from .prompt import PromptStrategy
from .classifier import ClassifierStrategy
from .few_shot import FewShotStrategy

__all__ = ["STRATEGIES", "AdaptationStrategy", "ClassifierStrategy", "FewShotStrategy", "FixedStrategy", "Key",
           "PromptStrategy", "RouterStrategy", "StrategyError", "build_strategy", "keyword_route",
           "register_strategy"]
