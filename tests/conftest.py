import os
from pathlib import Path

import pytest

# Offline and quiet, whatever the caller's shell has.
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(key, value)

# Tiny models run far faster on one thread than on two busy cores; subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]


def mirror_dir() -> Path | None:
    value = os.environ.get("T2_DATA_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    default = ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mirror() -> Path:
    path = mirror_dir()
    if path is None:
        pytest.skip("no local data mirror: set T2_DATA_DIR to a folder with the layout of shared/data")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A prepared built-in tiny random Llama (checkpoint + model.json), shared by the session."""
    from transformer2.models import prepare_model

    out = tmp_path_factory.mktemp("model")
    prepare_model("builtin:tiny-random-llama", out)
    return out


def saved_random_experts(model_dir: Path, root: Path, seeds: dict[str, int],
                         fingerprints: dict[str, str] | None = None) -> dict:
    """SVD cache of a prepared tiny model under `root` and one seeded random expert per name
    (z = 3·N(0, 1): far from the identity, so switching experts visibly changes outputs),
    saved to root/<name>; `fingerprints` overrides an expert's base (an expert of another model)."""
    import torch

    from transformer2.models import load_base
    from transformer2.svd import decompose
    from transformer2.svf import Expert, SVFConfig, find_targets

    model, _, info = load_base(model_dir)
    names = find_targets(model, "mlp")
    decompose(model, names, root / "svd", info.fingerprint)
    ranks = {n: min(m.weight.shape) for n, m in model.named_modules() if n in names}
    folders = {}
    for name, seed in seeds.items():
        g = torch.Generator().manual_seed(seed)
        Expert({n: 3.0 * torch.randn(r, generator=g) for n, r in ranks.items()},
               (fingerprints or {}).get(name, info.fingerprint), SVFConfig(), {"task": name}).save(root / name)
        folders[name] = str(root / name)
    return {"model": str(model_dir), "svd": str(root / "svd"), "experts": folders}
