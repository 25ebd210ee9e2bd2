import os
import socket
import time
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
# A test project's shared Prefect server stops soon after its last `t2` process (default 120 s).
os.environ.setdefault("T2_PREFECT_SERVER_IDLE_S", "10")
os.environ.setdefault("T2_FORKSERVER_IDLE_S", "10")  # and so does its forkserver
os.environ["T2_KERNEL_CACHE"] = ""  # every test process measures its own kernel alignment (no state across runs)

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


def _mini_mirror(source: Path, out: Path, rows: int = 400) -> Path:
    """The first `rows` lines of every split of the real mirror: enough for the tiny profile's splits."""
    for split in sorted(source.glob("*/*.jsonl")):
        target = out / split.parent.name / split.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(split, encoding="utf-8") as f:
            target.write_text("".join(line for _, line in zip(range(rows), f)), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, tiny_model_dir, mirror) -> Path:
    """A complete tiny project as every stage before evaluation would leave it (tiny profile): real model,
    SVD cache, data, an expert per rl.tasks, the classifier expert, a CEM result, a LoRA folder and the
    base cells' samples. Tests copy it (`shutil.copytree`) and then break one thing."""
    import json
    import shutil

    import torch
    import yaml

    from transformer2.cem import CEMResult
    from transformer2.models import load_base
    from transformer2.svd import decompose
    from transformer2.svf import SVFConfig, find_targets, init_expert, apply_svf
    from transformer2.svd import load_factors
    from transformer2.tasks import export_tasks

    root = tmp_path_factory.mktemp("project")
    params = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    params["data"]["dir"] = str(_mini_mirror(mirror, root.parent / f"{root.name}-mirror"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    art = root / "artifacts"
    shutil.copytree(tiny_model_dir, art / "model")
    model, _, info = load_base(art / "model")
    names = find_targets(model, params["svf"]["targets"])
    decompose(model, names, art / "svd", info.fingerprint)
    export_tasks(params["data"]["tasks"], art / "data", Path(params["data"]["dir"]), params["data"]["max_rows"],
                 params["data"]["fewshot_holdout"])
    config = SVFConfig(targets=params["svf"]["targets"])
    apply_svf(model, load_factors(art / "svd", info.fingerprint), config)
    for task in params["rl"]["tasks"]:
        init_expert(model, info.fingerprint, config, torch.Generator().manual_seed(1), {"task": task}).save(
            art / "experts" / task)
    init_expert(model, info.fingerprint, config, torch.Generator().manual_seed(2), {"task": "classifier"}).save(
        art / "classifier")
    for task in params["cem"]["tasks"]:
        CEMResult(alpha=[1.0] * len(params["rl"]["tasks"]), keys=list(params["rl"]["tasks"]), accuracy=0.5,
                  loglik=-1.0, task=task).save(art / "cem" / task)
    for task in params["lora"]["tasks"]:
        (art / "lora" / task).mkdir(parents=True)
        (art / "lora" / task / "adapter_config.json").write_text(json.dumps({"r": 16}))
        (art / "lora" / task / "provenance.json").write_text(json.dumps({"base_fingerprint": info.fingerprint}))
    for task in {*params["eval"]["tasks"], *params["eval"]["adapt_tasks"]}:
        (art / "eval" / f"base_{task}").mkdir(parents=True)
        (art / "eval" / f"base_{task}" / "samples.jsonl").write_text("")
    (root / "metrics").mkdir()
    return root


def pytest_report_header(config):
    """The CPU, torch and BLAS a run's bitwise results were checked on (decoding.kernels)."""
    from transformer2.decoding.kernels import _machine

    return f"kernels: {_machine()}"


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    """A loopback TCP port that nothing listens on (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
