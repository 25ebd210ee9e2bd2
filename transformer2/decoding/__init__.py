"""One decoding engine for every path that generates: rollouts, validation, CEM, dispatch, lm-eval.

`model.generate` reached ~14% of the fp32 matmul roofline on the 2-core CPU this project runs
on: its cache grows by concatenation, it builds masks every step and pads rows on the left.
`generate` here runs the same Hugging Face model, unchanged, and swaps only its attention
function (a registered `AttentionInterface`) for one that owns a preallocated KV buffer:

- rows are *left-aligned*: slot s, position p holds token p of the row in slot s, so padding
  only ever trails a row and a row's keys never move when other rows come and go;
- continuous batching: a row leaves the batch the step it stops (the last row moves into its
  slot), and waiting prompts are admitted into free slots, within a token budget
  (slots × (longest prompt + max_new_tokens) ≤ 131072, at most 128 slots: on 256 GSM8K prompts
  with 192 new tokens, 128 slots decode 378 tok/s, 256 slots 359, and a 16384 budget capped
  that run at 40 slots, 243 tok/s on 128 prompts; on 203 MATH prompts, where one 520-token
  prompt sets every slot's length, 65536 positions gave 92 slots, 131072 give 128: the call
  took 74.7 → 64.4 s in bf16 (184 slots: 67.4 s), 112.1 → 102.7 s in fp32 at 184 slots;
  the KV cache is at most 131072 × 46 KB = 6 GB for SmolLM2 in fp32, 3 GB in bf16);
- decode attention runs over spans of slots, each to its own longest row's keys
  (`kv._spans`), so one long prompt does not make every row read its keys;
- prefill is packed (no padding between prompts) and stops one token short of each prompt:
  every logit comes from the same one-token decode step, so nothing needs a per-row gather;
  a prompt piece's attention runs in causal blocks of `kv.QUERY_BLOCK` queries, each over the
  keys its last query sees, its scores scaled and masked by one `baddbmm` (64 five-shot-style
  prompts of ~625 tokens: prefill attention 13.6 → 9.0 s in fp32, 7.8 → 6.3 s in bf16);
- the prompts' common token prefix (a system prompt) is run once per z and copied into rows;
- copies of one prompt (an RL rollout's k samples) admitted together prefill once and copy its KV
  (benchmarks/generation.py: 8 copies of 4 prompts prefill in 0.78 s vs 5.48 s for 32 prompts).

Batch invariance (bitwise): a row's logits, hence its tokens, never depend on padding, batch
size or the other rows — where this CPU's kernels allow it. Kernels can round differently for
different shapes: on the AMD EPYC this was built on (MKL in torch 2.13) a linear layer's output
row depends on the row count M only when M is not a multiple of 4 (M < 4 is a gemv; threaded,
M in 5..11 splits unevenly); SDPA's CPU flash kernel splits keys into length-dependent blocks, so
trailing padding changes a row; a plain q·kᵀ matmul changes a column unless the key count is a
multiple of 8 (16 is used). Another CPU needs other multiples, so `kernels.alignment(model)`
measures them per machine (rows R, keys K): every forward has a multiple of R rows (decode) or
tokens per prompt piece (prefill), and attention is matmul + softmax over a key length rounded
up to K whose masked keys trail. Where no R, K works it says so (`Alignment.invariant`).
`batch_invariant=False` drops the row padding (faster at batch 1, where M=1 is a gemv).

Not kept: `torch.compile` of the decode step (dynamic shapes: ~19 min of compiling on this
machine for no measurable gain), SDPA (see above), and the 49152-row LM head as matmuls over
2048 rows at a time (bitwise the same; ~1.4x faster for the head matmul alone at 32 rows, but
0.94x / 1.04x of the whole decode at batch 32 / 64: within noise). What limits a step here is
MKL's sgemm at 4-64 rows with weights that come from DRAM (~1 ms for a 576 x 1536 matrix at 32
rows, 2-3x its time with the matrix in cache): neither the FLOP roofline nor the streaming
bandwidth (17.9 GB/s, i.e. ~1200 tok/s at batch 64 for 538 MB of weights + the KV) is reached.
"""
from .backend import DecodingBackend, TorchBackend
from .engine import generate, pad_batch
from .kernels import Alignment, alignment

__all__ = ["Alignment", "DecodingBackend", "TorchBackend", "alignment", "generate", "pad_batch"]
