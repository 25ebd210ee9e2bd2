"""The engine's KV buffer and the attention function it registers with transformers.

Rows are left-aligned (row r's token t sits in slot t), keys are padded to a multiple of
`align.keys` (see kernels.py) with exact zeros that trail, and attention is matmul + softmax
over them: the shapes that keep a row's result independent of the other rows (see the package
docstring). Keys are stored transposed, (slots, heads, head_dim, positions): q·Kᵀ is then a
plain matmul over a prefix of the positions (1.14 vs 2.08 ms a layer at 128 rows × 208 keys,
float32, here; 1.33 vs 1.79 in bf16, where a sliced Kᵀ was copied before every matmul).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from .kernels import Alignment

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


def _attn(q, Kt, V, ok, scaling: float, softcap: Optional[float]) -> torch.Tensor:
    """softmax(q·Kᵀ)·V as plain matmuls (shape-stable rounding, unlike SDPA's blocked kernel);
    Kt is (..., head_dim, keys)."""
    s = torch.matmul(q, Kt)
    s.mul_(scaling)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s.masked_fill_(~ok, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), V)


def _attn_prefill(q, Kt, V, bias, scaling: float, softcap: Optional[float]) -> torch.Tensor:
    """`_attn` for one block of a prefill piece, (kv heads, queries, ·), masked by an additive
    `bias` (0 / -inf): one baddbmm writes the scaled, masked scores, one pass over them instead of
    three (same bits as matmul, scale, mask; bf16 ~1.5x faster here). A softcap goes between the
    scale and the mask, so it takes `_attn`'s separate steps."""
    if softcap:
        return _attn(q, Kt, V, bias == 0, scaling, softcap)
    return torch.matmul(torch.softmax(torch.baddbmm(bias, q, Kt, alpha=scaling), dim=-1), V)


QUERY_BLOCK = 128    # prefill queries per attention matmul: each block reads only the keys its last query
                     # sees (causal), and its scores stay in cache (fp32, a 512-token piece: 2.4 vs 3.9 ms)
SPAN_ROWS = 16        # decode attention runs over spans of at least this many slots,
SPAN_COST = 1024     # each over its own longest row's keys, where that saves more than this many (row, key) reads


def _spans(keys: list[int]) -> list[tuple[int, int, int]]:
    """(first slot, end slot, key length) of the decode attention's matmuls: one over every row
    pads each to the longest row's keys (a 520-token prompt among 90-token ones makes every row
    read 600+ keys); consecutive SPAN_ROWS-slot spans over their own longest, merged wherever a
    separate span saves fewer than SPAN_COST (row, key) reads (the cost of its extra kernel calls)."""
    spans: list[tuple[int, int, int]] = []
    for a in range(0, len(keys), SPAN_ROWS):
        e = min(a + SPAN_ROWS, len(keys))
        L = max(keys[a:e])
        if spans:
            a0, _, L0 = spans[-1]
            if (e - a0) * max(L, L0) - (a - a0) * L0 - (e - a) * L <= SPAN_COST:
                spans[-1] = (a0, e, max(L, L0))
                continue
        spans.append((a, e, L))
    return spans


class _KV:
    """Preallocated keys/values per layer, keys (slots, heads, head_dim, positions) and values
    (slots, heads, positions, head_dim), and the attention over them.

    A forward either prefills packed `segments` (slot, start, offset, n): input tokens
    offset..offset+n are positions start..start+n of that slot — or decodes one token per slot
    at its own position `pos[slot]`. Inputs are (tokens, 1): every token is a batch row, so
    per-row SVF z can be given per token.
    """

    def __init__(self, slots: int, length: int, device: torch.device, align: Alignment):
        self.slots, self.length, self.device, self.align = slots, length, device, align
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.segments: list[tuple[int, int, int, int]] = []
        self.pos: Optional[torch.Tensor] = None
        self.kv_len = 0
        self.spans: list[tuple[int, int, int]] = []  # decode: see _spans
        self._masks: dict = {}

    def _bias(self, first: int, n: int, L: int, window: Optional[int], g: int, dtype) -> torch.Tensor:
        """(1, g·n, L) additive mask of queries at positions first..first+n (each repeated for the g
        query heads of a KV head), kept for the forward's other layers."""
        key = (first, n, L, window, g)
        if key not in self._masks:
            ok = _visible(torch.arange(first, first + n, device=self.device)[:, None], L, window).repeat(g, 1)
            self._masks[key] = torch.zeros(ok.shape, dtype=dtype, device=self.device).masked_fill_(~ok, float("-inf"))[None]
        return self._masks[key]

    def set_prefill(self, segments: list[tuple[int, int, int, int]]) -> None:
        self.segments, self.pos, self._masks = segments, None, {}

    def set_decode(self, pos: torch.Tensor) -> None:
        """One token per slot at `pos` (padding slots at 0): each span's key length, and the longest."""
        self.pos, self._masks = pos, {}
        keys = [min(_round_up(p + 1, self.align.keys), self.length) for p in pos.tolist()]
        self.spans, self.kv_len = _spans(keys), max(keys)

    def buffers(self, layer: int, heads: int, key_dim: int, value_dim: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.layers:  # zeros, not empty: masked slots must hold finite values (0·NaN = NaN)
            new = lambda *shape: torch.zeros(self.slots, heads, *shape, dtype=dtype, device=self.device)
            self.layers[layer] = (new(key_dim, self.length), new(self.length, value_dim))
        return self.layers[layer]

    def copy_positions(self, dst, source: "_KV", src, n: int) -> None:
        """Positions [0, n) of `source`'s slots `src` into this buffer's slots `dst`, every layer
        (a shared prefix into rows, a prompt's KV into its twins)."""
        for layer, (K, V) in list(source.layers.items()):
            Kd, Vd = self.buffers(layer, K.shape[1], K.shape[2], V.shape[3], K.dtype)
            Kd[dst, :, :, :n] = K[src, :, :, :n]
            Vd[dst, :, :n] = V[src, :, :n]

    def attend(self, module, query, key, value, scaling, window, softcap) -> torch.Tensor:
        N, H, _, d = query.shape  # (tokens, heads, 1, head_dim)
        kvh = key.shape[1]
        K, V = self.buffers(module.layer_idx, kvh, key.shape[-1], value.shape[-1], key.dtype)
        g = H // kvh  # the query heads of one KV head share its keys: no repeat_kv
        scaling = scaling if scaling is not None else d ** -0.5
        if self.pos is not None:  # decode: row b writes and reads slot b
            b = torch.arange(N, device=self.device)
            K[b, :, :, self.pos] = key[:, :, 0]
            V[b, :, self.pos] = value[:, :, 0]
            if (window, g) not in self._masks:
                self._masks[window, g] = _visible(self.pos[:, None], self.kv_len, window)[:, None, None]
            q, ok = query.reshape(N, kvh, g, d), self._masks[window, g]
            outs = [_attn(q[a:e], K[a:e, ..., :L], V[a:e, :, :L], ok[a:e, ..., :L], scaling, softcap)
                    for a, e, L in self.spans]
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            return out.view(N, H, 1, -1).transpose(1, 2)
        outs = []
        for slot, start, off, n in self.segments:  # prefill: one piece of one prompt at a time
            K[slot, ..., start:start + n] = key[off:off + n, :, 0].permute(1, 2, 0)
            V[slot, :, start:start + n] = value[off:off + n, :, 0].transpose(0, 1)
            q = query[off:off + n, :, 0].transpose(0, 1).view(kvh, g, n, d)
            for a in range(0, n, QUERY_BLOCK):  # query block [a, e) over keys up to its own end, rounded
                e = min(a + QUERY_BLOCK, n)
                L = min(_round_up(start + e, self.align.keys), self.length)
                o = _attn_prefill(q[:, :, a:e].reshape(kvh, g * (e - a), d), K[slot, ..., :L], V[slot, :, :L],
                                  self._bias(start + a, e - a, L, window, g, query.dtype), scaling, softcap)
                outs.append(o.view(H, e - a, -1).transpose(0, 1))
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
