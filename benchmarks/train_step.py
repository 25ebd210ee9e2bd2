"""Training-step time and memory of SVF (RL), SVF (next-token) and LoRA (next-token), same batch.

    python benchmarks/train_step.py [--task gsm8k] [--batch 4] [--max-new-tokens 64] [--repeats 2] [--rounds 2]
                                    [--configs svf_rl svf_next_token lora_next_token lora_rl]

Needs the default pipeline's artifacts (artifacts/model, artifacts/svd, artifacts/data). Every
configuration trains on the same first `--batch` training docs of `--task`. A step is what
`training.fit` does per step: objective (forward + backward) then clip + optimiser update.
For RL the rollout (greedy, exactly `--max-new-tokens` generated: no early stop, so the
work is fixed) is reported apart from the log-prob + backward pass, which is the part
comparable with a next-token step.

Each configuration runs in its own subprocess (one warm-up step, then `--repeats` timed
steps), so memory numbers are clean: `peak_rss_mb` is the subprocess's ru_maxrss
(model, SVD factors, everything), and `step_peak_mb` is the highest RSS sampled every 5 ms
during the steps (warm-up included) minus the RSS of the loaded model (every weight and SVD factor paged in) just before them: the
memory training adds (activations, logits, gradients, optimiser state, and what the
allocator keeps between steps), which ru_maxrss alone would hide behind the load-time peak. Configurations run in `--rounds` interleaved rounds (order rotated)
so that load from other processes hits all of them; medians and minima over all steps, and
ratios, come from one run. Writes benchmarks/results/train_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = ("svf_rl", "svf_next_token", "lora_next_token")
EXTRA = ("lora_rl",)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSSampler:
    """Highest resident memory seen while active, polled from a thread (torch ops release the GIL)."""

    def __init__(self, period: float = 0.005):
        self.period, self.peak, self._stop = period, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformer2.adapters import LoRAAdapter, SVFAdapter
    from transformer2.tasks import load_split
    from transformer2.lora import attach_lora, lora_config
    from transformer2.models import load_base, load_patched
    from transformer2.rl import RLObjectiveConfig, reinforce_objective
    from transformer2.sft import NextTokenConfig, next_token_objective
    from transformer2.svf import SVFConfig, init_expert
    from transformer2.training import LoopConfig, make_optimizer

    kind, objective_name = args.worker.split("_", 1)
    if kind == "svf":
        svf = SVFConfig(targets="mlp")
        model, tokenizer, info = load_patched(args.model_dir, args.svd_dir, svf)
        adapter = SVFAdapter(model, init_expert(model, info.fingerprint, svf, torch.Generator().manual_seed(0)))
    else:
        model, tokenizer, info = load_base(args.model_dir)
        model = attach_lora(model, lora_config())  # paper: q/v, r 16, alpha 32, dropout 0.05
        adapter = LoRAAdapter(model)
    docs = load_split(args.data_dir, args.task, "train")[: args.batch]
    if objective_name == "rl":
        model.generation_config.min_new_tokens = args.max_new_tokens  # fixed rollout length
        objective = reinforce_objective(model, tokenizer, adapter, args.task,
                                        RLObjectiveConfig(max_new_tokens=args.max_new_tokens,
                                                          micro_batch_size=args.batch))
    else:
        objective = next_token_objective(model, tokenizer, adapter, args.task,
                                         NextTokenConfig(micro_batch_size=args.batch))
    loop = LoopConfig()  # Adam, as fit builds it
    opt, _ = make_optimizer(adapter.trainable(), loop)

    def step() -> dict:
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        m = objective(docs)
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(adapter.trainable(), loop.grad_clip)
        opt.step()
        t2 = time.perf_counter()
        m.update(seconds_objective=t1 - t0, seconds_update=t2 - t1, seconds_step=t2 - t0)
        return m

    with torch.no_grad():  # fault in memory-mapped weights and SVD factors: the loaded model is resident
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()
    loaded_rss, loaded_peak = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with RSSSampler() as sampler:  # from before the warm-up: what the allocator keeps counts too
        step()  # warm-up (untimed): first-call allocations, optimiser state
        runs = [step() for _ in range(args.repeats)]
    rl = objective_name == "rl"
    steps = [{"step": r["seconds_step"], "rollout": r["seconds_rollout"] if rl else 0.0,
              "forward": r["seconds_logprob"] if rl else r["seconds_forward"], "backward": r["seconds_backward"],
              "update": r["seconds_update"]} for r in runs]
    return {"config": args.worker, "trainable_parameters": sum(p.numel() for p in adapter.trainable()),
            "steps": steps, "step_seconds": statistics.median(s["step"] for s in steps),
            "trained_tokens": runs[0]["completion_tokens" if rl else "tokens"],
            "rss_after_load_mb": round(loaded_rss, 1), "peak_rss_load_mb": round(loaded_peak, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "step_peak_mb": round(sampler.peak - loaded_rss, 1)}


def merge_runs(runs: list[dict]) -> dict:
    """Median (and min: the least disturbed) of every phase over all rounds; memory: the max."""
    steps = [s for r in runs for s in r["steps"]]
    phase = lambda f, k: round(f(s[k] for s in steps), 3)
    learn = [s["forward"] + s["backward"] + s["update"] for s in steps]  # a step without its rollout
    return {"trainable_parameters": runs[0]["trainable_parameters"], "trained_tokens": runs[0]["trained_tokens"],
            "samples": len(steps),
            "median_seconds": {**{k: phase(statistics.median, k) for k in steps[0]},
                               "learn": round(statistics.median(learn), 3)},
            "min_seconds": {**{k: phase(min, k) for k in steps[0]}, "learn": round(min(learn), 3)},
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "step_peak_mb": max(r["step_peak_mb"] for r in runs),
            "rounds": [{k: r[k] for k in ("step_seconds", "load_average_1min", "peak_rss_mb", "step_peak_mb",
                                          "rss_after_load_mb")} | {"steps": r["steps"]} for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per subprocess (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="subprocesses per configuration, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + EXTRA)
    ap.add_argument("--model-dir", default="artifacts/model")
    ap.add_argument("--svd-dir", default="artifacts/svd")
    ap.add_argument("--data-dir", default="artifacts/data")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    for r in range(args.rounds):  # interleaved, order rotated per round: machine noise hits every config
        order = args.configs[r % len(args.configs):] + args.configs[:r % len(args.configs)]
        for config in order:
            cmd = [sys.executable, __file__, "--worker", config] + [
                a for k, v in vars(args).items() if k not in ("worker", "configs", "out", "rounds")
                for a in (f"--{k.replace('_', '-')}", str(v))]
            load_before = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{config} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(line[len("RESULT "):])
            run["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            runs[config].append(run)
            print(f"  round {r + 1} {config}: {run['step_seconds']:.2f} s/step", file=sys.stderr, flush=True)
    results = {c: merge_runs(rs) for c, rs in runs.items()}

    ratios = {}
    if "lora_next_token" in results:
        lora = results["lora_next_token"]
        for name, r in results.items():
            if name == "lora_next_token":
                continue
            for stat in ("median", "min"):
                for part in ("step", "learn"):
                    ratios[f"{name}_over_lora_next_token_{part}_{stat}"] = round(
                        r[f"{stat}_seconds"][part] / lora[f"{stat}_seconds"][part], 3)
            ratios[f"{name}_over_lora_next_token_step_memory"] = round(
                r["step_peak_mb"] / max(lora["step_peak_mb"], 1e-9), 3)
    out = {"model": json.loads((Path(args.model_dir) / "model.json").read_text())["name"], "task": args.task,
           "batch": args.batch, "rl_max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
           "rounds": args.rounds, "threads": args.threads, "results": results, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    print(f"Training step, {out['model']}, {args.task}, {args.batch} docs; {args.rounds} interleaved rounds x "
          f"{args.repeats} steps, median (min); {args.threads} threads; RL rollouts exactly "
          f"{args.max_new_tokens} new tokens")
    head = (f"{'config':<16}{'params':>9}{'tokens':>7}{'rollout':>15}{'fwd':>13}{'bwd':>13}"
            f"{'learn':>13}{'step':>15}{'peak RSS':>10}{'step mem':>9}")
    print(head + "\n" + "-" * len(head))
    cell = lambda r, k, w: f"{r['median_seconds'][k]:.1f} ({r['min_seconds'][k]:.1f})".rjust(w)
    for name, r in results.items():
        print(f"{name:<16}{r['trainable_parameters']:>9,}{r['trained_tokens']:>7}{cell(r, 'rollout', 15)}"
              f"{cell(r, 'forward', 13)}{cell(r, 'backward', 13)}{cell(r, 'learn', 13)}{cell(r, 'step', 15)}"
              f"{r['peak_rss_mb']:>8.0f}MB{r['step_peak_mb']:>7.0f}MB")
    print("seconds; learn = forward + backward + clip/update (a step without its rollout); "
          "step mem = RSS a step adds over the loaded model")
    for k, v in ratios.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
