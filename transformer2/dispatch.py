"""Prompt dispatch: the first pass of Transformer² that picks an expert by asking the model.

The model (base weights, or the classification expert z_c) reads the paper's classification
prompt (`prompts.build_classify_messages`) and says code / math / reasoning / other; ROUTES
maps the category to an expert (code→MBPP, math→GSM8K, reasoning→ARC-Easy) or to None, the
exact base weights (the reference code kept the last expert loaded for "other"; here None
always goes through `set_expert(model, None)`, which puts the wrapped base layers back).

Two first-pass modes:
- `generate` (the paper): greedy decoding, the label read from the last \\boxed{};
  unparseable answers count as "other";
- `loglik`: no decoding. Each label's continuation `\\boxed{label}` is scored after the
  prompt: the classification system prompt, shared by every question, is run once and its
  KV cache reused; then one forward pass per batch over each question + the labels' shared
  prefix (`\\boxed{`) and, only when the labels' remaining tokens are longer than one token,
  one tiny forward of those few tokens per label through the KV cache (cache rows repeated,
  the prompt never recomputed). Scores are summed token log-probabilities of the whole
  continuation (sums, not means: a closed set of four labels).

`continuation_logprobs` is the shared machinery; it also scores multiple-choice options and
gold answers for the few-shot CEM (`cem.py`), with an optional per-sample z (one SVF vector
per row of the batch).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

import torch

from .errors import UserError
from .prompts import CATEGORIES, build_classify_messages, parse_category
from .svf import Expert, set_expert, svf_layers

# category -> expert name (the task it was trained on); None = exact base weights
ROUTES: dict[str, Optional[str]] = {"code": "mbpp", "math": "gsm8k", "reasoning": "arc_easy", "other": None}
MODES = ("generate", "loglik")
LABEL_CONTINUATIONS = tuple(f"\\boxed{{{c}}}" for c in CATEGORIES)  # what `loglik` scores, in CATEGORIES order

RowZ = Mapping[str, torch.Tensor]  # module name -> (N, r): one z per row of a batch


class DispatchError(UserError, ValueError):
    """A dispatch setting that cannot work (unknown mode, route to a missing expert)."""


# ---------------------------------------------------------------- SVF state helpers

@contextmanager
def preserved_svf_state(model) -> Iterator[None]:
    """Restore every SVF layer's active z (and its already rebuilt W') on exit, without rebuilding."""
    saved = [(layer, layer.z, layer._weight) for layer in svf_layers(model).values()]
    try:
        yield
    finally:
        for layer, z, weight in saved:
            layer.z, layer._weight = z, weight


def set_row_z(model, row_z: Optional[RowZ], index: Optional[torch.Tensor] = None) -> None:
    """Activate one z per batch row (rows `index` of `row_z`), or the base weights if row_z is None."""
    for name, layer in svf_layers(model).items():
        if row_z is None:
            layer.set_z(None)
        else:
            z = row_z[name]
            layer.set_z((z if index is None else z[index.to(z.device)]).to(layer.S.device))


# ---------------------------------------------------------------- scoring continuations

class ContinuationScores(NamedTuple):
    logprob: list[list[float]]  # per prompt, per continuation: Σ log p(continuation tokens | prompt)
    tokens: list[list[int]]     # per prompt, per continuation: number of tokens scored


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    k = 0
    while k < n and all(s[k] == seqs[0][k] for s in seqs):
        k += 1
    return k


def _plain_layers(cache) -> Optional[list]:
    """The cache's per-layer (keys, values) when every layer is a plain, growable DynamicLayer, else None."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        return None  # sliding-window / quantised / offloaded caches: no prefix sharing
    return [(layer.keys, layer.values) for layer in layers]


def _prefix_cache(model, ids: list[int], groups: list[int], group_z: Optional[RowZ], batch_size: int):
    """KV of the shared prompt prefix, one row per z group: list of (keys, values) or None."""
    device = _device(model)
    parts = []
    for start in range(0, len(groups), batch_size):
        g = torch.tensor(groups[start:start + batch_size])
        if group_z is not None:
            set_row_z(model, group_z, g)
        x = torch.tensor([ids] * len(g), device=device)
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        layers = _plain_layers(out.past_key_values)
        if layers is None:
            return None
        parts.append(layers)
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def _logit_batches(order: Sequence[int], keep: Sequence[int], batch_size: int, vocab: int,
                   max_logits_mb: float) -> list[list[int]]:
    """Consecutive runs of `order`: at most `batch_size` rows, and at most `max_logits_mb` of
    float32 logits for (rows × the longest kept span) — a single row always goes alone."""
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order:
        widest = max(longest, keep[i])
        if batch and (len(batch) == batch_size or (len(batch) + 1) * widest * vocab * 4 > max_logits_mb * 2 ** 20):
            batches.append(batch)
            batch, widest = [], keep[i]
        batch.append(i)
        longest = widest
    return batches + [batch] if batch else batches


def _logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the vocabulary (B, T), one row at a time in float32: never a second
    (B, T, V) tensor beside the logits (a full log_softmax of long gold answers doubled the peak)."""
    return torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: Sequence[str],
                          continuations: Sequence[str] | Sequence[Sequence[str]], *, batch_size: int = 8,
                          group_z: Optional[RowZ] = None, row_group: Optional[Sequence[int]] = None,
                          share_prefix: bool = True, min_shared_tokens: int = 16,
                          max_logits_mb: float = 1024) -> ContinuationScores:
    """Score each prompt's candidate continuations without decoding.

    `continuations` is one list shared by every prompt, or one list per prompt (lengths may
    differ). Prompt and continuation are tokenized separately and concatenated (as lm-eval).
    - The token prefix shared by all prompts (a system prompt, the chat header) is run once
      per z group and its KV cache reused by every row (when it has >= `min_shared_tokens`
      tokens and the model's cache is a plain DynamicCache).
    - Per batch of `batch_size` rows: one forward over the rest of the prompt + the candidates'
      shared token prefix (logits kept only where needed); if some candidate has more than one
      token left, one more forward of those tokens for every candidate through the KV cache.
    A batch also stops growing before its kept logits (rows × kept positions × vocabulary, float32)
    pass `max_logits_mb`: long teacher-forced answers (CEM's gold log-likelihood) stay bounded.
    With `group_z` ({name: (G, r)}), row i runs with z = group_z[name][row_group[i]] (the
    per-sample factored path of SVFLinear; `row_group` defaults to one group per row); without
    it, with whatever weights the model has active.
    """
    from transformers.cache_utils import DynamicCache

    if continuations and isinstance(continuations[0], str):
        per_prompt = [list(continuations)] * len(prompts)  # type: ignore[list-item]
    else:
        per_prompt = [list(c) for c in continuations]  # type: ignore[arg-type]
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} continuation lists")
    if any(not c for c in per_prompt):
        raise ValueError("every prompt needs at least one continuation")
    if not prompts:
        return ContinuationScores([], [])
    groups = (list(range(len(prompts))) if row_group is None else [int(g) for g in row_group]) \
        if group_z is not None else [0] * len(prompts)
    prompt_ids = _encode(tokenizer, prompts)
    if any(not ids for ids in prompt_ids):
        raise ValueError("empty prompt")
    cont_ids: dict[str, list[int]] = {}
    for cands in per_prompt:
        for text in cands:
            if text not in cont_ids:
                cont_ids[text] = _encode(tokenizer, [text])[0]
                if not cont_ids[text]:
                    raise ValueError(f"continuation {text!r} has no tokens")
    device, pad = _device(model), _pad_id(tokenizer)

    # the prompts' shared prefix, once per z group; every prompt keeps >= 1 token of its own
    C = min(_common_prefix(prompt_ids), min(len(ids) for ids in prompt_ids) - 1) if share_prefix else 0
    prefix, slot = None, {}
    if C >= min_shared_tokens:
        used = sorted(set(groups))
        slot = {g: i for i, g in enumerate(used)}
        prefix = _prefix_cache(model, prompt_ids[0][:C], used, group_z, batch_size)
    if prefix is None:
        C = 0

    out_lp: list[list[float]] = [[] for _ in prompts]
    out_n: list[list[int]] = [[] for _ in prompts]
    # shared token prefix of each prompt's candidates; every candidate keeps >= 1 own token
    shared: list[list[int]] = []
    rest: list[list[list[int]]] = []
    for cands in per_prompt:
        toks = [cont_ids[c] for c in cands]
        k = min(_common_prefix(toks), min(len(t) for t in toks) - 1)
        shared.append(toks[0][:k])
        rest.append([t[k:] for t in toks])
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))  # little padding per batch
    for idx in _logit_batches(order, [len(p) + 1 for p in shared], batch_size,
                              model.get_output_embeddings().weight.shape[0], max_logits_mb):
        prefixes, suffixes = [shared[i] for i in idx], [rest[i] for i in idx]
        rows = [prompt_ids[i][C:] + pre for i, pre in zip(idx, prefixes)]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), C + L), dtype=torch.long)
        mask[:, :C] = 1
        for b, r in enumerate(rows):
            ids[b, L - len(r):] = torch.tensor(r)
            mask[b, C + L - len(r):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, C:]
        keep = max(len(p) for p in prefixes) + 1
        multi = any(len(s) > 1 for cands in suffixes for s in cands)
        gidx = torch.tensor([groups[i] for i in idx])
        if group_z is not None:
            set_row_z(model, group_z, gidx)
        cache = None
        if prefix is not None:
            sel = torch.tensor([slot[int(g)] for g in gidx], device=prefix[0][0].device)
            cache = DynamicCache(ddp_cache_data=[(k.index_select(0, sel), v.index_select(0, sel)) for k, v in prefix])
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=multi or cache is not None, logits_to_keep=keep)
        logits = out.logits[:, -keep:]  # position t predicts token t+1
        lse = _logsumexp_rows(logits)
        base = []
        for b, pre in enumerate(prefixes):
            lp = 0.0
            for j, tok in enumerate(pre):  # pre[j] is predicted by kept position keep-1-len(pre)+j
                t = keep - 1 - len(pre) + j
                lp += float(logits[b, t, tok]) - float(lse[b, t])
            base.append(lp)
        # the last kept position predicts each candidate's first own token
        scores = [[base[b] + float(logits[b, -1, s[0]]) - float(lse[b, -1]) for s in cands]
                  for b, cands in enumerate(suffixes)]
        if multi:  # the remaining tokens of every candidate, through the KV cache
            flat = [(b, j, s) for b, cands in enumerate(suffixes) for j, s in enumerate(cands)]
            S = max(len(s) for _, _, s in flat) - 1
            ext = torch.full((len(flat), S), pad, dtype=torch.long)
            for n, (_, _, s) in enumerate(flat):
                if len(s) > 1:
                    ext[n, :len(s) - 1] = torch.tensor(s[:-1])
            rep = torch.tensor([b for b, _, _ in flat], device=device)
            cache = out.past_key_values
            cache.reorder_cache(rep)
            ext_mask = torch.cat([mask[rep], torch.ones((len(flat), S), dtype=torch.long, device=device)], dim=1)
            ext_pos = pos[rep, -1:] + 1 + torch.arange(S, device=device)
            if group_z is not None:
                set_row_z(model, group_z, gidx[rep.cpu()])
            out2 = model(input_ids=ext.to(device), attention_mask=ext_mask, position_ids=ext_pos,
                         past_key_values=cache, use_cache=True)
            lse2 = _logsumexp_rows(out2.logits)
            for n, (b, j, s) in enumerate(flat):
                for t in range(1, len(s)):
                    scores[b][j] += float(out2.logits[n, t - 1, s[t]]) - float(lse2[n, t - 1])
            del out2
        del out, cache
        for b, i in enumerate(idx):
            out_lp[i] = scores[b]
            out_n[i] = [len(cont_ids[c]) for c in per_prompt[i]]
    return ContinuationScores(out_lp, out_n)


# ---------------------------------------------------------------- classification

def classification_prompts(tokenizer, questions: Sequence[str]) -> list[str]:
    """The paper's classification prompt for each question, in the model's chat template."""
    return [tokenizer.apply_chat_template(build_classify_messages(q), tokenize=False, add_generation_prompt=True)
            for q in questions]


@contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Batched generation continues from the right edge: pad prompts on the left meanwhile."""
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


def classify_generate(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 8,
                      classifier: Optional[Expert] = None, unparsed: Optional[str] = "other",
                      texts_out: Optional[list] = None) -> list[Optional[str]]:
    """The paper's first pass: greedy answer to the classification prompt, label from \\boxed{}.

    Runs with z_c active if `classifier` is given, else with the exact base weights; the
    model's previous SVF state is restored afterwards. Unparseable answers become `unparsed`
    ("other" by default; pass None to see them). `texts_out`, if a list, receives the raw answers.
    """
    from .generation import generate_texts

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
    """Summed log-probabilities of the four `\\boxed{label}` continuations after each question's
    classification prompt, (B, 4) in CATEGORIES order, differentiable; plus the label-token mask
    and logits, (4B, C) and (4B, C, V), for the KL penalty. Tokenized as
    `continuation_logprobs`; each prompt runs once and its KV cache serves its four labels."""
    prompts = _encode(tokenizer, classification_prompts(tokenizer, questions))
    labels = _encode(tokenizer, LABEL_CONTINUATIONS)
    P, K, L, C = len(prompts), len(labels), max(len(p) for p in prompts), max(len(lab) for lab in labels)
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    ids = torch.full((P, L), pad, dtype=torch.long)
    mask = torch.zeros((P, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p), 1  # left padding
    targets = torch.full((P * K, C), pad, dtype=torch.long)
    target_mask = torch.zeros((P * K, C))
    for r in range(P * K):
        lab = labels[r % K]
        targets[r, :len(lab)], target_mask[r, :len(lab)] = torch.tensor(lab), 1  # right padding: never attended to
    ids, mask, targets, target_mask = ids.to(device), mask.to(device), targets.to(device), target_mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    rows = torch.arange(P, device=device).repeat_interleave(K)  # row r = prompt r // K, label r % K
    parts = [out.logits[rows, -1:].float()]  # predicts each label's first token
    if C > 1:
        cache = out.past_key_values
        cache.reorder_cache(rows)
        ext_mask = torch.cat([mask[rows], torch.ones((P * K, C - 1), dtype=torch.long, device=device)], dim=1)
        ext_pos = pos[rows, -1:] + 1 + torch.arange(C - 1, device=device)
        out2 = model(input_ids=targets[:, :-1], attention_mask=ext_mask, position_ids=ext_pos, past_key_values=cache,
                     use_cache=True)
        parts.append(out2.logits.float())
    logits = torch.cat(parts, dim=1)  # (P*K, C, V): position t predicts label token t
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (logp * target_mask).sum(1).view(P, K), target_mask, logits


def classify(model, tokenizer, questions: Sequence[str], *, mode: str = "loglik", batch_size: int = 8,
             max_new_tokens: int = 32, classifier: Optional[Expert] = None) -> list[str]:
    """Categories of `questions` in the given first-pass mode (generate | loglik)."""
    if mode == "generate":
        return [c or "other" for c in classify_generate(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                                        batch_size=batch_size, classifier=classifier)]
    if mode == "loglik":
        return classify_loglik(model, tokenizer, questions, batch_size=batch_size, classifier=classifier)
    raise DispatchError(f"dispatch mode must be one of {MODES}, got {mode!r}")


def route(category: Optional[str], routes: Mapping[str, Optional[str]] = ROUTES) -> Optional[str]:
    """The expert name for a category; None (base weights) for "other", unknown or missing labels."""
    return routes.get(category or "other", None)


def apply_route(model, experts: Mapping[str, Expert], category: Optional[str],
                routes: Mapping[str, Optional[str]] = ROUTES, base_fingerprint: Optional[str] = None) -> Optional[str]:
    """Activate the expert a category routes to — or the exact base weights — and return its name."""
    name = route(category, routes)
    set_expert(model, None if name is None else experts[name], base_fingerprint=base_fingerprint)
    return name


# ---------------------------------------------------------------- the adaptation strategy

class DispatchStrategy:
    """`harness.AdaptationStrategy` for prompt / classifier dispatch.

    `assign` classifies each distinct request context (the question as lm-eval formats it,
    its last `max_question_chars` characters) and returns expert names (None = base weights).
    `last` keeps the categories and `seconds` the time of the latest first pass.
    """

    def __init__(self, model, tokenizer, experts: Mapping[str, Expert], *, mode: str = "loglik",
                 classifier: Optional[Expert] = None, routes: Optional[Mapping[str, Optional[str]]] = None,
                 batch_size: int = 8, max_new_tokens: int = 32, max_question_chars: Optional[int] = 4000):
        if mode not in MODES:
            raise DispatchError(f"dispatch mode must be one of {MODES}, got {mode!r}")
        self.routes = dict(ROUTES if routes is None else routes)
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


__all__ = ["ContinuationScores", "DispatchError", "DispatchStrategy", "LABEL_CONTINUATIONS", "MODES", "ROUTES",
           "apply_route", "classification_prompts", "classify", "classify_generate", "classify_loglik",
           "continuation_logprobs", "label_logprobs", "left_padding", "loglik_categories", "preserved_svf_state",
           "route", "set_row_z"]
