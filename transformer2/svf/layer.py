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
      x → Vᵀx → scale → U, cheaper than rebuilding W' and differentiable in z only (a batch that
      is not trained has its σ·f(z) computed once, when it is set, not in every forward);
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
        self._scales: Optional[torch.Tensor] = None  # σ·f(z) per sample, for a batch z set without grad

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def set_z(self, z: Optional[torch.Tensor], index: Optional[torch.Tensor] = None) -> None:
        """Activate an expert vector (r,), a per-sample batch (B, r), or None for the base weights.
        With `index` (B,), sample i takes row index[i] of a batch of groups z (G, r) (the engine's
        prefill sets a z per token): σ·f(z) is computed per group and gathered per sample, and z
        is kept as given unless it is trained (then gathered, to stay differentiable). A z without
        grad is read once, here: set it again after changing it in place."""
        if z is not None and z.shape[-1] != self.rank:
            raise ValueError(f"expert vector of length {z.shape[-1]} for a layer of rank {self.rank}")
        self.z, self._weight, self._scales = z, None, None
        if z is None:
            return
        if index is not None:
            if z.dim() != 2:
                raise ValueError(f"an index into a batch of z needs z of shape (groups, {self.rank}), "
                                 f"not {tuple(z.shape)}")
            index = index.to(z.device)
            if z.requires_grad:
                self.z = z[index]
            elif z.shape[0] < index.shape[0]:  # fewer groups than samples: scale the groups, then gather
                self._scales = self.scaled(z)[index.to(self.S.device)]
            else:
                self._scales = self.scaled(z[index])
        elif not z.requires_grad:
            if z.dim() == 1:
                self._weight = self.adapted_weight(z)
            else:
                self._scales = self.scaled(z)

    def state(self) -> tuple[Optional[torch.Tensor], ...]:
        """The active z and what was built from it (W' or σ·f(z)), to put back later without a rebuild."""
        return self.z, self._weight, self._scales

    def restore(self, state: tuple[Optional[torch.Tensor], ...]) -> None:
        self.z, self._weight, self._scales = state

    def scaled(self, z: torch.Tensor) -> torch.Tensor:
        """σ·f(z) for z (r,) or (B, r), in the factors' dtype."""
        return self.config.scaled_singular_values(self.S, z.to(self.S))

    def adapted_weight(self, z: torch.Tensor) -> torch.Tensor:
        return (self.U * self.scaled(z)) @ self.Vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.z
        if z is None:
            return self.base(x)
        if self._weight is not None:
            return F.linear(x, self._weight, self.base.bias)
        s = self._scales if self._scales is not None else self.scaled(z)
        if s.dim() == 2:  # one z per sample: broadcast over the sequence axes
            s = s.view(s.shape[0], *([1] * (x.dim() - 2)), s.shape[-1])
        return F.linear(F.linear(x, self.Vh) * s, self.U, self.base.bias)

    def extra_repr(self) -> str:
        state = "base" if self.z is None else ("rebuilt" if self._weight is not None else "factored")
        return f"in={self.base.in_features}, out={self.base.out_features}, rank={self.rank}, active={state}"
