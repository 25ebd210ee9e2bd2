"""Log-likelihood scoring of continuations without decoding: one kernel for every caller.

Multiple-choice options (CEM on ARC), gold answers (CEM's tie-break), the four dispatch labels
(loglik first pass) and lm-eval-style scoring all reduce to "Σ log p(continuation | prompt)".
The kernel shares work: the token prefix common to every prompt (a system prompt) runs once
per z group and its KV cache is reused; candidates of one prompt share its forward pass; the
kept logits per batch are bounded (`max_logits_mb`). With `group_z`, row i runs with its own SVF
vector (the per-sample factored path), so a whole CEM population is one batch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .svf import RowZ, set_row_z


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
        ids, mask = left_padded([prompt_ids[i][C:] + pre for i, pre in zip(idx, prefixes)], pad, cached=C)
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


def continuation_logprobs_grad(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str]):
    """Summed log-probabilities of each of K shared continuations after each prompt, (P, K),
    differentiable (REINFORCE on a choice among a closed set); plus the continuation-token mask
    and logits, (P·K, C) and (P·K, C, V), for a KL penalty. Tokenized as `continuation_logprobs`;
    each prompt runs once and its KV cache serves its K continuations."""
    prompts = _encode(tokenizer, prompts)
    labels = _encode(tokenizer, continuations)
    P, K, C = len(prompts), len(labels), max(len(lab) for lab in labels)
    pad, device = _pad_id(tokenizer), _device(model)
    ids, mask = left_padded(prompts, pad)
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
