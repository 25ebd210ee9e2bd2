"""The SVF linear layer: a base nn.Linear plus its SVD factors and the active expert vector."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import SVFConfig


class SVFLinear(nn.Module):
    """W' = U diag(σ·f(z)) Vᵀ, with three forward paths.

    - no expert (z is None): the wrapped base layer, bit-for-bit the base weights;
    - a trainable z, or a batch of z (one row per sample): the factored form
      x → Vᵀx → scale → U, cheaper than rebuilding W' and differentiable in z only;
    - a fixed z: W' is rebuilt once when the expert is set and used like a normal weight,
      so adapted generation runs at base-model speed.
    """

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                 config: SVFConfig):
        super().__init__()
        r = S.shape[0]
        if U.shape != (base.out_features, r) or Vh.shape != (r, base.in_features):
            raise ValueError(f"SVD factors {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)} do not fit "
                             f"a linear layer of shape ({base.out_features}, {base.in_features})")
        self.base = base
        self.config = config
        w = base.weight
        self.register_buffer("U", U.to(w.device, w.dtype), persistent=False)
        self.register_buffer("S", S.to(w.device, w.dtype), persistent=False)
        self.register_buffer("Vh", Vh.to(w.device, w.dtype), persistent=False)
        self.z: Optional[torch.Tensor] = None
        self._weight: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def set_z(self, z: Optional[torch.Tensor]) -> None:
        """Activate an expert vector (r,), a per-sample batch (B, r), or None for the base weights."""
        if z is not None and z.shape[-1] != self.rank:
            raise ValueError(f"expert vector of length {z.shape[-1]} for a layer of rank {self.rank}")
        self.z = z
        self._weight = None
        if z is not None and z.dim() == 1 and not z.requires_grad:
            self._weight = self.adapted_weight(z)

    def state(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The active z and its rebuilt W' (if any), to put back later without a rebuild."""
        return self.z, self._weight

    def restore(self, state: tuple[Optional[torch.Tensor], Optional[torch.Tensor]]) -> None:
        self.z, self._weight = state

    def adapted_weight(self, z: torch.Tensor) -> torch.Tensor:
        s = self.config.scaled_singular_values(self.S, z.to(self.S))
        return (self.U * s) @ self.Vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.z
        if z is None:
            return self.base(x)
        if self._weight is not None:
            return F.linear(x, self._weight, self.base.bias)
        s = self.config.scaled_singular_values(self.S, z.to(self.S))
        if z.dim() == 2:  # one z per sample: broadcast over the sequence axes
            s = s.view(s.shape[0], *([1] * (x.dim() - 2)), s.shape[-1])
        return F.linear(F.linear(x, self.Vh) * s, self.U, self.base.bias)

    def extra_repr(self) -> str:
        state = "base" if self.z is None else ("rebuilt" if self._weight is not None else "factored")
        return f"in={self.base.in_features}, out={self.base.out_features}, rank={self.rank}, active={state}"
