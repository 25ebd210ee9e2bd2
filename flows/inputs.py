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


def _data(task: str, split: str) -> Need:
    return layout.DATA_DIR / task / f"{split}.jsonl", "data", None


def _shot_pool(task: str) -> Need:
    """CEM's shots: the training split, else the held-out few-shot split (tasks.shot_pool)."""
    folder = layout.DATA_DIR / task
    return folder / ("fewshot.jsonl" if not (folder / "train.jsonl").exists() and (folder / "fewshot.jsonl").exists()
                     else "train.jsonl"), "data", None


def _expert(task: str) -> Need:
    return layout.EXPERTS_DIR / task / "expert.json", f"expert@{task}", "rl.tasks"


MODEL: Need = (layout.MODEL_DIR / "model.json", "model", None)
SVD: Need = (layout.SVD_DIR / "index.json", "decompose", None)


def needs(command: str, params: Params, task: Optional[str] = None, kind: Optional[str] = None) -> list[Need]:
    """The inputs of one stage command, in the order a user would produce them."""
    if command == "decompose":
        return [MODEL]
    if command == "train-expert":
        return [MODEL, SVD, _data(task, "train"), _data(task, "validation")]
    if command == "train-lora":
        return [MODEL, _data(task, "train"), _data(task, "validation")]
    if command == "classifier":
        return [MODEL, SVD, *(_data(t, s) for t in params.classifier.sources for s in ("train", "validation")),
                *(_data(t, "test") for t in params.data.tasks)]
    if command == "cem":
        return [MODEL, SVD, _shot_pool(task), *(_expert(t) for t in params.rl.tasks)]
    if command == "eval":
        out = [MODEL, _data(task, "test")]
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
    """A local model.name (a path, a .gguf) must exist and be what it claims; hub ids (org/name) and built-ins
    are checked by the stage."""
    from transformer2.models import check_builtin, check_checkpoint_dir, check_gguf

    if name.startswith("builtin:"):
        return check_builtin(name)
    path = Path(name).expanduser()
    if (name.startswith(("/", ".", "~")) or name.endswith(".gguf")) and not path.exists():
        raise UserError(f"model.name {name}: no such file or directory (use a local checkpoint folder, a .gguf "
                        "file, an HF hub id such as org/name, or builtin:...)")
    if name.endswith(".gguf"):
        check_gguf(path)
    elif path.is_dir():
        check_checkpoint_dir(path)


def check_data_source(params: Params) -> None:
    """`t2 data` reads and checks the whole mirror (~1 s) before Prefect starts; the stage itself writes
    nothing until every task has been read and checked again (`tasks.export_tasks`)."""
    from transformer2.tasks import data_dir, prepare_tasks

    mirror = data_dir(params.data.dir)
    if mirror is not None:
        prepare_tasks(params.data.tasks, mirror, params.data.max_rows, params.data.fewshot_holdout)


def check_writable(folder: Path) -> None:
    """Fail before the work, not after it, when a stage could not save what it computed (a read-only
    checkout, a full or immutable folder): try to create a file where it will write."""
    import tempfile

    target = folder
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise UserError(f"{target} is not a folder, but the stage writes {folder} inside it: move it away")
    try:
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        raise UserError(f"cannot write in {target} ({err.strerror}): make it writable "
                        f"(the stage writes {folder})") from None


OUTPUTS = {"model": [layout.ARTIFACTS], "data": [layout.DATA_DIR], "decompose": [layout.SVD_DIR],
           "train-expert": [layout.EXPERTS_DIR, layout.CHECKPOINTS_DIR], "train-lora": [layout.LORA_DIR,
           layout.CHECKPOINTS_DIR], "classifier": [layout.CLASSIFIER_DIR, layout.CHECKPOINTS_DIR],
           "cem": [layout.CEM_DIR, layout.CHECKPOINTS_DIR], "eval": [layout.EVAL_DIR, layout.CHECKPOINTS_DIR],
           "report": [layout.REPORTS_DIR]}


def _model(params: Params):
    """model.json readable, its checkpoint present and whole (sizes as recorded)."""
    from transformer2.models import ModelInfo

    info = ModelInfo.load(layout.MODEL_DIR)
    checkpoint = info.path
    if Path(checkpoint).is_absolute() and not Path(checkpoint).exists():
        raise UserError(f"{MODEL[0]} points at {checkpoint}, which does not exist here (the checkout moved, or "
                        "the model stage ran on another machine): rerun it (`dvc repro -f model`)")
    if Path(checkpoint).is_dir() and not (Path(checkpoint) / "config.json").is_file():
        raise UserError(f"{MODEL[0]} points at {checkpoint}, which holds no model (no config.json): rerun the "
                        "model stage (`dvc repro -f model`)")
    info.check_files()
    return info


def _svd(params: Params, info) -> dict:
    """The SVD cache is of this base, and of the modules svf.targets selects now."""
    from transformer2.svd import load_index
    from transformer2.svf import match_targets

    index = load_index(layout.SVD_DIR, info.fingerprint)
    if info.linear_modules:  # older model.json files lack the model's linear names
        wanted = match_targets(info.linear_modules, params.svf.targets, info.architecture)
        if wanted != index["modules"]:
            raise UserError(f"svf.targets {params.svf.targets!r} selects {len(wanted)} matrices, the SVD cache in "
                            f"{layout.SVD_DIR} holds {len(index['modules'])} others: rerun the decompose stage "
                            "(`dvc repro decompose`)")
    return index


def _check_expert(folder: Path, fingerprint: str, index: Optional[dict]) -> None:
    """An expert's metadata, its weights' size, its base and its modules, without loading it."""
    from transformer2.svf import ExpertError, read_expert_meta
    from transformer2.svf.model import WEIGHTS_NAME

    meta = read_expert_meta(folder)
    recorded = meta.get("weights", {}).get("bytes")
    size = (folder / WEIGHTS_NAME).stat().st_size
    if recorded is not None and size != recorded:
        raise ExpertError(f"{folder / WEIGHTS_NAME} is damaged or incomplete ({size} bytes, {recorded} recorded in "
                          "expert.json): retrain the expert")
    if meta["base_fingerprint"] != fingerprint:
        raise ExpertError(f"{folder} was trained on base weights {meta['base_fingerprint'][:12]}…, not on this "
                          f"model ({fingerprint[:12]}…, {MODEL[0]}): retrain it on this base, or restore that base")
    if index is not None and "modules" in meta and sorted(meta["modules"]) != sorted(index["modules"]):
        raise ExpertError(f"{folder} patches {len(meta['modules'])} matrices, the SVD cache and svf.targets "
                          f"{len(index['modules'])} others: retrain it with the current svf.targets")


def _check_lora(folder: Path, fingerprint: str) -> None:
    for name in ("adapter_config.json", "provenance.json"):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{path} is not valid JSON ({err}): retrain the adapter") from None
            if name == "provenance.json" and data.get("base_fingerprint") not in (None, fingerprint):
                raise UserError(f"{folder} was trained on base weights {data['base_fingerprint'][:12]}…, not on "
                                f"this model ({fingerprint[:12]}…): retrain it on this base")


def check_inputs(command: str, params: Params, task: Optional[str] = None, kind: Optional[str] = None) -> None:
    """Raise one UserError for the first missing or unusable input of `command`, naming the file and the unit
    to run: every input is read as far as it can be without a model (JSON, sizes, columns, fingerprints)."""
    from transformer2.tasks import check_split

    if command == "model":
        check_model_name(params.model.name)
    if command == "data":
        check_data_source(params)
    inputs = needs(command, params, task, kind)
    for path, unit, listed in inputs:
        if not path.exists():
            stage, _, item = unit.partition("@")
            hint = ""
            if listed and item not in getattr(getattr(params, listed.split(".")[0]), "tasks"):
                hint = f"; {item} is not in {listed}: add it"
            raise UserError(f"{path} not found: run stage {unit} first (`dvc repro {unit}`){hint}")
    paths = [path for path, _, _ in inputs]
    info = _model(params) if MODEL[0] in paths else None
    if info is not None and info.linear_modules and command in ("decompose", "train-expert", "classifier", "cem", "eval"):
        from transformer2.svf import match_targets

        match_targets(info.linear_modules, params.svf.targets, info.architecture)  # svf.targets selects something
    index = _svd(params, info) if SVD[0] in paths and info is not None else None
    for path in paths:
        if path.parent.parent == layout.DATA_DIR:
            check_split(layout.DATA_DIR, path.parent.name, path.stem)
        elif path.name == "expert.json" and info is not None:
            _check_expert(path.parent, info.fingerprint, index)
        elif path.name == "adapter_config.json" and info is not None:
            _check_lora(path.parent, info.fingerprint)
        elif path.name == "cem.json":
            from transformer2.cem import CEMResult  # (torch: only where a CEM result is read)

            result = CEMResult.load(path)
            unknown = sorted(set(result.keys) - set(params.rl.tasks))
            if unknown:
                raise UserError(f"{path} mixes experts {unknown} that are not in rl.tasks {params.rl.tasks}: rerun "
                                f"stage cem@{task} (`dvc repro cem@{task}`)")
    for folder in OUTPUTS.get(command, []) + ([layout.METRICS_DIR] if command in OUTPUTS else []):
        check_writable(folder)
