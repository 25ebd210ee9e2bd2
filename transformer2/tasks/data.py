"""Loading and splitting a task's docs: from a local mirror, the Hugging Face hub, or code.

A task loads from the hub by default, or from a local mirror (layout `<dir>/<task>/<split>.jsonl`)
named by `data.dir` or `T2_DATA_DIR`; a task whose `Source.generate` makes its docs needs neither.
Splits follow the reference implementation (each task's `make_splits`). A task without a training
split (HumanEval) can have `fewshot_holdout` seeded docs moved out of its test split into a
`fewshot` split, so few-shot adaptation has labelled shots that no evaluation of it ever sees.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..files import atomic_write_text
from .base import Doc, Splits, get_task

DATA_ENV = "T2_DATA_DIR"
FEWSHOT_SPLIT = "fewshot"
FEWSHOT_SEED = 0  # fixed, like MBPP's split seed: the evaluation set must not move with `seed`


class DataError(UserError, RuntimeError):
    """Data that cannot be found or read; the message says where it looked."""


def data_dir(configured: Optional[str] = None) -> Optional[Path]:
    """The local mirror to use: the config's, else T2_DATA_DIR, else None (the hub)."""
    value = configured or os.environ.get(DATA_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        origin = "data.dir" if configured else DATA_ENV
        raise DataError(f"{origin} points at {path}, which is not a directory")
    return path


def read_jsonl(path: Path, fix: str = "rerun the data stage (`t2 data`)") -> list[Doc]:
    """JSON Lines, one object per line; a bad line is a DataError naming the file and line (and `fix`)."""
    docs = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                doc = json.loads(line)
                if not isinstance(doc, dict):
                    raise DataError(f"{path}:{n}: a row must be a JSON object, got {type(doc).__name__}; {fix}")
                docs.append(doc)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{n}: not valid JSON ({err.msg}, column {err.colno}); {fix}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); {fix}") from None
    return docs


def check_docs(name: str, docs: list[Doc], where: str, fix: str) -> None:
    """Every doc has what the task reads (prompt, reference answer, options, tests): a missing column is
    named here, before anything is trained, scored or overwritten, not deep inside a stage."""
    task = get_task(name)
    readers = [task.question, task.reference_answer]
    if task.choices is not None:
        readers.append(task.choices)
    if task.checks is not None:
        readers.append(lambda doc: task.checks(doc, ""))
    for i, doc in enumerate(docs):
        try:
            for read in readers:
                read(doc)
            if task.subset_column is not None:
                doc[task.subset_column]
        except KeyError as err:
            raise DataError(f"{where}: row {i + 1} has no column {err.args[0]!r} that {name} reads "
                            f"(columns: {sorted(doc)[:8]}); {fix}") from None
        except (TypeError, AttributeError, IndexError, ValueError) as err:
            raise DataError(f"{where}: row {i + 1} is malformed for {name} ({type(err).__name__}: {err}); {fix}") from None


def stratified_order(name: str, docs: list[Doc]) -> list[Doc]:
    """The docs of a task with subsets (MATH's subjects) taken round-robin, one of each subset in
    turn, each subset in its own order: the first n·k docs hold n of each of the k subsets, so a
    doc limit stays stratified. Other tasks' docs are returned as they are."""
    task = get_task(name)
    if not task.subsets:
        return docs
    groups: dict[str, list[Doc]] = {s.value: [] for s in task.subsets}
    for doc in docs:
        groups.setdefault(doc[task.subset_column], []).append(doc)
    queues = [iter(g) for g in groups.values()]
    out: list[Doc] = []
    while len(out) < len(docs):
        out.extend(doc for doc in (next(q, None) for q in queues) if doc is not None)
    return out


def write_jsonl(path: Path, docs: list[Doc]) -> None:
    atomic_write_text(path, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))


def _load_hub(name: str, hub_path: str, hub_config: Optional[str], split: str) -> list[Doc]:
    try:
        import datasets

        ds = datasets.load_dataset(hub_path, hub_config, split=split)
    except Exception as err:  # offline, missing, gated: all end the same way for the user
        raise DataError(
            f"{name}: could not load {hub_path} ({split}) from the Hugging Face hub "
            f"({type(err).__name__}: {str(err)[:200]}). Offline, point {DATA_ENV} (or data.dir in "
            f"params.yaml) at a local mirror with {name}/{split}.jsonl.") from None
    return [dict(row) for row in ds]


def load_source(name: str, split: str, mirror: Optional[Path] = None) -> list[Doc]:
    """One official split of a task: from the mirror if given (or made by the task's code when the
    mirror lacks it and the task can make it), else from the hub."""
    task = get_task(name)
    source = task.source
    if source is None:
        raise DataError(f"{name} is a pseudo-task with no data of its own")
    if source.generate is not None and (mirror is None or not (mirror / name / f"{split}.jsonl").is_file()):
        return source.generate(split)
    if mirror is not None:
        path = mirror / name / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} not found: the mirror in {mirror} lacks {name}/{split}.jsonl "
                            f"(set {DATA_ENV} or data.dir to a mirror with the layout of shared/data)")
        fix = "fix the mirror (nothing was written)"
        docs = read_jsonl(path, fix)
        if not docs:
            raise DataError(f"{path} has no rows; {fix}")
        check_docs(name, docs, str(path), fix)
        return docs
    if source.hub_path is None:
        raise DataError(f"{name} has no hub dataset: point {DATA_ENV} (or data.dir) at a mirror with {name}/")
    if task.subsets:  # the hub keeps one config per subset (MATH's subjects); the mirror one file
        return [doc for subset in task.subsets for doc in _load_hub(name, source.hub_path, subset.hub_config, split)]
    return _load_hub(name, source.hub_path, source.hub_config, split)


def hold_out_shots(splits: Splits, k: int, seed: int = FEWSHOT_SEED) -> Splits:
    """Move k seeded test docs into a `fewshot` split (tasks without a training split only)."""
    if k == 0 or "train" in splits:
        return splits
    test = splits["test"]
    if k > len(test) // 2:
        raise DataError(f"data.fewshot_holdout={k} would hold out more than half of the {len(test)} test docs")
    idx = set(random.Random(seed).sample(range(len(test)), k))
    return {**splits, FEWSHOT_SPLIT: [test[i] for i in sorted(idx)],
            "test": [d for i, d in enumerate(test) if i not in idx]}


def prepare_splits(name: str, mirror: Optional[Path] = None, max_rows: Optional[int] = None,
                   fewshot_holdout: int = 0) -> Splits:
    """The paper's train/validation/test splits of one task (each capped at `max_rows` if given),
    plus a `fewshot` split held out of the test split when the task has no training split.
    Every split must have rows: an empty one would train or evaluate on nothing."""
    task = get_task(name)
    if task.source is None:
        raise DataError(f"{name} is a pseudo-task with no data of its own")
    source = {split: load_source(name, split, mirror) for split in task.source.splits}
    try:
        splits = hold_out_shots(task.make_splits(source), fewshot_holdout)
    except KeyError as err:
        raise DataError(f"{name}: its source data lacks the column or split {err.args[0]!r} its splits are made "
                        f"from ({'mirror ' + str(mirror) if mirror else 'the hub'})") from None
    if max_rows is not None:
        splits = {k: v[:max_rows] for k, v in splits.items()}
    empty = sorted(k for k, v in splits.items() if not v)
    if empty:
        raise DataError(f"{name}: split {', '.join(empty)} would be empty ({'mirror ' + str(mirror) if mirror else 'hub'}); "
                        "nothing was written")
    return splits


def prepare_tasks(names: list[str], mirror: Optional[Path] = None, max_rows: Optional[int] = None,
                  fewshot_holdout: int = 0) -> dict[str, Splits]:
    """Every task's splits, all read and checked in memory (a cheap ~0.5 s for the six tasks)."""
    return {name: prepare_splits(name, mirror, max_rows, fewshot_holdout) for name in names}


def export_tasks(names: list[str], out_dir: str | Path, mirror: Optional[Path] = None,
                 max_rows: Optional[int] = None, fewshot_holdout: int = 0) -> dict[str, dict[str, int]]:
    """Write `<out_dir>/<task>/<split>.jsonl` for every task, only once every task's data has been read and
    checked: a bad mirror (a missing column, an empty split, a corrupt line) overwrites nothing.
    Returns the row counts."""
    prepared = prepare_tasks(names, mirror, max_rows, fewshot_holdout)
    for name, splits in prepared.items():
        for old in (Path(out_dir) / name).glob("*.jsonl"):  # a split this config no longer has
            if old.stem not in splits:
                old.unlink()
        for split, docs in splits.items():
            write_jsonl(Path(out_dir) / name / f"{split}.jsonl", docs)
    return {name: {split: len(docs) for split, docs in splits.items()} for name, splits in prepared.items()}


def export_splits(name: str, out_dir: str | Path, mirror: Optional[Path] = None,
                  max_rows: Optional[int] = None, fewshot_holdout: int = 0) -> dict[str, int]:
    """One task's `export_tasks`."""
    return export_tasks([name], out_dir, mirror, max_rows, fewshot_holdout)[name]


def load_split(data_root: str | Path, task: str, split: str) -> list[Doc]:
    """A split the data stage wrote (`<data_root>/<task>/<split>.jsonl`)."""
    path = Path(data_root) / task / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: run the data stage first (`t2 data`), with {task} in data.tasks")
    return read_jsonl(path)


def check_split(data_root: str | Path, task: str, split: str) -> None:
    """A split the data stage wrote can be read by `task` (rows, columns): what a stage checks up front."""
    path = Path(data_root) / task / f"{split}.jsonl"
    docs = load_split(data_root, task, split)
    fix = "rerun the data stage (`t2 data`)"
    if not docs:
        raise DataError(f"{path} has no rows; {fix}")
    check_docs(task, docs, str(path), fix)


def shot_pool(data_root: str | Path, task: str) -> tuple[str, list[Doc]]:
    """Where few-shot adaptation may draw labelled shots of `task`: its training split, else its
    held-out `fewshot` split; never the test docs it is evaluated on. Returns (split, docs)."""
    for split in ("train", FEWSHOT_SPLIT):
        if (Path(data_root) / task / f"{split}.jsonl").is_file():
            return split, load_split(data_root, task, split)
    raise DataError(f"{task} has no training split and no held-out few-shot split in {data_root}: "
                    "set data.fewshot_holdout > 0 and rerun the data stage")
