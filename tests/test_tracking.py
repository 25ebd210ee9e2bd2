"""MLflow as the comparison dashboard (issue 14, item 3): stage runs nest under one pipeline (or `dvc exp`)
run, carry the tags that line methods up per task, and an evaluation names what it measured."""
import json

import pytest

from tasks.stage_params import settings_hash, stage_settings
from tasks.tracking import (METHODS, artifact_fingerprint, cell_metrics, log_inputs, metric_name, pipeline_run,
                            record_metrics, stage_run, tag_output)
from transformer2.config import parse_params


def test_metric_names_stay_whole_in_the_ui():
    assert metric_name("acc_norm,none") == "acc_norm"
    assert metric_name("exact_match,strict-match") == "exact_match.strict-match"
    assert metric_name("pass@1,create_test") == "pass_at_1.create_test"
    assert metric_name("dispatch.prompt_loglik.per_task_accuracy.gsm8k") == "dispatch.prompt_loglik.per_task_accuracy.gsm8k"
    headline, logged = cell_metrics({"metric": "acc_norm,none", "metrics": {"acc,none": 0.5, "acc_norm,none": 0.25},
                                     "n_docs": 4, "first_pass_s": 0.1, "second_pass_s": 2.0})
    assert headline == "acc_norm"
    assert logged == {"acc": 0.5, "acc_norm": 0.25, "n": 4.0, "first_pass_s": 0.1, "second_pass_s": 2.0}
    _, logged = cell_metrics({"metric": "exact_match,none", "metrics": {"exact_match,none": 0.2}, "n_docs": 10,
                              "secondary": {"style": "harness", "metric": "acc_norm,none", "value": 0.3, "n_docs": 10,
                                            "ci95": [0.1, 0.6], "delta_vs_base": 0.1, "delta_ci95": [-0.2, 0.4],
                                            "p_value": 0.5}})
    assert {k: v for k, v in logged.items() if k.startswith("harness_")} == {  # the other style's, named by it
        "harness_acc_norm": 0.3, "harness_n": 10.0, "harness_acc_norm_ci95_low": 0.1, "harness_acc_norm_ci95_high": 0.6,
        "harness_delta_vs_base_ci95_low": -0.2, "harness_delta_vs_base_ci95_high": 0.4, "harness_delta_vs_base": 0.1,
        "harness_p_value": 0.5}


@pytest.fixture
def params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return parse_params({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "lineage"},
                         "rl": {"tasks": ["gsm8k"]}})


def _runs(params):
    import mlflow

    mlflow.set_tracking_uri(params.tracking.uri)
    return {r.data.tags["mlflow.runName"]: r for r in mlflow.search_runs(experiment_names=["lineage"],
                                                                         output_format="list")}


def test_stage_runs_nest_under_the_pipeline_run_and_evals_name_what_they_measured(params, tmp_path):
    expert = tmp_path / "artifacts/experts/gsm8k"
    expert.mkdir(parents=True)
    (expert / "expert.safetensors").write_bytes(b"z")
    with pipeline_run(params) as parent:
        with stage_run(params, "expert", "gsm8k", kind="svf", method="svf") as run:
            fingerprint = tag_output(expert)
            written = record_metrics(tmp_path / "expert.json", {"best_val_accuracy": 0.5}, run)
        with stage_run(params, "eval-svf", "gsm8k", kind="svf", method=METHODS["svf"]):
            measured = log_inputs(params, {"expert": expert})
    runs = _runs(params)
    assert set(runs) == {"pipeline", "expert@gsm8k", "eval-svf@gsm8k"}
    assert runs["pipeline"].info.status == "FINISHED"
    for name in ("expert@gsm8k", "eval-svf@gsm8k"):
        tags = runs[name].data.tags
        assert tags["mlflow.parentRunId"] == parent
        assert {k: tags[k] for k in ("task", "method", "kind", "base_model", "profile")} == {
            "task": "gsm8k", "method": "svf", "kind": "svf", "base_model": params.model.name, "profile": "lineage"}
        assert tags["params_hash"] == runs["pipeline"].data.tags["params_hash"]
    eval_run = runs["eval-svf@gsm8k"]
    assert eval_run.data.tags["stage"] == "eval"
    assert eval_run.data.params["input.expert.fingerprint"] == fingerprint == artifact_fingerprint(expert)
    assert eval_run.data.params["input.expert.run_id"] == runs["expert@gsm8k"].info.run_id == measured["expert"]["run_id"]
    assert eval_run.data.params["eval.limit"] == str(params.eval.limit)  # the settings the cell read
    assert json.loads((tmp_path / "expert.json").read_text()) == written  # run id + stage params hash, in metrics
    assert written["params_hash"] == settings_hash(stage_settings(params, "expert", "gsm8k"))
    assert written["mlflow_run_id"] == runs["expert@gsm8k"].info.run_id


def test_a_dvc_experiments_stages_share_one_parent(params, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lambda-0.1")
    for stage in ("model", "data"):
        with stage_run(params, stage):
            pass
    runs = _runs(params)
    parent = runs["dvc exp lambda-0.1"]
    assert parent.data.tags["dvc_exp"] == "lambda-0.1" and parent.data.params["rl.kl_coef"] == "0.0"
    assert {runs[s].data.tags["mlflow.parentRunId"] for s in ("model", "data")} == {parent.info.run_id}


def test_the_classifier_run_is_not_an_svf_run(params):
    with stage_run(params, "classifier", kind="classifier", method="t2-classifier"):
        pass
    tags = _runs(params)["classifier"].data.tags
    assert tags["kind"] == "classifier" and tags["method"] == "t2-classifier" and "task" not in tags


def test_intervals_reach_mlflow_as_low_and_high():
    from tasks.tracking import _numeric

    logged = _numeric({"best_val_accuracy": 0.5, "best_val_ci95": [0.2, 0.8], "task": "gsm8k", "flag": True,
                       "dispatch": {"prompt_loglik": {"accuracy": 0.75, "ci95": [0.6, 0.85], "n": 60}}})
    assert logged == {"best_val_accuracy": 0.5, "best_val_ci95_low": 0.2, "best_val_ci95_high": 0.8,
                      "dispatch.prompt_loglik.accuracy": 0.75, "dispatch.prompt_loglik.ci95_low": 0.6,
                      "dispatch.prompt_loglik.ci95_high": 0.85, "dispatch.prompt_loglik.n": 60.0}


def test_the_light_mlflow_ui_of_the_readme_serves_the_comparison_without_job_workers(tmp_path):
    """README: `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1`. MLflow 3.17 otherwise also starts
    a job runner with its huey consumers (10 processes, ~1.7 GB PSS here vs 2 and ~0.4 GB), which the runs
    table does not use: the search behind the comparison view (filter tags.stage = 'eval') still answers."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    import mlflow

    from .conftest import ROOT, free_port, wait_until

    command = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1"
    assert command in (ROOT / "README.md").read_text()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("light")
    client.create_run(experiment, tags={"stage": "eval", "method": "svf", "task": "gsm8k"})
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--workers", "1", "--host",
                             "127.0.0.1", "--port", str(port), "--backend-store-uri", uri], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    def group() -> list[int]:  # the server's processes: its session
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and os.getsid(int(p.name)) ==
                proc.pid] if Path("/proc").is_dir() else []

    try:
        wait_until(up, 120, "mlflow ui did not answer /health")
        time.sleep(3)  # a job runner would have started its consumers by now
        body = json.dumps({"experiment_ids": [experiment], "filter": "tags.stage = 'eval'"}).encode()
        request = urllib.request.Request(f"{url}/ajax-api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
        assert [{t["key"]: t["value"] for t in r["data"]["tags"]}["method"] for r in runs] == ["svf"]
        assert not Path("/proc").is_dir() or len(group()) <= 3, group()  # no huey consumers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
