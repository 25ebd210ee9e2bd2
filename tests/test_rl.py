import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from transformer2.adapters import SVFAdapter
from transformer2.generation import chat_prompts, rollout
from transformer2.models import build_tiny_random, fingerprint
from transformer2.rl import RLObjectiveConfig, completion_logits, kl_to_base, reinforce_objective, token_logprobs
from transformer2.svd import decompose, load_factors
from transformer2.svf import SVFConfig, apply_svf, find_targets, init_expert, svf_layers
from transformer2.training import LoopConfig, batch_indices, fit

DOCS = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]]


def svf_model(tmp_path, arch="llama"):
    model, tokenizer = build_tiny_random(arch)
    fp = fingerprint(model)
    decompose(model, find_targets(model, "mlp"), tmp_path, fp)
    config = SVFConfig(targets="mlp")
    apply_svf(model, load_factors(tmp_path, fp), config)
    return model, tokenizer, init_expert(model, fp, config, torch.Generator().manual_seed(0))


def test_rollout_masks_stop_at_first_eos(tmp_path):
    model, tokenizer, _ = svf_model(tmp_path)
    ro = rollout(model, tokenizer, chat_prompts(tokenizer, "gsm8k", DOCS[:3]), max_new_tokens=6)
    C = ro.input_ids.shape[1] - ro.prompt_length
    assert 1 <= C <= 6
    comp = ro.completion_mask[:, ro.prompt_length:]
    assert ro.completion_mask[:, :ro.prompt_length].sum() == 0
    for row, ids in zip(comp, ro.input_ids[:, ro.prompt_length:]):
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any()  # a prefix, never holes
        eos = (ids == tokenizer.eos_token_id).nonzero()
        if len(eos):
            assert n == int(eos[0]) + 1


def test_logprobs_match_a_plain_forward(tmp_path):
    model, tokenizer, _ = svf_model(tmp_path)
    ro = rollout(model, tokenizer, chat_prompts(tokenizer, "gsm8k", DOCS[:2]), max_new_tokens=5)
    with torch.no_grad():
        logp, mask = token_logprobs(completion_logits(model, ro), ro)
        full = torch.log_softmax(model(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits.float(), -1)
    P = ro.prompt_length
    ref = full[:, P - 1:-1].gather(-1, ro.input_ids[:, P:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logp * mask, ref * mask, atol=1e-4)


def test_kl_is_zero_for_identical_and_positive_otherwise():
    logits = torch.randn(2, 3, 11)
    mask = torch.ones(2, 3)
    assert kl_to_base(logits, logits, mask).abs() < 1e-6
    assert kl_to_base(logits, logits + torch.randn(2, 3, 11), mask) > 0


def test_reinforce_step_direction(tmp_path, monkeypatch):
    """A positive reward raises the log-prob of the sampled answer; a negative one lowers it."""
    model, tokenizer, expert = svf_model(tmp_path)
    for reward in (True, False):
        adapter = SVFAdapter(model, expert)
        monkeypatch.setattr("transformer2.tasks.score_batch", lambda task, docs, texts, **k: [reward] * len(texts))
        objective = reinforce_objective(model, tokenizer, adapter, "gsm8k", RLObjectiveConfig(max_new_tokens=4))
        ro = rollout(model, tokenizer, chat_prompts(tokenizer, "gsm8k", DOCS[:2]), max_new_tokens=4)

        def seq_logp():
            with torch.no_grad():
                lp, m = token_logprobs(completion_logits(model, ro), ro)
            return float((lp * m).sum())

        before = seq_logp()
        metrics = objective(DOCS[:2])
        assert metrics["reward"] == (1.0 if reward else -1.0)
        with torch.no_grad():
            for z in adapter.trainable():
                z -= 0.5 * z.grad  # one plain gradient step
        assert (seq_logp() > before) == reward


def test_kl_penalty_uses_base_weights(tmp_path, monkeypatch):
    model, tokenizer, expert = svf_model(tmp_path)
    expert.vectors = {k: v + 2 * torch.randn_like(v) for k, v in expert.vectors.items()}
    adapter = SVFAdapter(model, expert)
    monkeypatch.setattr("transformer2.tasks.score_batch", lambda task, docs, texts, **k: [False] * len(texts))
    objective = reinforce_objective(model, tokenizer, adapter, "gsm8k", RLObjectiveConfig(kl_coef=0.5, max_new_tokens=4))
    assert objective(DOCS[:2])["kl"] > 0
    assert all(layer.z is adapter.live[name] for name, layer in svf_layers(model).items())  # restored


def test_batches_cover_epochs_deterministically():
    seen = [i for step in range(3) for i in batch_indices(step, 4, 6, seed=1)]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:12]) == list(range(6))
    assert seen == [i for step in range(3) for i in batch_indices(step, 4, 6, seed=1)]
    assert seen != [i for step in range(3) for i in batch_indices(step, 4, 6, seed=2)]


def test_fit_keeps_best_and_only_trains_z(tmp_path):
    model, tokenizer, expert = svf_model(tmp_path / "svd")
    adapter = SVFAdapter(model, expert)
    before = {n: p.clone() for n, p in model.named_parameters()}
    objective = reinforce_objective(model, tokenizer, adapter, "gsm8k", RLObjectiveConfig(max_new_tokens=4))
    scores = iter([0.5, 0.25, 0.75, 0.5])
    result = fit(adapter, objective, lambda: next(scores), DOCS, LoopConfig(steps=3, batch_size=2, eval_every=1,
                 grad_clip=1.0, lr=0.05), tmp_path / "run")
    assert result.base_val_accuracy == 0.5 and result.best_step == 2 and result.best_val_accuracy == 0.75
    assert [v["step"] for v in result.validations] == [0, 1, 2, 3]
    assert len(result.history) == 3 and all("grad_norm" in h for h in result.history)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(result.best_state[k], expert.vectors[k]) for k in expert.vectors)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_rl import DOCS, svf_model
    from transformer2.adapters import SVFAdapter
    from transformer2.rl import RLObjectiveConfig, reinforce_objective
    from transformer2.training import LoopConfig, fit
    from pathlib import Path

    kill_at, out = int(sys.argv[1]), Path(sys.argv[2])
    model, tokenizer, expert = svf_model(out / "svd")
    adapter = SVFAdapter(model, expert)
    objective = reinforce_objective(model, tokenizer, adapter, "gsm8k",
                                    RLObjectiveConfig(max_new_tokens=4, do_sample=True))
    calls = iter(range(1000))
    validate = lambda: float(torch.rand(()).item())  # consumes RNG, like a sampled evaluation would
    def progress(m):
        if m["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = LoopConfig(steps=5, batch_size=2, eval_every=2, checkpoint_every=1, lr=0.05, grad_clip=1.0, seed=3)
    result = fit(adapter, objective, validate, DOCS, cfg, out / "run", resume=True, progress=progress)
    torch.save({{"best": result.best_state, "final": adapter.state(), "step": result.best_step,
                "resumed_from": result.resumed_from}}, out / "result.pt")
""")


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    from .conftest import ROOT

    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda kill_at, out: subprocess.run([sys.executable, str(script), str(kill_at), str(out)], env=env,
                                              capture_output=True, text=True, timeout=300)
    clean = run(0, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = run(3, tmp_path / "killed")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "result.pt").exists()
    resumed = run(0, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "clean" / "result.pt")
    b = torch.load(tmp_path / "killed" / "result.pt")
    assert b["resumed_from"] == 3 and a["resumed_from"] == 0
    assert a["step"] == b["step"]
    for key in ("best", "final"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
