"""dvc.yaml read as the DAG it is: stages in file order, foreach items resolved against the params.
Light (no Prefect): `t2 params` and the report read it too."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from transformer2.config import load_params
from transformer2.errors import UserError

from . import layout

DVC_FILE = "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    commands: tuple[str, ...]  # one per foreach item, `${item}` filled in
    foreach: bool
    items: tuple[Optional[str], ...] = (None,)  # the foreach items, or (None,)


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


def _items(stage: dict, values: dict) -> list[str]:
    ref = re.fullmatch(r"\$\{([\w.]+)\}", str(stage["foreach"]))
    return [str(item) for item in (_lookup(values, ref.group(1)) if ref else stage["foreach"])]


def dag_stages(params_path: str | Path = layout.PARAMS, path: str | Path | None = None) -> list[Stage]:
    """The stages of dvc.yaml in order, each with its commands (foreach resolved against the params)."""
    spec = yaml.safe_load(Path(path or dvc_file()).read_text())["stages"]
    values = load_params(params_path).model_dump()
    stages = []
    for name, stage in spec.items():
        if "foreach" in stage:
            items = _items(stage, values)
            cmds = tuple(stage["do"]["cmd"].replace("${item}", item) for item in items)
            stages.append(Stage(name, cmds, True, tuple(items)))
        else:
            stages.append(Stage(name, (stage["cmd"],), False))
    return stages


def _written_plots(spec: dict, values: dict) -> set[str]:
    """The plot files (or folders) the stages of the current DAG write: their `plots:` outputs."""
    written = set()
    for stage in spec["stages"].values():
        body, items = (stage["do"], _items(stage, values)) if "foreach" in stage else (stage, [""])
        for entry in body.get("plots", []):
            name = entry if isinstance(entry, str) else next(iter(entry))
            written.update(name.replace("${item}", item) for item in items)
    return written


def _figures(spec: dict) -> dict[str, list[str]]:
    """dvc.yaml's top-level plots: id -> the files it draws (y: {file: field}, else the id is the file)."""
    figures = {}
    for entry in spec.get("plots", []):
        for plot_id, plot in (entry.items() if isinstance(entry, dict) else [(entry, None)]):
            y = (plot or {}).get("y")
            figures[plot_id] = list(y) if isinstance(y, dict) else [plot_id]
    return figures


def stale_plots(params_path: str | Path = layout.PARAMS, path: str | Path | None = None,
                root: str | Path = ".") -> list[str]:
    """Files that dvc.yaml's top-level plots draw but no stage of the current DAG writes, and that exist
    under `root`: another profile's curves (a task this one does not train), which `dvc plots show`
    would draw beside this run's."""
    spec = yaml.safe_load(Path(path or dvc_file()).read_text())
    written = _written_plots(spec, load_params(params_path).model_dump())
    drawn = {f for files in _figures(spec).values() for f in files}
    return sorted(f for f in drawn - written if (Path(root) / f).is_file())


def plot_targets(params_path: str | Path = layout.PARAMS, path: str | Path | None = None,
                 root: str | Path = ".") -> tuple[list[str], dict[str, str]]:
    """What `t2 plots` draws: the plot outputs of the current DAG's stages and the top-level figures whose
    every file one of its stages writes, where they exist under `root` (so `dvc plots show` gets no missing
    file to warn about and no other profile's curve); and the left-out ones, each with the reason."""
    spec = yaml.safe_load(Path(path or dvc_file()).read_text())
    written = _written_plots(spec, load_params(params_path).model_dump())
    targets, left_out = [], {}
    for name in sorted(written):
        if (Path(root) / name).exists():
            targets.append(name)
        else:
            left_out[name] = "not written yet (run `dvc repro`)"
    for plot_id, files in _figures(spec).items():
        other = [f for f in files if f not in written]
        missing = [f for f in files if not (Path(root) / f).exists()]
        if other:
            left_out[plot_id] = "draws a task this profile does not run"
        elif missing:
            left_out[plot_id] = "not written yet (run `dvc repro`)"
        else:
            targets.append(plot_id)
    return targets, left_out


def eval_cells(stages: list[Stage]) -> list[tuple[str, str, str]]:
    """(stage, kind, task) of every evaluation cell the DAG produces: what one run's report shows."""
    cells = []
    for stage in stages:
        for cmd, item in zip(stage.commands, stage.items):
            argv = shlex.split(cmd)
            if argv[:2] == ["t2", "eval"]:
                cells.append((stage.name, argv[argv.index("--kind") + 1], argv[argv.index("--task") + 1]))
    return cells


def report_units(stages: list[Stage]) -> list[tuple[str, Optional[str]]]:
    """The training, classifier and cem units whose metrics the report's training, dispatch and CEM tables show."""
    return [(s.name, item) for s in stages if s.name in ("expert", "lora", "classifier", "cem") for item in s.items]


def resolved_stage_params(params_path: str | Path = layout.PARAMS) -> dict[str, dict]:
    """unit name (`expert_gsm8k`) -> the settings that unit reads, for every unit of the DAG."""
    from tasks.stage_params import stage_settings, unit_name

    params = load_params(params_path)
    return {unit_name(s.name, item): stage_settings(params, s.name, item)
            for s in dag_stages(params_path) if s.name != "params" for item in s.items}


def write_stage_params(params_path: str | Path = layout.PARAMS, out_dir: Path = layout.STAGE_PARAMS_DIR,
                       dry: bool = False) -> list[str]:
    """Write `<out_dir>/<unit>.json` for every unit (only files whose content changes are touched, files of
    units no longer in the DAG are removed); returns the units whose file changed."""
    from transformer2.files import atomic_write_text

    wanted = {f"{unit}.json": json.dumps(settings, indent=2, sort_keys=True) + "\n"
              for unit, settings in resolved_stage_params(params_path).items()}
    old = {p.name: p.read_text() for p in out_dir.glob("*.json")} if out_dir.is_dir() else {}
    changed = sorted(name for name in wanted.keys() | old.keys() if wanted.get(name) != old.get(name))
    if not dry:
        for name in changed:
            if name in wanted:
                atomic_write_text(out_dir / name, wanted[name])
            else:
                (out_dir / name).unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
    return [name.removesuffix(".json") for name in changed]
