"""What each `t2` stage command reads from earlier stages, checked before Prefect or a model starts:
a missing input is one error line naming the file and the dvc.yaml unit that writes it, in a second,
instead of a traceback after the stage has started. Mirrors dvc.yaml's deps (with layout.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from transformer2.config import Params
from transformer2.errors import UserError

from . import layout

Need = tuple[Path, str, Optional[str]]  # (file, unit that writes it, the params list its item must be in)


def _data(task: str) -> Need:
    return layout.DATA_DIR / task, "data", None


def _expert(task: str) -> Need:
    return layout.EXPERTS_DIR / task / "expert.json", f"expert@{task}", "rl.tasks"


MODEL: Need = (layout.MODEL_DIR / "model.json", "model", None)
SVD: Need = (layout.SVD_DIR / "index.json", "decompose", None)


def needs(command: str, params: Params, task: Optional[str] = None, kind: Optional[str] = None) -> list[Need]:
    """The inputs of one stage command, in the order a user would produce them."""
    if command == "decompose":
        return [MODEL]
    if command == "train-expert":
        return [MODEL, SVD, _data(task)]
    if command == "train-lora":
        return [MODEL, _data(task)]
    if command == "classifier":
        return [MODEL, SVD, *(_data(t) for t in dict.fromkeys([*params.classifier.sources, *params.data.tasks]))]
    if command == "cem":
        return [MODEL, SVD, _data(task), *(_expert(t) for t in params.rl.tasks)]
    if command == "eval":
        out = [MODEL, _data(task)]
        if kind != "base" and kind != "lora":
            out.append(SVD)
        if kind == "svf":
            out.append(_expert(task))
        elif kind == "lora":
            out.append((layout.LORA_DIR / task / "adapter_config.json", f"lora@{task}", "lora.tasks"))
        elif kind in ("prompt", "classifier", "few_shot"):
            out += [_expert(t) for t in params.rl.tasks]
            if kind == "classifier":
                out.append((layout.CLASSIFIER_DIR / "expert.json", "classifier", None))
            if kind == "few_shot":
                out.append((layout.CEM_DIR / task / "cem.json", f"cem@{task}", "cem.tasks"))
        if kind != "base":  # Δ vs base is paired on the base cell's per-sample outputs
            out.append((layout.base_samples(task), f"eval-base@{task}", None))
        return out
    return []


def check_model_name(name: str) -> None:
    """A local model.name (a path, a .gguf) must exist; hub ids (org/name) and built-ins are checked by the stage."""
    if name.startswith("builtin:"):
        return
    if (name.startswith(("/", ".", "~")) or name.endswith(".gguf")) and not Path(name).expanduser().exists():
        raise UserError(f"model.name {name}: no such file or directory (use a local checkpoint folder, a .gguf "
                        "file, an HF hub id such as org/name, or builtin:...)")


def check_inputs(command: str, params: Params, task: Optional[str] = None, kind: Optional[str] = None) -> None:
    """Raise one UserError for the first missing input of `command`, naming the unit to run."""
    if command == "model":
        check_model_name(params.model.name)
    for path, unit, listed in needs(command, params, task, kind):
        if not path.exists():
            stage, _, item = unit.partition("@")
            hint = ""
            if listed and item not in getattr(getattr(params, listed.split(".")[0]), "tasks"):
                hint = f"; {item} is not in {listed}: add it"
            raise UserError(f"{path} not found: run stage {unit} first (`dvc repro {unit}`){hint}")
    if any(path == MODEL[0] for path, _, _ in needs(command, params, task, kind)):
        checkpoint = json.loads(MODEL[0].read_text()).get("path", "")
        if checkpoint.startswith("/") and not Path(checkpoint).exists():
            raise UserError(f"{MODEL[0]} points at {checkpoint}, which does not exist here (the checkout moved, or "
                            "the model stage ran on another machine): rerun it (`dvc repro -f model`)")
        if Path(checkpoint).is_dir() and not (Path(checkpoint) / "config.json").is_file():
            raise UserError(f"{MODEL[0]} points at {checkpoint}, which holds no model (no config.json): rerun the "
                            "model stage (`dvc repro -f model`)")
