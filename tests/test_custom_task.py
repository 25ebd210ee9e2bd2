"""A task of your own, in one file (examples/addition_task.py): split, trained, evaluated through
lm-eval, dispatched and mixed by CEM, with no other library file touched."""
import pytest
import torch

from transformer2.tasks import get_task, load_task_modules

from .conftest import ROOT, saved_random_experts

TASK_FILE = str(ROOT / "examples" / "addition_task.py")


@pytest.fixture(scope="module")
def addition(tiny_model_dir, tmp_path_factory):
    from transformer2.tasks import TASKS, export_splits

    load_task_modules([TASK_FILE])
    root = tmp_path_factory.mktemp("addition")
    counts = export_splits("addition", root / "data", max_rows=6)
    setup = saved_random_experts(tiny_model_dir, root, {"gsm8k": 1, "mbpp": 2})
    yield {**setup, "data": root / "data", "counts": counts, "root": root}
    TASKS.pop("addition", None)  # the registry is process-wide: later test modules see the built-in tasks only


def test_params_accept_the_task_and_the_data_stage_splits_it(addition):
    from transformer2.config import parse_params

    params = parse_params({"task_modules": [TASK_FILE], "data": {"tasks": ["addition", "gsm8k"]},
                           "rl": {"tasks": ["addition"]}, "lora": {"tasks": ["addition"]}, "eval": {"tasks": ["addition", "arc_challenge"], "style": "paper",
                                                                    "adapt_tasks": ["arc_challenge"]}})
    assert params.rl.tasks == ["addition"]
    assert addition["counts"] == {"train": 6, "validation": 6, "test": 6}
    task = get_task("addition")
    assert task.score({"answer": "68"}, "The answer is 68.") and not task.score({"answer": "68"}, "67")


def test_expert_trains_and_evaluates_through_lm_eval(addition, tmp_path):
    from transformer2.harness import evaluate_task
    from transformer2.models import load_patched
    from transformer2.rl import train_svf_expert
    from transformer2.settings import LoopConfig, RLObjectiveConfig
    from transformer2.svf import SVFConfig, init_expert
    from transformer2.tasks import load_split

    model, tokenizer, info = load_patched(addition["model"], addition["svd"], SVFConfig())
    expert = init_expert(model, info.fingerprint, SVFConfig(), torch.Generator().manual_seed(0))
    train, val = load_split(addition["data"], "addition", "train"), load_split(addition["data"], "addition", "validation")
    result, adapter = train_svf_expert(model, tokenizer, expert, "addition", train, val[:2],
                                       LoopConfig(steps=1, batch_size=2, eval_every=1), RLObjectiveConfig(max_new_tokens=4),
                                       tmp_path / "run")
    assert result.best_step == 1 and 0 <= result.best_val_accuracy <= 1
    adapter.load_state(result.best_state)
    adapter.save(tmp_path / "expert", {"task": "addition"})
    out = evaluate_task({"pretrained": addition["model"], "svd": addition["svd"], "expert": str(tmp_path / "expert")},
                        "addition", data_root=addition["data"], style="paper", limit=2, batch_size=2,
                        apply_chat_template=True, gen_kwargs={"max_gen_toks": 4})
    assert out["task"] == "t2_addition" and out["headline"]["metric"] == "acc,none"
    assert 0 <= out["headline"]["value"] <= 1 and len(out["samples"]["t2_addition"]) == 2


def test_dispatch_routes_math_to_it_and_cem_mixes_it(addition):
    from transformer2.cem import few_shot_cem
    from transformer2.dispatch import default_routes
    from transformer2.models import load_patched
    from transformer2.settings import CEMConfig
    from transformer2.strategies import PromptStrategy
    from transformer2.svf import Expert, SVFConfig
    from transformer2.tasks import load_split

    experts = {"addition": Expert.load(addition["experts"]["gsm8k"]), "mbpp": Expert.load(addition["experts"]["mbpp"])}
    assert default_routes(list(experts)) == {"code": "mbpp", "math": "addition", "reasoning": None, "other": None}
    model, tokenizer, _ = load_patched(addition["model"], addition["svd"], SVFConfig())
    strategy = PromptStrategy(model, tokenizer, experts)
    keys = strategy.assign([type("R", (), {"args": ("What is 12 + 30?",)})()])
    assert keys[0] in {"addition", "mbpp", None}
    shots = load_split(addition["data"], "addition", "train")[:2]
    result = few_shot_cem(model, tokenizer, experts, "addition", shots, CEMConfig(population=2, generations=1),
                          batch_size=4, max_new_tokens=4)
    assert result.keys == ["addition", "mbpp"] and len(result.alpha) == 2 and result.shots == 2
