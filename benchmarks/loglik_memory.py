"""Peak memory of CEM's gold-answer log-likelihood (teacher-forced MATH solutions) by logits budget.

    python benchmarks/loglik_memory.py [--task math --shots 4 --population 8 --budgets 1e9 1024 256]

Needs `dvc repro data` and the model stage (artifacts/model, artifacts/data). One CEM
generation's scoring: `shots` training docs × `population` rows, each its gold answer,
through `continuation_logprobs` with `batch_size` rows per forward and `max_logits_mb` as the
budget (1e9 = no budget: one batch, the behaviour before the budget existed). Each budget runs
in its own subprocess so its peak RSS is clean; scores are compared across budgets. Prints a
table and writes benchmarks/results/loglik_memory.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from train_step import RSSSampler, rss_mb


def worker(args) -> dict:
    import torch

    from transformer2.tasks import shot_pool
    from transformer2.cem import draw_shots
    from transformer2.generation import left_padding
    from transformer2.loglik import continuation_logprobs
    from transformer2.generation import chat_prompts
    from transformer2.models import load_base
    from transformer2.tasks import reference_answer

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_base(args.model)
    shots, _ = draw_shots(shot_pool(args.data, args.task)[1], args.shots, args.seed)
    docs = [d for d in shots for _ in range(args.population)]
    prompts = chat_prompts(tokenizer, args.task, docs)
    answers = [[reference_answer(args.task, d)] for d in docs]
    loaded = rss_mb()
    with torch.no_grad(), left_padding(tokenizer), RSSSampler() as rss:
        t = time.perf_counter()
        scores = continuation_logprobs(model, tokenizer, prompts, answers, batch_size=args.batch_size,
                                       max_logits_mb=args.budget)
        seconds = time.perf_counter() - t
    return {"budget_mb": args.budget, "rows": len(docs), "answer_tokens_max": max(n[0] for n in scores.tokens),
            "rss_loaded_mb": round(loaded), "peak_mb": round(rss.peak), "scoring_extra_mb": round(rss.peak - loaded),
            "seconds": round(seconds, 2), "logprob": [round(lp[0], 4) for lp in scores.logprob]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/model")
    p.add_argument("--data", default="artifacts/data")
    p.add_argument("--task", default="math")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budgets", type=float, nargs="+", default=[1e9, 1024, 256])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loglik_memory.json"))
    args = p.parse_args()
    if args.budget is not None:
        print(json.dumps(worker(args)))
        return
    rows = []
    for budget in args.budgets:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--budget", str(budget)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"budget {budget}: failed\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = rows[0]["logprob"]
    for r in rows:
        r["max_abs_diff_vs_first"] = max(abs(a - b) for a, b in zip(r.pop("logprob"), ref))
    print(f"{'budget MB':>10} {'rows':>5} {'max tok':>8} {'peak MB':>8} {'extra MB':>9} {'s':>7} {'Δ logprob':>10}")
    for r in rows:
        print(f"{r['budget_mb']:>10g} {r['rows']:>5} {r['answer_tokens_max']:>8} {r['peak_mb']:>8} "
              f"{r['scoring_extra_mb']:>9} {r['seconds']:>7} {r['max_abs_diff_vs_first']:>10.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"task": args.task, "shots": args.shots, "population": args.population,
                                          "batch_size": args.batch_size, "threads": args.threads,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
