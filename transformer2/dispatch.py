"""Prompt dispatch: the first pass of Transformer² that picks an expert by asking the model.

The model (base weights, or the classification expert z_c) reads the paper's classification
prompt (`tasks.classify`) and says code / math / reasoning / other; routes map the category to
the expert of the task with that category (code→MBPP, math→GSM8K, reasoning→ARC-Easy for the
paper's experts) or to None, the exact base weights (the reference code kept the last expert
loaded for "other"; here None always goes through `set_expert(model, None)`).

Two first-pass modes:
- `generate` (the paper): greedy decoding, the label read from the last \\boxed{};
  unparseable answers count as "other";
- `loglik`: no decoding. Each label's continuation `\\boxed{label}` is scored after the prompt
  (`loglik.continuation_logprobs`: the shared classification system prompt runs once, its KV
  cache reused). Scores are summed token log-probabilities (a closed set of four labels).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from .errors import UserError
from .loglik import continuation_logprobs, continuation_logprobs_grad
from .svf import Expert, preserved_svf_state, set_expert
from .tasks import CATEGORIES, build_classify_messages, get_task, parse_category

MODES = ("generate", "loglik")
LABEL_CONTINUATIONS = tuple(f"\\boxed{{{c}}}" for c in CATEGORIES)  # what `loglik` scores, in CATEGORIES order


def default_routes(experts: Sequence[str]) -> dict[str, Optional[str]]:
    """category -> the first of `experts` (task names) whose task has that category; None = base weights."""
    routes: dict[str, Optional[str]] = {}
    for category in CATEGORIES:
        routes[category] = next((e for e in experts if category != "other" and get_task(e).category == category),
                                None)
    return routes


class DispatchError(UserError, ValueError):
    """A dispatch setting that cannot work (unknown mode, route to a missing expert)."""


# ---------------------------------------------------------------- classification

def classification_prompts(tokenizer, questions: Sequence[str]) -> list[str]:
    """The paper's classification prompt for each question, in the model's chat template."""
    return [tokenizer.apply_chat_template(build_classify_messages(q), tokenize=False, add_generation_prompt=True)
            for q in questions]


def classify_generate(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 8,
                      classifier: Optional[Expert] = None, unparsed: Optional[str] = "other",
                      texts_out: Optional[list] = None) -> list[Optional[str]]:
    """The paper's first pass: greedy answer to the classification prompt, label from \\boxed{}.

    Runs with z_c active if `classifier` is given, else with the exact base weights; the
    model's previous SVF state is restored afterwards. Unparseable answers become `unparsed`
    ("other" by default; pass None to see them). `texts_out`, if a list, receives the raw answers.
    """
    from .generation import generate_texts, left_padding

    if not questions:
        return []
    prompts = classification_prompts(tokenizer, questions)
    with preserved_svf_state(model), left_padding(tokenizer):
        set_expert(model, classifier)
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if texts_out is not None:
        texts_out.extend(texts)
    return [parse_category(t) or unparsed for t in texts]


def loglik_categories(model, tokenizer, questions: Sequence[str], *, batch_size: int = 8,
                      scores_out: Optional[list] = None) -> list[str]:
    """The loglik first pass under whatever weights are active (training validates z_c with it):
    the category whose `\\boxed{label}` is most likely after each question's classification prompt.
    `scores_out`, if a list, receives one row of four summed log-probabilities per question
    (CATEGORIES order)."""
    if not questions:
        return []
    scores = continuation_logprobs(model, tokenizer, classification_prompts(tokenizer, questions),
                                   list(LABEL_CONTINUATIONS), batch_size=batch_size)
    if scores_out is not None:
        scores_out.extend(scores.logprob)
    return [CATEGORIES[max(range(len(CATEGORIES)), key=row.__getitem__)] for row in scores.logprob]


def classify_loglik(model, tokenizer, questions: Sequence[str], *, batch_size: int = 8,
                    classifier: Optional[Expert] = None, scores_out: Optional[list] = None) -> list[str]:
    """First pass without decoding (`loglik_categories`) with the same weights and restore as
    `classify_generate`: z_c if given, else the exact base weights."""
    with preserved_svf_state(model):
        set_expert(model, classifier)
        return loglik_categories(model, tokenizer, questions, batch_size=batch_size, scores_out=scores_out)


def label_logprobs(model, tokenizer, questions: Sequence[str]):
    """The four `\\boxed{label}` log-probabilities after each question's classification prompt, (B, 4)
    in CATEGORIES order, differentiable (training z_c in loglik mode); plus mask and logits for the KL."""
    return continuation_logprobs_grad(model, tokenizer, classification_prompts(tokenizer, questions),
                                      LABEL_CONTINUATIONS)


def classify(model, tokenizer, questions: Sequence[str], *, mode: str = "loglik", batch_size: int = 8,
             max_new_tokens: int = 32, classifier: Optional[Expert] = None) -> list[str]:
    """Categories of `questions` in the given first-pass mode (generate | loglik)."""
    if mode == "generate":
        return [c or "other" for c in classify_generate(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                                        batch_size=batch_size, classifier=classifier)]
    if mode == "loglik":
        return classify_loglik(model, tokenizer, questions, batch_size=batch_size, classifier=classifier)
    raise DispatchError(f"dispatch mode must be one of {MODES}, got {mode!r}")


def route(category: Optional[str], routes: Mapping[str, Optional[str]]) -> Optional[str]:
    """The expert name for a category; None (base weights) for "other", unknown or missing labels."""
    return routes.get(category or "other", None)


__all__ = ["DispatchError", "LABEL_CONTINUATIONS", "MODES", "classification_prompts", "classify", "classify_generate",
           "classify_loglik", "default_routes", "label_logprobs", "loglik_categories", "route"]
