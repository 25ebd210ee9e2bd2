"""The interface a decoder offers the generating paths, and the in-process backend over `generate`."""
from __future__ import annotations

from typing import Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch

from ..svf import RowZ
from .engine import generate


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
        from ..svf import svf_layers

        for name, layer in svf_layers(self.model).items():
            if weights is None:
                layer.set_z(None)
            else:  # a fixed W' as a rebuilt expert would hold it (z kept only as a marker)
                layer.restore((torch.zeros(layer.rank, device=layer.S.device), weights[name].to(layer.S), None))

    def set_z(self, z: Optional[Mapping[str, torch.Tensor]]) -> None:
        from ..svf import svf_layers

        for name, layer in svf_layers(self.model).items():
            layer.set_z(None if z is None else z[name].to(layer.S.device))

    def generate(self, prompts, *, max_new_tokens, stop_ids=(), do_sample=False, temperature=1.0, top_p=1.0,
                 generator=None, row_z=None) -> list[list[int]]:
        return generate(self.model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=self.pad_id,
                        do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator,
                        row_z=row_z, **self.options)
