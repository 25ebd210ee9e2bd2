import pytest
import yaml

from transformer2.config import ConfigError, Params, load_params, parse_params

from .conftest import ROOT


def test_repo_params_yaml_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.model.name == "builtin:smollm2-135m-instruct"
    assert params.svf.targets == "mlp"


def test_empty_file_is_refused_and_an_empty_mapping_means_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_params(path)
    path.write_text("{}\n")
    assert load_params(path) == Params()


@pytest.mark.parametrize("data, key", [
    ({"svf": {"target": "mlp"}}, "svf.target: unknown key"),
    ({"modle": {}}, "modle: unknown key"),
    ({"rl": {"steps": "many"}}, "rl.steps"),
    ({"model": {"dtype": "float8"}}, "model.dtype"),
    ({"model": {"device": "tpu"}}, "model.device"),
    ({"svf": {"targets": "mlps"}}, "svf.targets"),
    ({"data": {"tasks": ["gsm8k", "squad"]}}, "data.tasks"),
    ({"svf": {"init_std": -1}}, "svf.init_std"),
])
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        parse_params(data, "params.yaml")
    assert key in str(err.value)
    assert str(err.value).startswith("params.yaml:")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_explicit_target_patterns_accepted():
    params = parse_params({"svf": {"targets": [r".*\.mlp\.down_proj"]}})
    assert params.svf.targets == [r".*\.mlp\.down_proj"]


def test_per_task_overrides():
    params = parse_params({"rl": {"max_new_tokens": 100, "overrides": {"arc_easy": {"max_new_tokens": 32}}},
                           "eval": {"overrides": {"math": {"limit": 2}}}})
    assert params.rl.for_task("arc_easy").max_new_tokens == 32
    assert params.rl.for_task("gsm8k").max_new_tokens == 100
    assert params.eval.for_task("math").limit == 2 and params.eval.for_task("gsm8k").limit == params.eval.limit


@pytest.mark.parametrize("data, message", [
    ({"rl": {"overrides": {"squad": {}}}}, "unknown task 'squad'"),
    ({"rl": {"overrides": {"mbpp": {"stepz": 3}}}}, "mbpp.stepz: unknown key"),
    ({"rl": {"overrides": {"mbpp": {"steps": "x"}}}}, "mbpp.steps"),
    ({"eval": {"overrides": {"math": {"tasks": ["math"]}}}}, "cannot be overridden"),
])
def test_bad_overrides_name_task_and_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(data)


def test_two_pass_sections_and_cross_check():
    params = parse_params({})
    assert params.cem.tasks == ["math", "humaneval", "arc_challenge"] == params.eval.adapt_tasks
    assert params.classifier.modes == ["generate", "loglik"] and params.eval.dispatch_mode == "loglik"
    assert parse_params({"cem": {"overrides": {"arc_challenge": {"population": 32}}}}).cem.for_task(
        "arc_challenge").population == 32
    with pytest.raises(ConfigError, match=r"eval.adapt_tasks: \['math'\] have no few-shot CEM result"):
        parse_params({"cem": {"tasks": ["humaneval"]}, "eval": {"adapt_tasks": ["math", "humaneval"]}})
    with pytest.raises(ConfigError, match=r"rl.tasks: \['mbpp'\] have no base cell to compare with; add them to eval.tasks"):
        parse_params({"eval": {"tasks": ["gsm8k", "arc_easy", "math", "humaneval", "arc_challenge"]}})
    with pytest.raises(ConfigError, match=r"eval.adapt_tasks: \['math'\] have no base cell"):
        parse_params({"eval": {"tasks": ["gsm8k", "mbpp", "arc_easy", "humaneval", "arc_challenge"]}})
    for bad, key in (({"classifier": {"modes": ["decode"]}}, "classifier.modes.0"),
                     ({"cem": {"method": "fast"}}, "cem.method"),
                     ({"cem": {"overrides": {"math": {"shots": 0}}}}, "math.shots"),
                     ({"eval": {"dispatch_mode": "x"}}, "eval.dispatch_mode"),
                     ({"data": {"fewshot_holdout": -1}}, "data.fewshot_holdout")):
        with pytest.raises(ConfigError, match=key):
            parse_params(bad)


def test_secondary_style_is_the_other_style_per_task():
    params = parse_params({"eval": {"style": "paper", "overrides": {"arc_easy": {"secondary_style": "harness"}}}})
    assert params.eval.for_task("arc_easy").secondary_style == "harness"
    assert params.eval.for_task("gsm8k").secondary_style is None
    with pytest.raises(ConfigError, match=r"eval.secondary_style: 'harness' is the cell's own style"):
        parse_params({"eval": {"secondary_style": "harness"}})  # the default style is harness
    with pytest.raises(ConfigError, match=r"eval.overrides.math.secondary_style: 'paper' is the cell's own style"):
        parse_params({"eval": {"style": "paper", "overrides": {"math": {"secondary_style": "paper"}}}})
    with pytest.raises(ConfigError, match=r"eval.secondary_style: Input should be 'harness' or 'paper'"):
        parse_params({"eval": {"secondary_style": "lm-eval"}})
