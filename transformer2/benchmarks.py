"""The benchmark registry: where each task's data comes from and how it is split.

Docs keep the Hugging Face column names, so the same JSON Lines feed the trainers, the
scorers (`scoring.py`) and lm-eval's own task configs. A task loads from the HF hub by
default, or from a local mirror (layout `<dir>/<task>/<split>.jsonl`) named by
`data.dir` or `T2_DATA_DIR`.

Splits follow the reference implementation (paper-notes §2): GSM8K and ARC-Easy halve the
official train split by even/odd index into train/validation; MBPP shuffles the official
train split with seed 16 into 200 train / 100 validation items. Tests are the official test
splits. The unseen tasks keep their official splits (their train split only feeds few-shot
adaptation); a task without a training split (HumanEval) can have `fewshot_holdout` seeded
docs moved out of its test split into a `fewshot` split, so few-shot adaptation has labelled
shots that no evaluation of that task ever sees.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from .errors import UserError

Doc = dict
Splits = dict[str, list[Doc]]
DATA_ENV = "T2_DATA_DIR"


class DataError(UserError, RuntimeError):
    """Data that cannot be found or read; the message says where it looked."""


def _even_odd(source: dict[str, list[Doc]]) -> Splits:
    train = source["train"]
    return {"train": train[0::2], "validation": train[1::2], "test": source["test"]}


def _mbpp(source: dict[str, list[Doc]]) -> Splits:
    pool = list(source["train"])
    random.Random(16).shuffle(pool)
    return {"train": pool[:200], "validation": pool[200:300], "test": source["test"]}


def _official(source: dict[str, list[Doc]]) -> Splits:
    return dict(source)


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub_path: str
    hub_config: Optional[str]
    source_splits: tuple[str, ...]
    category: str  # what the prompt-dispatch classifier should call it: code / math / reasoning
    make_splits: Callable[[dict[str, list[Doc]]], Splits]

    def score(self, doc: Doc, completion: str) -> bool:
        from .scoring import SCORERS

        return SCORERS[self.name](doc, completion)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("gsm8k", "openai/gsm8k", "main", ("train", "test"), "math", _even_odd),
    Benchmark("arc_easy", "allenai/ai2_arc", "ARC-Easy", ("train", "test"), "reasoning", _even_odd),
    Benchmark("mbpp", "google-research-datasets/mbpp", "full", ("train", "test"), "code", _mbpp),
    Benchmark("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test"),
              "reasoning", _official),
    Benchmark("math", "EleutherAI/hendrycks_math", None, ("train", "test"), "math", _official),
    Benchmark("humaneval", "openai/openai_humaneval", None, ("test",), "code", _official),
)}


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


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


def read_jsonl(path: Path) -> list[Doc]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, docs: list[Doc]) -> None:
    """Written to a temporary name and renamed, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


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
    """One official split of a benchmark, from the mirror if given, else from the hub."""
    bench = get_benchmark(name)
    if mirror is not None:
        path = mirror / name / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} not found: the mirror in {mirror} lacks {name}/{split}.jsonl "
                            f"(set {DATA_ENV} or data.dir to a mirror with the layout of shared/data)")
        return read_jsonl(path)
    if name == "math":  # the hub keeps MATH as one config per subject; the mirror as one file
        return [doc for subject in MATH_SUBJECTS
                for doc in _load_hub(name, bench.hub_path, subject, split)]
    return _load_hub(name, bench.hub_path, bench.hub_config, split)


FEWSHOT_SPLIT = "fewshot"
FEWSHOT_SEED = 0  # fixed, like MBPP's split seed: the evaluation set must not move with `seed`


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
    plus a `fewshot` split held out of the test split when the task has no training split."""
    bench = get_benchmark(name)
    source = {split: load_source(name, split, mirror) for split in bench.source_splits}
    splits = hold_out_shots(bench.make_splits(source), fewshot_holdout)
    if max_rows is not None:
        splits = {k: v[:max_rows] for k, v in splits.items()}
    return splits


def export_splits(name: str, out_dir: str | Path, mirror: Optional[Path] = None,
                  max_rows: Optional[int] = None, fewshot_holdout: int = 0) -> dict[str, int]:
    """Write `<out_dir>/<name>/<split>.jsonl` for every split; returns the row counts."""
    splits = prepare_splits(name, mirror, max_rows, fewshot_holdout)
    for old in (Path(out_dir) / name).glob("*.jsonl"):  # a split this config no longer has
        if old.stem not in splits:
            old.unlink()
    for split, docs in splits.items():
        write_jsonl(Path(out_dir) / name / f"{split}.jsonl", docs)
    return {split: len(docs) for split, docs in splits.items()}


def shot_pool(data_root: str | Path, task: str) -> tuple[str, list[Doc]]:
    """Where few-shot adaptation may draw labelled shots of `task`: its training split, else its
    held-out `fewshot` split; never the test docs it is evaluated on. Returns (split, docs)."""
    for split in ("train", FEWSHOT_SPLIT):
        if (Path(data_root) / task / f"{split}.jsonl").is_file():
            return split, load_split(data_root, task, split)
    raise DataError(f"{task} has no training split and no held-out few-shot split in {data_root}: "
                    "set data.fewshot_holdout > 0 and rerun the data stage")


def load_split(data_root: str | Path, task: str, split: str) -> list[Doc]:
    """A split the data stage wrote (`<data_root>/<task>/<split>.jsonl`)."""
    path = Path(data_root) / task / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: run the data stage first (`t2 data`), with {task} in data.tasks")
    return read_jsonl(path)
