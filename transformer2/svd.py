"""One-time thin SVD of every targeted matrix, cached on disk and resumable.

Layout of the cache directory:
    <dir>/factors/<module name>.safetensors   U (m×r), S (r,), Vh (r×n), float32, + metadata
    <dir>/index.json                           written last: fingerprint, modules, shapes

Each module's file is written atomically (temporary name, then rename), and `index.json`
only once all are present, so a run killed at any point resumes where it stopped and never
leaves a cache that looks complete but is not. The index records each file's size and SHA256:
a damaged factor is recomputed by `decompose` and named by the loaders, never a crash.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load
from torch import nn
from .errors import UserError
from .files import atomic_write_bytes, atomic_write_text, safetensors_bytes

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


def _usable_factor(path: Path, name: str, fingerprint: str, shape: list[int]) -> Optional[float]:
    """The relative error of a cached factor file that is whole and of this base and module, else None."""
    if not path.is_file():
        return None
    try:
        meta = _read_meta(path)  # safetensors checks that the file covers every tensor it declares
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in ("U", "S", "Vh")}
    except (SafetensorError, OSError, KeyError):
        return None
    r = min(shape)
    if (meta.get("fingerprint") != fingerprint or meta.get("module") != name
            or shapes != {"U": [shape[0], r], "S": [r], "Vh": [r, shape[1]]}):
        return None
    return float(meta["rel_error"])


def _file_record(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def decompose(model: nn.Module, module_names: list[str], cache: str | Path, fingerprint: str,
              progress: ProgressFn = None) -> dict:
    """SVD each named linear layer into `cache` (skipping those already done and whole); returns the index."""
    if not module_names:
        raise SVDCacheError("no module to decompose: svf.targets matches nothing")
    cache = Path(cache)
    index_path = cache / "index.json"
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            index = {}
        if (index.get("fingerprint") == fingerprint and index.get("modules") == module_names
                and index.get("files") and all(_factor_file(cache, n).is_file() and _file_record(
                    _factor_file(cache, n)) == index["files"][n] for n in module_names)):
            return index
        index_path.unlink()  # another base or target set, or a damaged factor: rebuild what does not match
    (cache / "factors").mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    shapes, errors = {}, {}
    for i, name in enumerate(module_names):
        path = _factor_file(cache, name)
        weight = modules[name].weight
        shapes[name] = list(weight.shape)
        cached = _usable_factor(path, name, fingerprint, shapes[name])
        if cached is not None:
            errors[name] = cached
        else:
            U, S, Vh = thin_svd(weight)
            w = weight.detach().to("cpu", torch.float32)
            errors[name] = float(torch.linalg.norm((U * S) @ Vh - w) / torch.linalg.norm(w).clamp_min(1e-30))
            meta = {"format": FORMAT, "fingerprint": fingerprint, "module": name,
                    "shape": json.dumps(shapes[name]), "rel_error": repr(errors[name])}
            atomic_write_bytes(path, safetensors_bytes({"U": U, "S": S, "Vh": Vh}, meta))
        if progress:
            progress(i + 1, len(module_names), name)
    for stale in (cache / "factors").glob("*.safetensors"):  # left by an earlier target set
        if stale.name.removesuffix(".safetensors") not in shapes:
            stale.unlink()
    index = {"format": FORMAT, "fingerprint": fingerprint, "modules": module_names, "shapes": shapes,
             "dtype": "float32", "max_rel_error": max(errors.values()),
             "files": {n: _file_record(_factor_file(cache, n)) for n in module_names}}
    atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    return index


def load_index(cache: str | Path, fingerprint: Optional[str] = None) -> dict:
    path = Path(cache) / "index.json"
    if not path.is_file():
        raise SVDCacheError(f"{path} not found: run the decompose stage first (`t2 decompose`)")
    try:
        index = json.loads(path.read_text())
        index["fingerprint"], index["modules"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise SVDCacheError(f"{path} is damaged ({type(err).__name__}): rerun the decompose stage "
                            "(`t2 decompose`; it keeps the factors that are whole)") from None
    if fingerprint is not None and index["fingerprint"] != fingerprint:
        raise SVDCacheError(f"the SVD cache in {cache} was computed for base weights {index['fingerprint'][:12]}…, "
                            f"not for this model ({fingerprint[:12]}…): rerun the decompose stage")
    return index


def _cached_names(cache: str | Path, fingerprint: Optional[str], modules: Optional[list[str]]) -> tuple[list[str], dict]:
    index = load_index(cache, fingerprint)
    names = index["modules"] if modules is None else modules
    missing = sorted(set(names) - set(index["modules"]))
    if missing:
        raise SVDCacheError(f"the SVD cache in {cache} lacks {missing[:3]}{'…' if len(missing) > 3 else ''}: "
                            "svf.targets changed since the decompose stage ran; rerun it")
    return names, index


def _damaged(path: Path, why: str) -> SVDCacheError:
    return SVDCacheError(f"{path} is damaged ({why}): rerun the decompose stage (`t2 decompose`; it recomputes "
                         "only the damaged factors)")


def load_factors(cache: str | Path, fingerprint: Optional[str] = None,
                 modules: Optional[list[str]] = None) -> dict[str, Factors]:
    """Factors of the cached modules (all, or those named), checked against the base fingerprint and
    each file's recorded size and SHA256."""
    out = {}
    names, index = _cached_names(cache, fingerprint, modules)
    for name in names:
        path = _factor_file(Path(cache), name)
        if not path.is_file():
            raise _damaged(path, "missing")
        data = path.read_bytes()
        recorded = index.get("files", {}).get(name)  # older caches lack it
        if recorded and (len(data) != recorded["bytes"] or hashlib.sha256(data).hexdigest() != recorded["sha256"]):
            raise _damaged(path, f"{len(data)} bytes, {recorded['bytes']} recorded" if len(data) != recorded["bytes"]
                           else "SHA256 differs from index.json")
        try:
            tensors = load(data)
        except SafetensorError as err:
            raise _damaged(path, str(err)) from None
        out[name] = (tensors["U"], tensors["S"], tensors["Vh"])
    return out


def load_singular_values(cache: str | Path, fingerprint: Optional[str] = None,
                         modules: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Only σ of each cached module: what measuring an expert needs, without U and V (GBs on 8B);
    sizes are checked, not hashes (that would read U and V)."""
    out = {}
    names, index = _cached_names(cache, fingerprint, modules)
    for name in names:
        path = _factor_file(Path(cache), name)
        recorded = index.get("files", {}).get(name)
        size = path.stat().st_size if path.is_file() else None
        if size is None or (recorded and size != recorded["bytes"]):
            raise _damaged(path, "missing" if size is None else f"{size} bytes, {recorded['bytes']} recorded")
        try:
            with safe_open(str(path), framework="pt") as f:
                out[name] = f.get_tensor("S")
        except SafetensorError as err:
            raise _damaged(path, str(err)) from None
    return out
