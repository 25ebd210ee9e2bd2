"""What gives a small model a learning signal, and what shows whether it got one: k samples per
prompt with a baseline, how far an expert moved, and the interval of each validation."""
import pytest
import torch

from transformer2.adapters import SVFAdapter
from transformer2.config import ConfigError, parse_params
from transformer2.generation import chat_prompts, rollout
from transformer2.models import TINY_ARCHS
from transformer2.rl import advantages, completion_logits, reinforce_objective, token_logprobs
from transformer2.settings import LoopConfig, RLObjectiveConfig
from transformer2.stats import wilson_interval
from transformer2.svd import load_factors, load_singular_values
from transformer2.svf import Expert, ExpertError, expert_movement
from transformer2.training import fit, with_interval

from .test_rl import DOCS, svf_model
from .test_training import VectorAdapter, _objective


def test_advantages_per_baseline():
    r = torch.tensor([[1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    assert torch.equal(advantages(r, "none"), r)
    assert torch.allclose(advantages(r, "mean"), torch.tensor([[1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]))
    # leave-one-out: r_j − mean of the other three
    assert torch.allclose(advantages(r, "rloo"), torch.tensor([[2.0, -2 / 3, -2 / 3, -2 / 3], [0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError):
        advantages(r[:, :1], "rloo")
    # batch: r − mean of the step's other seven rewards; the all-wrong prompt keeps a negative advantage
    assert torch.allclose(advantages(r, "batch"), torch.where(r > 0, torch.tensor(2.0), torch.tensor(-2 / 7)))
    assert torch.equal(advantages(r[:1, :1], "batch"), r[:1, :1])  # one sample: nothing to compare with


def test_objective_config_rejects_settings_without_signal():
    with pytest.raises(ValueError, match="do_sample"):
        RLObjectiveConfig(samples_per_prompt=4)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        RLObjectiveConfig(baseline="mean")
    with pytest.raises(ValueError, match="baseline"):
        RLObjectiveConfig(baseline="median", samples_per_prompt=2, do_sample=True)
    RLObjectiveConfig(samples_per_prompt=4, do_sample=True, baseline="rloo")
    RLObjectiveConfig(baseline="batch")  # one greedy sample per prompt, compared across prompts


@pytest.mark.parametrize("section,changes,error", [
    ("rl", {"samples_per_prompt": 4}, "rl.samples_per_prompt: .*need do_sample: true"),
    ("classifier", {"samples_per_prompt": 2}, "classifier.samples_per_prompt: .*need do_sample: true"),
    ("rl", {"baseline": "rloo"}, "rl.samples_per_prompt: .*baseline: rloo needs samples_per_prompt >= 2"),
    ("rl", {"baseline": "median"}, "rl.baseline: Input should be 'none', 'mean', 'rloo' or 'batch'"),
    ("rl", {"overrides": {"gsm8k": {"samples_per_prompt": 4}}},
     "rl.overrides: .*gsm8k.samples_per_prompt: .*do_sample"),
    ("rl", {"do_sample": True, "samples_per_prompt": 4, "overrides": {"mbpp": {"do_sample": False}}},
     "rl.overrides: .*mbpp.samples_per_prompt"),
])
def test_config_names_the_key_of_a_signal_free_setting(section, changes, error):
    with pytest.raises(ConfigError, match=error):
        parse_params({section: changes})


def test_config_builds_the_objective_per_task():
    p = parse_params({"rl": {"do_sample": True, "overrides": {"gsm8k": {"samples_per_prompt": 4, "baseline": "rloo"}}}})
    cfg = p.rl.for_task("gsm8k").objective_config()
    assert (cfg.samples_per_prompt, cfg.baseline, cfg.do_sample) == (4, "rloo", True)
    mbpp = p.rl.for_task("mbpp").objective_config()
    assert (mbpp.samples_per_prompt, mbpp.baseline) == (1, "none")


def test_k_samples_of_a_step_go_through_one_rollout(tmp_path, monkeypatch):
    import transformer2.rl as rl

    model, tokenizer, expert = svf_model(tmp_path)
    adapter = SVFAdapter(model, expert)
    calls = []

    def spy(model, tokenizer, prompts, **kw):
        calls.append(list(prompts))
        return rollout(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(rl, "rollout", spy)
    # per prompt, the first of its k samples is right: mixed rewards everywhere
    monkeypatch.setattr("transformer2.tasks.score_batch",
                        lambda task, docs, texts, **k: [i % 3 == 0 for i in range(len(texts))])
    cfg = RLObjectiveConfig(max_new_tokens=3, do_sample=True, samples_per_prompt=3, baseline="rloo", micro_batch_size=7)
    m = reinforce_objective(model, tokenizer, adapter, "gsm8k", cfg)(DOCS[:4])
    prompts = chat_prompts(tokenizer, "gsm8k", DOCS[:4])
    assert calls == [[p for p in prompts for _ in range(3)]]  # chunks of 7 // 3 = 2 prompts learn from it
    assert m["samples"] == 12 and m["reward"] == pytest.approx(-1 / 3) and m["accuracy"] == pytest.approx(1 / 3)
    assert m["mixed_reward_fraction"] == 1.0 and m["nonzero_advantage_fraction"] == 1.0
    assert m["mean_abs_advantage"] == pytest.approx(4 / 3)  # rewards (1, −1, −1) per prompt: |A| = 2, 1, 1
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in adapter.trainable())


def test_uniform_rewards_give_no_signal_with_a_baseline(tmp_path, monkeypatch):
    model, tokenizer, expert = svf_model(tmp_path)
    adapter = SVFAdapter(model, expert)
    monkeypatch.setattr("transformer2.tasks.score_batch", lambda task, docs, texts, **k: [False] * len(texts))
    cfg = RLObjectiveConfig(max_new_tokens=3, do_sample=True, samples_per_prompt=2, baseline="mean")
    m = reinforce_objective(model, tokenizer, adapter, "gsm8k", cfg)(DOCS[:2])
    assert m["reward"] == -1 and m["mixed_reward_fraction"] == 0 and m["mean_abs_advantage"] == 0
    assert all(z.grad is None or z.grad.abs().sum() == 0 for z in adapter.trainable())


def test_the_entropy_bonus_is_the_only_gradient_when_rewards_are_uniform(tmp_path, monkeypatch):
    """A collapsed policy (all k rewards equal) gets no policy gradient; with β > 0 the gradient is
    β · ∇ mean entropy, and a small step along it spreads the answers (entropy rises)."""
    from transformer2.rl import mean_entropy

    model, tokenizer, expert = svf_model(tmp_path)
    adapter = SVFAdapter(model, expert)
    monkeypatch.setattr("transformer2.tasks.score_batch", lambda task, docs, texts, **k: [False] * len(texts))
    cfg = RLObjectiveConfig(max_new_tokens=4, do_sample=True, samples_per_prompt=2, baseline="rloo", entropy_coef=0.5)
    m = reinforce_objective(model, tokenizer, adapter, "gsm8k", cfg)(DOCS[:2])
    assert m["mixed_reward_fraction"] == 0 and m["entropy"] > 0
    grads = {n: z.grad.clone() for n, z in adapter.live.items()}
    assert any(g.abs().sum() > 0 for g in grads.values())
    with adapter.inference():
        ro = rollout(model, tokenizer, [p for p in chat_prompts(tokenizer, "gsm8k", DOCS[:2]) for _ in range(2)],
                     max_new_tokens=4, do_sample=True)

    def entropy() -> float:
        with torch.no_grad():
            logits = completion_logits(model, ro)
            return float(mean_entropy(logits, token_logprobs(logits, ro)[1]))

    before = entropy()
    with torch.no_grad():
        for n, z in adapter.live.items():
            z -= 1e-2 * grads[n] / max(g.norm() for g in grads.values())  # descend the loss −β·H
    assert entropy() > before
    off = reinforce_objective(model, tokenizer, adapter, "gsm8k", RLObjectiveConfig(
        max_new_tokens=4, do_sample=True, samples_per_prompt=2, baseline="rloo"))(DOCS[:2])
    assert off["entropy"] > 0  # measured (without a gradient) when β = 0


def test_the_batch_baseline_sees_every_chunk_of_the_step(tmp_path, monkeypatch):
    """baseline: batch compares a sample with the whole step, not its chunk: one prompt per chunk
    gives the gradient of one chunk holding all three, and A = r − mean of the other rewards."""
    model, tokenizer, expert = svf_model(tmp_path)
    adapter = SVFAdapter(model, expert)
    metrics = {}

    def score(task, docs, texts, **k):  # the first doc is right, the others wrong, whatever the chunk
        return [docs[i] is DOCS[0] for i in range(len(texts))]

    monkeypatch.setattr("transformer2.tasks.score_batch", score)
    grads = []
    for micro in (1, 3):
        for z in adapter.trainable():
            z.grad = None
        m = reinforce_objective(model, tokenizer, adapter, "gsm8k",
                                RLObjectiveConfig(max_new_tokens=4, baseline="batch", micro_batch_size=micro))(DOCS[:3])
        grads.append({n: z.grad.clone() for n, z in adapter.live.items()})
        metrics[micro] = m
    # rewards (1, −1, −1): A = 1 − (−2)/2 = 2, −1 − 0/2 = −1, −1
    assert all(v["mean_abs_advantage"] == pytest.approx(4 / 3) and v["nonzero_advantage_fraction"] == 1.0
               for v in metrics.values())
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_prompt_shared_by_its_k_samples_gives_the_plain_forwards_logits_and_gradients(tmp_path, arch):
    """completion_logits(copies=k) runs each prompt once and repeats its KV cache: the same
    log-probs and z-gradients as k full forwards, to float rounding (k = 3; chunk of 2 prompts
    with different lengths, so left padding and ragged answers are covered)."""
    model, tokenizer, expert = svf_model(tmp_path, arch)
    adapter = SVFAdapter(model, expert)
    prompts = [p for p in chat_prompts(tokenizer, "gsm8k", [DOCS[0], {**DOCS[1], "question": "Why " * 9}])
               for _ in range(3)]
    with adapter.inference():
        ro = rollout(model, tokenizer, prompts, max_new_tokens=5, do_sample=True)
    assert ro.attention_mask[:, 0].sum() < len(prompts)  # left padding present
    result = {}
    for copies in (1, 3):
        for z in adapter.trainable():
            z.grad = None
        logp, mask = token_logprobs(completion_logits(model, ro, copies), ro)
        (logp * mask).sum().backward()
        result[copies] = (logp * mask, {n: z.grad.clone() for n, z in adapter.live.items()})
    assert torch.allclose(result[1][0], result[3][0], atol=1e-5)
    for n in result[1][1]:
        assert torch.allclose(result[1][1][n], result[3][1][n], atol=1e-5, rtol=1e-4), n
    with pytest.raises(ValueError, match="consecutive copies"):
        completion_logits(model, ro, 2)


def test_rows_of_a_rollout_drop_columns_padded_in_all_of_them(tmp_path):
    model, tokenizer, _ = svf_model(tmp_path)
    docs = [DOCS[0], {**DOCS[1], "question": "Why " * 9}]
    ro = rollout(model, tokenizer, chat_prompts(tokenizer, "gsm8k", docs), max_new_tokens=4)
    short = ro.rows(0, 1)
    n = int(ro.attention_mask[0].sum())
    assert short.input_ids.shape[1] == n and short.attention_mask.all()
    P = short.prompt_length
    assert torch.equal(short.input_ids[0, :P], ro.input_ids[0, ro.prompt_length - P:ro.prompt_length])
    assert short.completion_tokens == int(ro.completion_mask[0].sum()) and short.texts == ro.texts[:1]
    assert torch.equal(ro.rows(0, 2).input_ids, ro.input_ids) and ro.rows(0, 2).prompt_length == ro.prompt_length


def test_one_greedy_sample_without_baseline_is_the_reference_estimator(tmp_path, monkeypatch):
    """k = 1, baseline none: the gradient of −mean_i r_i Σ_t log π(y_it), exactly as before."""
    model, tokenizer, expert = svf_model(tmp_path)
    adapter = SVFAdapter(model, expert)
    verdicts = [True, False, False]
    monkeypatch.setattr("transformer2.tasks.score_batch", lambda task, docs, texts, **k: verdicts[:len(texts)])
    reinforce_objective(model, tokenizer, adapter, "gsm8k", RLObjectiveConfig(max_new_tokens=4))(DOCS[:3])
    got = {n: z.grad.clone() for n, z in adapter.live.items()}
    for z in adapter.trainable():
        z.grad = None
    with adapter.inference():
        ro = rollout(model, tokenizer, chat_prompts(tokenizer, "gsm8k", DOCS[:3]), max_new_tokens=4)
    logp, mask = token_logprobs(completion_logits(model, ro), ro)
    r = torch.tensor([1.0, -1.0, -1.0])
    (-((logp * mask).sum(1) * r).mean()).backward()
    for n, z in adapter.live.items():
        assert torch.allclose(got[n], z.grad, atol=1e-6, rtol=1e-4), n


def test_expert_movement_on_a_tiny_model(tmp_path):
    model, tokenizer, z0 = svf_model(tmp_path)
    sigma = load_singular_values(tmp_path)
    assert all(torch.equal(sigma[n], S) for n, (_, S, _) in load_factors(tmp_path).items())
    still = expert_movement(z0, z0, sigma)
    assert still["z_max_abs_change"] == 0 and still["sigma_mean_rel_change_from_init"] == pytest.approx(0, abs=1e-12)
    assert still["sigma_mean_rel_change"] == still["init_sigma_mean_rel_change"] > 0  # init noise, small
    assert still["sigma_mean_rel_change"] < 0.02 and still["matrices"] == len(z0.vectors)

    name = sorted(z0.vectors)[0]
    moved = Expert({n: v.clone() for n, v in z0.vectors.items()}, z0.base_fingerprint, z0.config)
    moved.vectors[name][0] += 0.5
    m = expert_movement(moved, z0, sigma)
    assert m["z_max_abs_change"] == pytest.approx(0.5)
    assert m["z_mean_abs_change"] == pytest.approx(0.5 / sum(v.numel() for v in z0.vectors.values()))
    # by hand for the moved matrix: σ' = σ·f(z)·Σσ/Σσf(z), f = sigmoid
    S, z = sigma[name].double(), moved.vectors[name].double()
    ratio = torch.sigmoid(z) * S.sum() / (S * torch.sigmoid(z)).sum()
    others = [expert_movement(Expert({n: z0.vectors[n]}, "", z0.config), None, sigma)["sigma_mean_rel_change"]
              for n in sorted(z0.vectors)[1:]]
    assert m["sigma_mean_rel_change"] == pytest.approx(((ratio - 1).abs().mean().item() + sum(others))
                                                       / len(z0.vectors))
    assert m["sigma_max_rel_change"] >= (ratio[0] - 1).abs().item() - 1e-12
    assert m["sigma_mean_rel_change_from_init"] > 0
    with pytest.raises(ExpertError, match="singular values"):
        expert_movement(moved, z0, {})


def test_validations_carry_n_and_wilson_interval(tmp_path):
    adapter = VectorAdapter()
    scores = iter([0.5, 0.75, 0.25])
    cfg = LoopConfig(steps=2, batch_size=2, lr=0.1, grad_clip=10.0, eval_every=1)
    docs = [{"y": float(i)} for i in range(4)]
    result = fit(adapter, _objective(adapter), lambda: next(scores), docs, cfg, tmp_path, val_n=4)
    assert result.val_n == 4
    for v, k in zip(result.validations, (2, 3, 1)):
        assert v["n"] == 4 and (v["ci_low"], v["ci_high"]) == wilson_interval(k, 4)
    assert result.history[-1]["val_ci_low"] == result.validations[-1]["ci_low"]
    # a checkpoint written before intervals existed (no val_n) resumes with them filled in
    with pytest.raises(KeyboardInterrupt):
        fit(adapter, _objective(adapter, crash_at=3), lambda: 0.5, docs, LoopConfig(**{**cfg.__dict__, "steps": 3}),
            tmp_path / "old")
    resumed = fit(adapter, _objective(adapter), lambda: 0.5, docs, LoopConfig(**{**cfg.__dict__, "steps": 3}),
                  tmp_path / "old", resume=True, val_n=4)
    assert resumed.resumed_from == 2 and [v["n"] for v in resumed.validations] == [4, 4, 4, 4]
    old = {"step": 1, "val_accuracy": 0.75, "weights": "toy"}
    low, high = wilson_interval(3, 4)
    assert with_interval(old, 4) == {**old, "n": 4, "ci_low": low, "ci_high": high}
    assert with_interval(old, None) == old
    with pytest.raises(ValueError, match="val_n"):
        with_interval(old, 5)
