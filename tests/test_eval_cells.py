"""How an evaluation cell is described to lm-eval (tasks/eval.py): one-pass kinds and the two-pass strategies."""
import pytest

from tasks.eval import adaptation_metrics, model_args, response_cache, strategy_model_args
from transformer2.config import parse_params


def test_one_pass_kinds():
    assert model_args("base", "m", "s", None) == {"pretrained": "m"}
    assert model_args("svf", "m", "s", "e") == {"pretrained": "m", "svd": "s", "expert": "e"}
    assert model_args("lora", "m", "s", "l") == {"pretrained": "m", "peft": "l"}
    with pytest.raises(ValueError, match="one-pass"):
        model_args("prompt", "m", "s", None)


def test_dispatch_routes_missing_experts_to_base_weights():
    params = parse_params({"eval": {"dispatch_mode": "generate", "dispatch_max_new_tokens": 7}})
    args = strategy_model_args("classifier", params, "m", "s", {"gsm8k": "e/gsm8k"}, classifier_dir="c")
    assert args["experts"] == {"gsm8k": "e/gsm8k", "classifier": "c"} and args["strategy"] == "classifier"
    sa = args["strategy_args"]
    assert sa["routes"] == {"code": None, "math": "gsm8k", "reasoning": None, "other": None}
    assert sa["mode"] == "generate" and sa["max_new_tokens"] == 7 and sa["classifier"] == "classifier"
    prompt = strategy_model_args("prompt", params, "m", "s", {"gsm8k": "a", "mbpp": "b", "arc_easy": "c"})
    assert prompt["strategy_args"]["routes"] == {"code": "mbpp", "math": "gsm8k", "reasoning": "arc_easy",
                                                 "other": None}
    assert "classifier" not in prompt["experts"]
    few = strategy_model_args("few_shot", params, "m", "s", {"gsm8k": "a"}, cem_dir="cem/math")
    assert few["strategy_args"] == {"result": "cem/math"}


def test_adaptation_metrics():
    assert adaptation_metrics({}) == {}
    m = adaptation_metrics({"first_pass_s": 1.0, "second_pass_s": 20.0, "per_key": {"gsm8k": 3}})
    assert m["first_to_second"] == 0.05 and m["per_key"] == {"gsm8k": 3}


def test_response_cache_is_named_by_settings_and_input_files(tmp_path):
    """A killed cell resumes from its own responses only: other settings or retrained adapters get another cache,
    and caches of other configs are removed."""
    model, expert = tmp_path / "model", tmp_path / "expert"
    model.mkdir(), expert.mkdir()
    (model / "model.json").write_text('{"fingerprint": "a"}')
    (expert / "expert.safetensors").write_bytes(b"z1")
    args = model_args("svf", str(model), str(tmp_path / "svd"), str(expert))
    run_dir = tmp_path / "run"
    cache = response_cache(str(run_dir), "svf", "gsm8k", args, {"limit": 10})
    (run_dir / f"{cache.name}_rank0.db").write_bytes(b"")
    assert response_cache(str(run_dir), "svf", "gsm8k", args, {"limit": 10}) == cache
    assert (run_dir / f"{cache.name}_rank0.db").exists()
    other = response_cache(str(run_dir), "svf", "gsm8k", args, {"limit": 10, "run_style": "paper"}, keep=(cache,))
    (run_dir / f"{other.name}_rank0.db").write_bytes(b"")  # the cell's secondary style: its own cache, both kept
    assert other != cache and (run_dir / f"{cache.name}_rank0.db").exists()
    assert response_cache(str(run_dir), "svf", "gsm8k", args, {"limit": 10}, keep=(other,)) == cache
    assert (run_dir / f"{other.name}_rank0.db").exists()
    assert response_cache(str(run_dir), "svf", "gsm8k", args, {"limit": 20}) != cache
    assert not (run_dir / f"{cache.name}_rank0.db").exists()  # stale: removed
    assert not (run_dir / f"{other.name}_rank0.db").exists()
    (expert / "expert.safetensors").write_bytes(b"z2")  # the expert was retrained
    assert response_cache(str(run_dir), "svf", "gsm8k", args, {"limit": 10}) != cache
