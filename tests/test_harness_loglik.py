"""lm-eval loglikelihood through the `transformer2` model's scorer (`loglik.token_logprobs`)
gives HFLM's own (logprob, is_greedy) on the same requests: base, fixed expert, routed experts."""
import pytest

lm_eval = pytest.importorskip("lm_eval")
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from transformer2 import loglik  # noqa: E402
from transformer2.decoding import kernels  # noqa: E402
from transformer2.harness import Transformer2LM  # noqa: E402
from transformer2.strategies import RouterStrategy, keyword_route  # noqa: E402
from transformer2.svf import Expert  # noqa: E402

from .conftest import saved_random_experts  # noqa: E402

FEW_SHOT = ("Question: Which is a mammal?\nAnswer: whale\n\nQuestion: Which is a bird?\nAnswer: robin\n\n"
            "Question: Which is a fish?\nAnswer: trout\n\n")
CONTEXTS = [FEW_SHOT + "Question: Pick a number?\nAnswer:", FEW_SHOT + "Question: def add(a, b):\nAnswer:",
            FEW_SHOT + "Question: Hello there, my friend. How are\nAnswer:", "2+2=", "Answer: "]
CONTINUATIONS = [" 4", " five", " return a + b", " yes indeed, it is", "x"]


def _ll(ctx: str, cont: str) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    out = saved_random_experts(tiny_model_dir, tmp_path_factory.mktemp("loglik"), {"math": 1, "code": 2})
    return {"model": out["model"], "svd": out["svd"], **out["experts"]}


def _requests() -> list[Instance]:
    reqs = [_ll(c, k) for c in CONTEXTS for k in CONTINUATIONS]
    return reqs + [_ll("", " hello world"), _ll(CONTEXTS[0], " 4")]  # empty context (prefix token), a repeat


def _same(fast: list, slow: list) -> None:
    assert len(fast) == len(slow)
    for (a, ga), (b, gb) in zip(fast, slow):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def _greedy_tokens(lm: Transformer2LM, ctx: list[int], n: int) -> list[int]:
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(lm._model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx):]


@pytest.mark.parametrize("with_expert", [False, True], ids=["base", "expert"])
def test_loglikelihood_matches_hflm(setup, with_expert, monkeypatch):
    kw = dict(pretrained=setup["model"], device="cpu", batch_size=3)
    if with_expert:
        kw.update(svd=setup["svd"], expert=setup["math"])
    fast, slow = Transformer2LM(**kw), Transformer2LM(**kw, engine="false")
    kernels.alignment(fast.model)  # measured before counting: its end-to-end check builds prefixes too
    prefix_calls = []
    real = loglik._prefix_cache
    monkeypatch.setattr(loglik, "_prefix_cache", lambda *a, **k: prefix_calls.append(1) or real(*a, **k))
    reqs = _requests()
    _same(fast.loglikelihood(reqs), slow.loglikelihood(reqs))
    shared = [r for r in reqs if r.args[0].startswith(FEW_SHOT)]
    _same(fast.loglikelihood(shared), slow.loglikelihood(shared))
    assert len(prefix_calls) == 1  # the few-shot prefix of the second call ran once for all its rows
    # is_greedy true: continuations of greedy tokens, at lm-eval's token level
    ctx = fast.tok_encode(CONTEXTS[2])
    greedy = [(None, ctx, _greedy_tokens(fast, ctx, n)) for n in (1, 3)]
    wrong = [(None, ctx, greedy[1][2][:2] + [(greedy[1][2][2] + 1) % fast.vocab_size])]
    got = fast._loglikelihood_tokens(greedy + wrong)
    assert [g for _, g in got] == [True, True, False]
    _same(got, slow._loglikelihood_tokens(greedy + wrong))
    # a tight logits budget splits batches, the scores stay
    fast.max_logits_mb = 1e-6
    _same(fast.loglikelihood(reqs), slow.loglikelihood(reqs))


def test_loglikelihood_with_routed_experts_and_truncation_matches_hflm(setup):
    """Requests routed to two experts and the base in one call; contexts left-truncated to max_length."""
    experts = {"math": Expert.load(setup["math"]), "code": Expert.load(setup["code"])}
    route = keyword_route({"math": ["number"], "code": ["def "]})
    lms = [Transformer2LM(pretrained=setup["model"], svd=setup["svd"], device="cpu", batch_size=2, max_length=40,
                          experts={"math": setup["math"], "code": setup["code"]},
                          strategy=RouterStrategy(route, experts), engine=engine) for engine in ("true", "false")]
    reqs = _requests()
    assert len(lms[0].tok_encode(CONTEXTS[0])) > 40  # the few-shot contexts are truncated from the left
    fast, slow = (lm.loglikelihood(reqs) for lm in lms)
    _same(fast, slow)
    assert lms[0].stats.per_key == lms[1].stats.per_key and len(lms[0].stats.per_key) == 3


def test_loglikelihood_rolling_matches_hflm(setup):
    text = FEW_SHOT * 3  # longer than max_length: several rolling windows
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in (text, "short one")]
    fast, slow = (Transformer2LM(pretrained=setup["model"], device="cpu", batch_size=2, max_length=48, engine=e)
                  .loglikelihood_rolling(reqs) for e in ("true", "false"))
    assert fast == pytest.approx(slow, abs=1e-4)


def test_scores_do_not_depend_on_the_other_requests(setup):
    """Bit for bit: a request scored alone, with a subset of its context's continuations, or in a
    batch of others (what a resumed lm-eval run with a response cache relies on)."""
    lm = Transformer2LM(pretrained=setup["model"], device="cpu", batch_size=4)
    reqs = _requests()
    together = lm.loglikelihood(reqs)
    # bitwise where this CPU's kernels allow it (decoding.kernels.alignment); else to rounding
    same = (lambda a, b: a == b) if kernels.alignment(lm._model).invariant else (lambda a, b: _same(a, b) or True)
    for k in (0, 7, 13, len(reqs) - 2):
        assert same(lm.loglikelihood([reqs[k]]), [together[k]])
    assert same(lm.loglikelihood(reqs[5:8]), together[5:8])  # one context: its prefix KV is shared


def test_no_progress_bar_off_a_terminal(setup, capfd):
    """lm-eval's evaluator calls `loglikelihood` without `disable_tqdm`, and HFLM then draws its "Tokenizing
    inputs" bar whatever TQDM_DISABLE says (it passes disable=False): off a terminal, as a stage's output in the
    `dvc-repro-<stage>` task log of `t2 pipeline`, the model turns it off. Results are the same either way."""
    lm = Transformer2LM(pretrained=setup["model"], device="cpu", batch_size=3)
    capfd.readouterr()
    quiet = lm.loglikelihood(_requests()[:4])
    assert "Tokenizing inputs" not in capfd.readouterr().err
    _same(quiet, Transformer2LM(pretrained=setup["model"], device="cpu", batch_size=3).loglikelihood(
        _requests()[:4], disable_tqdm=True))


def test_options_that_share_their_input_share_one_segment():
    """Options whose inputs are the same (single tokens such as letters, or answers that differ in
    their last token) run as one segment of the options' forward, and score as if each ran alone."""
    from transformer2.models import build_tiny_random

    model, _ = build_tiny_random("llama", seed=5)
    model.eval()
    rand = kernels.random_prompt_maker(model, seed=2)
    stem = rand(3)
    prompts = [rand(9), rand(14)]
    options = [[[11], [12], [13], [14]], [stem + [7], stem + [8], rand(2)]]
    fed = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)
    try:
        together = loglik.token_logprobs(model, prompts, options, batch_size=2)
    finally:
        hook.remove()
    rows = kernels.alignment(model).rows
    assert fed[-1] == 3 * rows  # prompt 0: one segment for its 4 letters; prompt 1: two for its 3 options
    same = (lambda a, b: a == b) if kernels.alignment(model).invariant else \
        (lambda a, b: a == pytest.approx(b, abs=1e-5))
    for i, cands in enumerate(options):
        for j, cand in enumerate(cands):
            alone = loglik.token_logprobs(model, [prompts[i]], [[cand]])
            assert same(alone.logprob[0][0], together.logprob[i][j])
            assert alone.greedy[0][0] == together.greedy[i][j] and together.tokens[i][j] == len(cand)
    assert len(set(together.logprob[0])) == 4  # four targets read from the one segment
