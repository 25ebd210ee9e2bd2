"""Few-shot CEM: the search, per-sample mixed z, batched vs naive population fitness, the strategy."""
import json

import pytest
import torch

from transformer2.cem import (CEM, CEMConfig, CEMError, CEMResult, Fitness, alpha_shape, cem_search, draw_shots,
                              few_shot_cem, population_fitness, population_z)
from transformer2.strategies import FewShotStrategy, StrategyError
from transformer2.models import build_tiny_random, fingerprint
from transformer2.svd import decompose, load_factors
from transformer2.svf import Expert, SVFConfig, apply_svf, find_targets, mix_experts, set_expert, set_row_z, svf_layers

from .conftest import saved_random_experts

ARC = [{"id": f"a{i}", "question": q, "choices": {"text": t, "label": lab}, "answerKey": key}
       for i, (q, t, lab, key) in enumerate([
           ("Which is a liquid?", ["rock", "water", "ice"], ["A", "B", "C"], "B"),
           ("What do plants need?", ["light", "sand", "noise", "plastic"], ["A", "B", "C", "D"], "A"),
           ("Which is hot?", ["snow", "fire", "ice", "rain"], ["1", "2", "3", "4"], "2"),
       ])]
GSM = [{"question": "Tom has 3 apples and buys 2 more. How many?", "answer": "3+2=5\n#### 5"},
       {"question": "What is 10 - 4?", "answer": "10-4=6\n#### 6"}]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cem")
    model, tokenizer = build_tiny_random("llama", seed=0)
    model.eval()
    # an untied random head: with tied embeddings the tiny model only ever repeats the last token,
    # so greedy answers would not depend on the mix and the generation check would prove nothing
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(0.5 * torch.randn(model.lm_head.weight.shape,
                                                                generator=torch.Generator().manual_seed(0)))
    fp = fingerprint(model)
    decompose(model, find_targets(model, "mlp"), root / "svd", fp)
    apply_svf(model, load_factors(root / "svd", fp), SVFConfig())
    experts = []
    for k in range(3):
        g = torch.Generator().manual_seed(100 + k)
        experts.append(Expert({n: 3.0 * torch.randn(layer.rank, generator=g) for n, layer in svf_layers(model).items()},
                              fp, SVFConfig(), {"task": f"e{k}"}))
    return model, tokenizer, experts


# ---------------------------------------------------------------- the search

def _distance_fitness(target):
    def evaluate(alphas):
        d = ((alphas - target) ** 2).reshape(alphas.shape[0], -1).sum(1)
        return Fitness(accuracy=-d, loglik=torch.zeros_like(d))
    return evaluate


@pytest.mark.parametrize("shape", [(3,), (3, 4)])
def test_cem_finds_the_optimum_of_a_synthetic_fitness(shape):
    target = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    cfg = CEMConfig(population=32, elite_ratio=0.2, generations=30, seed=3)
    cem = cem_search(_distance_fitness(target), shape, cfg)
    assert cem.best_alpha.shape == shape
    assert (cem.best_alpha - target).abs().max() < 0.05
    assert len(cem.history) == 30 and cem.history[-1]["best_so_far_accuracy"] >= cem.history[0]["best_accuracy"]
    again = cem_search(_distance_fitness(target), shape, cfg)  # seeded: the same run
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert torch.equal(again.best_alpha, cem.best_alpha) and strip(again.history) == strip(cem.history)


def test_cem_population_respects_bounds_initial_mean_and_keeps_the_best():
    cfg = CEMConfig(population=256, init_std=0.5, seed=0)
    cem = CEM((4,), cfg)
    pop = cem.ask()
    assert pop.shape == (256, 4) and pop.min() >= 0 and pop.max() <= 1
    assert torch.allclose(cem.mean, torch.full((4,), 0.25)) and torch.allclose(cem.std, torch.full((4,), 0.5))
    acc = torch.zeros(256)
    acc[7] = 1.0  # one candidate better than the rest
    cem.tell(pop, Fitness(acc, torch.zeros(256)))
    assert torch.equal(cem.best_alpha, pop[7]) and torch.equal(cem.ask()[0], pop[7])


def test_ties_in_accuracy_are_broken_by_loglik():
    target = torch.tensor([0.9, 0.1, 0.5])

    def evaluate(alphas):
        d = ((alphas - target) ** 2).sum(1)
        return Fitness(accuracy=torch.full_like(d, 0.5), loglik=-d)  # every candidate ties in accuracy

    cem = cem_search(evaluate, (3,), CEMConfig(population=32, generations=25, seed=0))
    assert (cem.best_alpha - target).abs().max() < 0.05
    f = Fitness(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([-2.0, -1.0, 5.0]))
    assert f.order() == [1, 0, 2]


class _Killed(Exception):
    pass


def _kill_at(generation):
    def progress(record):
        if record["generation"] == generation:
            raise _Killed  # after the checkpoint of that generation, as a SIGKILL would find it
    return progress


def _without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path):
    target = torch.tensor([0.2, 0.7, 0.4])
    cfg = CEMConfig(population=8, generations=6, seed=2)
    clean = cem_search(_distance_fitness(target), (3,), cfg)
    with pytest.raises(_Killed):
        cem_search(_distance_fitness(target), (3,), cfg, _kill_at(2), run_dir=tmp_path, run_id="r")
    resumed = cem_search(_distance_fitness(target), (3,), cfg, run_dir=tmp_path, resume=True, run_id="r")
    assert resumed.resumed_from == 3 and clean.resumed_from == 0
    assert torch.equal(resumed.best_alpha, clean.best_alpha) and resumed.best_key == clean.best_key
    assert _without_seconds(resumed.history) == _without_seconds(clean.history)
    assert resumed.seconds >= sum(r["seconds"] for r in resumed.history[:3])
    # a finished run's checkpoint resumes to the same result without evaluating anything
    def never(alphas):
        raise AssertionError("a finished search evaluated again")
    done = cem_search(never, (3,), cfg, run_dir=tmp_path, resume=True, run_id="r")
    assert done.resumed_from == 6 and torch.equal(done.best_alpha, clean.best_alpha)


@pytest.mark.parametrize("change", ["run_id", "config"])
def test_checkpoint_of_another_run_is_not_resumed(tmp_path, change, capsys):
    target = torch.tensor([0.2, 0.7, 0.4])
    cfg = CEMConfig(population=8, generations=4, seed=2)
    with pytest.raises(_Killed):
        cem_search(_distance_fitness(target), (3,), cfg, _kill_at(1), run_dir=tmp_path, run_id="r")
    other = CEMConfig(population=8, generations=4, seed=3) if change == "config" else cfg
    run_id = "other" if change == "run_id" else "r"
    fresh = cem_search(_distance_fitness(target), (3,), other, run_dir=tmp_path, resume=True, run_id=run_id)
    assert fresh.resumed_from == 0 and len(fresh.history) == 4
    assert "belongs to a different CEM run" in capsys.readouterr().out


KILL_SCRIPT = """
import os, signal, sys, torch
from transformer2.cem import CEMConfig, Fitness, cem_search

kill_at, run_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
target = torch.tensor([0.2, 0.7, 0.4])
def evaluate(alphas):
    d = ((alphas - target) ** 2).sum(1)
    return Fitness(accuracy=-d, loglik=torch.zeros_like(d))
def progress(record):
    if record["generation"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
cem = cem_search(evaluate, (3,), CEMConfig(population=8, generations=5, seed=4), progress, run_dir=run_dir,
                 resume=True, run_id="kill")
torch.save({"alpha": cem.best_alpha, "history": cem.history, "resumed_from": cem.resumed_from}, out)
"""


def test_sigkill_then_resume_matches_uninterrupted_search(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from .conftest import ROOT

    script = tmp_path / "search.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda kill_at, name: subprocess.run(  # noqa: E731
        [sys.executable, str(script), str(kill_at), str(tmp_path / name), str(tmp_path / f"{name}.pt")],
        env=env, capture_output=True, text=True, timeout=120)
    assert run(-1, "clean").returncode == 0
    assert run(2, "killed").returncode == -signal.SIGKILL and not (tmp_path / "killed.pt").exists()
    resumed = run(-1, "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = torch.load(tmp_path / "clean.pt"), torch.load(tmp_path / "killed.pt")
    assert a["resumed_from"] == 0 and b["resumed_from"] == 3
    assert torch.equal(a["alpha"], b["alpha"]) and _without_seconds(a["history"]) == _without_seconds(b["history"])


# ---------------------------------------------------------------- per-sample mixed z

def test_population_z_is_mix_experts_row_by_row(tiny):
    _, _, experts = tiny
    for shape in ((5, 3), (5, 3, len(experts[0].vectors))):
        alphas = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        zpop = population_z(experts, alphas)
        for p in range(shape[0]):
            mixed = mix_experts(experts, alphas[p])
            for name, z in zpop.items():
                assert torch.equal(z[p], mixed.vectors[name])
    with pytest.raises(CEMError, match="alphas must be"):
        population_z(experts, torch.rand(2, 4))


def test_per_sample_mixed_z_matches_rebuilt_mixed_weights(tiny):
    model, _, experts = tiny
    alphas = torch.rand(4, 3, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 250, (4, 9), generator=torch.Generator().manual_seed(3))
    set_row_z(model, population_z(experts, alphas))
    with torch.no_grad():
        batched = model(ids).logits
    for p in range(4):
        set_expert(model, mix_experts(experts, alphas[p]))  # W' rebuilt for this mix
        with torch.no_grad():
            alone = model(ids[p:p + 1]).logits[0]
        assert torch.allclose(batched[p], alone, atol=1e-4, rtol=1e-4)
    set_expert(model, None)


# ---------------------------------------------------------------- batched vs naive fitness

@pytest.mark.parametrize("task,shots", [("arc_challenge", ARC), ("gsm8k", GSM)])
def test_batched_population_fitness_equals_naive_loop(tiny, task, shots, monkeypatch):
    from transformer2 import cem

    model, tokenizer, experts = tiny
    texts = {}

    def parity_score(task, docs, completions, **kw):  # random-model answers are never right: a text-dependent proxy
        texts.setdefault(len(texts), list(completions))
        return [sum(map(ord, c)) % 2 == 0 for c in completions]

    monkeypatch.setattr(cem, "score_batch", parity_score)
    alphas = torch.rand(5, 3, generator=torch.Generator().manual_seed(4))
    alphas[0] = torch.tensor([1.0, 0.0, 0.0])  # pure expert 0 ...
    alphas[1] = 0.0  # ... and all-zero α (f(0) everywhere) are candidates too
    kw = dict(batch_size=4, max_new_tokens=5)
    batched = population_fitness(model, tokenizer, experts, task, shots, alphas, method="batched", **kw)
    naive = population_fitness(model, tokenizer, experts, task, shots, alphas, method="naive", **kw)
    assert torch.equal(batched.accuracy, naive.accuracy)
    assert torch.allclose(batched.loglik, naive.loglik, atol=1e-4)
    assert batched.order() == naive.order()
    assert len(set(batched.loglik.tolist())) > 1  # the mixes do differ
    if task == "gsm8k":  # the same greedy answers: batched rows are shot-major, the naive loop candidate-major
        P, k = alphas.shape[0], len(shots)
        assert [texts[0][s * P + p] for p in range(P) for s in range(k)] == [t for i in range(1, P + 1)
                                                                            for t in texts[i]]
        assert len(set(texts[0])) > 1 and 0 < float(batched.accuracy.mean()) < 1
    assert all(layer.z is None for layer in svf_layers(model).values())  # state restored


def test_few_shot_cem_resumes_only_its_own_run(tiny, tmp_path):
    """The checkpoint names experts, shots and decoding settings: other ones start afresh."""
    model, tokenizer, experts = tiny
    named = {f"e{k}": e for k, e in enumerate(experts)}
    cfg = CEMConfig(population=4, generations=3, seed=1)
    clean = few_shot_cem(model, tokenizer, named, "arc_challenge", ARC[:2], cfg, batch_size=8)
    with pytest.raises(_Killed):
        few_shot_cem(model, tokenizer, named, "arc_challenge", ARC[:2], cfg, batch_size=8,
                     progress=_kill_at(0), run_dir=tmp_path)
    resumed = few_shot_cem(model, tokenizer, named, "arc_challenge", ARC[:2], cfg, batch_size=8, run_dir=tmp_path,
                           resume=True)
    assert resumed.resumed_from == 1 and resumed.alpha == clean.alpha
    assert _without_seconds(resumed.history) == _without_seconds(clean.history)
    other_shots = few_shot_cem(model, tokenizer, named, "arc_challenge", ARC[1:], cfg, batch_size=8,
                               run_dir=tmp_path, resume=True)
    swapped = dict(reversed(list(named.items())))
    other_experts = few_shot_cem(model, tokenizer, swapped, "arc_challenge", ARC[:2], cfg, batch_size=8,
                                 run_dir=tmp_path, resume=True)
    assert other_shots.resumed_from == 0 and other_experts.resumed_from == 0


def test_few_shot_cem_result_roundtrip_and_mixed_expert(tiny, tmp_path):
    model, tokenizer, experts = tiny
    named = {f"e{k}": e for k, e in enumerate(experts)}
    cfg = CEMConfig(population=4, generations=2, per_matrix=True, seed=1)
    res = few_shot_cem(model, tokenizer, named, "arc_challenge", ARC[:2], cfg, batch_size=8)
    assert len(res.history) == 2 and res.keys == ["e0", "e1", "e2"] and res.shots == 2
    assert torch.tensor(res.alpha).shape == alpha_shape(experts, True)
    path = res.save(tmp_path / "out")
    assert json.loads(path.read_text())["keys"] == res.keys
    back = CEMResult.load(tmp_path / "out")
    assert back == res
    mixed = back.mixed(named)
    ref = mix_experts(experts, torch.tensor(res.alpha))
    assert all(torch.equal(mixed.vectors[n], ref.vectors[n]) for n in ref.vectors)
    shots, rest = draw_shots(list(range(10)), 3, seed=0)
    assert len(shots) == 3 and len(rest) == 7 and not set(shots) & set(rest)


# ---------------------------------------------------------------- through the lm-eval model

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def lm_setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cem_lm")
    setup = saved_random_experts(tiny_model_dir, root, {"gsm8k": 20, "mbpp": 21, "arc_easy": 22})
    data = root / "data" / "arc_challenge"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ARC))
    return {**setup, "data": str(root / "data")}


def _ll(ctx, cont):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)


def test_few_shot_strategy_fixed_alpha_and_lazy_cem(lm_setup):
    from transformer2.harness import Transformer2LM

    reqs = [_ll(c, cont) for c in ("Question one:", "Question two:") for cont in (" A", " B")]
    lm = Transformer2LM(pretrained=lm_setup["model"], svd=lm_setup["svd"], experts=lm_setup["experts"],
                        strategy="few_shot", strategy_args={"alpha": [0.2, 0.5, 0.3]}, device="cpu", batch_size=4)
    got = lm.loglikelihood(reqs)
    order = ["gsm8k", "mbpp", "arc_easy"]
    lm.use_expert(mix_experts([lm.experts[k] for k in order], torch.tensor([0.2, 0.5, 0.3])))
    assert got == lm.loglikelihood(reqs)

    lazy = Transformer2LM(pretrained=lm_setup["model"], svd=lm_setup["svd"], experts=lm_setup["experts"],
                          strategy="few_shot", device="cpu", batch_size=4,
                          strategy_args={"task": "arc_challenge", "data_root": lm_setup["data"], "shots": 2,
                                         "population": 4, "generations": 1})
    assert isinstance(lazy.strategy, FewShotStrategy) and lazy.strategy.result is None
    lazy.loglikelihood(reqs)
    res = lazy.strategy.result
    assert res is not None and res.shots == 2 and lazy.stats.first_pass_s > 0 and lazy.stats.second_pass_s > 0
    lazy.loglikelihood(reqs)  # CEM runs once
    assert lazy.strategy.result is res
    with pytest.raises(StrategyError, match="test split"):
        Transformer2LM(pretrained=lm_setup["model"], svd=lm_setup["svd"], experts=lm_setup["experts"],
                       strategy="few_shot", device="cpu",
                       strategy_args={"task": "arc_challenge", "data_root": lm_setup["data"], "split": "test"})


def test_cem_result_saves_alpha_tensor_and_json(tmp_path):
    from safetensors import safe_open

    result = CEMResult(alpha=[0.25, 0.75], keys=["gsm8k", "mbpp"], accuracy=0.5, loglik=-1.0, task="math", shots=3)
    result.save(tmp_path / "cem")
    assert CEMResult.load(tmp_path / "cem") == result
    with safe_open(str(tmp_path / "cem" / "alpha.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("alpha"), torch.tensor([0.25, 0.75]))
        assert json.loads(f.metadata()["keys"]) == ["gsm8k", "mbpp"]
