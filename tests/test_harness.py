"""lm-eval integration: the `transformer2` model, adaptation strategies, task configs, sandboxed code metrics."""
import uuid
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from transformer2 import harness  # noqa: E402
from transformer2.harness import (HarnessError, Transformer2LM, cli_main, read_task_yaml,  # noqa: E402
                                  task_config_dir)
from transformer2.harness import model as harness_model  # noqa: E402
from transformer2.harness.functions import code  # noqa: E402
from transformer2.harness.task_configs import lm_eval_tasks_dir  # noqa: E402
from transformer2.strategies import RouterStrategy, StrategyError, keyword_route  # noqa: E402
from transformer2.tasks import TASKS, benchmark_names  # noqa: E402

HARNESS_TASKS = {name: spec for task in TASKS.values() if task.harness for name, spec in task.harness.configs.items()}
PAPER_TASKS = benchmark_names()
from transformer2.svf import Expert, ExpertError  # noqa: E402

from .conftest import saved_random_experts  # noqa: E402


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """SVD cache of the tiny model and three experts: two of this base, one of another."""
    root = tmp_path_factory.mktemp("harness")
    out = saved_random_experts(tiny_model_dir, root, {"math": 1, "code": 2, "foreign": 3}, {"foreign": "0" * 64})
    return {"model": out["model"], "svd": out["svd"], "root": root, **out["experts"]}


@pytest.fixture(scope="module")
def task_manager(mirror, tmp_path_factory):
    out = task_config_dir(mirror, tmp_path_factory.mktemp("tasks"), style="all")
    return TaskManager(include_path=str(out), include_defaults=False)  # built-ins come in via `include`


def _ll(ctx: str, cont: str) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)


def _gen(ctx: str) -> Instance:
    return Instance(request_type="generate_until", doc={}, idx=0,
                    arguments=(ctx, {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}))


# ---------------------------------------------------------------- the model

def test_simple_evaluate_with_expert_on_mirror_tasks(setup, task_manager):
    args = f"pretrained={setup['model']},svd={setup['svd']},expert={setup['math']},batch_size=4"
    out = lm_eval.simple_evaluate(model="transformer2", model_args=args, tasks=["arc_easy", "gsm8k"],
                                  limit=3, device="cpu", task_manager=task_manager, gen_kwargs="max_gen_toks=8")
    res = out["results"]
    assert 0.0 <= res["arc_easy"]["acc,none"] <= 1.0 and res["arc_easy"]["sample_len"] == 3
    assert "exact_match,strict-match" in res["gsm8k"]
    assert out["configs"]["gsm8k"]["dataset_path"] == "json"  # the mirror, not the hub
    t2 = out["config"]["transformer2"]
    assert t2["strategy"] == "FixedStrategy" and t2["second_pass_s"] > 0
    assert t2["requests"] >= 3 * 3 + 3 and t2["per_key"] == {"fixed": t2["requests"]}  # ARC choices + gsm8k


def test_expert_switch_changes_and_none_restores_exactly(setup):
    reqs = [_ll("The answer is", " 42"), _ll("Question: 2+2?\nAnswer:", " 4"), _ll("def f(x):", " return x")]
    plain = Transformer2LM(pretrained=setup["model"], device="cpu", batch_size=2)  # no experts: plain HFLM
    base = [ll for ll, _ in plain.loglikelihood(reqs)]
    del plain
    lm = Transformer2LM(pretrained=setup["model"], svd=setup["svd"], expert=setup["math"], device="cpu", batch_size=2)
    with_math = [ll for ll, _ in lm.loglikelihood(reqs)]
    lm.use_expert(None)
    assert [ll for ll, _ in lm.loglikelihood(reqs)] == base  # bit-exact base weights
    lm.use_expert(Expert.load(setup["code"]))
    with_code = [ll for ll, _ in lm.loglikelihood(reqs)]
    assert all(abs(a - b) > 1e-4 for a, b in zip(with_math, base))
    assert all(abs(a - b) > 1e-4 for a, b in zip(with_code, with_math))
    lm.use_expert(None)
    assert [ll for ll, _ in lm.loglikelihood(reqs)] == base


def test_expert_of_another_base_is_refused(setup):
    with pytest.raises(ExpertError, match="trained on base weights 000000000000"):
        Transformer2LM(pretrained=setup["model"], svd=setup["svd"], expert=setup["foreign"], device="cpu")
    with pytest.raises(HarnessError, match="svd="):
        Transformer2LM(pretrained=setup["model"], expert=setup["math"], device="cpu")
    with pytest.raises(HarnessError, match="PEFT"):
        Transformer2LM(pretrained=setup["model"], svd=setup["svd"], expert=setup["math"], peft="x", device="cpu")


def test_router_groups_requests_keeps_order_and_switches_once_per_group(setup, monkeypatch):
    calls, routed = [], []
    real_set = harness_model.set_expert

    def counting_set(model, expert, **kwargs):
        calls.append(expert)
        return real_set(model, expert, **kwargs)

    route = keyword_route({"math": ["number"], "code": ["def "]})

    def logged_route(context):
        routed.append(context)
        return route(context)

    monkeypatch.setattr(harness_model, "set_expert", counting_set)
    experts = {"math": Expert.load(setup["math"]), "code": Expert.load(setup["code"])}
    strategy = RouterStrategy(logged_route, experts)
    lm = Transformer2LM(pretrained=setup["model"], svd=setup["svd"], strategy=strategy, device="cpu", batch_size=2,
                        experts=f"math:{setup['math']};code:{setup['code']}")  # the "name:folder;..." form
    contexts = ["Pick a number:", "def add(a, b):", "Hello there,", "Another number:", "def sub(a, b):"]
    reqs = [_ll(c, cont) for c in contexts for cont in (" 1", " return")]  # 2 requests per context
    calls.clear()
    got = lm.loglikelihood(reqs)
    assert routed == contexts  # the first pass saw each distinct context once
    assert len(calls) == 3 and calls[0] is experts["math"] and calls[1] is experts["code"] and calls[2] is None
    assert lm.stats.groups == 3 and lm.stats.per_key == {"math": 4, "code": 4, "None": 2}
    assert lm.stats.first_pass_s >= 0 and lm.stats.second_pass_s > 0
    # same answers, in the original order, as answering each request alone with its expert
    for r, (ll, greedy) in zip(reqs, got):
        lm.use_expert(experts.get(route(r.args[0])))
        (ll1, greedy1), = lm.loglikelihood([r])
        assert ll == pytest.approx(ll1, abs=1e-4) and greedy == greedy1
    lm.strategy = strategy
    gens = lm.generate_until([_gen(c) for c in contexts])
    for c, text in zip(contexts, gens):
        lm.use_expert(experts.get(route(c)))
        assert lm.generate_until([_gen(c)]) == [text]


def test_named_strategies(setup):
    lm = Transformer2LM(pretrained=setup["model"], svd=setup["svd"], device="cpu", strategy="keyword",
                        experts={"math": setup["math"], "code": setup["code"]},
                        strategy_args='{"routes": {"code": ["def "]}, "default": "math"}')
    assert lm.strategy.assign([_ll("def f():", " 1"), _ll("2+2=", "4")]) == ["code", "math"]
    with pytest.raises(StrategyError, match="unknown strategy"):
        Transformer2LM(pretrained=setup["model"], strategy="nope", device="cpu")
    route = keyword_route({"code": ["DEF"]}, default=None)
    assert route("def x") == "code" and route("nothing") is None


def test_engine_generate_until_matches_hflm(setup):
    """generate_until through decoding.generate gives HFLM's texts: same contexts, stops, post-processing."""
    contexts = ["Pick a number:", "def add(a, b):", "Hello there, my friend. How", "2+2="]
    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(c, {"until": [stop], "max_gen_toks": n, "do_sample": False}))
            for c in contexts for stop, n in (("\n\n", 6), ("e", 12))]
    fast = Transformer2LM(pretrained=setup["model"], device="cpu", batch_size=3)
    slow = Transformer2LM(pretrained=setup["model"], device="cpu", batch_size=3, engine="false")
    assert fast.engine and not slow.engine
    assert fast.generate_until(reqs) == slow.generate_until(reqs)


# ---------------------------------------------------------------- CLI

def test_cli_main_resolves(capsys):
    assert lm_eval.api.registry.get_model("transformer2") is Transformer2LM
    assert cli_main(["--help"]) == 0
    assert cli_main(["run", "--help"]) == 0
    assert "--model_args" in capsys.readouterr().out


# ---------------------------------------------------------------- task configs

def test_task_configs_keep_builtin_prompts_and_point_at_local_files(mirror, tmp_path):
    out = task_config_dir(mirror, tmp_path / "t", style="harness")
    tasks_dir = lm_eval_tasks_dir()
    for name, spec in HARNESS_TASKS.items():
        ours, builtin = read_task_yaml(out / f"{name}.yaml"), read_task_yaml(tasks_dir / spec.builtin)
        changed = {k for k in set(ours) | set(builtin) if ours.get(k) != builtin.get(k)}
        assert changed <= {"dataset_path", "dataset_name", "dataset_kwargs", "unsafe_code", "metric_list",
                           "filter_list", "fewshot_config", "process_docs"}, (name, changed)
        assert all(Path(p).is_file() for p in ours["dataset_kwargs"]["data_files"].values())
        assert ours["test_split"] in ours["dataset_kwargs"]["data_files"]
    assert not list(out.glob("t2_*.yaml"))
    hub = task_config_dir(None, tmp_path / "hub", style="all")
    assert read_task_yaml(hub / "gsm8k.yaml")["dataset_path"] == "openai/gsm8k"
    assert read_task_yaml(hub / "mbpp.yaml")["unsafe_code"] is False  # sandboxed even from the hub
    assert {f"t2_{t}.yaml" for t in PAPER_TASKS} <= {p.name for p in hub.iterdir()}


def test_task_configs_on_data_stage_layout(tmp_path):
    root = tmp_path / "data"
    (root / "arc_easy").mkdir(parents=True)
    for split in ("train", "test"):  # no validation file
        (root / "arc_easy" / f"{split}.jsonl").write_text("{}\n")
    out = task_config_dir(root, tmp_path / "t", style="harness")
    cfg = read_task_yaml(out / "arc_easy.yaml")
    assert cfg["validation_split"] is None and set(cfg["dataset_kwargs"]["data_files"]) == {"train", "test"}
    assert not (out / "gsm8k.yaml").exists()  # no local gsm8k: the built-in (hub) stays in charge


# ---------------------------------------------------------------- sandboxed code metrics

@pytest.fixture
def fast_limits(monkeypatch):
    monkeypatch.setattr(code, "LIMITS", code.SandboxLimits(timeout_s=2.0, cpu_s=1))


def test_code_metric_runs_in_sandbox_and_contains_hostile_code(fast_limits, tmp_path):
    test = "assert add(2, 3) == 5"
    assert code.pass_at_1([test], ["def add(a, b):\n    return a + b"]) == 1.0
    assert code.pass_at_1([test], ["def add(a, b):\n    return a * b"]) == 0.0
    target = Path("/tmp") / f"t2-escape-{uuid.uuid4().hex}"
    hostile = {
        "write outside": f"open({str(target)!r}, 'w').write('x')\ndef add(a, b):\n    return a + b",
        "loop forever": "while True:\n    pass\ndef add(a, b):\n    return a + b",
        "shell out": f"import os\nos.system('touch {target}')\ndef add(a, b):\n    return a + b",
        "exit early": "import sys\nsys.exit(0)",
    }
    for what, program in hostile.items():
        assert code.pass_at_1([test], [program]) == 0.0, what
    assert not target.exists()
    scores = code.pass_at_k([test, test], [["def add(a, b): return a + b"] * 2, ["x = 1", "def add(a, b): return 5"]],
                            k=[1, 2])
    assert scores == {"pass@1": 0.75, "pass@2": 1.0}


def test_code_tasks_use_the_sandboxed_metric(task_manager, fast_limits, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    tasks = task_manager.load(["mbpp", "humaneval", "t2_mbpp"])["tasks"]
    mbpp, humaneval, t2_mbpp = tasks["mbpp"], tasks["humaneval"], tasks["t2_mbpp"]
    assert not getattr(mbpp, "UNSAFE_CODE", False) and not getattr(humaneval, "UNSAFE_CODE", False)
    doc = next(iter(mbpp.test_docs()))
    assert mbpp.process_results(doc, [doc["code"]]) == {"pass_at_1": 1.0}
    assert mbpp.process_results(doc, ["while True:\n    pass"]) == {"pass_at_1": 0.0}
    assert [s["task_id"] for s in code.mbpp_fewshot_samples()] == [2, 3, 4]
    hdoc = next(iter(humaneval.test_docs()))
    good = code.humaneval_build_predictions([[hdoc["canonical_solution"]]], [hdoc])[0]
    assert humaneval.process_results(hdoc, [good]) == {"pass@1": 1.0}
    target = Path("/tmp") / f"t2-escape-{uuid.uuid4().hex}"
    escape = f"open({str(target)!r}, 'w').write('x')\n"
    assert humaneval.process_results(hdoc, [[hdoc["prompt"] + "    " + escape]]) == {"pass@1": 0.0}
    tdoc = next(iter(t2_mbpp.test_docs()))
    assert t2_mbpp.process_results(tdoc, [f"```python\n{tdoc['code']}\n```"]) == {"acc": 1.0}
    assert t2_mbpp.process_results(tdoc, [f"```python\n{escape}{tdoc['code']}\n```"]) == {"acc": 0.0}
    assert not target.exists()


def test_paper_tasks_use_project_prompts_and_scorers(task_manager):
    from transformer2.tasks import get_task, question_text

    tasks = task_manager.load(["t2_gsm8k", "t2_arc_easy"])["tasks"]
    gsm, arc = tasks["t2_gsm8k"], tasks["t2_arc_easy"]
    doc = next(iter(gsm.test_docs()))
    assert gsm.config.description == get_task("gsm8k").system_prompt and gsm.doc_to_text(doc) == question_text("gsm8k", doc)
    gold = doc["answer"].split("####")[-1].strip()
    assert gsm.process_results(doc, [f"So the total is... The answer is {gold}."]) == {"acc": 1.0}
    assert gsm.process_results(doc, ["The answer is 123456789."]) == {"acc": 0.0}
    adoc = next(iter(arc.test_docs()))
    letter = "ABCDE"[adoc["choices"]["label"].index(adoc["answerKey"])]
    assert arc.process_results(adoc, [f"Thinking... the answer is ({letter})"]) == {"acc": 1.0}


def test_peft_adapter_still_works(setup, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformer2.models import load_base

    model, _, _ = load_base(setup["model"])
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    reqs = [_ll("The answer is", " 42")]
    base = Transformer2LM(pretrained=setup["model"], device="cpu").loglikelihood(reqs)
    adapted = Transformer2LM(pretrained=setup["model"], peft=str(tmp_path / "lora"), device="cpu").loglikelihood(reqs)
    assert abs(base[0][0] - adapted[0][0]) > 1e-4


# ---------------------------------------------------------------- resuming a killed cell

@pytest.mark.parametrize("task", ["arc_easy", "gsm8k"])  # loglikelihood and generate_until requests
def test_response_cache_resumes_a_cell_with_the_same_results(setup, mirror, tmp_path, task):
    from sqlitedict import SqliteDict

    args = {"pretrained": setup["model"], "svd": setup["svd"], "expert": setup["math"]}
    run = lambda: harness.evaluate_task(args, task, data_root=mirror, limit=3, batch_size=4,  # noqa: E731
                                        gen_kwargs={"max_gen_toks": 4}, response_cache=tmp_path / "responses")
    first = run()
    requests = first["adaptation"]["requests"]
    assert first["cached_responses"] == 0 and requests >= 3
    [db] = harness.cache_files(tmp_path / "responses")
    with SqliteDict(str(db), autocommit=True) as responses:  # a kill after all but two responses
        assert len(responses) == requests
        for key in list(responses)[:2]:
            del responses[key]
    resumed = run()
    assert resumed["cached_responses"] == requests - 2 and resumed["adaptation"]["requests"] == 2
    assert resumed["metrics"] == first["metrics"]
    assert resumed["samples"] == first["samples"]
