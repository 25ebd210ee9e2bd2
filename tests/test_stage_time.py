"""benchmarks/stage_time.py: sums by kind of stage, and whether two runs had the same params."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("stage_time", ROOT / "benchmarks" / "stage_time.py")
stage_time = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_time)


def run_dir(tmp_path: Path, name: str, params: str, seconds: dict[str, float]) -> Path:
    d = tmp_path / name
    (d / "metrics").mkdir(parents=True)
    (d / "params.yaml").write_text(params)
    for stage, s in seconds.items():
        (d / "metrics" / f"{stage}.json").write_text(json.dumps({"seconds": s, "overhead_s": 2.0}))
    return d


def test_sums_by_kind_and_says_whether_params_match(tmp_path, monkeypatch, capsys):
    base = (ROOT / "profiles" / "tiny.yaml").read_text()
    before = run_dir(tmp_path, "before", base, {"eval_base_gsm8k": 120, "expert_gsm8k": 60, "data": 6})
    # execution only says how stages run: the same computation
    after = run_dir(tmp_path, "after", base.replace("retries: 0", "retries: 2"),
                    {"eval_base_gsm8k": 30, "expert_gsm8k": 60, "data": 3})
    assert "retries: 0" in base
    out = tmp_path / "st.json"
    monkeypatch.setattr("sys.argv", ["stage_time.py", "--before", str(before), "--after", str(after), "--out", str(out)])
    stage_time.main()
    result = json.loads(out.read_text())
    assert result["same_params"] is True
    assert result["before"]["minutes"] == 3.1 and result["after"]["minutes"] == 1.55 and result["ratio"] == 0.5
    assert result["after"]["minutes_by_kind"] == {"eval cells": 0.5, "experts": 1.0, "the rest": 0.05}
    assert "same params (less execution / tracking): yes" in capsys.readouterr().out

    changed = run_dir(tmp_path, "changed", base.replace("retries: 0", "retries: 2").replace("seed: 0", "seed: 1"),
                      {"eval_base_gsm8k": 30})
    monkeypatch.setattr("sys.argv", ["stage_time.py", "--before", str(before), "--after", str(changed), "--out", str(out)])
    stage_time.main()
    assert json.loads(out.read_text())["same_params"] is False
    assert "NO: the times below are not comparable" in capsys.readouterr().out


def test_a_source_that_is_neither_folder_nor_revision_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["stage_time.py", "--before", str(tmp_path / "nowhere"), "--after", "HEAD",
                                     "--out", str(tmp_path / "st.json")])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="neither a folder nor a git revision"):
        stage_time.main()


def test_training_stages_split_by_phase_from_their_curves():
    curve = ("step,val_accuracy,seconds_rollout,seconds_logprob,seconds_forward,seconds_backward,seconds_validation\n"
             "1,,10.0,4.0,,3.0,\n"
             "2,0.5,9.0,3.0,,3.0,20.0\n")
    lora = "step,seconds_rollout,seconds_logprob,seconds_forward,seconds_backward\n1,,,5.0,4.0\n"
    metrics = {"expert_gsm8k": {"seconds": 120.0}, "lora_gsm8k": {"seconds": 69.0},
               "classifier": {"seconds": 60.0},  # no curve: all of it is "the rest"
               "eval_base_gsm8k": {"seconds": 500.0}}  # not a training stage
    phases = stage_time.training_phases(metrics, {"expert_gsm8k": curve, "lora_gsm8k": lora})
    assert phases == {"rollouts": round(19 / 60, 2), "gradient pass": round(22 / 60, 2),
                      "validation": round(20 / 60, 2), "the rest": round((68 + 60 + 60) / 60, 2)}
