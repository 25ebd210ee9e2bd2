"""What a trainer trains: an SVF expert or a PEFT LoRA adapter, behind one small interface.

The RL and next-token objectives are written once against `Adapter`, so the paper's
ablations (SVF + next-token, LoRA + RL) are the same trainers with another adapter.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Protocol

import torch

from .svf import Expert, set_expert, svf_layers


class Adapter(Protocol):
    kind: str

    def trainable(self) -> list[torch.Tensor]: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def disabled(self): ...  # context manager: the exact base model (for KL and baselines)

    def inference(self): ...  # context manager: fastest frozen form, for rollouts and validation

    def save(self, folder: str | Path, provenance: dict, extra: Optional[Mapping[str, Any]] = None) -> None: ...


class NamedTensorsAdapter:
    """What every adapter shares: a dict of named trainable tensors, copied out and back in."""

    tensors: dict[str, torch.Tensor]

    def trainable(self) -> list[torch.Tensor]:
        return list(self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in self.tensors.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.tensors.items():
                v.copy_(state[k])


class SVFAdapter(NamedTensorsAdapter):
    """Trains the z vectors of an SVF-patched model; the base weights stay frozen."""

    kind = "svf"

    def __init__(self, model, expert: Expert):
        self.model = model
        self.expert = expert
        self.live = self.tensors = set_expert(model, expert, trainable=True)

    def _set(self, frozen: bool | None) -> None:
        for name, layer in svf_layers(self.model).items():
            z = self.live[name]
            layer.set_z(None if frozen is None else (z.detach() if frozen else z))

    @contextmanager
    def disabled(self) -> Iterator[None]:
        self._set(None)
        try:
            yield
        finally:
            self._set(False)

    @contextmanager
    def inference(self) -> Iterator[None]:
        self._set(True)  # W' rebuilt once per layer: generation at base-model speed
        try:
            yield
        finally:
            self._set(False)

    def to_expert(self, provenance: dict) -> Expert:
        return Expert(self.state(), self.expert.base_fingerprint, self.expert.config,
                      {**self.expert.provenance, **provenance})

    def save(self, folder: str | Path, provenance: dict, extra: Optional[Mapping[str, Any]] = None) -> None:
        """The expert (`Expert.save`), with the JSON files of `extra` in the same unit."""
        self.to_expert(provenance).save(folder, extra)


class LoRAAdapter(NamedTensorsAdapter):
    """A PEFT LoRA model: the adapter's own parameters are the trainable ones."""

    kind = "lora"

    def __init__(self, peft_model):
        self.model = peft_model
        self.params = self.tensors = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}

    def disabled(self):
        return self.model.disable_adapter()

    @contextmanager
    def inference(self) -> Iterator[None]:
        yield

    def save(self, folder: str | Path, provenance: dict, extra: Optional[Mapping[str, Any]] = None) -> None:
        """PEFT's own format (PeftModel.from_pretrained, lm-eval's peft=), written as one unit
        (`files.atomic_dir`) with provenance.json and the JSON files of `extra` (the run's validations),
        so a crash never leaves a half-saved adapter."""
        import json

        from .files import atomic_dir, write_json_files

        with atomic_dir(folder) as tmp:
            self.model.save_pretrained(tmp)
            config = tmp / "adapter_config.json"  # PEFT writes target_modules from a set: in hash-seed order
            settings = json.loads(config.read_text())
            for key in ("target_modules", "modules_to_save", "exclude_modules"):
                if isinstance(settings.get(key), list):
                    settings[key] = sorted(settings[key])
            config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
            write_json_files(tmp, extra)
