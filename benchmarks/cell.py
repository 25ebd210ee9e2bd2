"""One default eval cell through the decoding engine vs through HFLM's own generate: same params.

    python benchmarks/cell.py [--tasks gsm8k,math] [--params params.yaml]

Runs each task's base cell with the profile's eval settings (`eval.for_task`: style, limit, chat
template, max_gen_toks, batch_size, the cells' dtype) twice in one process, `engine=true` then `engine=false` (the
`transformer2` lm-eval model's switch: `generate_until` through `decoding.generate`, or through
HFLM's padded batches), and reports seconds, accuracy and how many outputs agree. Writes
benchmarks/results/cell.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transformer2.config import load_params
from transformer2.harness.cell import evaluate_task
from transformer2.runtime import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="gsm8k,math")
    ap.add_argument("--model-dir", default="artifacts/model")
    ap.add_argument("--data", default="artifacts/data")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="benchmarks/results/cell.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    params = load_params(args.params)
    rows = []
    for task in args.tasks.split(","):
        ev, runs = params.eval.for_task(task), {}
        for engine in ("true", "false"):
            t = time.perf_counter()
            out = evaluate_task({"pretrained": args.model_dir, "engine": engine}, task, data_root=Path(args.data),
                                style=ev.style, limit=ev.limit, batch_size=ev.batch_size, num_fewshot=ev.num_fewshot,
                                apply_chat_template=ev.apply_chat_template,
                                gen_kwargs={"max_gen_toks": ev.max_gen_toks} if ev.max_gen_toks else None,
                                device=params.model.device, dtype=params.cell_dtype(task), seed=params.seed)
            runs[engine] = dict(seconds=round(time.perf_counter() - t, 1), accuracy=out["headline"]["value"],
                                outputs=[s.get("resps") for s in out["samples"][out["task"]]])
        same = sum(a == b for a, b in zip(runs["true"]["outputs"], runs["false"]["outputs"]))
        row = dict(task=task, dtype=params.cell_dtype(task), batch_size=ev.batch_size, max_gen_toks=ev.max_gen_toks,
                   docs=len(runs["true"]["outputs"]), engine_s=runs["true"]["seconds"],
                   hflm_s=runs["false"]["seconds"], hflm_over_engine=round(runs["false"]["seconds"] / runs["true"]["seconds"], 2),
                   engine_accuracy=runs["true"]["accuracy"], hflm_accuracy=runs["false"]["accuracy"], same_outputs=same)
        rows.append(row)
        print(f"{task:10s} {row['docs']:4d} docs  engine {row['engine_s']:7.1f} s  HFLM {row['hflm_s']:7.1f} s  "
              f"({row['hflm_over_engine']}x)  accuracy {row['engine_accuracy']:.3f} / {row['hflm_accuracy']:.3f}  "
              f"same outputs {same} of {row['docs']}", flush=True)
    result = dict(params=args.params, threads=2, cells=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
