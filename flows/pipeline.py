"""The whole pipeline as one Prefect flow; `t2 serve` schedules it from the UI.

The DAG is written once, in `dvc.yaml`: this flow reads its stages in file order (a
topological order) and each stage's `cmd` (a `t2 ...` command), with `foreach` resolved
against the validated params. By default each stage runs as `dvc repro --single-item <stage>`:
DVC skips what is up to date, records dvc.lock and caches the outputs, while each stage still
appears in Prefect as its own task run (DVC holds a repository lock, so stages run one at a
time). `use_dvc=False` runs each stage's command in-process, without git or DVC; there
`parallel=True` runs the items of a foreach stage (e.g. the experts of different tasks)
concurrently (several copies of the model in memory: for multi-GPU or big-RAM hosts).
"""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.config import load_params
from transformer2.errors import UserError

from . import layout

DVC_FILE = "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    commands: tuple[str, ...]  # one per foreach item, `${item}` filled in
    foreach: bool


def dvc_file() -> Path:
    """The project's dvc.yaml: in the working directory, else next to this package (a source checkout)."""
    for path in (Path(DVC_FILE), Path(__file__).resolve().parents[1] / DVC_FILE):
        if path.is_file():
            return path
    raise UserError(f"{DVC_FILE} not found in {Path.cwd()} or beside the installed flows package")


def _lookup(params: dict, ref: str) -> Any:
    value: Any = params
    for key in ref.split("."):
        if not isinstance(value, dict) or key not in value:
            raise UserError(f"{DVC_FILE}: ${{{ref}}} names no key of the params")
        value = value[key]
    return value


def dag_stages(params_path: str | Path = layout.PARAMS, path: str | Path | None = None) -> list[Stage]:
    """The stages of dvc.yaml in order, each with its commands (foreach resolved against the params)."""
    spec = yaml.safe_load(Path(path or dvc_file()).read_text())["stages"]
    values = load_params(params_path).model_dump()
    stages = []
    for name, stage in spec.items():
        if "foreach" in stage:
            ref = re.fullmatch(r"\$\{([\w.]+)\}", str(stage["foreach"]))
            items = _lookup(values, ref.group(1)) if ref else stage["foreach"]
            cmds = tuple(stage["do"]["cmd"].replace("${item}", str(item)) for item in items)
            stages.append(Stage(name, cmds, True))
        else:
            stages.append(Stage(name, (stage["cmd"],), False))
    return stages


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro_task(stage: str) -> None:
    log = get_run_logger()
    proc = subprocess.run(["dvc", "repro", "--single-item", stage], capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).strip().splitlines()[-20:]:
        log.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc repro --single-item {stage}` failed with exit code {proc.returncode}")


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


@flow(name="transformer2-pipeline")
def pipeline_flow(params_path: str = str(layout.PARAMS), use_dvc: bool = True, parallel: bool = False) -> None:
    for stage in dag_stages(params_path):
        if use_dvc:
            dvc_repro_task.with_options(name=f"dvc-repro-{stage.name}")(stage.name)
        elif parallel and stage.foreach:
            futures = [command_task.with_options(name=f"t2-{stage.name}").submit(cmd, params_path)
                       for cmd in stage.commands]
            for future in futures:
                future.result()
        else:
            for cmd in stage.commands:
                command_task.with_options(name=f"t2-{stage.name}")(cmd, params_path)
