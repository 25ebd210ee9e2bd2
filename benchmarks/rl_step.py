"""One REINFORCE step on the default model, split into phases, and adapted-vs-base generation speed.

    python benchmarks/rl_step.py [--task gsm8k] [--batch 8] [--max-new-tokens 128] [--repeats 3]

Needs `dvc repro decompose` first (artifacts/model, artifacts/svd, artifacts/data). Prints a
table and writes benchmarks/results/rl_step.json. Throughputs are compared within one run,
alternating base and adapted generation so that machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from transformer2.adapters import SVFAdapter
from transformer2.tasks import load_split
from transformer2.generation import chat_prompts, rollout
from transformer2.models import load_patched
from transformer2.runtime import keep_freed_memory
from transformer2.rl import RLObjectiveConfig, reinforce_objective
from transformer2.svf import SVFConfig, init_expert, set_expert


def generation_throughput(model, tokenizer, prompts, max_new_tokens) -> tuple[float, int, float]:
    start = time.perf_counter()
    ro = rollout(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    tokens = ro.input_ids.shape[0] * (ro.input_ids.shape[1] - ro.prompt_length)  # generated positions
    return tokens / seconds, tokens, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/rl_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory()  # as the stages run (flows/cli.py); T2_MALLOPT=off measures glibc's default

    model, tokenizer, info = load_patched("artifacts/model", "artifacts/svd", SVFConfig(targets="mlp"))
    expert = init_expert(model, info.fingerprint, SVFConfig(targets="mlp"), torch.Generator().manual_seed(0))
    docs = load_split("artifacts/data", args.task, "train")[: args.batch]
    prompts = chat_prompts(tokenizer, args.task, docs)

    # adapted (W' rebuilt once) vs base generation, alternating; min_new_tokens forces equal lengths
    # (the one-off rebuild of W' when an expert is set is timed on its own, not in the throughput)
    rates, rebuild = {"base": [], "svf": []}, []
    model.generation_config.min_new_tokens = args.max_new_tokens
    for r in range(args.repeats):
        for mode in ("base", "svf") if r % 2 == 0 else ("svf", "base"):
            t = time.perf_counter()
            set_expert(model, None if mode == "base" else expert)
            if mode == "svf":
                rebuild.append(time.perf_counter() - t)
            rates[mode].append(generation_throughput(model, tokenizer, prompts, args.max_new_tokens)[0])
    model.generation_config.min_new_tokens = None

    # one full training step, phase by phase
    adapter = SVFAdapter(model, expert)
    objective = reinforce_objective(model, tokenizer, adapter, args.task,
                                    RLObjectiveConfig(max_new_tokens=args.max_new_tokens,
                                                      micro_batch_size=args.batch))
    steps = []
    for _ in range(args.repeats):
        for z in adapter.trainable():
            z.grad = None
        t = time.perf_counter()
        m = objective(docs)
        m["seconds_total"] = time.perf_counter() - t
        steps.append(m)

    med = lambda key: statistics.median(s[key] for s in steps)
    result = {
        "model": info.name, "task": args.task, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "threads": args.threads, "malloc_tuned": malloc_tuned,
        "step_seconds": {k: round(med(f"seconds_{k}"), 3) for k in ("rollout", "score", "logprob", "backward", "total")},
        "rollout_completion_tokens_per_s": round(med("rollout_tokens_per_s"), 2),
        "generation_tokens_per_s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
        "expert_switch_seconds": round(statistics.median(rebuild), 3),
        "svf_over_base_generation_ratio": round(statistics.median(rates["svf"]) / statistics.median(rates["base"]), 4),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"REINFORCE step, {info.name}, {args.task}, batch {args.batch}, <= {args.max_new_tokens} new tokens "
          f"(median of {args.repeats})")
    print(f"{'phase':<12}{'seconds':>10}")
    for k, v in result["step_seconds"].items():
        print(f"{k:<12}{v:>10.2f}")
    print(f"rollout throughput: {result['rollout_completion_tokens_per_s']:.1f} completion tokens/s")
    print(f"generation tokens/s  base {result['generation_tokens_per_s']['base']:.1f}  "
          f"svf {result['generation_tokens_per_s']['svf']:.1f}  ratio {result['svf_over_base_generation_ratio']:.3f}")
    print(f"switching experts (rebuilding every W'): {result['expert_switch_seconds']:.2f} s")


if __name__ == "__main__":
    main()
