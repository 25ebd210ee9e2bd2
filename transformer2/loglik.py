"""Log-likelihood scoring of continuations without decoding: one kernel for every caller.

Multiple-choice options (CEM on ARC), gold answers (CEM's tie-break), the four dispatch labels
(loglik first pass) and lm-eval's loglikelihood requests (the `transformer2` lm-eval model,
on lm-eval's own token ids) all reduce to "Σ log p(continuation | prompt)": `token_logprobs`
is that kernel, `continuation_logprobs` its entry point for texts. The kernel shares work: the
token prefix common to every prompt (a system prompt) runs once per z group and its KV cache
is reused; candidates of one prompt share its forward pass; the kept logits per batch are
bounded (`max_logits_mb`). With `group_z`, row i runs with its own SVF
vector (the per-sample factored path), so a whole CEM population is one batch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .svf import RowZ, set_row_z


class ContinuationScores(NamedTuple):
    logprob: list[list[float]]  # per prompt, per continuation: Σ log p(continuation tokens | prompt)
    tokens: list[list[int]]     # per prompt, per continuation: number of tokens scored
    greedy: list[list[bool]]    # per prompt, per continuation: every token is the argmax (lm-eval's is_greedy)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def left_padded(rows: Sequence[Sequence[int]], pad: int, cached: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one length: (ids (B, L), attention mask (B, cached + L)), the
    mask's first `cached` columns covering a KV-cached prefix every row shares."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), cached + L), dtype=torch.long)
    mask[:, :cached] = 1
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(r)
        mask[b, cached + L - len(r):] = 1
    return ids, mask


def _prefix_cache(model, ids: list[int], groups: list[int], use_z, pad_id: int, prefill_tokens: int, align):
    """KV of the shared prompt prefix, one slot per z group (a `_KV`): by the
    engine's own prefill, so a prompt's scores are the same bits with or without the prefix
    reuse (HF's forward rounds differently: ~5e-7 in a summed log-probability)."""
    from .decoding.engine import prefill
    from .decoding.kv import _KV, _round_up

    kv = _KV(len(groups), _round_up(len(ids) + align.rows, align.keys), _device(model), align)
    prefill(model, kv, [(i, g, ids, 0) for i, g in enumerate(groups)], pad=pad_id, prefill_tokens=prefill_tokens,
            use_z=use_z)
    return kv


def _logit_batches(order: Sequence[int], keep: Sequence[int], batch_size: int, vocab: int,
                   max_logits_mb: float) -> list[list[int]]:
    """Consecutive runs of `order`: at most `batch_size` prompts, and at most `max_logits_mb` of
    float32 logits for their Σ `keep` scored positions — a single prompt always goes alone."""
    budget = max_logits_mb * 2 ** 20 / (vocab * 4)  # positions of float32 logits
    batches: list[list[int]] = []
    batch: list[int] = []
    total = 0
    for i in order:
        if batch and (len(batch) == batch_size or total + keep[i] > budget):
            batches.append(batch)
            batch, total = [], 0
        batch.append(i)
        total += keep[i]
    return batches + [batch] if batch else batches


def _logsumexp_rows(logits: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """logsumexp over the vocabulary of (T, V) logits, `chunk` rows at a time in float32: never a
    second (T, V) tensor beside the logits (a full log_softmax of long gold answers doubled the peak)."""
    return torch.cat([torch.logsumexp(logits[a:a + chunk].float(), dim=-1) for a in range(0, len(logits), chunk)])


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: Sequence[str],
                          continuations: Sequence[str] | Sequence[Sequence[str]], *, batch_size: int = 8,
                          group_z: Optional[RowZ] = None, row_group: Optional[Sequence[int]] = None,
                          share_prefix: bool = True, min_shared_tokens: int = 16,
                          max_logits_mb: float = 1024) -> ContinuationScores:
    """Score each prompt's candidate continuations without decoding (texts: see `token_logprobs`).

    `continuations` is one list shared by every prompt, or one list per prompt (lengths may
    differ). Prompt and continuation are tokenized separately, without special tokens, and
    concatenated (as lm-eval).
    """
    if continuations and isinstance(continuations[0], str):
        per_prompt = [list(continuations)] * len(prompts)  # type: ignore[list-item]
    else:
        per_prompt = [list(c) for c in continuations]  # type: ignore[arg-type]
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} continuation lists")
    if any(not c for c in per_prompt):
        raise ValueError("every prompt needs at least one continuation")
    if not prompts:
        return ContinuationScores([], [], [])
    prompt_ids = _encode(tokenizer, prompts)
    cont_ids: dict[str, list[int]] = {}
    for cands in per_prompt:
        for text in cands:
            if text not in cont_ids:
                cont_ids[text] = _encode(tokenizer, [text])[0]
                if not cont_ids[text]:
                    raise ValueError(f"continuation {text!r} has no tokens")
    return token_logprobs(model, prompt_ids, [[cont_ids[c] for c in cands] for cands in per_prompt],
                          pad_id=_pad_id(tokenizer), batch_size=batch_size, group_z=group_z, row_group=row_group,
                          share_prefix=share_prefix, min_shared_tokens=min_shared_tokens,
                          max_logits_mb=max_logits_mb)


@torch.no_grad()
def token_logprobs(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]], *,
                   pad_id: int = 0, batch_size: int = 8, group_z: Optional[RowZ] = None,
                   row_group: Optional[Sequence[int]] = None, share_prefix: bool = True,
                   min_shared_tokens: int = 16, max_logits_mb: float = 1024,
                   prefill_tokens: int = 2048, align=None) -> ContinuationScores:
    """The kernel, on token ids: Σ log p(continuation | prompt) for each prompt's candidates,
    and whether every continuation token is the argmax (lm-eval's is_greedy).

    It runs on the decoding engine's KV buffer and attention (`decoding.kv`: rows packed without
    padding, matmul attention over aligned key lengths), so a prompt's scores never depend on
    the other prompts of a batch, nor a candidate's on the other candidates (a resumed lm-eval
    run reproduces its cached answers bit for bit):
    - the token prefix shared by all prompts (a system prompt, few-shot examples) runs once per
      z group (when it has >= `min_shared_tokens` tokens) and is copied into every row;
    - per batch of <= `batch_size` prompts: one packed prefill of each prompt's own tokens but
      its last, then one packed forward of every candidate (the last prompt token + the
      candidate but its last token) into its prompt's slot, with logits for every position;
      candidates with the same input (single-token options) share one segment.
    A batch also stops growing before those logits (candidate tokens × vocabulary, float32) pass
    `max_logits_mb`: long teacher-forced answers (CEM's gold log-likelihood, lm-eval's rolling
    windows) stay bounded. With `group_z` ({name: (G, r)}), row i runs with z =
    group_z[name][row_group[i]] (the per-sample factored path of SVFLinear; `row_group` defaults
    to one group per row); without it, with whatever weights the model has active.
    """
    from .decoding.engine import _shared_prefix, prefill
    from .decoding.kernels import alignment
    from .decoding.kv import _KV, _forward, _round_up

    prompt_ids = [[int(t) for t in p] for p in prompts]
    per_prompt = [[[int(t) for t in c] for c in cands] for cands in continuations]
    if len(per_prompt) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(per_prompt)} continuation lists")
    if any(not c for c in per_prompt):
        raise ValueError("every prompt needs at least one continuation")
    if any(not t for cands in per_prompt for t in cands):
        raise ValueError("a continuation has no tokens")
    if not prompt_ids:
        return ContinuationScores([], [], [])
    if any(not ids for ids in prompt_ids):
        raise ValueError("empty prompt")
    groups = (list(range(len(prompt_ids))) if row_group is None else [int(g) for g in row_group]) \
        if group_z is not None else [0] * len(prompt_ids)
    device = _device(model)

    def use_z(rows: list) -> None:
        if group_z is not None:
            set_row_z(model, group_z, torch.tensor(rows))

    # the prompts' shared prefix, once per z group; every prompt keeps >= 1 token of its own
    C = _shared_prefix(prompt_ids) if share_prefix else 0
    al = align or alignment(model)
    prefix, slot = None, {}
    if C >= min_shared_tokens:
        used = sorted(set(groups))
        slot = {g: i for i, g in enumerate(used)}
        prefix = _prefix_cache(model, prompt_ids[0][:C], used, use_z, pad_id, prefill_tokens, al)
    else:
        C = 0

    out_lp: list[list[float]] = [[] for _ in prompt_ids]
    out_g: list[list[bool]] = [[] for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # similar KV lengths per batch
    scored = [sum(_round_up(len(c), al.rows) for c in {tuple(c[:-1]): c for c in cands}.values())  # its segments
              for cands in per_prompt]
    vocab = model.get_output_embeddings().weight.shape[0]
    for idx in _logit_batches(order, scored, batch_size, vocab, max_logits_mb):
        length = _round_up(max(len(prompt_ids[i]) + max(map(len, per_prompt[i])) for i in idx) + al.rows, al.keys)
        kv = _KV(len(idx), length, device, al)
        if prefix is not None:  # the shared prefix's KV into every prompt's slot
            src = torch.tensor([slot[groups[i]] for i in idx], device=device)
            kv.copy_positions(slice(None), prefix, src, C)
        prefill(model, kv, [(b, groups[i], prompt_ids[i][C:-1], C) for b, i in enumerate(idx)
                            if len(prompt_ids[i]) - 1 > C], pad=pad_id, prefill_tokens=prefill_tokens, use_z=use_z)
        # every candidate: one segment of its prompt's slot, from the last prompt token on; the
        # segments of one slot overwrite each other's keys, each only after it has attended.
        # Candidates whose inputs are the same (all but their last token: single-token options
        # such as letters) share one segment: the same tokens at the same positions give the
        # same logits bit for bit, so each reads its own target there
        ids, pos, rows, segments, at, first = [], [], [], [], [], {}
        for b, i in enumerate(idx):
            start = len(prompt_ids[i]) - 1
            for cand in per_prompt[i]:
                key = (b, tuple(cand[:-1]))
                if key not in first:
                    n = _round_up(len(cand), al.rows)
                    first[key] = len(ids)
                    segments.append((b, start, len(ids), n))
                    ids += [prompt_ids[i][-1]] + cand[:-1] + [pad_id] * (n - len(cand))
                    pos += range(start, start + n)
                    rows += [groups[i]] * n
                at += [(first[key] + j, t) for j, t in enumerate(cand)]
        kv.set_prefill(segments)
        use_z(rows)
        logits = _forward(model, kv, torch.tensor(ids, device=device), torch.tensor(pos, device=device))
        where, target = (torch.tensor(x, device=device) for x in zip(*at))
        lp = (logits[where, target].float() - _logsumexp_rows(logits)[where]).tolist()
        hit = (logits.argmax(-1)[where] == target).tolist()
        del logits, kv
        k = 0
        for i in idx:
            for cand in per_prompt[i]:
                out_lp[i].append(float(sum(lp[k:k + len(cand)])))
                out_g[i].append(all(hit[k:k + len(cand)]))
                k += len(cand)
    return ContinuationScores(out_lp, [[len(c) for c in cands] for cands in per_prompt], out_g)


def scores_match_alone(model, align) -> bool:
    """`token_logprobs` with these row/key multiples gives every prompt's scores bit for bit
    alone and among others (random prompts sharing a prefix, so the prefix KV is reused, and
    packed candidates): the scorer's half of `decoding.kernels.alignment`'s end-to-end check."""
    from .decoding.kernels import random_prompt_maker

    rand = random_prompt_maker(model, seed=1)
    head = rand(24)
    prompts = [head + rand(n) for n in (1, 7, 19, 40)]
    conts = [[rand(n) for n in ks] for ks in ((1, 3), (5,), (2, 9, 4), (6, 1))]
    with torch.inference_mode():
        together = token_logprobs(model, prompts, conts, batch_size=4, align=align)
        for i in range(len(prompts)):
            alone = token_logprobs(model, [prompts[i]], [conts[i]], align=align)
            if alone.logprob[0] != together.logprob[i]:
                return False
        pair = token_logprobs(model, prompts[1:3], conts[1:3], batch_size=2, align=align)
    return pair.logprob == together.logprob[1:3]


def prompt_once_logits(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, continuations: torch.Tensor,
                       continuation_mask: Optional[torch.Tensor] = None,
                       position_ids: Optional[torch.Tensor] = None, prefix_cache=None) -> torch.Tensor:
    """Logits that predict each continuation token, (R, C, V), with each prompt run once.

    ids / mask: (P, L) left-padded prompts; row r of `continuations` (R, C) continues prompt
    rows[r]. The prompts' KV cache (gradients included, if any) is gathered by `rows` for the
    continuations' pass. continuation_mask: (R, C), right padding (None: all attended, which a
    right-padded tail cannot change); position_ids: the prompts' (P, L) positions, continued
    from each row's last one (None: the model's default, as a plain forward of the same rows).
    prefix_cache: the KV cache of a prefix that comes before every prompt (one row per prompt);
    `mask` then starts with its columns and `position_ids` must be given.
    """
    from .models import forward_cache_kw, returned_cache

    C = continuations.shape[1]
    if prefix_cache is not None and position_ids is None:
        raise ValueError("a prefix cache needs the prompts' position_ids")
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                **({} if prefix_cache is None else forward_cache_kw(model, prefix_cache)))
    first = out.logits[rows, -1:].float()  # predicts each continuation's first token
    if C == 1:
        return first
    cache = returned_cache(out)
    cache.reorder_cache(rows)
    tail = (torch.ones((len(rows), C - 1), dtype=mask.dtype, device=mask.device) if continuation_mask is None
            else continuation_mask[:, :-1].to(mask.dtype))
    ext_pos = None if position_ids is None else position_ids[rows, -1:] + 1 + torch.arange(C - 1, device=ids.device)
    rest = model(input_ids=continuations[:, :-1], attention_mask=torch.cat([mask[rows], tail], dim=1),
                 position_ids=ext_pos, use_cache=True, **forward_cache_kw(model, cache)).logits.float()
    return torch.cat([first, rest], dim=1)


def _sliding_window(model) -> Optional[int]:
    """The smallest attention window of the model's layers (None: every layer sees every key)."""
    config = getattr(model.config, "text_config", None) or model.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False or (types and "sliding_attention" not in types):
        return None
    return int(window)


def continuation_logprobs_grad(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *,
                               min_shared_tokens: int = 16):
    """Summed log-probabilities of each of K shared continuations after each prompt, (P, K),
    differentiable (REINFORCE on a choice among a closed set); plus the continuation-token mask
    and logits, (P·K, C) and (P·K, C, V), for a KL penalty. Tokenized as `continuation_logprobs`;
    each prompt runs once and its KV cache serves its K continuations, and the token prefix all
    prompts share (>= `min_shared_tokens`; the classification prompts' instructions, 148 of ~210
    tokens) runs once for all of them: a classifier step 9.3 -> 5.6 s (12 prompts, SmolLM2, fp32),
    the same log-probabilities and z-gradients to float rounding."""
    from .decoding.engine import _shared_prefix
    from .models import returned_cache

    prompts = _encode(tokenizer, prompts)
    labels = _encode(tokenizer, continuations)
    P, K, C = len(prompts), len(labels), max(len(lab) for lab in labels)
    pad, device = _pad_id(tokenizer), _device(model)
    S = _shared_prefix(prompts)
    window = _sliding_window(model)  # the suffixes' padding sits after the prefix: inside a window, if any
    cache = None
    if S >= min_shared_tokens and (window is None or max(len(p) for p in prompts) + C <= window):
        # the prefix's KV, gradients included, one row per prompt
        cache = returned_cache(model(input_ids=torch.tensor([prompts[0][:S]], device=device), use_cache=True,
                                     logits_to_keep=1))
        cache.reorder_cache(torch.zeros(P, dtype=torch.long, device=device))
    else:
        S = 0
    ids, mask = left_padded([p[S:] for p in prompts], pad, cached=S)
    targets = torch.full((P * K, C), pad, dtype=torch.long)
    target_mask = torch.zeros((P * K, C))
    for r in range(P * K):
        lab = labels[r % K]
        targets[r, :len(lab)], target_mask[r, :len(lab)] = torch.tensor(lab), 1  # right padding: never attended to
    ids, mask, targets, target_mask = ids.to(device), mask.to(device), targets.to(device), target_mask.to(device)
    pos = S + (mask[:, S:].cumsum(-1) - 1).clamp_min(0)  # the suffixes' positions, after the shared prefix
    rows = torch.arange(P, device=device).repeat_interleave(K)  # row r = prompt r // K, label r % K
    logits = prompt_once_logits(model, ids, mask, rows, targets, position_ids=pos,  # position t predicts token t
                                prefix_cache=cache)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (logp * target_mask).sum(1).view(P, K), target_mask, logits
