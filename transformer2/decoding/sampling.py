"""Choosing the next token: greedy, or temperature then top-p with per-row pre-drawn uniforms
(so a saved generator state replays a call, and a row's draw does not depend on the others)."""
from __future__ import annotations

from typing import Optional

import torch

def _pick(logits: torch.Tensor, u: Optional[torch.Tensor], temperature: float, top_p: float) -> torch.Tensor:
    """Greedy (u is None), or inverse-CDF sampling with one uniform per row: a row's draw depends
    only on its own logits and its own random stream, never on the batch."""
    if u is None:  # max's first index, as argmax's, at 1.5 vs 6.6 ms for 128 × 49152 logits here
        return logits.max(-1).indices
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
