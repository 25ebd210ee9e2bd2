"""Model-level SVF: patch targets, activate/switch/mix experts, save and load them.

An expert is {module name: z}. On disk it is a folder like a PEFT adapter:
`expert.safetensors` (one tensor per module) + `expert.json` (base fingerprint, targets,
parameterisation, provenance), so it cannot be applied to the wrong base by accident.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import nn

from .config import SVFConfig
from .layer import SVFLinear
from ..errors import UserError
from ..files import atomic_dir, safetensors_bytes, write_json_files

EXPERT_FORMAT = "transformer2.svf-expert/1"
WEIGHTS_NAME = "expert.safetensors"
META_NAME = "expert.json"


class ExpertError(UserError, ValueError):
    """An expert that does not fit the model it is applied to; the message says why."""


@dataclass
class Expert:
    vectors: dict[str, torch.Tensor]
    base_fingerprint: str
    config: SVFConfig
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.vectors.values())

    def save(self, folder: str | Path, extra: Optional[Mapping[str, Any]] = None) -> None:
        """The folder is written as one unit (`files.atomic_dir`): a crash never leaves the vectors of one
        run beside the metadata of another. expert.json records the weights' size and SHA256. `extra`:
        {name: data} JSON files of the same unit (a training run's validations, z_c's dispatch predictions)."""
        meta = {"format": EXPERT_FORMAT, "base_fingerprint": self.base_fingerprint,
                "svf": self.config.to_dict(), "modules": {k: v.numel() for k, v in self.vectors.items()},
                "num_parameters": self.num_parameters, "provenance": self.provenance}
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.vectors.items()}
        data = safetensors_bytes(tensors, {"format": EXPERT_FORMAT})
        with atomic_dir(folder) as tmp:
            (tmp / WEIGHTS_NAME).write_bytes(data)
            meta["weights"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            write_json_files(tmp, extra)

    @classmethod
    def load(cls, folder: str | Path) -> "Expert":
        meta = read_expert_meta(folder)
        path = Path(folder) / WEIGHTS_NAME
        data = path.read_bytes()
        recorded = meta.get("weights")  # older experts lack it
        if recorded and (len(data) != recorded["bytes"] or hashlib.sha256(data).hexdigest() != recorded["sha256"]):
            raise ExpertError(f"{path} does not match {META_NAME} ({len(data)} bytes, {recorded['bytes']} recorded): "
                              "it is damaged or was replaced; retrain the expert")
        try:
            loaded = load(data)
        except SafetensorError as err:
            raise ExpertError(f"{path} is not a readable safetensors file ({err}): retrain the expert") from None
        order = [name for name in meta.get("modules", {}) if name in loaded]  # safetensors' own order is arbitrary
        vectors = {name: loaded[name] for name in order + sorted(set(loaded) - set(order))}
        return cls(vectors=vectors, base_fingerprint=meta["base_fingerprint"], config=SVFConfig(**meta["svf"]),
                   provenance=meta.get("provenance", {}))


def read_expert_meta(folder: str | Path) -> dict:
    """An expert's expert.json, checked enough to name what is wrong (no tensors read)."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / META_NAME).is_file():
        raise ExpertError(f"{folder} is not an SVF expert (needs {WEIGHTS_NAME} and {META_NAME})")
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExpertError(f"{folder / META_NAME} is not valid JSON ({err}): retrain the expert") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPERT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExpertError(f"{folder / META_NAME}: unknown expert format {got!r}")
    missing = [k for k in ("base_fingerprint", "svf") if k not in meta]
    if missing:
        raise ExpertError(f"{folder / META_NAME} lacks {missing}: retrain the expert")
    return meta


def check_same_base(experts: Mapping[str, "Expert"], base_fingerprint: str, where: str = "") -> None:
    """Every path that applies or combines experts calls this: an expert trained on other base weights
    would silently scale the wrong singular vectors."""
    for name, expert in experts.items():
        if expert.base_fingerprint != base_fingerprint:
            raise ExpertError(f"expert {name}{where} was trained on base weights {expert.base_fingerprint[:12]}…, "
                              f"not on this model ({base_fingerprint[:12]}…): retrain it on this base")


def apply_svf(model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              config: SVFConfig) -> dict[str, SVFLinear]:
    """Wrap each factored nn.Linear in an SVFLinear (in place) and freeze every base weight."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, (U, S, Vh) in factors.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, SVFLinear):
            raise ValueError(f"{name} is already SVF-patched")
        layer = SVFLinear(base, U, S, Vh, config)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def svf_layers(model: nn.Module) -> dict[str, SVFLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVFLinear)}


RowZ = Mapping[str, torch.Tensor]  # module name -> (N, r): one z per row of a batch


@contextmanager
def preserved_svf_state(model: nn.Module) -> Iterator[None]:
    """Restore every SVF layer's active z (and its already rebuilt W') on exit, without rebuilding."""
    saved = [(layer, layer.state()) for layer in svf_layers(model).values()]
    try:
        yield
    finally:
        for layer, state in saved:
            layer.restore(state)


def set_row_z(model: nn.Module, row_z: Optional[RowZ], index: Optional[torch.Tensor] = None) -> None:
    """Activate one z per batch row (rows `index` of `row_z`), or the base weights if row_z is None."""
    for name, layer in svf_layers(model).items():
        if row_z is None:
            layer.set_z(None)
        else:
            layer.set_z(row_z[name].to(layer.S.device), index)


def remove_svf(model: nn.Module) -> None:
    """Put the original nn.Linear modules back."""
    for name, layer in svf_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)


def init_expert(model: nn.Module, base_fingerprint: str, config: SVFConfig,
                generator: Optional[torch.Generator] = None, provenance: Optional[dict] = None) -> Expert:
    """Reference init: z = init_mean + init_std·N(0, 1) per singular value (float32, CPU)."""
    vectors = {}
    for name, layer in svf_layers(model).items():
        noise = torch.randn(layer.rank, generator=generator, dtype=torch.float32)
        vectors[name] = config.init_mean + config.init_std * noise
    return Expert(vectors, base_fingerprint, config, provenance or {})


def check_expert(model: nn.Module, expert: Expert, base_fingerprint: Optional[str] = None) -> None:
    """Raise ExpertError unless the expert fits this model's patched layers exactly."""
    if base_fingerprint is not None and expert.base_fingerprint != base_fingerprint:
        raise ExpertError(f"expert was trained on base weights {expert.base_fingerprint[:12]}…, "
                          f"but this model is {base_fingerprint[:12]}…")
    layers = svf_layers(model)
    missing = sorted(set(layers) - set(expert.vectors))
    extra = sorted(set(expert.vectors) - set(layers))
    if missing or extra:
        raise ExpertError(f"expert modules do not match the patched model: missing {missing[:3]}, "
                          f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)")
    for name, layer in layers.items():
        if expert.vectors[name].shape != (layer.rank,):
            raise ExpertError(f"{name}: expert vector has shape {tuple(expert.vectors[name].shape)}, "
                              f"the layer needs ({layer.rank},)")


def set_expert(model: nn.Module, expert: Optional[Expert],
               trainable: bool = False, base_fingerprint: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Activate an expert (None restores the exact base weights). Returns the live z tensors;
    with trainable=True they are leaf tensors requiring grad, ready for an optimiser."""
    layers = svf_layers(model)
    if expert is None:
        for layer in layers.values():
            layer.set_z(None)
        return {}
    check_expert(model, expert, base_fingerprint)
    live = {}
    for name, layer in layers.items():
        z = expert.vectors[name].detach().to(layer.S.device, torch.float32).clone()
        if trainable:
            z.requires_grad_(True)
        layer.set_z(z)
        live[name] = z
    return live


def mix_experts(experts: Sequence[Expert], alpha: torch.Tensor) -> Expert:
    """z' = Σ_k α_k z_k, in z space, so the mix goes through the same f(z) and norm as each expert.

    alpha is (K,) — one weight per expert — or (K, M) — one per expert and matrix, in the
    order of the first expert's modules.
    """
    if not experts:
        raise ExpertError("mix_experts needs at least one expert")
    names = list(experts[0].vectors)
    for e in experts[1:]:
        if (set(e.vectors) != set(names) or e.base_fingerprint != experts[0].base_fingerprint
                or e.config != experts[0].config):
            raise ExpertError("experts to mix must share the base model, the target modules and the SVF config")
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    if alpha.shape not in ((len(experts),), (len(experts), len(names))):
        raise ExpertError(f"alpha must have shape ({len(experts)},) or ({len(experts)}, {len(names)}), "
                          f"got {tuple(alpha.shape)}")
    if alpha.dim() == 1:
        alpha = alpha[:, None].expand(len(experts), len(names))
    vectors = {name: sum(alpha[k, j] * experts[k].vectors[name] for k in range(len(experts)))
               for j, name in enumerate(names)}
    return Expert(vectors, experts[0].base_fingerprint, experts[0].config,
                  {"mixed_from": [e.provenance.get("task") for e in experts], "alpha": alpha.tolist()})


def expert_movement(expert: Expert, initial: Optional[Expert], singular_values: Mapping[str, torch.Tensor]) -> dict:
    """How far an expert moved: in z from its start z₀, and in singular values from the base.

    RL with a tiny lr can leave z where it started, so every expert's metrics say how far it got:
    - z_max_abs_change, z_mean_abs_change: max and mean |z − z₀| over all elements;
    - sigma_mean_rel_change: mean over matrices of the mean |σ'/σ − 1|, σ' = σ·f(z) after the
      sum-keeping norm (the base is σ' = σ); sigma_max_rel_change: the largest single one;
    - init_sigma_mean_rel_change: the same for z₀ (the init's own noise, to read the above against),
      and sigma_mean_rel_change_from_init: σ'(z) against σ'(z₀), what training changed.
    `singular_values`: σ per module (`svd.load_singular_values`). Without `initial`, only the σ keys.
    """
    names = sorted(expert.vectors)
    missing = [n for n in names if n not in singular_values or (initial and n not in initial.vectors)]
    if missing:
        raise ExpertError(f"no singular values or initial z for {missing[:3]} ({len(missing)} modules)")

    def ratio(name: str, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        S = singular_values[name].double()
        keep = S > 0  # a zero σ stays zero whatever z is
        return expert.config.scaled_singular_values(S, vectors[name].double())[keep] / S[keep]

    now = [ratio(n, expert.vectors) for n in names]
    out = {"matrices": len(names), "sigma_mean_rel_change": _mean_of_means([(r - 1).abs() for r in now]),
           "sigma_max_rel_change": float(max((r - 1).abs().max() for r in now))}
    if initial is not None:
        dz = torch.cat([(expert.vectors[n].double() - initial.vectors[n].double()).abs() for n in names])
        init = [ratio(n, initial.vectors) for n in names]
        out.update(z_max_abs_change=float(dz.max()), z_mean_abs_change=float(dz.mean()),
                   init_sigma_mean_rel_change=_mean_of_means([(r - 1).abs() for r in init]),
                   sigma_mean_rel_change_from_init=_mean_of_means([(a / b - 1).abs() for a, b in zip(now, init)]))
    return out


def _mean_of_means(per_matrix: Sequence[torch.Tensor]) -> float:
    """Every matrix weighs the same, whatever its rank."""
    return float(torch.stack([x.mean() for x in per_matrix]).mean())
