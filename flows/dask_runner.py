"""`execution.task_runner: dask`: the parallel pipeline's foreach training stages on a local Dask cluster.

`t2 pipeline --no-dvc --parallel` submits the items of a foreach training stage (experts, LoRA runs, CEM
tasks) to the flow's task runner. With `dask` that is prefect-dask's DaskTaskRunner on a
`distributed.LocalCluster` of `execution.dask_workers` worker *processes*, one thread each (one stage unit
per process at a time), each with its share of the cores for torch (cores // workers, at least 1). The
workers import the heavy modules when they start (`flows.dask_worker`), while the first stages run here.

Light on purpose (stdlib only until the runner is built): `t2` checks that prefect-dask is installed before
anything heavy is imported.
"""
from __future__ import annotations

import importlib.util
import os

from transformer2.errors import UserError

THREADS_ENV = "T2_TORCH_THREADS"  # a worker's torch threads (flows.dask_worker sets them)
INSTALL = "pip install 'transformer2[dask]'  (or: pip install prefect-dask)"


def installed(module: str = "prefect_dask") -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_prefect_dask() -> None:
    if not installed():
        raise UserError(f"execution.task_runner: dask needs prefect-dask, which is not installed: {INSTALL}; "
                        "or set execution.task_runner: thread")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_threads(workers: int) -> int:
    """Each worker's share of this machine's cores."""
    return max(1, cores() // workers)


def dask_task_runner(workers: int):
    """A DaskTaskRunner whose local cluster has `workers` worker processes of one thread each."""
    require_prefect_dask()
    import logging

    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)  # not its ~40 INFO lines of start and close

    threads = str(worker_threads(workers))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, THREADS_ENV: threads}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True, "env": env,
        "dashboard_address": None, "preload": ["flows.dask_worker"]})
