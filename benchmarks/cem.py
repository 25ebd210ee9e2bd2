"""Few-shot CEM with batched mixed-expert evaluation vs the naive rebuild-per-candidate loop,
and the cost of the dispatch first pass vs the second pass, on the default model.

    python benchmarks/cem.py [--task arc_challenge --shots 10 --population 16 --generations 2]

Needs `dvc repro decompose` first (artifacts/model, artifacts/svd, artifacts/data). Uses the
experts in artifacts/experts/{gsm8k,mbpp,arc_easy}/ when all three exist, else three seeded
random experts (said so in the output): timings do not depend on the values of z.

One CEM run, both methods on the same populations: each generation's population is scored
by the batched path (one z per row, no rebuild) and by the naive loop (W' rebuilt per
candidate), alternating which goes first, the two fitnesses are compared, and the batched
one drives the search. Wall time = the sum of each method's evaluations. Prints a table and
writes benchmarks/results/cem.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from transformer2.cem import CEM, CEMConfig, alpha_shape, draw_shots, population_fitness
from transformer2.dispatch import (LABEL_CONTINUATIONS, classification_prompts, classify_generate, classify_loglik,
                                   default_routes, route)
from transformer2.generation import chat_prompts, generate_texts
from transformer2.loglik import continuation_logprobs
from transformer2.models import load_patched
from transformer2.tasks import load_split, question_text
from transformer2.svf import Expert, SVFConfig, set_expert, svf_layers

EXPERT_TASKS = ("gsm8k", "mbpp", "arc_easy")
ROUTES = default_routes(EXPERT_TASKS)


def load_experts(model, fingerprint: str, config: SVFConfig, root: Path) -> tuple[dict[str, Expert], str]:
    if all((root / t / "expert.json").is_file() for t in EXPERT_TASKS):
        return {t: Expert.load(root / t) for t in EXPERT_TASKS}, "trained"
    experts = {}
    for k, task in enumerate(EXPERT_TASKS):  # seeded random experts, spread like trained ones could be
        g = torch.Generator().manual_seed(1000 + k)
        experts[task] = Expert({n: config.init_mean + 0.5 * torch.randn(layer.rank, generator=g)
                                for n, layer in svf_layers(model).items()}, fingerprint, config, {"task": task})
    return experts, "random (artifacts/experts/<task>/ not all present)"


def compare(a, b) -> dict:
    return {"accuracy_equal": bool(torch.equal(a.accuracy, b.accuracy)),
            "candidates_differing": int((a.accuracy != b.accuracy).sum()),
            "max_abs_loglik_diff": float((a.loglik - b.loglik).abs().max()), "same_order": a.order() == b.order()}


def cem_both(model, tokenizer, experts, task, shots, cfg, batch_size, max_new_tokens) -> dict:
    ordered = list(experts.values())
    cem = CEM(alpha_shape(ordered, cfg.per_matrix), cfg)
    seconds = {"batched": 0.0, "naive": 0.0}
    checks = []
    for gen in range(cfg.generations):
        alphas = cem.ask()
        fit = {}
        for method in (("batched", "naive") if gen % 2 == 0 else ("naive", "batched")):
            t = time.perf_counter()
            fit[method] = population_fitness(model, tokenizer, ordered, task, shots, alphas, method=method,
                                             batch_size=batch_size, max_new_tokens=max_new_tokens)
            seconds[method] += time.perf_counter() - t
        checks.append(compare(fit["batched"], fit["naive"]))
        rec = cem.tell(alphas, fit["batched"])
        print(f"  {task} generation {gen}: batched {seconds['batched']:.1f}s naive {seconds['naive']:.1f}s "
              f"(cumulative), best acc {rec['best_accuracy']:.2f}, same fitness: {checks[-1]}", flush=True)
    return {"task": task, "shots": len(shots), "population": cfg.population, "generations": cfg.generations,
            "per_matrix": cfg.per_matrix, "rows_per_forward": batch_size, "max_new_tokens": max_new_tokens,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "naive_over_batched": round(seconds["naive"] / seconds["batched"], 3),
            "fitness_checks": checks, "best_alpha": cem.best_alpha.tolist(), "history": cem.history}


def first_vs_second(model, tokenizer, experts, data: Path, n: int, max_new_tokens: int, batch_size: int) -> dict:
    """Dispatch first pass (loglik, base weights) vs answering the same questions (second pass)."""
    docs = [("arc_challenge", d) for d in load_split(data, "arc_challenge", "test")[: n - n // 2]]
    docs += [("math", d) for d in load_split(data, "math", "test")[: n // 2]]
    questions = [question_text(t, d) for t, d in docs]
    set_expert(model, None)
    out = {"questions": len(docs), "second_pass_max_new_tokens": max_new_tokens}
    t = time.perf_counter()
    cats = classify_loglik(model, tokenizer, questions, batch_size=batch_size)
    out["first_pass_loglik_s"] = time.perf_counter() - t
    t = time.perf_counter()  # the same scores without reusing the shared system-prompt KV
    continuation_logprobs(model, tokenizer, classification_prompts(tokenizer, questions), list(LABEL_CONTINUATIONS),
                          batch_size=batch_size, share_prefix=False)
    out["first_pass_loglik_no_prefix_sharing_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gen_cats = classify_generate(model, tokenizer, questions, max_new_tokens=32, batch_size=batch_size)
    out["first_pass_generate_s"] = time.perf_counter() - t
    out["categories_loglik"] = cats
    out["categories_generate"] = gen_cats
    # second pass: each question with the expert its category routes to (None = base), greedy
    groups: dict = {}
    for i, c in enumerate(cats):
        groups.setdefault(route(c, ROUTES), []).append(i)
    t = time.perf_counter()
    for name, idx in groups.items():
        set_expert(model, None if name is None else experts[name])
        for task in ("arc_challenge", "math"):
            sel = [i for i in idx if docs[i][0] == task]
            if sel:
                generate_texts(model, tokenizer, chat_prompts(tokenizer, task, [docs[i][1] for i in sel]),
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    out["second_pass_s"] = time.perf_counter() - t
    set_expert(model, None)
    for key in ("first_pass_loglik_s", "first_pass_loglik_no_prefix_sharing_s", "first_pass_generate_s",
                "second_pass_s"):
        out[key] = round(out[key], 2)
    out["loglik_first_over_second"] = round(out["first_pass_loglik_s"] / out["second_pass_s"], 4)
    out["generate_first_over_second"] = round(out["first_pass_generate_s"] / out["second_pass_s"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="arc_challenge")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward (both methods)")
    ap.add_argument("--gen-task", default="gsm8k", help="a generation task for a second, smaller CEM ('' to skip)")
    ap.add_argument("--gen-shots", type=int, default=4)
    ap.add_argument("--gen-population", type=int, default=8)
    ap.add_argument("--gen-max-new-tokens", type=int, default=32)
    ap.add_argument("--dispatch-n", type=int, default=16)
    ap.add_argument("--second-max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default="artifacts/model")
    ap.add_argument("--svd-dir", default="artifacts/svd")
    ap.add_argument("--data-dir", default="artifacts/data")
    ap.add_argument("--experts-dir", default="artifacts/experts")
    ap.add_argument("--out", default="benchmarks/results/cem.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    t0 = time.perf_counter()
    config = SVFConfig(targets="mlp")
    model, tokenizer, info = load_patched(args.model_dir, args.svd_dir, config)
    experts, kind = load_experts(model, info.fingerprint, config, Path(args.experts_dir))
    print(f"{info.name}: {len(svf_layers(model))} SVF matrices; experts: {kind}; {args.threads} thread(s)", flush=True)
    data = Path(args.data_dir)

    result = {"model": info.name, "experts": kind, "threads": args.threads, "routes": ROUTES}
    shots, _ = draw_shots(load_split(data, args.task, "train"), args.shots, args.seed)  # never the test split
    # warm-up (first-call costs are nobody's): one candidate, one shot, both methods
    warm = CEMConfig(population=2, generations=1, seed=args.seed)
    cem_both(model, tokenizer, experts, args.task, shots[:1], warm, args.batch_size, 4)
    cfg = CEMConfig(population=args.population, generations=args.generations, seed=args.seed)
    result["mc"] = cem_both(model, tokenizer, experts, args.task, shots, cfg, args.batch_size, 0)
    if args.gen_task:
        gshots, _ = draw_shots(load_split(data, args.gen_task, "train"), args.gen_shots, args.seed)
        gcfg = CEMConfig(population=args.gen_population, generations=1, seed=args.seed)
        result["generation"] = cem_both(model, tokenizer, experts, args.gen_task, gshots, gcfg,
                                        args.gen_population * args.gen_shots, args.gen_max_new_tokens)
    result["passes"] = first_vs_second(model, tokenizer, experts, data, args.dispatch_n, args.second_max_new_tokens,
                                       batch_size=16)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nCEM fitness evaluation, {info.name}, experts {kind}, {args.threads} thread(s)")
    print(f"{'task':<15}{'shots':>6}{'pop':>5}{'gens':>5}{'batched s':>11}{'naive s':>10}{'naive/batched':>15}"
          f"{'same fitness':>14}")
    for key in ("mc", "generation"):
        r = result.get(key)
        if r:
            same = all(c["accuracy_equal"] and c["max_abs_loglik_diff"] < 1e-3 for c in r["fitness_checks"])
            print(f"{r['task']:<15}{r['shots']:>6}{r['population']:>5}{r['generations']:>5}"
                  f"{r['seconds']['batched']:>11.1f}{r['seconds']['naive']:>10.1f}{r['naive_over_batched']:>15.2f}"
                  f"{str(same):>14}")
    p = result["passes"]
    print(f"\nfirst vs second pass, {p['questions']} questions (ARC-Challenge + MATH test), second pass greedy "
          f"<= {p['second_pass_max_new_tokens']} new tokens")
    print(f"{'pass':<42}{'seconds':>9}{'/ second':>10}")
    for label, key in (("first, loglik (shared-prefix KV)", "first_pass_loglik_s"),
                       ("first, loglik (no prefix sharing)", "first_pass_loglik_no_prefix_sharing_s"),
                       ("first, generate (<= 32 tokens)", "first_pass_generate_s"),
                       ("second, routed experts", "second_pass_s")):
        print(f"{label:<42}{p[key]:>9.2f}{p[key] / p['second_pass_s']:>10.3f}")
    print(f"\ntotal {result['total_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
