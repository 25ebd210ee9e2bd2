"""One-time thin SVD of every targeted matrix, cached on disk and resumable.

Layout of the cache directory:
    <dir>/factors/<module name>.safetensors   U (m×r), S (r,), Vh (r×n), float32, + metadata
    <dir>/index.json                           written last: fingerprint, modules, shapes

Each module's file is written atomically (temporary name, then rename), and `index.json`
only once all are present, so a run killed at any point resumes where it stopped and never
leaves a cache that looks complete but is not.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from .errors import UserError
from .files import atomic_save, atomic_write_text

FORMAT = "transformer2.svd/1"
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
ProgressFn = Optional[Callable[[int, int, str], None]]  # (done, total, module name)


class SVDCacheError(UserError, RuntimeError):
    """A missing or stale SVD cache."""


def thin_svd(weight: torch.Tensor) -> Factors:
    """float32 thin SVD on the CPU (the reference does the same; it is a one-off cost)."""
    U, S, Vh = torch.linalg.svd(weight.detach().to("cpu", torch.float32), full_matrices=False)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def _factor_file(cache: Path, name: str) -> Path:
    return cache / "factors" / f"{name}.safetensors"


def _read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def decompose(model: nn.Module, module_names: list[str], cache: str | Path, fingerprint: str,
              progress: ProgressFn = None) -> dict:
    """SVD each named linear layer into `cache` (skipping those already done); returns the index."""
    cache = Path(cache)
    index_path = cache / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("fingerprint") == fingerprint and index.get("modules") == module_names:
            return index
        index_path.unlink()  # a different base or target set: rebuild what does not match
    (cache / "factors").mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    shapes, errors = {}, {}
    start = time.perf_counter()
    for i, name in enumerate(module_names):
        path = _factor_file(cache, name)
        weight = modules[name].weight
        shapes[name] = list(weight.shape)
        if path.exists() and _read_meta(path).get("fingerprint") == fingerprint:
            errors[name] = float(_read_meta(path)["rel_error"])
        else:
            U, S, Vh = thin_svd(weight)
            w = weight.detach().to("cpu", torch.float32)
            errors[name] = float(torch.linalg.norm((U * S) @ Vh - w) / torch.linalg.norm(w).clamp_min(1e-30))
            meta = {"format": FORMAT, "fingerprint": fingerprint, "module": name,
                    "shape": json.dumps(shapes[name]), "rel_error": repr(errors[name])}
            atomic_save(path, lambda tmp: save_file({"U": U, "S": S, "Vh": Vh}, str(tmp), metadata=meta))
        if progress:
            progress(i + 1, len(module_names), name)
    for stale in (cache / "factors").glob("*.safetensors"):  # left by an earlier target set
        if stale.name.removesuffix(".safetensors") not in shapes:
            stale.unlink()
    index = {"format": FORMAT, "fingerprint": fingerprint, "modules": module_names, "shapes": shapes,
             "dtype": "float32", "max_rel_error": max(errors.values()),
             "seconds_this_run": round(time.perf_counter() - start, 3)}
    atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    return index


def load_index(cache: str | Path, fingerprint: Optional[str] = None) -> dict:
    path = Path(cache) / "index.json"
    if not path.is_file():
        raise SVDCacheError(f"{path} not found: run the decompose stage first (`t2 decompose`)")
    index = json.loads(path.read_text())
    if fingerprint is not None and index["fingerprint"] != fingerprint:
        raise SVDCacheError(f"the SVD cache in {cache} was computed for base weights {index['fingerprint'][:12]}…, "
                            f"not for this model ({fingerprint[:12]}…): rerun the decompose stage")
    return index


def _cached_names(cache: str | Path, fingerprint: Optional[str], modules: Optional[list[str]]) -> list[str]:
    index = load_index(cache, fingerprint)
    names = index["modules"] if modules is None else modules
    missing = sorted(set(names) - set(index["modules"]))
    if missing:
        raise SVDCacheError(f"the SVD cache in {cache} lacks {missing[:3]}{'…' if len(missing) > 3 else ''}: "
                            "svf.targets changed since the decompose stage ran; rerun it")
    return names


def load_factors(cache: str | Path, fingerprint: Optional[str] = None,
                 modules: Optional[list[str]] = None) -> dict[str, Factors]:
    """Factors of the cached modules (all, or those named), checked against the base fingerprint."""
    out = {}
    for name in _cached_names(cache, fingerprint, modules):
        with safe_open(str(_factor_file(Path(cache), name)), framework="pt") as f:
            out[name] = (f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("Vh"))
    return out


def load_singular_values(cache: str | Path, fingerprint: Optional[str] = None,
                         modules: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Only σ of each cached module: what measuring an expert needs, without U and V (GBs on 8B)."""
    out = {}
    for name in _cached_names(cache, fingerprint, modules):
        with safe_open(str(_factor_file(Path(cache), name)), framework="pt") as f:
            out[name] = f.get_tensor("S")
    return out
