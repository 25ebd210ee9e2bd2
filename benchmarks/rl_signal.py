"""Does an SVF expert trained with REINFORCE move off the base, and does it beat it on test docs?

    python benchmarks/rl_signal.py --task arc_easy [--steps 24 --batch 4 --samples 8 --baseline rloo --temperature 0.7
        --lr 3e-2 --kl-coef 0 --entropy-coef 0 --max-new-tokens 48 --val 64 --test 300]

One expert is trained on the task's training split and validated on its validation split (never
the test split), exactly as the expert stage does (`rl.train_svf_expert`), then the base and the
kept expert answer the first `--test` test docs through lm-eval in paper style, and the two are
compared on the same docs with the exact McNemar test (`stats.cell_statistics`). Needs
`dvc repro decompose data` first (or --model / --svd / --data). Resumable: training checkpoints
every step and each evaluation's responses are cached under --work. Prints a table and writes
benchmarks/results/rl_signal_<task>.json (learning curve, validations with intervals, how far z
and σ moved, test accuracies with intervals, Δ and p).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transformer2.files import atomic_write_json
from transformer2.harness import evaluate_task
from transformer2.models import load_patched
from transformer2.rl import train_svf_expert
from transformer2.settings import LoopConfig, RLObjectiveConfig
from transformer2.stats import cell_statistics, samples_answer_spread, write_samples
from transformer2.svd import load_singular_values
from transformer2.svf import SVFConfig, expert_movement, init_expert
from transformer2.tasks import load_split


def evaluate(args: dict, task: str, data: Path, limit: int, max_gen_toks: int, out: Path) -> tuple[Path, dict]:
    """Per-sample outputs of one paper-style cell (cached: a rerun reads them back)."""
    samples, summary = out / "samples.jsonl", out / "cell.json"
    if not summary.is_file():
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        res = evaluate_task(args, task, data_root=data, style="paper", limit=limit, batch_size=32,
                            apply_chat_template=True, gen_kwargs={"max_gen_toks": max_gen_toks},
                            response_cache=out / "responses")
        write_samples(samples, res["samples"])
        atomic_write_json(summary, {"headline": res["headline"], "seconds": round(time.perf_counter() - start, 1)})
    return samples, json.loads(summary.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--model", default="artifacts/model")
    ap.add_argument("--svd", default="artifacts/svd")
    ap.add_argument("--data", default="artifacts/data")
    ap.add_argument("--work", default="artifacts/checkpoints/rl_signal")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step")
    ap.add_argument("--samples", type=int, default=8, help="sampled completions per prompt")
    ap.add_argument("--baseline", default="rloo", choices=("none", "mean", "rloo", "batch"),
                    help="subtracted from each reward: per prompt (mean, rloo) or over the step (batch); none: a "
                         "prompt whose k answers are all wrong still pushes them down")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--kl-coef", type=float, default=0.0, help="λ of the KL penalty to the base (paper: 0-0.3)")
    ap.add_argument("--entropy-coef", type=float, default=0.0,
                    help="β of the entropy bonus on answer tokens (against the policy collapsing onto one answer)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--val", type=int, default=64, help="validation docs")
    ap.add_argument("--test", type=int, default=300, help="test docs for the paired comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="model.dtype of training and both test cells (bf16: fast where the CPU has AMX)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    work = Path(a.work) / a.task
    loop = LoopConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, eval_every=max(1, a.steps // 4), grad_clip=1.0,
                      seed=a.seed)
    objective = RLObjectiveConfig(max_new_tokens=a.max_new_tokens, do_sample=True, temperature=a.temperature, kl_coef=a.kl_coef,
                                  entropy_coef=a.entropy_coef, samples_per_prompt=a.samples, baseline=a.baseline,
                                  micro_batch_size=16)
    svf = SVFConfig()
    model, tokenizer, info = load_patched(a.model, a.svd, svf, dtype=a.dtype)
    initial = init_expert(model, info.fingerprint, svf, torch.Generator().manual_seed(a.seed))
    train = load_split(a.data, a.task, "train")
    val = load_split(a.data, a.task, "validation")[: a.val]
    result, adapter = train_svf_expert(model, tokenizer, initial, a.task, train, val, loop, objective, work / "train",
                                       resume=True, eval_batch_size=32,
                                       progress=lambda m: print(f"step {m['step']}: reward {m['reward']:+.3f}, "
                                                                f"mixed {m['mixed_reward_fraction']:.2f}, "
                                                                f"entropy {m['entropy']:.3f}", flush=True))
    adapter.load_state(result.best_state)
    expert = adapter.to_expert({"task": a.task, "best_step": result.best_step})
    expert.save(work / "expert")
    movement = expert_movement(expert, initial, load_singular_values(a.svd, info.fingerprint))
    del model
    base_samples, base = evaluate({"pretrained": a.model, "dtype": a.dtype}, a.task, Path(a.data), a.test, a.max_new_tokens,
                                  work / "eval_base")
    svf_samples, svf_cell = evaluate({"pretrained": a.model, "svd": a.svd, "expert": str(work / "expert"),
                                      "dtype": a.dtype}, a.task,
                                     Path(a.data), a.test, a.max_new_tokens, work / "eval_svf")
    metric = base["headline"]["metric"]
    out = {"task": a.task, "settings": {**vars(a), "loop": vars(loop), "objective": vars(objective)},
           "validations": result.validations, "best_step": result.best_step, "movement": movement,
           "curve": [{k: h.get(k) for k in ("step", "reward", "accuracy", "mixed_reward_fraction", "entropy", "kl",
                                                   "grad_norm")}
                     for h in result.history],
           "test": {"metric": metric,
                    "base": {**cell_statistics(base_samples, metric), **(samples_answer_spread(base_samples, a.task) or {}),
                             "seconds": base["seconds"]},
                    "svf": {**cell_statistics(svf_samples, metric, base_samples), **(samples_answer_spread(svf_samples, a.task) or {}),
                            "seconds": svf_cell["seconds"]}},
           "train_seconds": result.seconds}
    suffix = "".join(f"_{name}{value:g}" for name, value, default in (("lr", a.lr, 3e-2), ("kl", a.kl_coef, 0.0),
                                                                        ("entropy", a.entropy_coef, 0.0),
                                                                        ("batch", a.batch, 4), ("k", a.samples, 8))
                     if value != default) + ("" if a.baseline == "rloo" else f"_{a.baseline}") + (
        "" if a.dtype == "float32" else f"_{a.dtype}")
    path = Path(a.out or Path(__file__).parent / "results" / f"rl_signal_{a.task}{suffix}.json")
    atomic_write_json(path, out)
    t = out["test"]
    print(f"\n{a.task}: validation base {result.base_val_accuracy:.3f} -> best {result.best_val_accuracy:.3f} "
          f"(step {result.best_step}, n={len(val)}); max |z - z0| {movement['z_max_abs_change']:.3f}, "
          f"mean |s'/s - 1| {100 * movement['sigma_mean_rel_change']:.2f}%")
    print("| cell | n | accuracy | 95% CI | Δ vs base | 95% CI | p (McNemar) | most common answer: share "
          "(a constant answer's accuracy) | no answer |\n|---|---|---|---|---|---|---|---|---|")
    for name in ("base", "svf"):
        c = t[name]
        delta = (f"{100 * c['delta_vs_base']:+.1f} | [{100 * c['delta_ci_low']:+.1f}, {100 * c['delta_ci_high']:+.1f}]"
                 f" | {c['p_value']:.2g}") if "delta_vs_base" in c else "– | – | –"
        spread = (f"{c['most_common_answer']}: {100 * c['most_common_share']:.0f}% "
                  f"({100 * c['constant_answer_accuracy']:.1f}) | {100 * c['no_answer_share']:.0f}%"
                  if "most_common_answer" in c else "– | –")
        print(f"| {name} | {c['n']} | {100 * c['accuracy']:.1f} | [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}] "
              f"| {delta} | {spread} |")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
