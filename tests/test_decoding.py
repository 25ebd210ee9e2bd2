"""The decoding engine: HF-identical greedy output, bitwise batch invariance, per-row z, sampling."""
import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F

from transformer2.decoding import engine, kernels, kv
from transformer2.decoding import DecodingBackend, TorchBackend, generate, pad_batch
from transformer2.models import TINY_ARCHS, build_tiny_random, fingerprint
from transformer2.svd import decompose, load_factors
from transformer2.svf import (Expert, SVFConfig, apply_svf, find_targets, set_expert, set_row_z, svf_layers)

SYSTEM = "<|im_start|>system\nYou are a careful assistant. Think, then answer in one line.<|im_end|>\n<|im_start|>user\n"
QUESTIONS = ["What is 17 * 3?", "Hi", "Name three colours of the rainbow, then the other four, in order. " * 2,
             "x", "Sort [3, 1, 2] in Python.", "Why is the sky blue? Explain it to a child."]


def encode(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def chat_and_plain(tokenizer):
    """Prompts sharing a system prompt (prefix sharing), then the bare questions (no common prefix);
    lengths 1..~150 tokens: past gemma3's 64-token sliding window."""
    return encode(tokenizer, [SYSTEM + q for q in QUESTIONS]) + encode(tokenizer, QUESTIONS)


def cut(ids, stop):
    return ids[:ids.index(stop) + 1] if stop in ids else ids


def hf_greedy(model, tokenizer, prompts, max_new_tokens, batched=False):
    """HF `generate` greedy completions: each prompt alone, or all at once left-padded."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        if not batched:
            return [cut(model.generate(torch.tensor([p]), **kw)[0, len(p):].tolist(), tokenizer.eos_token_id)
                    for p in prompts]
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        return [cut(row[P:].tolist(), tokenizer.eos_token_id) for row in out]


def logits_by_row(**kwargs):
    """generate(...) plus every step's logits per input row: (outputs, {row: [logits per step]})."""
    seen: dict = {}

    def hook(rows, logits):
        for r, row in zip(rows, logits):
            seen.setdefault(r, []).append(row.clone())

    return generate(on_logits=hook, **kwargs), seen


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    model, tokenizer = build_tiny_random("llama", seed=3)
    model.eval()
    fp = fingerprint(model)
    root = tmp_path_factory.mktemp("decoding")
    names = find_targets(model, "mlp")
    decompose(model, names, root / "svd", fp)
    apply_svf(model, load_factors(root / "svd", fp), SVFConfig())
    g = torch.Generator().manual_seed(0)
    experts = [Expert({n: 3.0 * torch.randn(layer.rank, generator=g) for n, layer in svf_layers(model).items()},
                      fp, SVFConfig()) for _ in range(3)]
    return model, tokenizer, experts


# ---------------------------------------------------------------- the kernel facts the design rests on

def assert_same_steps(seen, alone, model, what):
    """Bitwise where `kernels.alignment` found this CPU's kernels batch-invariant for the model;
    elsewhere equal to float rounding, with the same greedy token unless the top two were a tie
    at rounding (after which the row is another sequence)."""
    if kernels.alignment(model).invariant:
        assert len(seen) == len(alone) and all(map(torch.equal, seen, alone)), what
        return
    for a, b in zip(seen, alone):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), what
        if a.argmax() != b.argmax():
            top = b.topk(2).values
            assert top[0] - top[1] < 1e-4, what
            return
    assert len(seen) == len(alone), what


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_alignment_is_measured_confirmed_end_to_end_and_cached(arch):
    """The chosen multiples come from the candidate lists, pass the engine's own alone-vs-batch
    check, and are measured once; the check itself catches unaligned rows (M = 1 is a gemv)
    wherever the kernel probe does."""
    model, _ = build_tiny_random(arch)
    model.eval()
    align = kernels.alignment(model)
    assert align.rows in kernels.ROW_CHOICES and align.keys in kernels.KEY_CHOICES
    assert kernels.alignment(model) is align
    if align.invariant:
        assert engine.rows_match_alone(model, align)
    g = torch.Generator().manual_seed(0)
    if not all(kernels._rows_stable(*s, 1, torch.float32, g) for s in kernels._linear_specs(model)):
        assert not engine.rows_match_alone(model, kernels.Alignment(1, align.keys, True))
    stats: dict = {}
    generate(model, [[1, 2, 3]], max_new_tokens=2, stats=stats)
    assert (stats["row_align"], stats["key_align"], stats["batch_invariant"]) == (align.rows, align.keys,
                                                                                 align.invariant)


def test_a_measured_alignment_is_kept_on_disk_for_the_next_process(tmp_path, monkeypatch):
    model, _ = build_tiny_random("qwen2", seed=12)
    path = tmp_path / "kernels.json"
    monkeypatch.setenv(kernels.CACHE_ENV, str(path))
    monkeypatch.setattr(kernels, "_cache", {})
    align = kernels.alignment(model)
    (entry,) = json.loads(path.read_text()).values()
    assert entry["alignment"] == dataclasses.asdict(align) and entry["model"] == "Qwen2ForCausalLM"
    assert entry["machine"] and entry["threads"] == torch.get_num_threads()
    monkeypatch.setattr(kernels, "_cache", {})  # a new process: read, not measured
    monkeypatch.setattr(kernels, "_measure", lambda *a: pytest.fail("measured again"))
    assert kernels.alignment(model) == align
    path.write_text("{not json")  # a damaged file is measured again, not an error
    monkeypatch.undo()
    monkeypatch.setenv(kernels.CACHE_ENV, str(path))
    monkeypatch.setattr(kernels, "_cache", {})
    assert kernels.alignment(model) == align and json.loads(path.read_text())


def test_without_an_invariant_alignment_the_engine_warns_and_still_decodes(monkeypatch):
    model, tokenizer = build_tiny_random("llama", seed=11)
    model.eval()
    monkeypatch.setattr(kernels, "_cache", {})
    monkeypatch.setattr(engine, "rows_match_alone", lambda model, align: False)
    with pytest.warns(RuntimeWarning, match="batch-invariant"):
        align = kernels.alignment(model)
    assert not align.invariant and (align.rows, align.keys) == (kernels.ROW_CHOICES[0], kernels.KEY_CHOICES[0])
    stats: dict = {}
    prompts = chat_and_plain(tokenizer)[:3]
    assert generate(model, prompts, max_new_tokens=6, stats=stats) == hf_greedy(model, tokenizer, prompts, 6)
    assert stats["batch_invariant"] is False


# ---------------------------------------------------------------- greedy == HF generate

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_hf_generate(arch, monkeypatch):
    model, tokenizer = build_tiny_random(arch)
    model.eval()
    prompts = chat_and_plain(tokenizer)
    got = generate(model, prompts, max_new_tokens=20, stop_ids=[tokenizer.eos_token_id],
                   pad_id=tokenizer.pad_token_id, max_batch=4)  # 12 prompts through 4 slots
    assert got == hf_greedy(model, tokenizer, prompts, 20)
    assert got == hf_greedy(model, tokenizer, prompts, 20, batched=True)  # left-padded, mixed lengths
    monkeypatch.setattr(kv, "QUERY_BLOCK", 3)  # prefill attention in causal query blocks, each over its own keys
    assert generate(model, prompts, max_new_tokens=20, stop_ids=[tokenizer.eos_token_id],
                    pad_id=tokenizer.pad_token_id, max_batch=4) == got


def test_default_slots_fill_to_128_rows_within_the_token_budget():
    """The defaults decode up to 128 rows at once (lm-eval's 192-token cells ran at 40 under the old
    16384-position budget); the budget still caps rows when prompts are long; and rows come out
    the same as through 4 slots."""
    model, tokenizer = build_tiny_random("llama")
    model.eval()
    rand = kernels.random_prompt_maker(model, seed=3)
    short = [rand(5 + i % 7) for i in range(140)]
    stats: dict = {}
    got = generate(model, short, max_new_tokens=4, stats=stats)
    assert stats["slots"] == 128
    assert got == generate(model, short, max_new_tokens=4, max_batch=4)
    long = [rand(1000) for _ in range(140)]
    generate(model, long, max_new_tokens=200, stats=stats)
    length = stats["slots"] * (1000 + 200)
    assert 64 <= stats["slots"] < 128 and length <= 131072


def test_greedy_matches_hf_with_a_fixed_expert_and_with_per_row_z(patched):
    model, tokenizer, experts = patched
    prompts = chat_and_plain(tokenizer)[:6]
    set_expert(model, experts[0])  # rebuilt W'
    assert generate(model, prompts, max_new_tokens=16) == hf_greedy(model, tokenizer, prompts, 16, batched=True)
    set_expert(model, None)
    # one z per row: rows 0, 3 expert 0, rows 1, 4 expert 1, rows 2, 5 expert 2 (the factored path)
    row_z = {n: torch.stack([e.vectors[n] for e in experts]) for n in svf_layers(model)}
    groups = [0, 1, 2, 0, 1, 2]
    got = generate(model, prompts, max_new_tokens=16, row_z=row_z, row_group=groups, max_batch=4)
    for p, g, ids in zip(prompts, groups, got):
        set_row_z(model, row_z, torch.tensor([g]))
        assert ids == hf_greedy(model, tokenizer, [p], 16)[0]
    set_row_z(model, None)
    assert all(layer.z is None for layer in svf_layers(model).values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_decodes_what_hf_computes_in_bfloat16(arch):
    """model.dtype: bfloat16 (AMX CPUs, GPUs): every step's logits are HF's own bf16 forward of the
    same tokens to bf16 rounding, and a greedy token differs from HF's argmax only at a near-tie.
    (Token identity with HF `generate` cannot hold in bf16: the engine's attention sums in
    another order than SDPA, and bf16 keeps 8 bits.)"""
    model, tokenizer = build_tiny_random(arch)
    model.to(torch.bfloat16).eval()
    prompts = chat_and_plain(tokenizer)[:6]
    got, seen = logits_by_row(model=model, prompts=prompts, max_new_tokens=12, max_batch=4)
    for i, (p, ids) in enumerate(zip(prompts, got)):
        assert len(ids) == 12 and next(model.parameters()).dtype == torch.bfloat16
        with torch.no_grad():
            ref = model(torch.tensor([p + ids[:-1]])).logits[0, len(p) - 1:]  # HF's bf16 forward, same tokens
        for step, (ours, theirs) in enumerate(zip(seen[i], ref)):
            ours, theirs = ours.float(), theirs.float()
            assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max() + 0.01, (i, step)  # a few bf16 ulps
            top = theirs.topk(2).values
            assert ids[step] == int(theirs.argmax()) or top[0] - top[1] <= 0.02 * top[0].abs() + 0.01, (i, step)


# ---------------------------------------------------------------- batch invariance, bitwise

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_rows_logits_never_depend_on_the_batch(arch, monkeypatch):
    """Alone vs shuffled into batches of other sizes, with and without the shared prefix, long
    prompts cut into pieces, rows stopping early and others admitted: the same bits each step."""
    model, tokenizer = build_tiny_random(arch)
    model.eval()
    monkeypatch.setattr(engine, "PIECE", 12)  # long prompts prefill in several pieces
    monkeypatch.setattr(kv, "QUERY_BLOCK", 5)  # and pieces' attention in query blocks
    prompts = chat_and_plain(tokenizer)
    alone = [logits_by_row(model=model, prompts=[p], max_new_tokens=12)[1][0] for p in prompts]
    rng = random.Random(0)
    for trial in range(4):
        order = rng.sample(range(len(prompts)), len(prompts))
        early = (lambda r, ids: len(ids) >= 3 + r % 5) if trial % 2 else None
        _, seen = logits_by_row(model=model, prompts=[prompts[i] for i in order], max_new_tokens=12,
                                max_batch=(4, 8, 12, 64)[trial], share_prefix=trial < 2, stop_check=early,
                                prefill_tokens=(16, 64, 2048, 40)[trial])
        for j, i in enumerate(order):
            assert_same_steps(seen[j], alone[i][:len(seen[j])], model, (trial, i))
            assert len(seen[j]) == (12 if early is None else min(12, 3 + j % 5))


def test_decode_attention_spans_read_each_row_group_to_its_own_longest_row():
    """Spans: one matmul over all rows while splitting saves little, else each span over its own keys."""
    assert kv._spans([16] * 40) == [(0, 40, 16)]
    assert kv._spans([96] * 16 + [608] + [96] * 31) == [(0, 16, 96), (16, 32, 608), (32, 48, 96)]
    assert kv._spans([96] * 16 + [128] * 16) == [(0, 32, 128)]  # 512 (row, key) reads saved: not worth a call


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_decode_the_same_whatever_span_their_attention_runs_in(arch, monkeypatch):
    """Spans of 4 slots, split at any saving: each row's logits are those it gets alone."""
    model, tokenizer = build_tiny_random(arch)
    model.eval()
    monkeypatch.setattr(kv, "SPAN_ROWS", 4)
    monkeypatch.setattr(kv, "SPAN_COST", 0)
    prompts = chat_and_plain(tokenizer) * 2
    alone = [logits_by_row(model=model, prompts=[p], max_new_tokens=8)[1][0] for p in prompts]
    _, seen = logits_by_row(model=model, prompts=prompts, max_new_tokens=8, share_prefix=False,
                            stop_check=lambda r, ids: len(ids) >= 2 + r % 7)
    for i in range(len(prompts)):
        assert_same_steps(seen[i], alone[i][:len(seen[i])], model, i)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_copies_of_a_prompt_prefill_once_and_decode_as_if_alone(arch):
    """k samples of one prompt (an RL rollout): one prefill, the others copy its KV, bitwise the
    same logits as each prompt alone, with the shared system prompt and without, and when the
    copies do not all fit in the slots at once."""
    model, tokenizer = build_tiny_random(arch)
    model.eval()
    prompts = chat_and_plain(tokenizer)
    chosen = [prompts[0], prompts[2], prompts[6]]
    alone = [logits_by_row(model=model, prompts=[p], max_new_tokens=8)[1][0] for p in chosen]
    rows = [p for p in chosen for _ in range(4)]
    for max_batch, share in ((64, True), (8, False)):
        stats: dict = {}
        _, seen = logits_by_row(model=model, prompts=rows, max_new_tokens=8, max_batch=max_batch, share_prefix=share,
                                stats=stats)
        assert stats["prompts_copied"] == 9 if max_batch == 64 else stats["prompts_copied"] >= 6
        for r in range(len(rows)):
            assert_same_steps(seen[r], alone[r // 4], model, (max_batch, r))
    g = torch.Generator().manual_seed(3)
    sampled = generate(model, rows, max_new_tokens=8, do_sample=True, generator=g)
    assert len({tuple(ids) for ids in sampled}) > 3  # copies share a prompt, not their draws


def test_per_row_z_follows_its_row_through_reordering(patched):
    model, tokenizer, experts = patched
    prompts = chat_and_plain(tokenizer)
    row_z = {n: torch.stack([experts[i % 3].vectors[n] for i in range(len(prompts))]) for n in svf_layers(model)}
    alone = []
    for i, p in enumerate(prompts):
        one = {n: z[i:i + 1] for n, z in row_z.items()}
        alone.append(logits_by_row(model=model, prompts=[p], max_new_tokens=10, row_z=one)[1][0])
    order = random.Random(1).sample(range(len(prompts)), len(prompts))
    _, seen = logits_by_row(model=model, prompts=[prompts[i] for i in order], max_new_tokens=10, max_batch=4,
                            row_z={n: z[order] for n, z in row_z.items()},
                            stop_check=lambda r, ids: len(ids) >= 2 + r % 7)
    for j, i in enumerate(order):
        assert_same_steps(seen[j], alone[i][:len(seen[j])], model, i)
    # grouped z: the shared prefix is computed once per group and gives the same bits
    _, grouped = logits_by_row(model=model, prompts=prompts[:6], max_new_tokens=6,
                               row_z={n: torch.stack([e.vectors[n] for e in experts]) for n in svf_layers(model)},
                               row_group=[0, 1, 2, 0, 1, 2])
    for i in range(6):
        assert_same_steps(grouped[i], alone[i][:6], model, i)


# ---------------------------------------------------------------- stopping, sampling, state

def test_stops_at_the_first_stop_id_and_on_stop_check():
    model, tokenizer = build_tiny_random("qwen2")
    model.eval()
    prompts = chat_and_plain(tokenizer)[:4]
    free = generate(model, prompts, max_new_tokens=12)
    assert all(len(ids) == 12 for ids in free)
    stop = free[0][4]  # a token row 0 emits at step 5
    got = generate(model, prompts, max_new_tokens=12, stop_ids=[stop])
    for ids, ref in zip(got, free):
        assert ids == (ref[:ref.index(stop) + 1] if stop in ref else ref)
    assert len(got[0]) <= 5
    assert generate(model, prompts, max_new_tokens=12, stop_check=lambda r, ids: len(ids) == r + 1) == \
        [ref[:r + 1] for r, ref in enumerate(free)]
    assert generate(model, prompts, max_new_tokens=0) == [[]] * 4
    assert generate(model, [], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=4)


def test_sampling_is_seeded_resumable_and_batch_invariant():
    model, tokenizer = build_tiny_random("llama")
    model.eval()
    prompts = chat_and_plain(tokenizer)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.3, top_p=0.9)
    g = torch.Generator().manual_seed(7)
    checkpoint = g.get_state()
    first = generate(model, prompts, generator=g, **kw)
    second = generate(model, prompts, generator=g, **kw)
    assert first != second  # the generator moved on
    resumed = torch.Generator()
    resumed.set_state(checkpoint)
    assert generate(model, prompts, generator=resumed, max_batch=4, **kw) == first  # other batching, same draws
    assert generate(model, prompts, generator=resumed, **kw) == second
    greedy = generate(model, prompts, max_new_tokens=16)
    assert first != greedy
    assert generate(model, prompts, generator=torch.Generator().manual_seed(7), max_new_tokens=16, do_sample=True,
                    temperature=1.0, top_p=1e-6) == greedy  # a tiny nucleus is the argmax


def test_model_state_is_restored(patched):
    model, tokenizer, experts = patched
    set_expert(model, experts[1])
    before = {n: layer.state() for n, layer in svf_layers(model).items()}
    attn = model.config._attn_implementation
    model.train()
    row_z = {n: torch.stack([e.vectors[n] for e in experts[:2]]) for n in svf_layers(model)}
    generate(model, encode(tokenizer, QUESTIONS[:2]), max_new_tokens=3, row_z=row_z)
    assert model.training and model.config._attn_implementation == attn
    for n, layer in svf_layers(model).items():
        assert all(a is b for a, b in zip(layer.state(), before[n]))
    model.eval()
    x = torch.tensor([encode(tokenizer, ["hello"])[0]])
    assert torch.isfinite(model(x).logits).all()  # HF attention works again
    set_expert(model, None)


def test_pad_batch_has_the_rollout_layout():
    ids, attn, comp, P = pad_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert P == 3
    assert ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert comp.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_torch_backend_sets_weights_from_w_prime_or_from_z(patched):
    model, tokenizer, experts = patched
    backend = TorchBackend(model, pad_id=tokenizer.pad_token_id)
    assert isinstance(backend, DecodingBackend)
    prompts = encode(tokenizer, QUESTIONS[:3])
    backend.set_z(experts[2].vectors)
    by_z = backend.generate(prompts, max_new_tokens=8)
    backend.set_weights({n: layer.adapted_weight(experts[2].vectors[n]) for n, layer in svf_layers(model).items()})
    assert backend.generate(prompts, max_new_tokens=8) == by_z
    backend.set_weights(None)
    assert backend.generate(prompts, max_new_tokens=8) == generate(model, prompts, max_new_tokens=8)


# ---------------------------------------------------------------- the real default model

@pytest.mark.slow
def test_real_model_matches_hf_generate_and_is_batch_invariant(tmp_path):
    from transformer2.generation import chat_prompts
    from transformer2.models import load_base, prepare_model

    prepare_model("builtin:smollm2-135m-instruct", tmp_path)
    model, tokenizer, _ = load_base(tmp_path)
    docs = [{"question": q} for q in ("Tom has 3 apples and buys 5 more. How many now?", "What is 12 * 12?",
                                      "A train goes 60 km in 1.5 hours. What is its speed?", "Is 91 prime?")]
    prompts = encode(tokenizer, chat_prompts(tokenizer, "gsm8k", docs))
    got, seen = logits_by_row(model=model, prompts=prompts, max_new_tokens=24, stop_ids=[tokenizer.eos_token_id],
                              pad_id=tokenizer.pad_token_id)
    assert got == hf_greedy(model, tokenizer, prompts, 24, batched=True)
    assert got == hf_greedy(model, tokenizer, prompts, 24)
    for i, p in enumerate(prompts):
        alone = logits_by_row(model=model, prompts=[p], max_new_tokens=24, stop_ids=[tokenizer.eos_token_id])[1][0]
        assert_same_steps(seen[i], alone, model, i)


def test_a_peft_lora_model_in_training_mode_decodes_like_hf_in_eval_mode():
    """The LoRA baseline validates a PeftModel mid-training: dropout off while decoding, mode restored."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = build_tiny_random("llama", seed=5)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                  target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = chat_and_plain(tokenizer)[:4]
    peft_model.train()
    got = generate(peft_model, prompts, max_new_tokens=10)
    assert peft_model.training
    peft_model.eval()
    assert got == hf_greedy(peft_model, tokenizer, prompts, 10, batched=True)
