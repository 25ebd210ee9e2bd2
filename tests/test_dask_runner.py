"""`execution.task_runner: dask`: `t2 pipeline --no-dvc --parallel` on a local 2-worker Dask cluster.

On the tiny profile with two experts (and the DAG cut after the expert stage, so the test stays short): the
experts train in two different worker processes at the same time (their MLflow runs record the process and
the start/end times), their files are byte-identical to a serial run's, and the run is recorded in
dvc.lock, so a later `dvc repro` does nothing. A missing prefect-dask is one `t2: error:` line.
"""
import json
import subprocess
import sys
import time

import pytest
import yaml

from transformer2.config import parse_params

from .conftest import ROOT
from .test_pipeline import TINY, _env, _run

pytest.importorskip("prefect_dask")

STAGES = ("params", "model", "data", "decompose", "expert")  # the DAG up to the experts
TASKS = ("gsm8k", "arc_easy")


def _params(task_runner: str) -> dict:
    return parse_params({**TINY, "rl": {**TINY["rl"], "tasks": list(TASKS)},
                         "eval": {**TINY["eval"], "tasks": ["gsm8k", "arc_easy", "arc_challenge"]},
                         "lora": {**TINY["lora"], "tasks": []},
                         "data": {**TINY["data"], "tasks": ["gsm8k", "mbpp", "arc_easy", "arc_challenge"]},
                         "execution": {**TINY["execution"], "task_runner": task_runner, "dask_workers": 2}}
                        ).model_dump()


def _project(root, task_runner: str, env: dict):
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(_params(task_runner), sort_keys=False))
    dag = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dag["stages"] = {name: stage for name, stage in dag["stages"].items() if name in STAGES}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        proc = _run(cmd, root, env)
        assert proc.returncode == 0, proc.stderr
    return root


def _pipeline(root, env, *flags):
    env = {**env, "PREFECT_HOME": str(root / ".prefect")}
    started = time.monotonic()
    proc = subprocess.Popen(["t2", "pipeline", "--no-dvc", *flags], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return proc.pid, round(time.monotonic() - started, 1), out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mirror):
    """The same project run serially (thread runner, no --parallel) and on the 2-worker Dask cluster."""
    base = tmp_path_factory.mktemp("dask")
    env = _env(mirror)
    serial = _project(base / "serial", "thread", env)
    dask = _project(base / "dask", "dask", env)
    s_pid, s_wall, _ = _pipeline(serial, env)
    d_pid, d_wall, out = _pipeline(dask, env, "--parallel")
    print(f"\nserial {s_wall} s, dask (2 workers) {d_wall} s")  # the README's numbers (pytest -s)
    return {"serial": serial, "dask": dask, "dask_pid": d_pid, "dask_out": out, "env": env}


def _expert_runs(root, env) -> dict:
    script = ("import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); "
              "runs = mlflow.search_runs(experiment_names=['tiny'], output_format='list'); "
              "print(json.dumps({r.data.tags['unit']: [r.data.tags['pid'], r.data.tags.get('torch_threads'), "
              "r.info.start_time, r.info.end_time] for r in runs if 'unit' in r.data.tags}))")
    proc = _run([sys.executable, "-c", script], root, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_experts_train_concurrently_in_two_worker_processes(runs):
    from flows.dask_runner import worker_threads

    units = _expert_runs(runs["dask"], runs["env"])
    experts = [units[f"expert@{task}"] for task in TASKS]
    pids = {int(pid) for pid, *_ in experts}
    main = int(units["model"][0])  # a stage that ran in `t2` itself
    assert main == runs["dask_pid"] and len(pids) == 2 and main not in pids  # two processes, neither `t2`
    assert all(threads == str(worker_threads(2)) for _, threads, *_ in experts)  # each its share of the cores
    (_, _, start_a, end_a), (_, _, start_b, end_b) = experts
    assert max(start_a, start_b) < min(end_a, end_b), experts  # the two runs overlap in time
    assert "DaskTaskRunner" in runs["dask_out"] or "Dask cluster" in runs["dask_out"]


def test_experts_are_byte_identical_to_a_serial_run(runs):
    for task in TASKS:
        serial = sorted(p for p in (runs["serial"] / "artifacts/experts" / task).rglob("*") if p.is_file())
        dask = sorted(p for p in (runs["dask"] / "artifacts/experts" / task).rglob("*") if p.is_file())
        assert [p.name for p in serial] == [p.name for p in dask] and serial
        for a, b in zip(serial, dask):
            assert a.read_bytes() == b.read_bytes(), a.name


def test_the_run_is_recorded_in_dvc_lock(runs):
    root, env = runs["dask"], runs["env"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"params", "model", "data", "decompose", *(f"expert@{t}" for t in TASKS)}
    proc = _run(["dvc", "repro"], root, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Data and pipelines are up to date" in proc.stdout and "Running stage" not in proc.stdout


def test_a_missing_prefect_dask_is_one_error_line(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params("dask"), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # import prefect_dask: ImportError; find_spec: None
    code = main(["pipeline", "--no-dvc", "--parallel"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("t2: error: execution.task_runner: dask needs prefect-dask")
    assert "pip install 'transformer2[dask]'" in err
    assert not (tmp_path / ".prefect" / "t2-server.log").exists()  # failed before any server started


def test_execution_keys_change_no_stage():
    from tasks.stage_params import params_hash, stage_settings

    thread, dask = parse_params(_params("thread")), parse_params({**_params("dask"),
                                                                  "execution": {"task_runner": "dask",
                                                                                "dask_workers": 7}})
    assert params_hash(thread) == params_hash(dask)
    for stage, item in (("expert", "gsm8k"), ("model", None), ("cem", "arc_challenge"), ("eval-svf", "gsm8k")):
        assert stage_settings(thread, stage, item) == stage_settings(dask, stage, item)
    assert "execution" not in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["params"]["params"]
    with pytest.raises(Exception, match="dask_workers"):
        parse_params({"execution": {"dask_workers": 0}})
    with pytest.raises(Exception, match="task_runner"):
        parse_params({"execution": {"task_runner": "ray"}})
