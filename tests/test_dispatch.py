"""Prompt dispatch: continuation scoring, the two first-pass modes, routing, the harness strategies."""
import pytest
import torch

from transformer2.dispatch import (LABEL_CONTINUATIONS, DispatchError, classification_prompts, classify_generate,
                                   classify_loglik, default_routes, route)
from transformer2.decoding import kernels
from transformer2.loglik import continuation_logprobs
from transformer2.strategies import PromptStrategy
from transformer2.svf import set_row_z
from transformer2.models import TINY_ARCHS, build_tiny_random, fingerprint
from transformer2.tasks import CATEGORIES
from transformer2.svd import decompose, load_factors
from transformer2.svf import Expert, SVFConfig, apply_svf, find_targets, set_expert, svf_layers

from .conftest import saved_random_experts

QUESTIONS = ["Write a Python function that reverses a list.", "What is 17 * 3?",
             "Which gas do plants absorb?\nOptions:\nA. oxygen\nB. carbon dioxide\n", "Hi"]



def tiny_patched(tmp_path, seed=0):
    model, tokenizer = build_tiny_random("llama", seed=seed)
    model.eval()
    fp = fingerprint(model)
    names = find_targets(model, "mlp")
    decompose(model, names, tmp_path / "svd", fp)
    apply_svf(model, load_factors(tmp_path / "svd", fp), SVFConfig())
    return model, tokenizer, fp


def random_expert(model, fp, seed, task=None) -> Expert:
    g = torch.Generator().manual_seed(seed)
    return Expert({n: 3.0 * torch.randn(layer.rank, generator=g) for n, layer in svf_layers(model).items()}, fp,
                  SVFConfig(), {"task": task or f"seed{seed}"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer, fp = tiny_patched(tmp_path_factory.mktemp("dispatch"))
    experts = {t: random_expert(model, fp, i + 1, t) for i, t in enumerate(("gsm8k", "mbpp", "arc_easy"))}
    return model, tokenizer, fp, experts


def reference_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """Σ log p(continuation | prompt), one unpadded sequence, full logits."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(p) - 1 + i, t] for i, t in enumerate(c)))


def test_continuation_logprobs_match_one_sequence_at_a_time(tiny):
    model, tokenizer, _, _ = tiny
    prompts = ["short", "a somewhat longer prompt here", "mid length one"]
    shared = list(LABEL_CONTINUATIONS)  # shared prefix "\boxed{", multi-token rests: the KV-cache path
    got = continuation_logprobs(model, tokenizer, prompts, shared, batch_size=2)
    per_prompt = [["The answer is (A", "The answer is (B", "The answer is (C"], [" yes", " no"], ["x", "xy", "xyz"]]
    got2 = continuation_logprobs(model, tokenizer, prompts, per_prompt, batch_size=3)  # one-token rests + nested
    for i, p in enumerate(prompts):
        for j, c in enumerate(shared):
            assert got.logprob[i][j] == pytest.approx(reference_logprob(model, tokenizer, p, c), abs=1e-4)
            assert got.tokens[i][j] == len(tokenizer(c, add_special_tokens=False)["input_ids"])
        for j, c in enumerate(per_prompt[i]):
            assert got2.logprob[i][j] == pytest.approx(reference_logprob(model, tokenizer, p, c), abs=1e-4)


def test_logit_budget_splits_batches_and_keeps_scores(tiny):
    """Long teacher-forced answers: batches shrink so that rows × kept positions × vocab stays under the budget."""
    from transformer2.loglik import _logit_batches

    assert _logit_batches([0, 1, 2, 3], [10, 10, 10, 10], 8, 1000, 10 * 4 * 1000 * 2 / 2 ** 20) == [[0, 1], [2, 3]]
    assert _logit_batches([0, 1, 2], [5, 50, 5], 8, 1000, 1e-9) == [[0], [1], [2]]  # one row always fits
    assert _logit_batches([0, 1, 2], [5, 5, 5], 2, 1000, 1e9) == [[0, 1], [2]]
    model, tokenizer, _, _ = tiny
    prompts = ["short", "a somewhat longer prompt here", "mid length one"]
    answers = [["The answer is 42 because six times seven"], [" yes indeed"], ["x y z w v u"]]
    whole = continuation_logprobs(model, tokenizer, prompts, answers, batch_size=3)
    split = continuation_logprobs(model, tokenizer, prompts, answers, batch_size=3, max_logits_mb=1e-9)
    assert split.tokens == whole.tokens
    for a, b in zip(split.logprob, whole.logprob):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loglik_scores_are_exact_on_every_architecture(arch):
    model, tokenizer = build_tiny_random(arch)
    model.eval()
    prompts = classification_prompts(tokenizer, ["What is 17 * 3?", "Sort a list in Python, please."])
    got = continuation_logprobs(model, tokenizer, prompts, list(LABEL_CONTINUATIONS), batch_size=2)
    for i, p in enumerate(prompts):
        for j, c in enumerate(LABEL_CONTINUATIONS):
            assert got.logprob[i][j] == pytest.approx(reference_logprob(model, tokenizer, p, c), abs=2e-4), (arch, i, j)


def test_shared_prompt_prefix_is_computed_once_and_scores_stay_exact(tiny, monkeypatch):
    model, tokenizer, _, experts = tiny
    prompts = classification_prompts(tokenizer, QUESTIONS)  # a long shared system prompt
    calls = []
    real_forward = type(model).forward
    kernels.alignment(model)  # measured once per model shape: its own forwards are not counted

    def counting_forward(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].numel())  # the engine packs tokens: (tokens, 1)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting_forward)
    got = continuation_logprobs(model, tokenizer, prompts, list(LABEL_CONTINUATIONS), batch_size=2)
    monkeypatch.undo()
    shared = len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"]) - len(QUESTIONS[0].encode()) - 30
    assert calls[0] > shared  # the prefix, once
    assert all(tokens < calls[0] for tokens in calls[1:])  # then only each prompt's own tokens
    for i, p in enumerate(prompts):
        for j, c in enumerate(LABEL_CONTINUATIONS):
            assert got.logprob[i][j] == pytest.approx(reference_logprob(model, tokenizer, p, c), abs=1e-4)
    # per-group z: rows 0, 2 run expert A, rows 1, 3 expert B; the prefix runs once per group
    group_z = {n: torch.stack([experts["gsm8k"].vectors[n], experts["mbpp"].vectors[n]]) for n in svf_layers(model)}
    grouped = continuation_logprobs(model, tokenizer, prompts, list(LABEL_CONTINUATIONS), batch_size=3,
                                    group_z=group_z, row_group=[0, 1, 0, 1])
    for g, name in enumerate(("gsm8k", "mbpp")):
        set_expert(model, experts[name])
        alone = continuation_logprobs(model, tokenizer, prompts, list(LABEL_CONTINUATIONS), share_prefix=False)
        for i in (g, g + 2):
            assert grouped.logprob[i] == pytest.approx(alone.logprob[i], abs=1e-4)
    set_expert(model, None)


def test_continuation_logprobs_per_row_z_match_each_expert_alone(tiny):
    model, tokenizer, _, experts = tiny
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]
    chosen = [experts["gsm8k"], experts["mbpp"], experts["arc_easy"]]
    row_z = {n: torch.stack([e.vectors[n] for e in chosen]) for n in svf_layers(model)}
    got = continuation_logprobs(model, tokenizer, prompts, list(LABEL_CONTINUATIONS), batch_size=3, group_z=row_z)
    set_row_z(model, None)
    for i, (p, e) in enumerate(zip(prompts, chosen)):
        set_expert(model, e)
        want = continuation_logprobs(model, tokenizer, [p], list(LABEL_CONTINUATIONS)).logprob[0]
        assert got.logprob[i] == pytest.approx(want, abs=1e-4)
    set_expert(model, None)


def test_loglik_and_generate_modes_agree_in_shape_and_label_set(tiny):
    model, tokenizer, _, experts = tiny
    set_expert(model, experts["mbpp"])
    before = [(layer.z, layer._weight) for layer in svf_layers(model).values()]
    scores: list = []
    ll = classify_loglik(model, tokenizer, QUESTIONS, batch_size=3, scores_out=scores)
    texts: list = []
    gen = classify_generate(model, tokenizer, QUESTIONS, max_new_tokens=6, batch_size=3, texts_out=texts)
    raw = classify_generate(model, tokenizer, QUESTIONS, max_new_tokens=6, batch_size=3, unparsed=None)
    assert len(ll) == len(gen) == len(raw) == len(texts) == len(QUESTIONS)
    assert set(ll) <= set(CATEGORIES) and set(gen) <= set(CATEGORIES)
    assert all(r is None or r in CATEGORIES for r in raw) and all(g == (r or "other") for g, r in zip(gen, raw))
    assert [len(s) for s in scores] == [4] * len(QUESTIONS)
    assert ll == [CATEGORIES[max(range(4), key=s.__getitem__)] for s in scores]
    # the expert that was active before the first pass is active again, not rebuilt
    after = [(layer.z, layer._weight) for layer in svf_layers(model).values()]
    assert all(z0 is z1 and w0 is w1 for (z0, w0), (z1, w1) in zip(before, after))
    # the first pass ran with the base weights: same scores as on the unpatched path
    set_expert(model, None)
    base: list = []
    classify_loglik(model, tokenizer, QUESTIONS, scores_out=base)
    assert torch.allclose(torch.tensor(scores), torch.tensor(base), atol=1e-5)
    # with a classifier expert the scores change
    zc: list = []
    classify_loglik(model, tokenizer, QUESTIONS, classifier=experts["arc_easy"], scores_out=zc)
    assert not torch.allclose(torch.tensor(zc), torch.tensor(base), atol=1e-3)
    assert classification_prompts(tokenizer, ["q"])[0].count("\\boxed{") >= 1


def test_other_routes_to_exact_base_weights_after_an_expert(tiny):
    model, tokenizer, _, experts = tiny
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    set_expert(model, None)
    with torch.no_grad():
        base = model(ids).logits
    routes = default_routes(["gsm8k", "mbpp", "arc_easy"])
    assert route("math", routes) == "gsm8k" and route("code", routes) == "mbpp" and route("reasoning", routes) == "arc_easy"
    assert route("other", routes) is None and route(None, routes) is None and routes["other"] is None
    assert default_routes(["gsm8k"]) == {"code": None, "math": "gsm8k", "reasoning": None, "other": None}
    strategy = PromptStrategy(model, tokenizer, experts)
    set_expert(model, strategy.expert(route("math", routes)))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base, atol=1e-3)
    set_expert(model, strategy.expert(route("other", routes)))
    assert all(layer.z is None for layer in svf_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # bit-exact base, not the last expert


def test_strategy_validates_routes(tiny):
    model, tokenizer, _, experts = tiny
    with pytest.raises(DispatchError, match="experts not given"):
        PromptStrategy(model, tokenizer, {"gsm8k": experts["gsm8k"]}, routes={"code": "mbpp"})
    assert PromptStrategy(model, tokenizer, {"gsm8k": experts["gsm8k"]}).routes["code"] is None  # default: base
    with pytest.raises(DispatchError, match="mode"):
        PromptStrategy(model, tokenizer, experts, mode="vote")
    s = PromptStrategy(model, tokenizer, experts, max_question_chars=5)
    assert s.question("  0123456789 ") == "56789"


# ---------------------------------------------------------------- through the lm-eval model

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def lm_setup(tiny_model_dir, tmp_path_factory):
    return saved_random_experts(tiny_model_dir, tmp_path_factory.mktemp("dispatch_lm"),
                                {"gsm8k": 10, "mbpp": 11, "arc_easy": 12, "classifier": 13})


def _ll(ctx, cont):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)


@pytest.mark.parametrize("strategy", ["prompt", "classifier"])
def test_dispatch_strategies_keep_order_and_time_both_passes(lm_setup, strategy, monkeypatch):
    from transformer2.harness import Transformer2LM
    from transformer2.strategies import prompt as prompt_strategy

    experts = dict(lm_setup["experts"])
    if strategy == "prompt":
        experts.pop("classifier")
    lm = Transformer2LM(pretrained=lm_setup["model"], svd=lm_setup["svd"], experts=experts, strategy=strategy,
                        strategy_args={"mode": "loglik", "batch_size": 4}, device="cpu", batch_size=4)
    zc = lm.experts.get("classifier")
    contexts = ["Pick a number:", "def add(a, b):", "Hello there,", "2+2=", "def sub(a, b):"]
    # the real first pass decides; check it used z_c exactly when asked to
    cats = classify_loglik(lm.model, lm.tokenizer, contexts, classifier=zc)
    reqs = [_ll(c, cont) for c in contexts for cont in (" 1", " return")]
    got = lm.loglikelihood(reqs)
    assert lm.strategy.last == cats
    assert lm.stats.first_pass_s > 0 and lm.stats.second_pass_s > 0 and lm.stats.contexts == len(contexts)
    routes = lm.strategy.routes
    for r, (ll, greedy) in zip(reqs, got):  # original order, each answered by its routed expert
        lm.use_expert(lm.experts.get(route(cats[contexts.index(r.args[0])], routes)))
        (ll1, greedy1), = lm.loglikelihood([r])
        assert ll == pytest.approx(ll1, abs=1e-4) and greedy == greedy1

    # "other" after an expert: the exact base weights answer (forced labels)
    lm2 = Transformer2LM(pretrained=lm_setup["model"], svd=lm_setup["svd"], experts=experts, strategy=strategy,
                         device="cpu", batch_size=4)
    monkeypatch.setattr(prompt_strategy, "classify", lambda *a, **k: ["math", "other"])
    got2 = lm2.loglikelihood([_ll("first", " x"), _ll("second", " y")])
    assert list(lm2.stats.per_key) == ["gsm8k", "None"]  # the expert group ran first
    plain = Transformer2LM(pretrained=lm_setup["model"], device="cpu", batch_size=4)
    assert got2[1] == plain.loglikelihood([_ll("second", " y")])[0]  # bit-exact base
