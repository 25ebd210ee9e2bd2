"""One evaluation cell: a (model, task) pair through lm-eval's `simple_evaluate` with the
`transformer2` model, the project's task YAMLs and, for resumable cells, lm-eval's response cache."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from ..tasks import get_task
from . import model as _model  # noqa: F401  (registers the lm-eval model "transformer2")
from .errors import HarnessError
from .task_configs import headline_metric, lm_eval_task_name, task_config_dir


def evaluate_task(model_args: Mapping[str, Any], task: str, *, data_root: Optional[Path], style: str = "harness",
                  limit: Optional[int] = None, batch_size: int = 8, num_fewshot: Optional[int] = None,
                  apply_chat_template: bool = False, gen_kwargs: Optional[dict] = None,
                  device: str = "cpu", dtype: str = "float32", seed: int = 0,
                  response_cache: str | Path | None = None) -> dict:
    """Run one (model, task) cell through lm-eval's `simple_evaluate` with the `transformer2` model.

    `response_cache`: lm-eval's sqlite cache of model responses (written as they are computed),
    so a killed cell rerun with the same cache only computes what is missing. The caller owns
    its identity: responses are keyed by request alone, not by model.
    Returns {"metrics": {name: value}, "headline": (name, value), "results": lm-eval's results
    dict (JSON-ready), "samples": per-sample outputs, "adaptation": first/second pass stats
    of the requests computed in this run, "cached_responses": responses found in the cache}.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = lm_eval_task_name(task, style)
    limit = docs_limit(task, style, limit)
    cached = cached_responses(response_cache) if response_cache is not None else 0
    with tempfile.TemporaryDirectory(prefix="t2-tasks-") as tmp:
        include = task_config_dir(data_root, Path(tmp), style=style)
        # Only the project's configs: they name lm-eval's built-in YAMLs by path, so indexing lm-eval's
        # ~15k default tasks (12 s of every cell here) finds nothing they need.
        manager = TaskManager(include_path=str(include), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model="transformer2", model_args={"device": device, "dtype": dtype, **model_args}, tasks=[name], limit=limit, batch_size=batch_size,
            num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, gen_kwargs=gen_kwargs,
            task_manager=manager, log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
            use_cache=str(response_cache) if response_cache is not None else None)
    results = json.loads(json.dumps(out["results"], default=str))
    metrics = {k: v for k, v in results.get(name, {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
    key = headline_metric(task, style)
    if key not in metrics:
        raise HarnessError(f"{name}: lm-eval reported no {key!r} (got {sorted(metrics)})")
    samples = json.loads(json.dumps(out.get("samples", {}), default=str))
    adaptation = out.get("config", {}).get("transformer2", {})
    return {"task": name, "metrics": metrics, "headline": {"metric": key, "value": metrics[key]},
            "results": results, "samples": samples, "adaptation": adaptation,
            "n_samples": out.get("n-samples", {}).get(name, {}), "cached_responses": cached}


def docs_limit(task: str, style: str, limit: Optional[int]) -> Optional[int]:
    """lm-eval's `limit` for a cell whose `limit` counts docs per subset (MATH's subjects): the
    harness runs one lm-eval task per subject, so it applies per subject already; a paper-style
    task holds every subject, interleaved, so it takes `limit` of each."""
    subsets = get_task(task).subsets
    return limit * len(subsets) if limit is not None and style == "paper" and subsets else limit


CELL_RESULTS, CELL_SAMPLES = "results.json", "samples.jsonl"


def save_cell(folder: str | Path, out: Mapping[str, Any],
              secondary: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Path:
    """A cell's output (`evaluate_task`'s results and per-sample outputs, no timings) as one unit
    (`files.atomic_dir`): a kill never leaves the results of one run beside the samples of another.
    `secondary` (style -> `evaluate_task` output): the same cell in another style, kept in `<style>/`
    of the same unit. Returns the samples file."""
    from ..files import atomic_dir, atomic_write_json
    from ..stats import write_samples

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        for sub, result in [(tmp, out)] + [(tmp / style, r) for style, r in (secondary or {}).items()]:
            sub.mkdir(exist_ok=True)
            atomic_write_json(sub / CELL_RESULTS, {"results": result["results"], "n_samples": result["n_samples"]})
            write_samples(sub / CELL_SAMPLES, result["samples"])
    return folder / CELL_SAMPLES


def secondary_samples(folder: str | Path, style: str) -> Path:
    """The per-sample outputs of a cell's secondary `style` (`save_cell`)."""
    return Path(folder) / style / CELL_SAMPLES


def cache_files(response_cache: str | Path) -> list[Path]:
    """The sqlite files lm-eval writes for `use_cache=response_cache` (one per rank)."""
    base = Path(response_cache)
    return sorted(base.parent.glob(base.name + "_rank*.db"))


def cached_responses(response_cache: str | Path) -> int:
    from sqlitedict import SqliteDict

    total = 0
    for db in cache_files(response_cache):
        with SqliteDict(str(db), flag="r") as responses:
            total += len(responses)
    return total
