"""The engine's KV buffer and the attention function it registers with transformers.

Rows are left-aligned (row r's token t sits in slot t), keys are padded to a multiple of
`align.keys` (see kernels.py) with exact zeros that trail, and attention is matmul + softmax
over them: the shapes that keep a row's result independent of the other rows (see the package
docstring).
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

    def __init__(self, slots: int, length: int, device: torch.device, align: Alignment):
        self.slots, self.length, self.device, self.align = slots, length, device, align
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.segments: list[tuple[int, int, int, int]] = []
        self.pos: Optional[torch.Tensor] = None
        self.kv_len = 0
        self._masks: dict = {}

    def set_prefill(self, segments: list[tuple[int, int, int, int]]) -> None:
        self.segments, self.pos, self._masks = segments, None, {}

    def set_decode(self, pos: torch.Tensor, longest: int) -> None:
        self.pos, self._masks = pos, {}
        self.kv_len = min(_round_up(longest + 1, self.align.keys), self.length)

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
            L = min(_round_up(start + n, self.align.keys), self.length)
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
