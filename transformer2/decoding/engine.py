"""`generate`: continuous batching over the KV buffer of `kv.py`, shared-prefix KV once per z
group, per-row SVF z that follows rows as they are compacted, stop ids and stop checks."""
from __future__ import annotations

import random
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..svf import RowZ, preserved_svf_state, set_row_z, svf_layers
from .kernels import MAX_ROWS, Alignment, alignment, random_prompt_maker
from .kv import _KV, _forward, _round_up
from .sampling import _pick, _row_uniforms

PIECE = 512       # longest prefill piece of one prompt (bounds the (heads, piece, keys) scores)


def _shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many tokens every sequence starts with, leaving each at least one of its own (its last
    token feeds the step that scores or decodes it); 0 for fewer than two sequences."""
    if len(seqs) < 2:
        return 0
    n, first, k = min(len(s) for s in seqs) - 1, seqs[0], 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


def prefill(model, kv: _KV, items: Sequence[tuple[int, int, Sequence[int], int]], *, pad: int,
            prefill_tokens: int, use_z: Optional[Callable[[list], None]] = None, clock: Optional[dict] = None) -> None:
    """Write prompts' KV into `kv`: items are (slot, row, tokens, first position). Prompts are cut
    into pieces of <= PIECE tokens, each padded to a multiple of `kv.align.rows`, and packed into
    forwards of about `prefill_tokens`; a prompt's pieces run in order. `use_z(rows)` sets the
    per-token SVF z (one row id per input token); `clock` adds up seconds and tokens."""
    device, align = next(model.parameters()).device, kv.align.rows
    pieces = []
    for slot, row, toks, start in items:
        for a in range(0, len(toks), PIECE):
            pieces.append((slot, row, list(toks[a:a + PIECE]), start + a))
    while pieces:
        batch, total = [], 0
        while pieces and (not batch or total + len(pieces[0][2]) <= prefill_tokens):
            batch.append(pieces.pop(0))
            total += _round_up(len(batch[-1][2]), align)
        ids, pos, rows, segments = [], [], [], []
        for slot, row, toks, start in batch:
            n = _round_up(len(toks), align)
            segments.append((slot, start, len(ids), n))
            ids += toks + [pad] * (n - len(toks))
            pos += range(start, start + n)
            rows += [row] * n
        kv.set_prefill(segments)
        if use_z is not None:
            use_z(rows)
        t = time.perf_counter()
        _forward(model, kv, torch.tensor(ids, device=device), torch.tensor(pos, device=device), logits=False)
        if clock is not None:
            clock["prefill_s"] += time.perf_counter() - t
            clock["prefill_tokens"] += sum(len(p[2]) for p in batch)


class _Decoder:
    """The state of one `generate` call: KV slots, the rows in them, and the waiting prompts."""

    def __init__(self, model, prompts, *, max_new_tokens, stop_ids, pad_id, row_z, row_group, token_budget,
                 max_batch, share_prefix, min_shared_tokens, prefill_tokens, batch_invariant, align: Alignment):
        self.model, self.prompts, self.max_new, self.pad = model, prompts, max_new_tokens, pad_id
        self.device = next(model.parameters()).device
        self.stop = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long, device=self.device)
        n = len(prompts)
        self.row_z = row_z
        self.groups = [0] * n if row_z is None else list(range(n)) if row_group is None else [int(g) for g in row_group]
        self.prefill_tokens, self.align = prefill_tokens, align.rows if batch_invariant else 1
        longest = max(len(p) for p in prompts)
        length = _round_up(longest + max_new_tokens + align.rows, align.keys)
        cap = lambda k: max(align.rows, k // align.rows * align.rows)
        self.slots = min(_round_up(n, align.rows), cap(max_batch), cap(token_budget // length))
        self.kv = _KV(self.slots, length, self.device, align)
        self.rid: list[Optional[int]] = [None] * self.slots  # slot -> input row
        z = lambda: torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self.pos, self.tok, self.steps = z(), z(), z()  # next token's position, next token, tokens generated
        self.active = 0  # rows live in slots [0, active)
        # a row's twin: the first row with the same prompt and z group (k samples of one prompt);
        # twins admitted together prefill once, the others copy its KV
        first: dict = {}
        self.twin = [first.setdefault((self.groups[i], tuple(p)), i) for i, p in enumerate(prompts)]
        self.queue = deque(sorted(range(n), key=lambda i: (-len(prompts[i]), self.twin[i], i)))  # longest first
        self.out: list[list[int]] = [[] for _ in prompts]
        self._z_rows: Optional[list] = None
        self.clock = dict(prefill_s=0.0, prefill_tokens=0, prompts_copied=0, decode_s=0.0, steps=0, rows=0)
        # the common prefix, once per z group (not worth it with more groups than slots)
        self.shared, self.prefix = 0, None
        if share_prefix and n > 1:
            shared = _shared_prefix(prompts)
            used = sorted(set(self.groups))
            if shared >= min_shared_tokens and len(used) <= self.slots:
                self.shared, self.group_slot = shared, {g: i for i, g in enumerate(used)}
                self.prefix = _KV(len(used), _round_up(shared + align.rows, align.keys), self.device, align)
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
        prefill(self.model, kv, items, pad=self.pad, prefill_tokens=self.prefill_tokens, use_z=self.use_z,
                clock=self.clock)

    def admit(self) -> None:
        """Move waiting prompts into free slots: shared prefix copied, the rest prefilled."""
        free = self.slots - self.active
        if not self.queue or free < min(len(self.queue), self.kv.align.rows):
            return
        new = [self.queue.popleft() for _ in range(min(free, len(self.queue)))]
        a, C = self.active, self.shared
        if self.prefix is not None:
            src = torch.tensor([self.group_slot[self.groups[r]] for r in new], device=self.device)
            self.kv.copy_positions(slice(a, a + len(new)), self.prefix, src, C)
        # the last prompt token is fed by the first decode step; a twin's rows copy its KV
        slot_of, copies, items = {}, [], []
        for b, r in enumerate(new):
            if self.twin[r] in slot_of:
                copies.append((a + b, slot_of[self.twin[r]]))
                continue
            slot_of[self.twin[r]] = a + b
            if len(self.prompts[r]) - 1 > C:
                items.append((a + b, r, self.prompts[r][C:-1], C))
        self._prefill(self.kv, items)
        if copies:
            dst, src = (torch.tensor(c, device=self.device) for c in zip(*copies))
            n = max(len(self.prompts[new[d - a]]) for d, _ in copies) - 1
            self.kv.copy_positions(dst, self.kv, src, n)
        self.clock["prompts_copied"] += len(copies)
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
        self.kv.set_decode(self.pos[:rows])
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

    def run(self, pick: Callable[[list, torch.Tensor], torch.Tensor], stop_check=None, progress=None) -> None:
        """Admit and step until every prompt has finished."""
        done = 0
        while self.queue or self.active:
            self.admit()
            finished = self.step(pick, stop_check)
            if finished and progress is not None:
                done += finished
                progress(done, len(self.prompts))


def rows_match_alone(model, align: Alignment) -> bool:
    """The engine's own check that, with these multiples, a row's logits are the same bits alone
    and in batches (random prompts, with and without a shared prefix, per-row SVF z if the model
    has SVF layers, slots freed and refilled), and so is a packed prefill's. `kernels.alignment`
    runs it once per model shape: it catches what a kernel-level probe can miss."""
    g = torch.Generator().manual_seed(0)
    rand = random_prompt_maker(model, seed=0)
    head = rand(20)
    prompts = [rand(n) for n in (1, 13, 47)] + [head + rand(n) for n in (3, 22)]
    layers = svf_layers(model)
    zs = [None] + ([{n: 1 + 0.3 * torch.randn(len(prompts), layer.rank, generator=g).to(layer.S)
                     for n, layer in layers.items()}] if layers else [])

    def logits(rows: list, row_z, **kw) -> dict:
        seen: dict = {}

        def pick(rids, lg):
            for r, x in zip(rids, lg):
                seen.setdefault(rows[r], []).append(x.clone())
            return lg.argmax(-1)

        sub = None if row_z is None else {n: z[rows] for n, z in row_z.items()}
        _Decoder(model, [prompts[i] for i in rows], max_new_tokens=3, stop_ids=(), pad_id=0, row_z=sub, row_group=None,
                 token_budget=1 << 30, min_shared_tokens=16, batch_invariant=True, align=align, **kw).run(pick)
        return seen

    order = random.Random(0).sample(range(len(prompts)), len(prompts))
    with preserved_svf_state(model), _eval_mode(model), torch.inference_mode():
        for row_z in zs:
            alone = {i: logits([i], row_z, max_batch=64, share_prefix=False, prefill_tokens=2048)[i]
                     for i in range(len(prompts))}
            for kw in (dict(max_batch=64, share_prefix=True, prefill_tokens=2048),
                       dict(max_batch=2 * align.rows, share_prefix=False, prefill_tokens=48)):
                seen = logits(order, row_z, **kw)
                if any(len(seen[i]) != len(alone[i]) or not all(map(torch.equal, seen[i], alone[i])) for i in alone):
                    return False
    return True


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int] = (),
             pad_id: int = 0, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, row_z: Optional[RowZ] = None,
             row_group: Optional[Sequence[int]] = None, token_budget: int = 131072, max_batch: int = MAX_ROWS,
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

    align = alignment(model)
    with preserved_svf_state(model), _eval_mode(model):
        dec = _Decoder(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                       row_z=row_z, row_group=row_group, token_budget=token_budget, max_batch=max_batch,
                       share_prefix=share_prefix, min_shared_tokens=min_shared_tokens,
                       prefill_tokens=prefill_tokens, batch_invariant=batch_invariant, align=align)
        dec.run(pick, stop_check, progress)
    if stats is not None:
        stats.update(dec.clock, seconds=time.perf_counter() - start, slots=dec.slots, shared_prefix=dec.shared,
                     generated=sum(len(o) for o in dec.out), row_align=align.rows, key_align=align.keys,
                     batch_invariant=batch_invariant and align.invariant)
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
