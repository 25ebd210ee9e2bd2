"""One decoding engine for every path that generates: rollouts, validation, CEM, dispatch, lm-eval.

`model.generate` reached ~14% of the fp32 matmul roofline on the 2-core CPU this project runs
on: its cache grows by concatenation, it builds masks every step and pads rows on the left.
`generate` here runs the same Hugging Face model, unchanged, and swaps only its attention
function (a registered `AttentionInterface`) for one that owns a preallocated KV buffer:

- rows are *left-aligned*: slot s, position p holds token p of the row in slot s, so padding
  only ever trails a row and a row's keys never move when other rows come and go;
- continuous batching: a row leaves the batch the step it stops (the last row moves into its
  slot), and waiting prompts are admitted into free slots, within a token budget
  (slots × (longest prompt + max_new_tokens));
- prefill is packed (no padding between prompts) and stops one token short of each prompt:
  every logit comes from the same one-token decode step, so nothing needs a per-row gather;
- the prompts' common token prefix (a system prompt) is run once per z and copied into rows.

Batch invariance (bitwise): a row's logits, hence its tokens, never depend on padding, batch
size or the other rows. Kernels can round differently for different shapes; on this machine's
MKL (see `tests/test_decoding.py`): a linear layer's output row depends on the row count M
only when M is not a multiple of 4 (M < 4 is a gemv; threaded, M in 5..11 splits unevenly);
SDPA's CPU flash kernel splits keys into length-dependent blocks, so trailing padding changes
a row; a plain q·kᵀ matmul changes a column unless the key count is a multiple of 4. Hence:
every forward has a multiple of 4 rows (decode) or tokens per prompt piece (prefill), and
attention is matmul + softmax over a key length rounded up to 16 whose masked keys trail.
`batch_invariant=False` drops the row padding (faster at batch 1, where M=1 is a gemv).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch

from .svf import RowZ, preserved_svf_state, set_row_z

ROW_ALIGN = 4     # decode rows and prefill pieces come in multiples of this
KV_ALIGN = 16     # attention runs over a key length rounded up to this
PIECE = 512       # longest prefill piece of one prompt (bounds the (heads, piece, keys) scores)
_IMPL = "t2_engine"
_local = threading.local()  # the KV buffer of the forward running in this thread


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _visible(q_pos: torch.Tensor, length: int, window: Optional[int]) -> torch.Tensor:
    """(..., L) bool: the keys a query at q_pos (..., 1) attends to (causal, sliding window)."""
    j = torch.arange(length, device=q_pos.device)
    ok = j <= q_pos
    if window:
        ok &= j > q_pos - window
    return ok


def _attn(q, K, V, ok, scaling: float, softcap: Optional[float]) -> torch.Tensor:
    """softmax(q·Kᵀ)·V as plain matmuls (shape-stable rounding, unlike SDPA's blocked kernel)."""
    s = torch.matmul(q, K.transpose(-1, -2))
    s.mul_(scaling)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s.masked_fill_(~ok, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), V)


class _KV:
    """Preallocated keys/values, slots × positions per layer, and the attention over them.

    A forward either prefills packed `segments` (slot, start, offset, n): input tokens
    offset..offset+n are positions start..start+n of that slot — or decodes one token per slot
    at its own position `pos[slot]`. Inputs are (tokens, 1): every token is a batch row, so
    per-row SVF z can be given per token.
    """

    def __init__(self, slots: int, length: int, device: torch.device):
        self.slots, self.length, self.device = slots, length, device
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.segments: list[tuple[int, int, int, int]] = []
        self.pos: Optional[torch.Tensor] = None
        self.kv_len = 0
        self._masks: dict = {}

    def set_prefill(self, segments: list[tuple[int, int, int, int]]) -> None:
        self.segments, self.pos, self._masks = segments, None, {}

    def set_decode(self, pos: torch.Tensor, longest: int) -> None:
        self.pos, self._masks = pos, {}
        self.kv_len = min(_round_up(longest + 1, KV_ALIGN), self.length)

    def buffers(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.layers:  # zeros, not empty: masked slots must hold finite values (0·NaN = NaN)
            shape = (self.slots, key.shape[1], self.length)
            self.layers[layer] = (key.new_zeros(*shape, key.shape[-1]), value.new_zeros(*shape, value.shape[-1]))
        return self.layers[layer]

    def attend(self, module, query, key, value, scaling, window, softcap) -> torch.Tensor:
        K, V = self.buffers(module.layer_idx, key, value)
        N, H, _, d = query.shape  # (tokens, heads, 1, head_dim)
        kvh = K.shape[1]
        g = H // kvh  # the query heads of one KV head share its keys: no repeat_kv
        scaling = scaling if scaling is not None else d ** -0.5
        if self.pos is not None:  # decode: row b writes and reads slot b
            b = torch.arange(N, device=self.device)
            K[b, :, self.pos] = key[:, :, 0]
            V[b, :, self.pos] = value[:, :, 0]
            if (window, g) not in self._masks:
                self._masks[window, g] = _visible(self.pos[:, None], self.kv_len, window)[:, None, None]
            out = _attn(query.reshape(N, kvh, g, d), K[:N, :, :self.kv_len], V[:N, :, :self.kv_len],
                        self._masks[window, g], scaling, softcap)
            return out.view(N, H, 1, -1).transpose(1, 2)
        outs = []
        for i, (slot, start, off, n) in enumerate(self.segments):  # prefill: one piece of one prompt at a time
            K[slot, :, start:start + n] = key[off:off + n, :, 0].transpose(0, 1)
            V[slot, :, start:start + n] = value[off:off + n, :, 0].transpose(0, 1)
            L = min(_round_up(start + n, KV_ALIGN), self.length)
            if (i, window, g) not in self._masks:
                q_pos = torch.arange(start, start + n, device=self.device)[:, None]
                self._masks[i, window, g] = _visible(q_pos, L, window).repeat(g, 1)
            q = query[off:off + n, :, 0].transpose(0, 1).reshape(kvh, g * n, d)
            o = _attn(q, K[slot, :, :L], V[slot, :, :L], self._masks[i, window, g], scaling, softcap)
            outs.append(o.view(H, n, -1).transpose(0, 1))
        return torch.cat(outs)[:, None]  # what HF attention functions return: (batch, q_len, heads, dim)


def _attention(module, query, key, value, attention_mask, *, scaling=None, sliding_window=None, softcap=None,
               **kwargs):
    kv = getattr(_local, "kv", None)
    if kv is None:
        raise RuntimeError("transformer2.decoding: the model ran outside the engine while it decodes "
                           "(from another thread?)")
    return kv.attend(module, query, key, value, scaling, sliding_window, softcap), None


@contextmanager
def _engine_attention(model, kv: _KV) -> Iterator[None]:
    """Route the model's attention through `kv` for the duration; the model itself is untouched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if _IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(_IMPL, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config, prev = model.config, getattr(_local, "kv", None)
    orig = config._attn_implementation
    config._attn_implementation, _local.kv = _IMPL, kv
    try:
        yield
    finally:
        config._attn_implementation, _local.kv = orig, prev


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a "prepared 4D mask": HF skips building its own


def _forward(model, kv: _KV, ids: torch.Tensor, pos: torch.Tensor, logits: bool = True) -> torch.Tensor:
    """One forward of (tokens,) ids at positions pos through `kv`: logits (tokens, vocab), or
    none at all for a prefill (an empty `logits_to_keep` index skips the LM head)."""
    keep = 1 if logits else torch.zeros(0, dtype=torch.long, device=ids.device)
    with _engine_attention(model, kv):
        out = model(input_ids=ids[:, None], position_ids=pos[:, None], attention_mask=_NO_MASK.to(ids.device),
                    use_cache=False, logits_to_keep=keep)
    return out.logits[:, -1] if logits else out.logits


# ---------------------------------------------------------------- choosing the next token

def _pick(logits: torch.Tensor, u: Optional[torch.Tensor], temperature: float, top_p: float) -> torch.Tensor:
    """Greedy (u is None), or inverse-CDF sampling with one uniform per row: a row's draw depends
    only on its own logits and its own random stream, never on the batch."""
    if u is None:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    order = None
    if top_p < 1.0:  # nucleus, as HF's TopPLogitsWarper: drop tokens once the mass above them reaches top_p
        logits, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(logits, -1)
    if order is not None:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    i = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_max(cdf.shape[1] - 1)
    return (i if order is None else order.gather(1, i)).squeeze(1)


def _row_uniforms(n: int, steps: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(n, steps) uniforms, one stream per row seeded from `generator`: reproducible, resumable
    from a saved generator state, and independent of how rows are batched."""
    seeds = torch.randint(0, 2 ** 62, (n,), generator=generator).tolist()
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s)) for s in seeds])


# ---------------------------------------------------------------- the engine

def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n, first, k = min(len(s) for s in seqs), seqs[0], 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


class _Decoder:
    """The state of one `generate` call: KV slots, the rows in them, and the waiting prompts."""

    def __init__(self, model, prompts, *, max_new_tokens, stop_ids, pad_id, row_z, row_group, token_budget,
                 max_batch, share_prefix, min_shared_tokens, prefill_tokens, batch_invariant):
        self.model, self.prompts, self.max_new, self.pad = model, prompts, max_new_tokens, pad_id
        self.device = next(model.parameters()).device
        self.stop = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long, device=self.device)
        n = len(prompts)
        self.row_z = row_z
        self.groups = [0] * n if row_z is None else list(range(n)) if row_group is None else [int(g) for g in row_group]
        self.prefill_tokens, self.align = prefill_tokens, ROW_ALIGN if batch_invariant else 1
        longest = max(len(p) for p in prompts)
        length = _round_up(longest + max_new_tokens + ROW_ALIGN, KV_ALIGN)
        cap = lambda k: max(ROW_ALIGN, k // ROW_ALIGN * ROW_ALIGN)
        self.slots = min(_round_up(n, ROW_ALIGN), cap(max_batch), cap(token_budget // length))
        self.kv = _KV(self.slots, length, self.device)
        self.rid: list[Optional[int]] = [None] * self.slots  # slot -> input row
        z = lambda: torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self.pos, self.tok, self.steps = z(), z(), z()  # next token's position, next token, tokens generated
        self.active = 0  # rows live in slots [0, active)
        self.queue = deque(sorted(range(n), key=lambda i: -len(prompts[i])))  # longest first
        self.out: list[list[int]] = [[] for _ in prompts]
        self._z_rows: Optional[list] = None
        self.clock = dict(prefill_s=0.0, prefill_tokens=0, decode_s=0.0, steps=0, rows=0)
        # the common prefix, once per z group (not worth it with more groups than slots)
        self.shared, self.prefix = 0, None
        if share_prefix and n > 1:
            shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
            used = sorted(set(self.groups))
            if shared >= min_shared_tokens and len(used) <= self.slots:
                self.shared, self.group_slot = shared, {g: i for i, g in enumerate(used)}
                self.prefix = _KV(len(used), _round_up(shared + ROW_ALIGN, KV_ALIGN), self.device)
                reps = [self.groups.index(g) for g in used]  # a group's first row stands for it
                self._prefill(self.prefix, [(i, r, prompts[r][:shared], 0) for i, r in enumerate(reps)])

    def use_z(self, rows: Sequence[int]) -> None:
        """Per-row z for the next forward's rows (only when they changed)."""
        if self.row_z is not None:
            groups = [self.groups[r] for r in rows]
            if groups != self._z_rows:
                set_row_z(self.model, self.row_z, torch.tensor(groups))
                self._z_rows = groups

    def _prefill(self, kv: _KV, items: list[tuple[int, int, list, int]]) -> None:
        """Write prompts' KV: items are (slot, row, tokens, first position). Prompts are cut into
        pieces of <= PIECE tokens, each padded to a multiple of ROW_ALIGN, and packed into
        forwards of about `prefill_tokens`; a prompt's pieces run in order."""
        pieces = []
        for slot, row, toks, start in items:
            for a in range(0, len(toks), PIECE):
                pieces.append((slot, row, toks[a:a + PIECE], start + a))
        while pieces:
            batch, total = [], 0
            while pieces and (not batch or total + len(pieces[0][2]) <= self.prefill_tokens):
                batch.append(pieces.pop(0))
                total += _round_up(len(batch[-1][2]), ROW_ALIGN)
            ids, pos, rows, segments = [], [], [], []
            for slot, row, toks, start in batch:
                n = _round_up(len(toks), ROW_ALIGN)
                segments.append((slot, start, len(ids), n))
                ids += toks + [self.pad] * (n - len(toks))
                pos += range(start, start + n)
                rows += [row] * n
            kv.set_prefill(segments)
            self.use_z(rows)
            t = time.perf_counter()
            _forward(self.model, kv, torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device),
                     logits=False)
            self.clock["prefill_s"] += time.perf_counter() - t
            self.clock["prefill_tokens"] += sum(len(p[2]) for p in batch)

    def admit(self) -> None:
        """Move waiting prompts into free slots: shared prefix copied, the rest prefilled."""
        free = self.slots - self.active
        if not self.queue or free < min(len(self.queue), ROW_ALIGN):
            return
        new = [self.queue.popleft() for _ in range(min(free, len(self.queue)))]
        a, C = self.active, self.shared
        if self.prefix is not None:
            src = torch.tensor([self.group_slot[self.groups[r]] for r in new], device=self.device)
            for layer, (K, V) in self.prefix.layers.items():
                Kt, Vt = self.kv.buffers(layer, K, V)
                Kt[a:a + len(new), :, :C] = K[src, :, :C]
                Vt[a:a + len(new), :, :C] = V[src, :, :C]
        # the last prompt token is fed by the first decode step
        self._prefill(self.kv, [(a + b, r, self.prompts[r][C:-1], C) for b, r in enumerate(new)
                                if len(self.prompts[r]) - 1 > C])
        for b, r in enumerate(new):
            self.rid[a + b] = r
            self.pos[a + b] = len(self.prompts[r]) - 1
            self.tok[a + b] = self.prompts[r][-1]
            self.steps[a + b] = 0
        self.active += len(new)

    def step(self, pick: Callable[[list, torch.Tensor], torch.Tensor],
             stop_check: Optional[Callable[[int, list], bool]]) -> int:
        """One token for every live row; returns how many rows finished."""
        t = time.perf_counter()
        m, rows = self.active, _round_up(self.active, self.align)
        self.use_z([r if r is not None else self.rid[0] for r in self.rid[:rows]])
        self.kv.set_decode(self.pos[:rows], int(self.pos[:m].max()))
        logits = _forward(self.model, self.kv, self.tok[:rows], self.pos[:rows])[:m]
        nxt = pick(self.rid[:m], logits)
        self.tok[:m] = nxt
        self.pos[:m] += 1
        self.steps[:m] += 1
        finished = self.steps[:m] >= self.max_new
        if self.stop.numel():
            finished |= torch.isin(nxt, self.stop)
        for b, token in enumerate(nxt.tolist()):
            self.out[self.rid[b]].append(token)
        if stop_check is not None:
            finished |= torch.tensor([stop_check(r, self.out[r]) for r in self.rid[:m]], device=self.device)
        keep = (~finished).nonzero().flatten().tolist()
        if len(keep) < m:
            self._compact(keep)
        self.clock["decode_s"] += time.perf_counter() - t
        self.clock["steps"] += 1
        self.clock["rows"] += m
        return m - len(keep)

    def _compact(self, keep: list) -> None:
        """Surviving rows to the front: only rows past the new end move, into the holes."""
        m, kept = len(keep), set(keep)
        holes = [i for i in range(m) if i not in kept]
        movers = [i for i in keep if i >= m]
        if holes:
            dst, src = torch.tensor(holes, device=self.device), torch.tensor(movers, device=self.device)
            for K, V in self.kv.layers.values():
                K[dst] = K[src]
                V[dst] = V[src]
            for t in (self.pos, self.tok, self.steps):
                t[dst] = t[src]
            for h, s in zip(holes, movers):
                self.rid[h] = self.rid[s]
        self.rid[m:self.active] = [None] * (self.active - m)
        self.pos[m:self.active] = 0  # dead slots attend to their own slot 0 only
        self.active = m


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int] = (),
             pad_id: int = 0, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, row_z: Optional[RowZ] = None,
             row_group: Optional[Sequence[int]] = None, token_budget: int = 16384, max_batch: int = 64,
             share_prefix: bool = True, min_shared_tokens: int = 16, prefill_tokens: int = 2048,
             batch_invariant: bool = True, stop_check: Optional[Callable[[int, list], bool]] = None,
             on_logits: Optional[Callable[[list, torch.Tensor], None]] = None,
             progress: Optional[Callable[[int, int], None]] = None,
             stats: Optional[dict] = None) -> list[list[int]]:
    """Generated token ids per prompt (in input order), up to and including the first stop id.

    prompts: token ids per row (ragged, unpadded). Greedy unless `do_sample`: temperature, then
    top-p, with uniforms drawn per row from `generator` (a saved generator state replays a call).
    row_z: {module: (G, r)}: row i decodes with z = row_z[module][row_group[i]] (the factored SVF
    path; row_group defaults to one group per row); without it, the weights that are active.
    Rows are taken longest first into at most `max_batch` slots of at most `token_budget` KV
    positions in all, and admitted as slots free up; a row stops at a stop id, at
    `max_new_tokens`, or when `stop_check(row, ids_so_far)` returns True (e.g. stop strings).
    The common token prefix of all prompts (>= `min_shared_tokens`) is computed once per z group.
    `on_logits(rows, logits)` sees each step's logits; `stats`, if a dict, receives the seconds
    and token counts of prefill and decode. The model's SVF state and mode are restored.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    start = time.perf_counter()
    uniforms = _row_uniforms(len(prompts), max_new_tokens, generator) if do_sample else None

    def pick(rows: list, logits: torch.Tensor) -> torch.Tensor:
        if on_logits is not None:
            on_logits(list(rows), logits.float())
        u = None if uniforms is None else uniforms[rows, dec.steps[:len(rows)].cpu()].to(logits.device)
        return _pick(logits, u, temperature, top_p)

    with preserved_svf_state(model), _eval_mode(model):
        dec = _Decoder(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                       row_z=row_z, row_group=row_group, token_budget=token_budget, max_batch=max_batch,
                       share_prefix=share_prefix, min_shared_tokens=min_shared_tokens,
                       prefill_tokens=prefill_tokens, batch_invariant=batch_invariant)
        done = 0
        while dec.queue or dec.active:
            dec.admit()
            finished = dec.step(pick, stop_check)
            if finished and progress is not None:
                done += finished
                progress(done, len(prompts))
    if stats is not None:
        stats.update(dec.clock, seconds=time.perf_counter() - start, slots=dec.slots, shared_prefix=dec.shared,
                     generated=sum(len(o) for o in dec.out))
    return dec.out


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Decode without dropout (a LoRA model may be in training mode); restore the mode after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


# ---------------------------------------------------------------- for callers and other backends

def pad_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int):
    """Left-padded prompts followed by right-padded completions, the layout of
    `generation.Rollout`: (input_ids, attention_mask, completion_mask, prompt_length)."""
    P = max(len(p) for p in prompts)
    C = max([len(c) for c in completions] + [0])
    ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, P - len(p):P], attn[b, P - len(p):P] = torch.tensor(p, dtype=torch.long), 1
        if c:
            ids[b, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[b, P:P + len(c)] = comp[b, P:P + len(c)] = 1
    return ids, attn, comp, P


@runtime_checkable
class DecodingBackend(Protocol):
    """What a generating path needs from a decoder; `TorchBackend` is this module's engine.

    A vLLM backend maps onto it as TRL's vLLM modes do: the policy lives in an `LLM` (on a second
    GPU, or colocated with `gpu_memory_utilization` < 1). `set_weights` pushes the rebuilt
    W' = U diag(σ·f(z)) Vᵀ of each SVF target (or the base weights) into vLLM's model with
    `llm.collective_rpc` → `model.load_weights([(hf_name + ".weight", W')])` and resets the
    prefix cache; `set_z` is `set_weights` with W' rebuilt from z. `generate` is
    `llm.generate([TokensPrompt(prompt_token_ids=p) ...], SamplingParams(max_tokens=...,
    temperature=0 or T, top_p=..., stop_token_ids=..., seed=per-row seed))`, returning
    `output.outputs[0].token_ids` per prompt, with prefix caching standing in for the shared
    prefix. vLLM has no per-request SVF: per-row z becomes one `set_z` + `generate` per z group
    (CEM: per candidate). Outputs are not bitwise equal to this engine's (other kernels).
    """

    def set_weights(self, weights: Optional[Mapping[str, torch.Tensor]]) -> None:
        """{module name: W'} for SVF targets; None restores the base weights."""

    def set_z(self, z: Optional[Mapping[str, torch.Tensor]]) -> None:
        """{module name: z (r,)}: a fixed expert; None restores the base weights."""

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int] = (),
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None,
                 row_z: Optional[RowZ] = None) -> list[list[int]]:
        """Token ids per prompt, up to and including the first stop id."""


class TorchBackend:
    """`DecodingBackend` over an in-process (SVF-patched) HF model and `generate`."""

    def __init__(self, model, pad_id: int = 0, **engine_options):
        self.model, self.pad_id, self.options = model, pad_id, engine_options

    def set_weights(self, weights: Optional[Mapping[str, torch.Tensor]]) -> None:
        from .svf import svf_layers

        for name, layer in svf_layers(self.model).items():
            if weights is None:
                layer.set_z(None)
            else:  # a fixed W' as a rebuilt expert would hold it (z kept only as a marker)
                layer.restore((torch.zeros(layer.rank, device=layer.S.device), weights[name].to(layer.S)))

    def set_z(self, z: Optional[Mapping[str, torch.Tensor]]) -> None:
        from .svf import svf_layers

        for name, layer in svf_layers(self.model).items():
            layer.set_z(None if z is None else z[name].to(layer.S.device))

    def generate(self, prompts, *, max_new_tokens, stop_ids=(), do_sample=False, temperature=1.0, top_p=1.0,
                 generator=None, row_z=None) -> list[list[int]]:
        return generate(self.model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=self.pad_id,
                        do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator,
                        row_z=row_z, **self.options)


__all__ = ["DecodingBackend", "TorchBackend", "generate", "pad_batch"]
