"""Library runs on the tiny profile, one per process, for the kill-and-resume and determinism tests
(tests/test_atomic_resume.py): `python -m tests.resume_worker <job> <project> <out>`.

Each job prints `progress <i>` (flushed) after every unit of work it has checkpointed (a training step, a
CEM generation, an evaluation response in the cell's cache), so a test can SIGKILL it at a random point, and
writes its results under <out> only at the end, the way its stage saves them; `run.json` says what the run
found to resume from (it differs between an uninterrupted and a resumed run, so it is not compared).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

TIMING = ("tokens_per_s", "rollout_tokens_per_s")  # and every key starting with "seconds"


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k not in TIMING} for r in records]


def tick(i: int) -> None:
    print(f"progress {i}", flush=True)


def job_decompose(project: Path, out: Path) -> None:
    from transformer2.models import load_base
    from transformer2.svd import decompose
    from transformer2.svf import find_targets

    model, _, info = load_base(project / "artifacts/model")
    decompose(model, find_targets(model, "all"), out / "svd", info.fingerprint,
              progress=lambda i, n, name: tick(i))


def _params(project: Path):
    from transformer2.config import load_params

    return load_params(project / "params.yaml")


def job_expert(project: Path, out: Path) -> None:
    """REINFORCE for 4 steps, a checkpoint after each, resuming from out/run when there is one."""
    from transformer2.models import load_patched
    from transformer2.rl import train_svf_expert
    from transformer2.svf import init_expert
    from transformer2.tasks import load_split

    params = _params(project)
    rl = params.rl.for_task("gsm8k").model_copy(update={"steps": 4, "eval_every": 2})
    svf = params.svf.config()
    model, tokenizer, info = load_patched(project / "artifacts/model", project / "artifacts/svd", svf)
    expert = init_expert(model, info.fingerprint, svf, torch.Generator().manual_seed(params.seed), {"task": "gsm8k"})
    data = project / "artifacts/data"
    result, adapter = train_svf_expert(model, tokenizer, expert, "gsm8k", load_split(data, "gsm8k", "train"),
                                       load_split(data, "gsm8k", "validation")[: rl.val_size],
                                       rl.loop_config(params.seed), rl.objective_config(), out / "run", resume=True,
                                       eval_batch_size=rl.eval_batch_size,
                                       progress=lambda m: tick(m["step"]))
    final = adapter.state()
    adapter.load_state(result.best_state)
    adapter.save(out / "expert", {"best_step": result.best_step}, extra=result.output_files())
    torch.save(final, out / "final_state.pt")
    _history(out, result)


def _history(out: Path, result) -> None:
    """A training run's per-step metrics (timings excluded) and validations, and where it resumed from."""
    (out / "history.json").write_text(json.dumps({"history": without_timings(result.history),
                                                  "validations": result.validations}, sort_keys=True))
    (out / "run.json").write_text(json.dumps({"resumed_from": result.resumed_from}))


def job_lora(project: Path, out: Path) -> None:
    """The LoRA baseline (next-token, dropout on) for 4 steps, a checkpoint after each, as the lora stage saves it."""
    from transformer2.lora import train_lora
    from transformer2.models import load_base
    from transformer2.tasks import load_split

    params = _params(project)
    lora = params.lora.for_task("gsm8k").model_copy(update={"steps": 4, "eval_every": 2})
    rl = params.rl.for_task("gsm8k")
    base, tokenizer, info = load_base(project / "artifacts/model")
    data = project / "artifacts/data"
    result, adapter = train_lora(base, tokenizer, "gsm8k", load_split(data, "gsm8k", "train"),
                                 load_split(data, "gsm8k", "validation")[: rl.val_size], lora.loop_config(params.seed),
                                 run_dir=out / "run", objective=lora.objective, lora=lora.lora_config(),
                                 next_token=lora.next_token_config(),
                                 reinforce=rl.objective_config(micro_batch_size=lora.micro_batch_size), resume=True,
                                 max_new_tokens=rl.max_new_tokens, eval_batch_size=rl.eval_batch_size,
                                 seed=params.seed, base_fingerprint=info.fingerprint,
                                 progress=lambda m: tick(m["step"]))
    final = adapter.state()
    adapter.load_state(result.best_state)
    adapter.save(out / "lora", {"best_step": result.best_step, "base_fingerprint": info.fingerprint},
                 extra=result.output_files())
    torch.save(final, out / "final_state.pt")
    _history(out, result)


def job_classifier(project: Path, out: Path) -> None:
    """z_c (the classifier stage's training: generate mode, seeded init) for 4 steps, saved with its validations."""
    from transformer2.classifier import classifier_docs, train_classifier_expert
    from transformer2.models import load_patched

    params = _params(project)
    cfg = params.classifier.model_copy(update={"steps": 4, "eval_every": 2})
    svf = params.svf.config()
    data = project / "artifacts/data"
    model, tokenizer, info = load_patched(project / "artifacts/model", project / "artifacts/svd", svf)
    train = classifier_docs(data, "train", cfg.per_class, params.seed, cfg.sources, params.eval.adapt_tasks)
    val = classifier_docs(data, "validation", cfg.val_per_class, params.seed, cfg.sources, params.eval.adapt_tasks)
    expert, result, start = train_classifier_expert(
        model, tokenizer, info.fingerprint, svf, train, val, cfg.loop_config(params.seed), cfg.objective_config(),
        out / "run", resume=True, eval_batch_size=cfg.eval_batch_size, init_seed=params.seed,
        progress=lambda m: tick(m["step"]), mode=cfg.train_mode)
    expert.save(out / "classifier", extra=result.output_files())
    start.save(out / "start")
    _history(out, result)


def job_cem(project: Path, out: Path) -> None:
    """The cem stage's search for arc_challenge over two experts, 4 generations, a checkpoint after each."""
    from transformer2.cem import few_shot_cem, shot_indices
    from transformer2.models import load_patched
    from transformer2.svf import Expert
    from transformer2.tasks import shot_pool

    params = _params(project)
    cfg = params.cem.for_task("arc_challenge").model_copy(update={"generations": 4})
    art = project / "artifacts"
    model, tokenizer, _ = load_patched(art / "model", art / "svd", params.svf.config())
    experts = {"gsm8k": Expert.load(art / "experts/gsm8k"), "other": Expert.load(art / "classifier")}
    split, pool = shot_pool(art / "data", "arc_challenge")
    indices = shot_indices(len(pool), cfg.shots, params.seed)
    result = few_shot_cem(model, tokenizer, experts, "arc_challenge", [pool[i] for i in indices],
                          cfg.cem_config(params.seed), method=cfg.method, batch_size=cfg.batch_size,
                          max_new_tokens=cfg.max_new_tokens, run_dir=out / "run", resume=True,
                          progress=lambda r: tick(r["generation"] + 1))
    result.save(out / "cem", timings=False, extra={"shots.json": {"split": split, "indices": indices}})
    (out / "run.json").write_text(json.dumps({"resumed_from": result.resumed_from}))


def job_eval(project: Path, out: Path) -> None:
    """One evaluation cell (the gsm8k expert on ARC-Easy, 6 docs, through lm-eval) with the eval stage's
    response cache: a `progress` line after each response lm-eval caches; saved as the stage saves a cell."""
    from lm_eval.api import model as lm_model

    from transformer2.harness import cache_files, evaluate_task, save_cell

    add_partial, done = lm_model.CacheHook.add_partial, [0]

    def cached(self, attr, req, res) -> None:
        add_partial(self, attr, req, res)
        done[0] += 1
        tick(done[0])

    lm_model.CacheHook.add_partial = cached
    params = _params(project)
    ev = params.eval.for_task("arc_easy")
    art = project / "artifacts"
    cache = out / "run" / "responses"
    cache.parent.mkdir(parents=True, exist_ok=True)
    result = evaluate_task({"pretrained": str(art / "model"), "svd": str(art / "svd"),
                            "expert": str(art / "experts/gsm8k")}, "arc_easy", data_root=art / "data",
                           style=ev.style, limit=6, batch_size=ev.batch_size, num_fewshot=ev.num_fewshot,
                           seed=params.seed, response_cache=cache)
    save_cell(out / "cell", result)
    for db in cache_files(cache):  # as the stage does once the cell is written
        db.unlink()
    (out / "run.json").write_text(json.dumps({"cached_responses": result["cached_responses"],
                                              "computed_responses": done[0]}))


def job_all(project: Path, out: Path) -> None:
    """An SVF expert, a LoRA adapter and a CEM mix, as the stages make them (tiny profile, seed 0)."""
    from transformer2.cem import few_shot_cem, shot_indices
    from transformer2.lora import train_lora
    from transformer2.models import load_base, load_patched
    from transformer2.rl import train_svf_expert
    from transformer2.svf import init_expert
    from transformer2.tasks import load_split, shot_pool

    params = _params(project)
    data = project / "artifacts/data"
    train, val = load_split(data, "gsm8k", "train"), load_split(data, "gsm8k", "validation")
    rl, svf = params.rl.for_task("gsm8k"), params.svf.config()
    model, tokenizer, info = load_patched(project / "artifacts/model", project / "artifacts/svd", svf)
    expert = init_expert(model, info.fingerprint, svf, torch.Generator().manual_seed(params.seed), {"task": "gsm8k"})
    result, adapter = train_svf_expert(model, tokenizer, expert, "gsm8k", train, val[: rl.val_size],
                                       rl.loop_config(params.seed), rl.objective_config(), out / "run_expert",
                                       eval_batch_size=rl.eval_batch_size)
    adapter.load_state(result.best_state)
    adapter.save(out / "expert", {"best_step": result.best_step})
    metrics = {"expert": without_timings(result.history), "expert_validations": result.validations}

    cem_cfg = params.cem.for_task("arc_challenge")
    split, pool = shot_pool(data, "arc_challenge")
    shots = [pool[i] for i in shot_indices(len(pool), cem_cfg.shots, params.seed)]
    cem = few_shot_cem(model, tokenizer, {"gsm8k": adapter.to_expert({"task": "gsm8k"})}, "arc_challenge", shots,
                       cem_cfg.cem_config(params.seed), method=cem_cfg.method, batch_size=cem_cfg.batch_size,
                       max_new_tokens=cem_cfg.max_new_tokens, run_dir=out / "run_cem")
    cem.save(out / "cem", timings=False)

    lora = params.lora.for_task("gsm8k")
    base, tokenizer, info = load_base(project / "artifacts/model")
    result, adapter = train_lora(base, tokenizer, "gsm8k", train, val[: rl.val_size], lora.loop_config(params.seed),
                                 run_dir=out / "run_lora", objective=lora.objective, lora=lora.lora_config(),
                                 next_token=lora.next_token_config(),
                                 reinforce=rl.objective_config(micro_batch_size=lora.micro_batch_size),
                                 max_new_tokens=rl.max_new_tokens, eval_batch_size=rl.eval_batch_size,
                                 seed=params.seed, base_fingerprint=info.fingerprint)
    adapter.load_state(result.best_state)
    adapter.save(out / "lora", {"best_step": result.best_step, "base_fingerprint": info.fingerprint})
    metrics.update(lora=without_timings(result.history), lora_validations=result.validations)
    (out / "metrics.json").write_text(json.dumps(metrics, sort_keys=True, indent=1))


if __name__ == "__main__":
    job, project, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    jobs = {"decompose": job_decompose, "expert": job_expert, "lora": job_lora, "classifier": job_classifier,
            "cem": job_cem, "eval": job_eval, "all": job_all}
    jobs[job](project, out)
    print("done", flush=True)
