from __future__ import annotations

import logging
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from transformer2.cells import TWO_PASS_KINDS
from transformer2.config import Params
from transformer2.harness.cell import CELL_RESULTS, cache_files, evaluate_task, save_cell, secondary_samples
from transformer2.runtime import resource_metrics, timed
from transformer2.identity import file_bytes, run_fingerprint
from transformer2.stats import PairingError, cell_statistics, samples_answer_spread

from .tracking import METHODS, cell_metrics, log_inputs, record_metrics, stage_run


def model_args(kind: str, model_dir: str, svd_dir: str, adapter_dir: str | None) -> dict:
    """lm-eval model_args of a one-pass cell: the base, the base + an SVF expert, or the base + a LoRA adapter."""
    args = {"pretrained": model_dir}
    if kind == "svf":
        args.update(svd=svd_dir, expert=adapter_dir)
    elif kind == "lora":
        args.update(peft=adapter_dir)
    elif kind != "base":
        raise ValueError(f"unknown one-pass model kind {kind!r}; use one of base, svf, lora")
    return args


def strategy_model_args(kind: str, params: Params, model_dir: str, svd_dir: str, experts: dict[str, str],
                        classifier_dir: str | None = None, cem_dir: str | None = None) -> dict:
    """lm-eval model_args of a two-pass cell: the task experts (by task name) and the strategy choosing among them.

    prompt / classifier route code→mbpp, math→gsm8k, reasoning→arc_easy, other→base weights; a
    category whose expert is not in rl.tasks also gets the base weights. few_shot uses the mix
    the cem stage found for this task.
    """
    from transformer2.dispatch import default_routes

    folders = dict(experts)
    args: dict = {"pretrained": model_dir, "svd": svd_dir, "strategy": kind}
    if kind in ("prompt", "classifier"):
        ev = params.eval
        strategy_args = {"mode": ev.dispatch_mode, "max_new_tokens": ev.dispatch_max_new_tokens,
                         "batch_size": ev.batch_size,
                         "routes": default_routes(list(experts))}
        if kind == "classifier":
            folders["classifier"] = classifier_dir
            strategy_args["classifier"] = "classifier"
    elif kind == "few_shot":
        strategy_args = {"result": cem_dir}
    else:
        raise ValueError(f"unknown strategy kind {kind!r}; use one of {TWO_PASS_KINDS}")
    return {**args, "experts": folders, "strategy_args": strategy_args}


def adaptation_metrics(adaptation: dict) -> dict:
    """First / second pass seconds of a cell (paper Table 3) and their ratio."""
    first, second = adaptation.get("first_pass_s"), adaptation.get("second_pass_s")
    if first is None or second is None:
        return {}
    return {"first_pass_s": first, "second_pass_s": second,
            "first_to_second": round(first / second, 4) if second else None,
            "per_key": adaptation.get("per_key", {})}


def _input_files(args: dict) -> list[Path]:
    """The files a cell's responses depend on besides its settings: model and SVD identity, adapters, mixes."""
    strategy_args = args.get("strategy_args") or {}
    folders = [args.get("expert"), args.get("peft"), *(args.get("experts") or {}).values(), strategy_args.get("result")]
    files = [Path(args["pretrained"]) / "model.json"] + ([Path(args["svd"]) / "index.json"] if args.get("svd") else [])
    for folder in filter(None, folders):
        folder = Path(folder)
        files += sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    return files


def sample_statistics(samples: Path, metric: str, base_samples: str | None, seed: int, log) -> dict:
    """n, the 95% interval of the cell's accuracy and, against the base cell on the same docs, Δ with its
    interval and paired test (`stats.cell_statistics`). A cell that cannot be paired keeps its own result
    and says why (`stats_error`): the evaluation is never lost to its statistics."""
    try:
        stats = cell_statistics(samples, metric, base_samples, seed=seed)
    except (PairingError, OSError) as err:
        log.warning(f"no paired statistics for {samples}: {err}")
        try:
            stats, error = cell_statistics(samples, metric, seed=seed), str(err)
        except (PairingError, OSError) as own:
            return {"stats_error": str(own)}
        stats["stats_error"] = error
    out = {"ci95": [stats.pop("ci_low"), stats.pop("ci_high")], "sample_accuracy": stats.pop("accuracy"),
           "sample_n": stats.pop("n")}
    if "delta_vs_base" in stats:
        out["delta_ci95"] = [stats.pop("delta_ci_low"), stats.pop("delta_ci_high")]
    return {**out, **stats}


def response_cache(run_dir: str, kind: str, task_name: str, args: dict, settings: dict,
                   keep: tuple[Path, ...] = ()) -> Path:
    """Where a cell caches lm-eval's responses: named by everything they depend on, so a rerun after
    a kill reuses them and a changed cell never does; caches of other configs are removed (not those
    of `keep`: the same cell's other style)."""
    files = _input_files(args)
    digest = run_fingerprint([kind, task_name, args, settings, [str(p) for p in files]], file_bytes(files))
    cache = Path(run_dir) / f"responses_{digest}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    for stale in set(cache.parent.glob("responses_*")) - {f for c in (cache, *keep) for f in cache_files(c)}:
        stale.unlink()
    return cache


def style_statistics(out: dict, samples: Path, task_name: str, style: str, base_samples: str | None,
                     seed: int, log) -> dict:
    """One style's result of a cell: its lm-eval task, n, headline with its interval, Δ vs base (the base
    cell's samples of the same style) and, for paper style, the spread of the stated answers."""
    n_docs = sum(len({row.get("doc_id") for row in rows}) for rows in out["samples"].values())
    spread = samples_answer_spread(samples, task_name) if style == "paper" else None
    return {"style": style, "lm_eval_task": out["task"], "n_docs": n_docs, "metric": out["headline"]["metric"],
            "value": out["headline"]["value"], "metrics": out["metrics"],
            **sample_statistics(samples, out["headline"]["metric"], base_samples, seed, log),
            **({"answer_spread": spread} if spread else {})}


class _Overrides(logging.Filter):
    """lm-eval warns once per task that the project's YAMLs shadow its built-in ones: that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "overrides existing task" not in record.getMessage()


logging.getLogger("lm_eval.tasks._index").addFilter(_Overrides())


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_cell_task(params: Params, kind: str, task_name: str, args: dict, data_dir: str, out_dir: str,
                       metrics_path: str, extra: dict | None = None, run_dir: str | None = None,
                       inputs: dict[str, str] | None = None, base_samples: str | None = None) -> dict:
    """One cell of the evaluation matrix through lm-eval (`args`: the `transformer2` model's
    model_args); results and per-sample outputs kept, first/second pass times recorded.

    With `run_dir`, responses are cached there as they are computed (a killed cell resumes) and
    the cache is removed once the cell's results are written. `inputs` (name -> folder: the model,
    the expert / adapter / mix measured) are logged to MLflow with their fingerprints and the runs
    that wrote them. The cell's output holds results and samples only; timings go to its metrics.
    `base_samples`: the base cell's per-sample outputs on this task, to pair this cell's against."""
    import mlflow

    log = get_run_logger()
    ev = params.eval.for_task(task_name)
    styles = (ev.style,) + ((ev.secondary_style,) if ev.secondary_style else ())
    caches: dict[str, Path | None] = dict.fromkeys(styles)
    if run_dir is not None:
        settings = {"eval": ev.model_dump(), "model": params.model.model_dump(), "seed": params.seed}
        for style in reversed(styles):  # each keeps the ones named before it
            caches[style] = response_cache(run_dir, kind, task_name, args, {**settings, "run_style": style},
                                           keep=tuple(c for c in caches.values() if c is not None))
    with stage_run(params, "eval-" + kind.replace("_", "-"), task_name, kind=kind, method=METHODS[kind]) as stage:
        if inputs:
            log_inputs(params, inputs)
        outs = {}
        with timed() as t:
            for style in styles:  # the cell's own style, then its secondary one on the same docs
                outs[style] = evaluate_task(
                    args, task_name, data_root=Path(data_dir), style=style, limit=ev.limit,
                    batch_size=ev.batch_size, num_fewshot=ev.num_fewshot, apply_chat_template=ev.apply_chat_template,
                    gen_kwargs={"max_gen_toks": ev.max_gen_toks} if ev.max_gen_toks else None,
                    device=params.model.device, dtype=params.cell_dtype(task_name), seed=params.seed,
                    response_cache=caches[style])
        out_path = Path(out_dir)
        out = outs[ev.style]
        secondary = outs.get(ev.secondary_style)
        # results.json and samples.jsonl (and the secondary style's, in <style>/) as one unit
        samples = save_cell(out_path, out, secondary={ev.secondary_style: secondary} if secondary else None)
        own = style_statistics(out, samples, task_name, ev.style, base_samples, params.seed, log)
        metrics = {"kind": kind, "task": task_name, "limit": ev.limit, **own,
                   **adaptation_metrics(out["adaptation"]), **(extra or {})}
        if secondary:
            style = ev.secondary_style
            metrics["secondary"] = style_statistics(
                secondary, secondary_samples(out_path, style), task_name, style,
                base_samples and str(secondary_samples(Path(base_samples).parent, style)), params.seed, log)
        metrics.update({"resumed_responses": sum(o["cached_responses"] for o in outs.values()),
                        **resource_metrics(t["seconds"])})
        headline, logged = cell_metrics(metrics)
        mlflow.set_tag("metric", headline)
        metrics = record_metrics(metrics_path, metrics, stage, logged=logged)
        mlflow.log_artifact(str(samples), artifact_path="samples")
        mlflow.log_artifact(str(out_path / CELL_RESULTS), artifact_path="samples")
        if secondary:
            mlflow.log_artifacts(str(out_path / ev.secondary_style), artifact_path=f"samples/{ev.secondary_style}")
        for db in [f for c in caches.values() if c is not None for f in cache_files(c)]:
            db.unlink()  # results are written: a later rerun (dvc repro -f) recomputes and re-times everything
        log.info(f"{kind} on {task_name}: {out['headline']['metric']} = {out['headline']['value']:.4f}")
    return metrics
