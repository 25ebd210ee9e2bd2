"""The whole pipeline as one Prefect flow; `t2 serve` schedules it from the UI.

The DAG is written once, in `dvc.yaml`: this flow reads its stages in file order (a
topological order) and each stage's `cmd` (a `t2 ...` command), with `foreach` resolved
against the validated params. By default each stage runs as `dvc repro --single-item <stage>`:
DVC skips what is up to date, records dvc.lock and caches the outputs, while each stage still
appears in Prefect as its own task run (DVC holds a repository lock, so stages run one at a
time). Each stage's MLflow run nests under the pipeline's own run (its id reaches the stage
processes in MLFLOW_PARENT_RUN_ID). `use_dvc=False` runs each stage's command in-process,
without git or DVC; there `parallel=True` runs the items of a foreach training stage (e.g. the experts of
different tasks) concurrently (several copies of the model in memory: for multi-GPU or big-RAM hosts).
Evaluation cells stay one at a time: lm-eval's task registry and evaluator are process-wide state, and
concurrent cells in one process fail. `execution.task_runner` picks where the concurrent items run: threads of
this process (`thread`) or the worker processes of a local Dask cluster (`dask`, flows/dask_runner.py).
A run without DVC in a DVC project records what it ran in dvc.lock at the end (`dvc commit --force` of its
stage units), so a later `dvc repro` has nothing to do.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import load_params
from transformer2.errors import UserError

from . import layout
from .dag import DVC_FILE, Stage, dag_stages, dvc_file, eval_cells, report_units  # noqa: F401  (the DAG's readers)

def _stream(cmd: list[str], log=None) -> int:
    """Run `cmd`, its output logged line by line as it comes (`log`), or straight on this terminal; its exit
    code. On Ctrl-C (which reaches `cmd` too: one process group) wait for it to stop before going on."""
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "bufsize": 1} if log else {}
    proc = subprocess.Popen(cmd, **piped)
    try:
        for line in proc.stdout if log else ():
            log.info(line.rstrip("\n"))
        return proc.wait()
    finally:
        if proc.poll() is None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro_task(stage: str) -> None:
    code = _stream(["dvc", "repro", "--single-item", stage], get_run_logger())
    if code != 0:
        raise RuntimeError(f"`dvc repro --single-item {stage}` failed with exit code {code}")


@task(name="t2", cache_policy=NO_CACHE)
def command_task(command: str, params_path: str, env: Optional[dict] = None) -> None:
    """One stage command (`t2 ...` from dvc.yaml) run in this process; `env`: the pipeline run's variables,
    set first in a worker process of another task runner (Dask), which started before they existed."""
    if env is not None:
        from .dask_worker import ready

        ready()
        os.environ.update(env)
        os.chdir(env.get("T2_CWD", os.getcwd()))
    from .cli import main

    argv = shlex.split(command)
    if argv[:1] != ["t2"]:
        raise UserError(f"{DVC_FILE}: stage command {command!r} is not a `t2` command")
    code = main(argv[1:] + ["--params", params_path])
    if code:
        raise RuntimeError(f"`{command}` failed with exit code {code}")


@flow(name="transformer2-repro", flow_run_name="repro")
def repro_flow(dvc_args: list[str], params_path: str = str(layout.PARAMS)) -> None:
    """`t2 repro [dvc repro args]`: one `dvc repro` whose stage processes all use this run's Prefect server
    (PREFECT_API_URL, set by `t2`), whose flow runs are subflows of this one (T2_PARENT_FLOW_RUN: stages.run_stage)
    and whose MLflow runs nest under one parent run; DVC's output goes straight to the terminal as it comes
    (each stage's logs are in its own flow run too)."""
    from tasks.tracking import pipeline_run

    from prefect.runtime import flow_run

    from .stages import PARENT_ENV

    get_run_logger().info(f"dvc repro {shlex.join(dvc_args)}")
    os.environ[PARENT_ENV] = str(flow_run.id)  # each stage's flow run becomes a subflow of this one
    try:
        with pipeline_run(load_params(params_path), name="repro"):
            code = _stream(["dvc", "repro", *dvc_args])
    finally:
        os.environ.pop(PARENT_ENV, None)
    if code != 0:
        raise RuntimeError(f"`dvc repro {shlex.join(dvc_args)}` failed with exit code {code}")


@flow(name="transformer2-pipeline")
def pipeline_flow(params_path: str = str(layout.PARAMS), use_dvc: bool = True, parallel: bool = False) -> None:
    """Every stage in DAG order, their MLflow runs nested under one parent run of this pipeline run."""
    from tasks.tracking import pipeline_run

    with pipeline_run(load_params(params_path), name="pipeline" + ("" if use_dvc else " (no dvc)")):
        _run_stages(params_path, use_dvc, parallel)


def uses_dask(params, use_dvc: bool, parallel: bool) -> bool:
    return not use_dvc and parallel and params.execution.task_runner == "dask"


def run_pipeline(params_path: str = str(layout.PARAMS), use_dvc: bool = True, parallel: bool = False) -> None:
    """`t2 pipeline`: the pipeline flow, on a local Dask cluster where `execution.task_runner: dask` applies
    (`--no-dvc --parallel`); its workers reach this run's Prefect server through PREFECT_API_URL."""
    params = load_params(params_path)
    flow_ = pipeline_flow
    if params.execution.task_runner == "dask" and not uses_dask(params, use_dvc, parallel):
        import sys

        print("t2: warning: execution.task_runner: dask applies to `t2 pipeline --no-dvc --parallel` only; "
              "this run's stages run one at a time", file=sys.stderr)
    if uses_dask(params, use_dvc, parallel):
        from .dask_runner import dask_task_runner

        flow_ = pipeline_flow.with_options(task_runner=dask_task_runner(params.execution.dask_workers))
    with logs_delivered():
        flow_(params_path=params_path, use_dvc=use_dvc, parallel=parallel)


def run_repro(dvc_args: list[str], params_path: str = str(layout.PARAMS)) -> None:
    """`t2 repro`: the repro flow, its last logs delivered before `t2` stops the run's server."""
    with logs_delivered():
        repro_flow(dvc_args=dvc_args, params_path=params_path)


@contextlib.contextmanager
def logs_delivered():
    """The flow's last logs reach its server before `t2` stops it (else Prefect's log worker prints
    "Error logging to API: All connection attempts failed" at exit, after a run that succeeded)."""
    try:
        yield
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)


PIPELINE_VARS = ("PREFECT_API_URL", "T2_PIPELINE_RUN", "MLFLOW_PARENT_RUN_ID")


def _run_stages(params_path: str, use_dvc: bool, parallel: bool) -> None:
    params = load_params(params_path)
    dask = uses_dask(params, use_dvc, parallel)
    units = []
    for stage in dag_stages(params_path):
        if use_dvc:
            dvc_repro_task.with_options(name=f"dvc-repro-{stage.name}")(stage.name)
        elif parallel and stage.foreach and not any(shlex.split(c)[:2] == ["t2", "eval"] for c in stage.commands):
            env = ({k: os.environ[k] for k in PIPELINE_VARS if k in os.environ} | {"T2_CWD": os.getcwd()}
                   if dask else None)
            futures = [command_task.with_options(name=f"t2-{stage.name}").submit(cmd, params_path, env)
                       for cmd in stage.commands]
            for future in futures:
                future.result()
        else:
            for cmd in stage.commands:
                command_task.with_options(name=f"t2-{stage.name}")(cmd, params_path)
        units += [stage.name + (f"@{item}" if stage.foreach else "") for item in stage.items]
    if not use_dvc:
        record_in_dvc_lock(params_path, units)


def record_in_dvc_lock(params_path: str, units: list[str]) -> bool:
    """After a run without DVC in a DVC project: `dvc commit --force` of the units it ran, so dvc.lock holds
    their params, dependencies and outputs as they are now and a later `dvc repro` reruns nothing. Only where
    that is true: the project's own params.yaml and dvc.yaml (another params file's outputs would be
    recorded under params.yaml's values), `dvc` on PATH. Returns whether it recorded them."""
    log = get_run_logger()
    if not Path(".dvc").is_dir():
        return False
    if shutil.which("dvc") is None:
        log.warning("dvc.lock not updated: `dvc` is not on PATH; run `dvc commit --force` before `dvc repro`")
        return False
    if Path(params_path).resolve() != Path(layout.PARAMS).resolve() or \
            dvc_file().resolve() != Path(DVC_FILE).resolve():
        log.warning(f"dvc.lock not updated: this run read {params_path}, not the project's {layout.PARAMS} "
                    f"(and {DVC_FILE}); `dvc repro` will rerun the stages whose params differ")
        return False
    code = _stream(["dvc", "commit", "--force", *units], log)
    if code != 0:
        raise RuntimeError(f"`dvc commit --force` of {len(units)} stage units failed with exit code {code}; "
                           "the outputs are intact: run `dvc commit --force` (or `dvc repro`, which reruns them)")
    log.info(f"dvc.lock: recorded {len(units)} stage units (`dvc repro` has nothing to do)")
    return True
