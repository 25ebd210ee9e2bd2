from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import Params
from transformer2.models import load_base
from transformer2.runtime import resource_metrics, timed
from transformer2.svd import decompose
from transformer2.svf import count_svf_parameters, find_targets

from .tracking import record_metrics, stage_run


@task(name="decompose", cache_policy=NO_CACHE)
def decompose_task(params: Params, model_dir: str, out_dir: str, metrics_path: str) -> dict:
    """Thin float32 SVD of every targeted matrix, resumable; the cache later stages read."""
    log = get_run_logger()
    with stage_run(params, "decompose") as stage:
        with timed() as t:
            model, _, info = load_base(model_dir, dtype="float32", device="cpu")
            names = find_targets(model, params.svf.targets)
            log.info(f"{len(names)} target matrices ({params.svf.targets})")
            step = max(1, len(names) // 10)
            index = decompose(model, names, out_dir, info.fingerprint,
                              progress=lambda i, n, name: (i % step == 0 or i == n) and log.info(f"SVD {i}/{n} {name}"))
        metrics = {"modules": len(names), "svf_parameters": count_svf_parameters(model, params.svf.targets),
                   "max_rel_reconstruction_error": index["max_rel_error"], **resource_metrics(t["seconds"])}
        metrics = record_metrics(metrics_path, metrics, stage)
    return metrics
