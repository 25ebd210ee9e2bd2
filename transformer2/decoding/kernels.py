"""The padding under which this CPU's kernels give a row the same bits whatever shares its batch.

The engine's batch invariance is a property of the BLAS kernels as much as of the engine. On the
AMD EPYC (Zen 3, MKL via torch 2.13) this project was built on, a linear layer's output row
depends on the row count M only when M is not a multiple of 4, and attention over keys padded
to a multiple of 16 does not depend on the padding. CI once ran on a CPU where 4 was not enough
(rows of a batch of 8 differed from the same rows in a batch of 4). So the engine does not assume
4 and 16: `alignment(model)` measures, once per (weight shapes, head shape, dtype, threads), the
smallest row multiple in ROW_CHOICES and key multiple in KEY_CHOICES under which random inputs
come out bitwise the same at every row count and key length the engine uses, with the model's
own matrix shapes (its linear layers, SVF factors, attention heads), then confirms it end to end
with the model itself (`engine.rows_match_alone`, `loglik.scores_match_alone`). Where no choice
passes, the
engine still runs (at the smallest choices) and `Alignment.invariant` is False: a row's logits
can then differ with its batch at float rounding (~1e-6 relative), and so can a greedy token
at a near-tie.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROW_CHOICES = (4, 8, 16, 32, 64)
KEY_CHOICES = (16, 32, 64, 128)
MAX_ROWS = 128       # decode rows probed (a multiple of every row choice), and so the engine's default max_batch
PREFILL_ROWS = 256   # one larger packed-prefill size probed (not for the LM head: its cost)
PROBE = 4            # what the probe covers (2: decode rows up to 128; 3: keys stored transposed; 4: prefill
                     # attention in query blocks); a cached alignment of another is measured again
MAX_KEYS = 256       # key lengths probed


@dataclass(frozen=True)
class Alignment:
    rows: int        # decode rows and prefill pieces come in multiples of this
    keys: int        # attention runs over a key length rounded up to this
    invariant: bool  # whether the probe found the kernels bitwise stable under these multiples


_cache: dict = {}
CACHE_ENV = "T2_KERNEL_CACHE"  # a JSON file of measured alignments; empty: measure in every process


def _cache_file() -> Optional[Path]:
    """Where measured alignments persist across processes (a stage pays the ~10 s check for a
    0.1B model once per machine, not once per process): $T2_KERNEL_CACHE, else the user cache."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]) if os.environ[CACHE_ENV] else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transformer2" / "kernel_alignment.json"


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    """What a kernel's rounding depends on besides shapes: the CPU, its ISA level, torch and its BLAS."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    blas = next((line.strip() for line in torch.__config__.show().splitlines() if "Math Kernel Library" in line
                 or "BLAS_INFO" in line), "")
    return f"{name} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | {blas}"


def _load_disk(key: str) -> Optional[Alignment]:
    path = _cache_file()
    try:
        entry = json.loads(path.read_text())[key] if path and path.exists() else None
        return Alignment(**entry["alignment"]) if entry else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or foreign: measure again


def _save_disk(key: str, described: dict, align: Alignment) -> None:
    from ..files import atomic_write_json

    path = _cache_file()
    if path is None:
        return
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}  # damaged: start it again
    try:
        data = data if isinstance(data, dict) else {}
        data[key] = {**described, "alignment": asdict(align)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    except (OSError, ValueError):
        pass  # a read-only home: the next process measures again


def _linear_specs(model) -> list[tuple[int, int, bool]]:
    """(out, in, has_bias) of every matrix the model's forward multiplies token rows by."""
    from ..svf.layer import SVFLinear

    specs = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            specs.add((m.out_features, m.in_features, m.bias is not None))
        elif isinstance(m, SVFLinear):  # the factored per-row-z path: x·Vhᵀ, then ·Uᵀ
            specs.add((m.Vh.shape[0], m.Vh.shape[1], False))
            specs.add((m.U.shape[0], m.U.shape[1], m.base.bias is not None))
    return sorted(specs)


def _head_spec(model) -> tuple[int, int, int]:
    """(kv heads, query heads per kv head, head dim) of the model's attention."""
    c = getattr(model.config, "text_config", None) or model.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    d = getattr(c, "head_dim", None) or c.hidden_size // heads
    return kv_heads, heads // kv_heads, d


def _rows_stable(out: int, inp: int, bias: bool, align: int, dtype, g: torch.Generator) -> bool:
    """Each row of x·Wᵀ(+b) the same bits at every multiple of `align` rows, in any order."""
    w = torch.randn(out, inp, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    big = out * inp > 8_000_000  # an LM head: a few decode sizes only (its cost)
    top = MAX_ROWS if big else PREFILL_ROWS
    x = torch.randn(top, inp, generator=g).to(dtype)
    ref = F.linear(x, w, b)
    sizes = [m for m in range(align, MAX_ROWS + 1, align)
             if not big or m in (align, 2 * align, 3 * align, 48, MAX_ROWS)]
    sizes += [] if big else [PREFILL_ROWS]
    for m in sizes:
        idx = torch.randperm(top, generator=g)[:m]
        if not torch.equal(F.linear(x[idx], w, b), ref[idx]):
            return False
    return True


def _attention_stable(kv_heads: int, group: int, d: int, keys: int, dtype, g: torch.Generator) -> bool:
    """The engine's decode attention (`kv._attn`: a row's query heads against its keys) the same
    bits at every key length padded to `keys` — decode pads to the longest live row. (A prefill
    query block's key length is its own end rounded up: it never depends on the other rows.)"""
    from .kv import _attn

    Kt = torch.randn(kv_heads, d, MAX_KEYS, generator=g).to(dtype)  # the engine's layout: keys transposed
    V = torch.randn(kv_heads, MAX_KEYS, d, generator=g).to(dtype)
    q = torch.randn(kv_heads, group, d, generator=g).to(dtype)
    for visible in (1, keys - 1, keys + 3, MAX_KEYS // 2 + 5):
        ok = torch.arange(MAX_KEYS) < visible
        ref = None
        for L in range(-(-visible // keys) * keys, MAX_KEYS + 1, keys):
            out = _attn(q, Kt[..., :L], V[:, :L], ok[:L], d ** -0.5, None)
            if ref is None:
                ref = out
            elif not torch.equal(out, ref):
                return False
    return True


def alignment(model) -> Alignment:
    """The smallest row and key multiples that keep this model's rows batch-invariant here:
    measured once per (CPU, torch, shapes, dtype, thread count) and kept in `_cache_file()`;
    ~0.3 s for a tiny model, 13-23 s for SmolLM2-135M on this project's 2 cores. A kernel-level
    probe picks the first candidate; the engine's own end-to-end check (`engine.rows_match_alone`, `loglik.scores_match_alone`) must confirm it, else larger
    multiples are tried."""
    param = next(model.parameters())
    if param.device.type != "cpu":  # not probed on accelerators: no invariance claimed
        return Alignment(ROW_CHOICES[0], KEY_CHOICES[0], False)
    specs, head = _linear_specs(model), _head_spec(model)
    described = dict(probe=PROBE, machine=_machine(), model=type(model).__name__, linear=specs, heads=list(head),
                     dtype=str(param.dtype), threads=torch.get_num_threads())
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    if key not in _cache:
        _cache[key] = _load_disk(key)
    if _cache[key] is None:
        _cache[key] = _measure(model, specs, head, param.dtype)
        _save_disk(key, described, _cache[key])
        if not _cache[key].invariant:
            warnings.warn(f"transformer2.decoding: no row multiple in {ROW_CHOICES} and key multiple in "
                          f"{KEY_CHOICES} made this CPU's kernels batch-invariant for {type(model).__name__}: "
                          "a row's logits can differ with its batch at float rounding", RuntimeWarning)
    return _cache[key]


@torch.inference_mode()
def _measure(model, specs, head, dtype) -> Alignment:
    from ..loglik import scores_match_alone
    from ..svf import preserved_svf_state
    from .engine import _eval_mode, rows_match_alone

    with preserved_svf_state(model), _eval_mode(model):  # a LoRA model mid-training: no dropout here
        return _search(specs, head, dtype, lambda a: rows_match_alone(model, a) and scores_match_alone(model, a))


def random_prompt_maker(model, seed: int):
    """n -> n random token ids of the model's vocabulary (the end-to-end checks' inputs)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    return lambda n: torch.randint(vocab, (n,), generator=g).tolist()


def _search(specs, head, dtype, confirmed) -> Alignment:
    g = torch.Generator().manual_seed(0)
    rows = [a for a in ROW_CHOICES if all(_rows_stable(*s, a, dtype, g) for s in specs)] or [ROW_CHOICES[0]]
    keys = [k for k in KEY_CHOICES if _attention_stable(*head, k, dtype, g)] or [KEY_CHOICES[0]]
    for r in [a for a in ROW_CHOICES if a >= rows[0]]:
        for k in [b for b in KEY_CHOICES if b >= keys[0]][:2]:
            a = Alignment(r, k, True)
            if confirmed(a):
                return a
    return Alignment(ROW_CHOICES[0], KEY_CHOICES[0], False)
