"""Decoding and scoring throughput against this CPU's fp32 matmul roofline.

    python benchmarks/generation.py [--quick] [--batches 1,8,32,64] [--max-new-tokens 128] [--threads 2]
                                    [--dtype float32|bfloat16]

On the default model (artifacts/model, or --model-dir; the SVD cache in --svd-dir is built if
missing) with GSM8K test questions as chat prompts (artifacts/data, else the data mirror, else
synthetic questions, said so in the output). Every row decodes exactly --max-new-tokens tokens
(no stop ids; HF gets min_new_tokens), and tokens/s = generated tokens / wall time including
prefill. Measured in one run, alternating the order of the methods per repeat so that machine
noise hits all alike: the roofline (best of a 512×576 · 576×1536 matmul; tokens/s = GFLOP/s /
(2 · parameters)); the streaming bandwidth (sum of a 512 MB tensor) and, per batch, the tokens/s
a step would reach if it only streamed the weights and the rows' KV once (the bound that binds at
these batch sizes here); the engine (`transformer2.decoding.generate`) with base weights, a fixed
expert (W' rebuilt) and one z per row, at each batch and at its own choice of batch (all
prompts, default token budget), and at batch < 4 also without the row padding that batch
invariance costs;
RL rollouts (8 sampled copies of 4 prompts, which prefill once, vs 32 different prompts); HF `generate` at the same batches; a real workload (every prompt, stopping
at EOS: completion tokens/s of the engine vs HF `generate` in batches, as `generate_texts`
ran it); log-likelihood scoring (`dispatch.continuation_logprobs`, gold answers after each
prompt) in forward tokens/s, and lm-eval `loglikelihood` on --arc-docs ARC-Easy docs (their
choices) through the `transformer2` model (`loglik.token_logprobs`) vs plain HFLM at its best
of --hflm-batches, with the largest difference in log-probability and is_greedy between them; lm-eval
`generate_until` on --gsm8k-docs GSM8K docs (harness style, 5-shot, lm-eval's stop sequences) through the
`transformer2` model vs plain HFLM at its best of --hflm-gen-batches, with how many outputs differ.
Prints a table and writes benchmarks/results/generation.json (generation_bfloat16.json with
--dtype bfloat16: every method in bf16, shares against the fp32 roofline and bf16's own).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from transformer2.decoding import alignment, generate
from transformer2.dispatch import continuation_logprobs
from transformer2.generation import chat_prompts
from transformer2.models import load_base
from transformer2.runtime import keep_freed_memory
from transformer2.svd import decompose, load_factors
from transformer2.svf import SVFConfig, apply_svf, find_targets, init_expert, set_expert, svf_layers

SYNTHETIC = ["A farmer has {a} cows and buys {b} more. Each cow gives {c} litres of milk a day. How many litres "
             "does he get in a week?", "Sam reads {a} pages a day for {b} days, then {c} pages on the last day. "
             "How many pages did he read?"]


def roofline(threads: int, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of the matmul the issue measured (512×576 · 576×1536), fp32 unless `dtype`
    (bf16 runs on AMX / AVX512-BF16 where the CPU has them: several times the fp32 rate)."""
    a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * 512 * 576 * 1536 / best / 1e9


def stream_bandwidth(threads: int, mb: int = 512) -> float:
    """Best GB/s of summing a tensor far larger than the caches: what streaming the weights and
    the KV cache through the cores can reach (a decode step reads all of both once)."""
    a = torch.ones(mb * 2 ** 20 // 4)
    a.sum()
    return a.numel() * 4 / min(_timed(a.sum) for _ in range(5)) / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def load_docs(data: str, n: int) -> tuple[list[dict], str]:
    from transformer2.tasks import DataError, load_split, read_jsonl

    try:
        return load_split(data, "gsm8k", "test")[:n], f"{data}/gsm8k/test"
    except DataError:
        pass
    for root in (os.environ.get("T2_DATA_DIR"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if root and (Path(root) / "gsm8k" / "test.jsonl").is_file():
            return read_jsonl(Path(root) / "gsm8k" / "test.jsonl")[:n], f"{root}/gsm8k/test.jsonl"
    docs = [{"question": SYNTHETIC[i % 2].format(a=3 + i, b=7 + i % 5, c=2 + i % 3), "answer": "#### 0"}
            for i in range(n)]
    return docs, "synthetic GSM8K-like questions (no data found)"


def load_model(model_dir: str, svd_dir: str, dtype: str = "float32"):
    model, tokenizer, info = load_base(model_dir, dtype=dtype)
    names = find_targets(model, "mlp")
    decompose(model, names, svd_dir, info.fingerprint)
    apply_svf(model, load_factors(svd_dir, info.fingerprint, modules=names), SVFConfig(targets="mlp"))
    return model, tokenizer, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="artifacts/model")
    ap.add_argument("--svd-dir", default="artifacts/svd")
    ap.add_argument("--data", default="artifacts/data")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--own-prompts", type=int, default=128, help="prompts for the engine's own choice of batch")
    ap.add_argument("--score-prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights and activations of every method (model.dtype); shares stay against the fp32 "
                         "roofline, with the dtype's own roofline beside them")
    ap.add_argument("--hf-batch", type=int, default=32, help="HF batch size in the stop-at-EOS run")
    ap.add_argument("--skip-hf-above", type=int, default=64, help="largest batch HF generate is timed at")
    ap.add_argument("--arc-docs", type=int, default=64, help="ARC-Easy docs for lm-eval loglikelihood (0: skip)")
    ap.add_argument("--hflm-batches", default="8,16,32", help="batch sizes tried for plain HFLM's loglikelihood")
    ap.add_argument("--gsm8k-docs", type=int, default=64, help="GSM8K docs for lm-eval generate_until (0: skip)")
    ap.add_argument("--hflm-gen-batches", default="32,64", help="batch sizes tried for plain HFLM's generate_until")
    ap.add_argument("--gen-max-tokens", type=int, default=192, help="max_gen_toks of the generate_until requests "
                    "(the default profile's eval.max_gen_toks)")
    ap.add_argument("--quick", action="store_true", help="batches 1,8, 8 new tokens, 8 prompts: a smoke run")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/generation[_<dtype>].json")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.max_new_tokens, args.own_prompts, args.score_prompts, args.hf_batch = "1,8", 8, 8, 8, 8
        args.arc_docs, args.hflm_batches = 8, "8"
        args.gsm8k_docs, args.hflm_gen_batches, args.gen_max_tokens = 4, "4", 16
    torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory()  # as the stages run (flows/cli.py); T2_MALLOPT=off measures glibc's default
    batches = [int(b) for b in args.batches.split(",")]
    N = args.max_new_tokens

    model, tokenizer, info = load_model(args.model_dir, args.svd_dir, args.dtype)
    dtype = getattr(torch, args.dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    t = time.perf_counter()
    kernel_alignment = {**dataclasses.asdict(alignment(model)), "measured_s": round(time.perf_counter() - t, 2)}
    params = sum(p.numel() for p in model.parameters())  # the base weights (SVF factors are buffers)
    docs, source = load_docs(args.data, max(batches + [args.own_prompts, args.score_prompts]))
    prompts = chat_prompts(tokenizer, "gsm8k", docs)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    expert = init_expert(model, info.fingerprint, SVFConfig(targets="mlp"), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    row_z = {n: expert.vectors[n] + 0.5 * torch.randn(len(ids), layer.rank, generator=g)
             for n, layer in svf_layers(model).items()}

    def engine(rows, mode, **kw):
        set_expert(model, expert if mode == "fixed" else None)
        stats = {}
        out = generate(model, ids[:rows], max_new_tokens=N, pad_id=tokenizer.pad_token_id, stats=stats,
                       row_z={n: z[:rows] for n, z in row_z.items()} if mode == "row_z" else None, **kw)
        assert all(len(o) == N for o in out)
        return stats

    def hf(rows):
        set_expert(model, None)
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts[:rows], return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        return {"seconds": time.perf_counter() - t, "generated": rows * N,
                "prefill_tokens": sum(len(i) for i in ids[:rows])}

    engine(4, "base")  # warm-up: allocator, first-call costs
    rates: dict = {}
    load_before = os.getloadavg()
    roof = [roofline(args.threads)]
    roof_dtype = [roofline(args.threads, dtype=dtype)] if args.dtype != "float32" else []
    for r in range(args.repeats):
        for B in batches:
            methods = [("base", lambda: engine(B, "base")), ("fixed", lambda: engine(B, "fixed")),
                       ("row_z", lambda: engine(B, "row_z"))]
            if B < 4:  # rows padded to 4 for batch invariance vs. a plain gemv
                methods.append(("base_noninv", lambda: engine(B, "base", batch_invariant=False)))
            if B <= args.skip_hf_above:
                methods.append(("hf_generate", lambda: hf(B)))
            if r % 2:
                methods.reverse()
            for name, fn in methods:
                s = fn()
                rates.setdefault((name, B), []).append(s)
                print(f"  batch {B:>3} {name:<12} {s['generated'] / s['seconds']:7.1f} tok/s", flush=True)
        for mode in ("base", "row_z"):  # the engine's own choice: every prompt, default budget
            s = engine(args.own_prompts, mode)
            rates.setdefault((mode, "own"), []).append(s)
            print(f"  own choice ({s['slots']} slots) {mode:<6} {s['generated'] / s['seconds']:7.1f} tok/s", flush=True)
        roof.append(roofline(args.threads))
    set_expert(model, None)

    # RL rollouts: k = 8 sampled copies of 4 prompts (copies prefill once) vs 32 different prompts
    rollouts = {}
    for name, rows in (("8_copies_of_4", [ids[i] for i in range(4) for _ in range(8)]), ("32_distinct", ids[:32])):
        s = {}
        generate(model, rows, max_new_tokens=48, pad_id=tokenizer.pad_token_id, do_sample=True, temperature=0.7,
                 generator=torch.Generator().manual_seed(0), stats=s)
        rollouts[name] = {"seconds": round(s["seconds"], 2), "prefill_s": round(s["prefill_s"], 2),
                          "prefill_tokens": s["prefill_tokens"], "prompts_copied": s["prompts_copied"],
                          "tokens_per_s": round(s["generated"] / s["seconds"], 1)}
        print(f"  rollout {name:<14} prefill {s['prefill_s']:.2f} s, {rollouts[name]['tokens_per_s']} tok/s", flush=True)
    bandwidth = stream_bandwidth(args.threads)

    # a real workload: every prompt, stop at EOS; engine (own choice) vs HF in batches of --hf-batch
    stop = sorted({tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None})
    eos: dict = {}
    for name in ("engine", "hf_generate"):
        t = time.perf_counter()
        if name == "engine":
            useful = sum(map(len, generate(model, ids[:args.own_prompts], max_new_tokens=N, stop_ids=stop,
                                           pad_id=tokenizer.pad_token_id)))
        else:
            useful = 0
            order = sorted(range(args.own_prompts), key=lambda i: len(ids[i]))  # as generate_texts batches
            for a in range(0, len(order), args.hf_batch):
                chunk = [prompts[i] for i in order[a:a + args.hf_batch]]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=N, do_sample=False, eos_token_id=stop,
                                         pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    cut = [k for k, tok in enumerate(row) if tok in stop]
                    useful += cut[0] + 1 if cut else len(row)
        eos[name] = {"seconds": round(time.perf_counter() - t, 2), "completion_tokens": useful,
                     "tokens_per_s": round(useful / (time.perf_counter() - t), 2)}
        print(f"  stop at EOS, {args.own_prompts} prompts, {name:<12} {eos[name]['tokens_per_s']:7.1f} tok/s", flush=True)
    eos["engine_over_hf"] = round(eos["engine"]["tokens_per_s"] / eos["hf_generate"]["tokens_per_s"], 3)
    eos["hf_batch"] = args.hf_batch

    # log-likelihood scoring: gold answers after each prompt (CEM's fitness, lm-eval loglikelihood)
    sp, answers = prompts[:args.score_prompts], [" " + d["answer"] for d in docs[:args.score_prompts]]
    t = time.perf_counter()
    continuation_logprobs(model, tokenizer, sp, [[a] for a in answers], batch_size=16)
    score_s = time.perf_counter() - t
    score_tokens = sum(len(tokenizer(p + a, add_special_tokens=False)["input_ids"]) for p, a in zip(sp, answers))
    roof.append(roofline(args.threads))
    harness_ll = lm_eval_loglik(args.model_dir, args.data, args.arc_docs,
                                [int(b) for b in args.hflm_batches.split(",")], args.dtype) if args.arc_docs else None
    roof.append(roofline(args.threads))
    harness_gen = lm_eval_generate(args.model_dir, args.data, args.gsm8k_docs,
                                   [int(b) for b in args.hflm_gen_batches.split(",")],
                                   args.gen_max_tokens, args.dtype) if args.gsm8k_docs else None
    roof.append(roofline(args.threads))
    if roof_dtype:
        roof_dtype.append(roofline(args.threads, dtype=dtype))

    gflops = max(roof)
    roof_tok = gflops * 1e9 / (2 * params)
    dtype_roof_tok = max(roof_dtype, default=0.0) * 1e9 / (2 * params)
    cfg = model.config
    kv_bytes = 2 * elem * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    context = statistics.mean(len(i) for i in ids[:max(batches)]) + N / 2  # mean keys per row and step

    def memory_bound(B) -> float:
        """tokens/s if a step took only the time to stream the weights and B rows' KV once."""
        return B * bandwidth * 1e9 / (elem * params + B * context * kv_bytes)

    rows = []
    for (name, B), runs in rates.items():
        rate = statistics.median(s["generated"] / s["seconds"] for s in runs)
        row = {"method": name, "batch": B, "tokens_per_s": round(rate, 2), "share_of_roofline": round(rate / roof_tok, 4)}
        if roof_dtype:
            row["share_of_dtype_roofline"] = round(rate / dtype_roof_tok, 4)
        # all the forward work, prompt tokens included: what the arithmetic of the step reaches
        forward = statistics.median((s["prefill_tokens"] + s["generated"]) / s["seconds"] for s in runs)
        row["forward_share_of_roofline"] = round(forward / roof_tok, 4)
        if isinstance(B, int):
            row["share_of_memory_bound"] = round(rate / memory_bound(B), 4)
        if name != "hf_generate":
            s = runs[len(runs) // 2]
            row.update(slots=s["slots"], prefill_s=round(s["prefill_s"], 2), decode_s=round(s["decode_s"], 2),
                       decode_tokens_per_s=round(s["generated"] / max(s["decode_s"], 1e-9), 2),
                       prefill_tokens_per_s=round(s["prefill_tokens"] / max(s["prefill_s"], 1e-9), 2))
        rows.append(row)
    by = {(r["method"], r["batch"]): r["tokens_per_s"] for r in rows}
    ratios = {f"{k}@{B}": round(v, 3) for B in batches + ["own"] for k, v in (
        ("fixed_over_base", by.get(("fixed", B), 0) / by[("base", B)] if ("fixed", B) in by else None),
        ("row_z_over_fixed", by.get(("row_z", B), 0) / by[("fixed", B)] if ("fixed", B) in by else None),
        ("row_z_over_base", by.get(("row_z", B), 0) / by[("base", B)]),
        ("engine_over_hf", by[("base", B)] / by[("hf_generate", B)] if ("hf_generate", B) in by else None),)
        if v is not None}
    result = {
        "model": info.name, "parameters": params, "threads": args.threads, "malloc_tuned": malloc_tuned, "max_new_tokens": N, "dtype": args.dtype,
        "prompts": source, "prompt_tokens_mean": round(sum(len(i) for i in ids[:max(batches)]) / max(batches), 1),
        # new tokens/s over the roofline cannot pass N / (N + P) while each prompt token costs a forward too
        "new_token_share_ceiling": round(N / (N + statistics.mean(len(i) for i in ids[:max(batches)])), 4),
        "roofline_gflops": round(gflops, 1), "roofline_gflops_all": [round(x, 1) for x in roof],
        "roofline_tokens_per_s": round(roof_tok, 1), "stream_gb_per_s": round(bandwidth, 1),
        **({f"{args.dtype}_roofline_gflops": round(max(roof_dtype), 1),
            f"{args.dtype}_roofline_gflops_all": [round(x, 1) for x in roof_dtype],
            f"{args.dtype}_roofline_tokens_per_s": round(dtype_roof_tok, 1)} if roof_dtype else {}),
        "kv_bytes_per_token": kv_bytes, "memory_bound_tokens_per_s": {B: round(memory_bound(B), 1) for B in batches},
        "kernel_alignment": kernel_alignment,  # rows / keys multiples of this CPU (decoding.kernels)
        "rows": rows, "ratios": ratios, "rollouts": rollouts,
        "stop_at_eos": eos,
        "loglik": {"prompts": len(sp), "forward_tokens": score_tokens, "seconds": round(score_s, 2),
                   "tokens_per_s": round(score_tokens / score_s, 1),
                   "share_of_roofline": round(score_tokens / score_s / roof_tok, 4)},
        "lm_eval_loglikelihood": harness_ll,
        "lm_eval_generate_until": harness_gen,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "busy_processes": _busy(),
    }
    out = Path(args.out or f"benchmarks/results/generation{'' if args.dtype == 'float32' else '_' + args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{info.name}, {args.threads} threads, {N} new tokens per row, prompts: {source} "
          f"(mean {result['prompt_tokens_mean']} tokens)")
    print(f"roofline {gflops:.1f} GFLOP/s -> {roof_tok:.0f} tok/s at 2·{params / 1e6:.1f}M FLOP/token; "
          f"load average {load_before[0]:.1f} -> {result['loadavg_after'][0]:.1f}")
    if roof_dtype:
        print(f"{args.dtype} roofline {max(roof_dtype):.1f} GFLOP/s -> {dtype_roof_tok:.0f} tok/s (the 'roofline' "
              f"column stays the fp32 one; {args.dtype}'s share is in the JSON)")
    print(f"memory: {bandwidth:.1f} GB/s streamed; a step reads {elem * params / 1e6:.0f} MB of weights + "
          f"{kv_bytes / 1e3:.1f} kB of KV per row and key ({context:.0f} keys on average) -> bound "
          + ", ".join(f"{v:.0f} tok/s at {B}" for B, v in result["memory_bound_tokens_per_s"].items()))
    print(f"new tokens/s can reach at most {result['new_token_share_ceiling']:.1%} of the roofline here: every "
          f"row also runs {result['prompt_tokens_mean']:.0f} prompt tokens through the model ('forward' counts them)")
    print(f"{'method':<16}{'batch':>6}{'tok/s':>9}{'roofline':>10}{'forward':>9}{'mem bound':>10}{'slots':>7}"
          f"{'prefill s':>11}{'decode tok/s':>14}")
    for r in sorted(rows, key=lambda r: (str(r["batch"]).zfill(4), r["method"])):
        mem = f"{r['share_of_memory_bound']:.1%}" if "share_of_memory_bound" in r else ""
        print(f"{r['method']:<16}{r['batch']!s:>6}{r['tokens_per_s']:>9.1f}{r['share_of_roofline']:>9.1%}"
              f"{r['forward_share_of_roofline']:>9.1%}{mem:>10}{r.get('slots', ''):>7}{r.get('prefill_s', ''):>11}"
              f"{r.get('decode_tokens_per_s', ''):>14}")
    print("rollouts (48 sampled tokens): " + ", ".join(
        f"{k} {v['tokens_per_s']} tok/s, prefill {v['prefill_s']} s ({v['prompts_copied']} copied)"
        for k, v in rollouts.items()))
    ll = result["loglik"]
    print(f"log-likelihood scoring: {ll['tokens_per_s']:.1f} forward tok/s ({ll['share_of_roofline']:.1%}), "
          f"{ll['prompts']} prompts, {ll['forward_tokens']} tokens")
    print(f"stop at EOS ({args.own_prompts} prompts, completion tokens/s): engine {eos['engine']['tokens_per_s']:.1f}, "
          f"HF generate in batches of {args.hf_batch} {eos['hf_generate']['tokens_per_s']:.1f} "
          f"({eos['engine_over_hf']}x)")
    if harness_ll:
        h = harness_ll
        print(f"lm-eval loglikelihood, {h['requests']} requests of {h['docs']} ARC-Easy docs: transformer2 "
              f"{h['transformer2_s']} s, HFLM {h['hflm_best_s']} s at batch {h['hflm_best_batch']} "
              f"({h['transformer2_over_hflm']}x); max |Δ logprob| {h['max_abs_diff']:.2e}, "
              f"is_greedy differs {h['greedy_differs']}")
    if harness_gen:
        h = harness_gen
        print(f"lm-eval generate_until, {h['requests']} GSM8K docs (5-shot, {h['prompt_tokens_mean']:.0f} prompt tokens, "
              f"<= {h['max_gen_toks']} new): transformer2 {h['transformer2_s']} s, HFLM {h['hflm_best_s']} s at batch "
              f"{h['hflm_best_batch']} ({h['transformer2_over_hflm']}x); outputs differ on {h['outputs_differ']}")
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))


FEWSHOT_SEED = 1234  # lm-eval's own default (simple_evaluate's fewshot_random_seed)


def harness_requests(data: str, task_name: str, request_type: str, n_docs: int) -> list | None:
    """The `request_type` requests of the first n_docs docs of lm-eval task `task_name` (this project's
    harness-style YAMLs over the local data mirror), or None (said so) when no mirror holds the task."""
    import tempfile

    from lm_eval.tasks import TaskManager, get_task_dict

    from transformer2.harness import task_config_dir

    root = next((Path(r) for r in (data, os.environ.get("T2_DATA_DIR"),
                                   Path(__file__).resolve().parents[2] / "shared" / "data")
                 if r and (Path(r) / task_name).is_dir()), None)
    if root is None:
        print(f"  lm-eval {request_type}: no {task_name} data found, skipped")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        manager = TaskManager(include_path=str(task_config_dir(root, Path(tmp), style="harness")),
                              include_defaults=False)
        task = get_task_dict([task_name], manager)[task_name]
        task.set_fewshot_seed(FEWSHOT_SEED)  # else each run draws other shots: 972 vs 1008 prompt tokens in two runs
        task.build_all_requests(limit=n_docs, rank=0, world_size=1)
        return [inst for inst in task.instances if inst.request_type == request_type]


def checkpoint_path(model_dir: str) -> str:
    """The HF checkpoint behind the model stage's folder (plain HFLM loads it), or the folder itself."""
    from transformer2.models import ModelInfo

    return ModelInfo.load(model_dir).path if (Path(model_dir) / "model.json").is_file() else model_dir


def lm_eval_loglik(model_dir: str, data: str, n_docs: int, hflm_batches: list[int], dtype: str = "float32") -> dict | None:
    """lm-eval's ARC-Easy loglikelihood requests (n_docs docs, every choice) timed through the
    `transformer2` model and through plain HFLM (same checkpoint) at each of `hflm_batches`."""
    from lm_eval.models.huggingface import HFLM

    from transformer2.harness import Transformer2LM

    requests = harness_requests(data, "arc_easy", "loglikelihood", n_docs)
    if requests is None:
        return None
    checkpoint = checkpoint_path(model_dir)
    lm = Transformer2LM(pretrained=model_dir, device="cpu", batch_size=16, dtype=dtype)
    lm.loglikelihood(requests[:8])  # warm-up
    t = time.perf_counter()
    ours = lm.loglikelihood(requests)
    ours_s = time.perf_counter() - t
    del lm
    plain = HFLM(pretrained=checkpoint, device="cpu", batch_size=hflm_batches[0], dtype=dtype)
    plain.loglikelihood(requests[:8])
    timings = {}
    for b in hflm_batches:
        plain.batch_size_per_gpu = b
        t = time.perf_counter()
        theirs = plain.loglikelihood(requests)
        timings[b] = round(time.perf_counter() - t, 2)
        print(f"  lm-eval loglikelihood, HFLM batch {b}: {timings[b]} s", flush=True)
    best = min(timings, key=timings.get)
    print(f"  lm-eval loglikelihood, transformer2: {ours_s:.2f} s", flush=True)
    return {"docs": n_docs, "requests": len(requests), "transformer2_s": round(ours_s, 2),
            "hflm_s_by_batch": timings, "hflm_best_batch": best, "hflm_best_s": timings[best],
            "transformer2_over_hflm": round(timings[best] / ours_s, 3),
            "max_abs_diff": max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)),
            "greedy_differs": sum(a[1] != b[1] for a, b in zip(ours, theirs))}


def lm_eval_generate(model_dir: str, data: str, n_docs: int, hflm_batches: list[int], max_gen_toks: int,
                     dtype: str = "float32") -> dict | None:
    """lm-eval's GSM8K generate_until requests (harness style: its 5-shot prompts and stop sequences, as the
    default profile's cells; n_docs docs, max_gen_toks each) through the `transformer2` model and through
    plain HFLM (same checkpoint) at each of `hflm_batches`, with how many outputs differ."""
    from lm_eval.models.huggingface import HFLM

    from transformer2.harness import Transformer2LM

    requests = harness_requests(data, "gsm8k", "generate_until", n_docs)
    if requests is None:
        return None
    for inst in requests:
        inst.arguments = (inst.arguments[0], {**inst.arguments[1], "max_gen_toks": max_gen_toks})
    checkpoint = checkpoint_path(model_dir)
    lm = Transformer2LM(pretrained=model_dir, device="cpu", dtype=dtype)
    tokenizer = lm.tokenizer
    t = time.perf_counter()
    ours = lm.generate_until(requests)
    ours_s = time.perf_counter() - t
    print(f"  lm-eval generate_until, transformer2: {ours_s:.1f} s", flush=True)
    del lm
    timings, theirs = {}, None
    for b in hflm_batches:
        plain = HFLM(pretrained=checkpoint, device="cpu", batch_size=b, dtype=dtype)
        t = time.perf_counter()
        theirs = plain.generate_until(requests)
        timings[b] = round(time.perf_counter() - t, 1)
        print(f"  lm-eval generate_until, HFLM batch {b}: {timings[b]} s", flush=True)
        del plain
    best = min(timings, key=timings.get)
    tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in ours)
    return {"docs": n_docs, "requests": len(requests), "max_gen_toks": max_gen_toks,
            "prompt_tokens_mean": round(statistics.mean(len(tokenizer(r.arguments[0])["input_ids"]) for r in requests), 1),
            "output_tokens": tokens, "transformer2_s": round(ours_s, 1), "hflm_s_by_batch": timings,
            "hflm_best_batch": best, "hflm_best_s": timings[best], "transformer2_over_hflm": round(timings[best] / ours_s, 3),
            "outputs_differ": sum(a != b for a, b in zip(ours, theirs))}


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _busy() -> list[str]:
    """What else was running (top CPU users), for the record."""
    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
        return [" ".join(line.split())[:120] for line in ps.splitlines()[1:6]]
    except OSError:
        return []


if __name__ == "__main__":
    main()
