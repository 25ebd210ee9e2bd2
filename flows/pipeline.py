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
concurrent cells in one process fail.
"""
from __future__ import annotations

import shlex
import subprocess

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
def command_task(command: str, params_path: str) -> None:
    """One stage command (`t2 ...` from dvc.yaml) run in this process."""
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
    (PREFECT_API_URL, set by `t2`) and whose MLflow runs nest under one parent run; DVC's output goes
    straight to the terminal as it comes (each stage's logs are in its own flow run too)."""
    from tasks.tracking import pipeline_run

    get_run_logger().info(f"dvc repro {shlex.join(dvc_args)}")
    with pipeline_run(load_params(params_path), name="repro"):
        code = _stream(["dvc", "repro", *dvc_args])
    if code != 0:
        raise RuntimeError(f"`dvc repro {shlex.join(dvc_args)}` failed with exit code {code}")


@flow(name="transformer2-pipeline")
def pipeline_flow(params_path: str = str(layout.PARAMS), use_dvc: bool = True, parallel: bool = False) -> None:
    """Every stage in DAG order, their MLflow runs nested under one parent run of this pipeline run."""
    from tasks.tracking import pipeline_run

    with pipeline_run(load_params(params_path), name="pipeline" + ("" if use_dvc else " (no dvc)")):
        _run_stages(params_path, use_dvc, parallel)


def _run_stages(params_path: str, use_dvc: bool, parallel: bool) -> None:
    for stage in dag_stages(params_path):
        if use_dvc:
            dvc_repro_task.with_options(name=f"dvc-repro-{stage.name}")(stage.name)
        elif parallel and stage.foreach and not any(shlex.split(c)[:2] == ["t2", "eval"] for c in stage.commands):
            futures = [command_task.with_options(name=f"t2-{stage.name}").submit(cmd, params_path)
                       for cmd in stage.commands]
            for future in futures:
                future.result()
        else:
            for cmd in stage.commands:
                command_task.with_options(name=f"t2-{stage.name}")(cmd, params_path)
