"""One Prefect server per project, and no server left behind (issues 12.3 and 14).

- Stages run one after another (a plain `dvc repro`) share the project's server: the first `t2` process
  starts it in the background, the next ones find it; it stops once no `t2` process has used it for
  T2_PREFECT_SERVER_IDLE_S, also when its stage was SIGKILLed, and on SIGTERM.
- `t2 repro ARGS` runs `dvc repro ARGS` on that server: no stage starts a temporary server, every stage's
  flow run carries the run's `t2-pipeline:<id>` tag, and the server is gone after its idle time.
- With T2_PREFECT_SERVER=temporary a stage starts Prefect's temporary server as a child that dies with it:
  SIGKILL the stage mid-run and the server goes too (Prefect 3.8 alone leaves it running: it stops it
  only at exit).
- `execution.retries` retries a stage's task on an unexpected error, never on bad input, and reruns nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, alive as _alive, wait_until as _wait

pytestmark = pytest.mark.timeout(900)  # server starts on shared, busy cores


def _project(tmp_path: Path, mirror: Path) -> tuple[Path, dict]:
    root = tmp_path / "p"
    root.mkdir()
    params = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    params["data"]["dir"] = str(mirror)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(root / ".prefect")}
    for key in ("PREFECT_API_URL", "T2_PIPELINE_RUN", "MLFLOW_PARENT_RUN_ID"):
        env.pop(key, None)
    return root, env


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, whichever of its threads started them."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(p) for p in children.read_text().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _start_stage(root: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(["t2", "data"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _server_state(root: Path) -> dict | None:
    try:
        return json.loads((root / ".prefect" / "t2-server.json").read_text())
    except (OSError, ValueError):
        return None


def _flow_runs(root: Path) -> list[str]:
    db = sqlite3.connect(root / ".prefect" / "prefect.db")
    try:
        return [name for (name,) in db.execute(
            "select flow.name from flow_run join flow on flow.id = flow_run.flow_id")]
    finally:
        db.close()


def test_stages_share_the_projects_server_until_it_is_stopped(tmp_path, mirror):
    root, env = _project(tmp_path, mirror)
    env["T2_PREFECT_SERVER_IDLE_S"] = "120"  # stays up between the two stages, however slow the machine
    first = subprocess.run(["t2", "data"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    state = _server_state(root)
    assert state and _alive(state["pid"]) and _alive(state["server_pid"])
    assert f"Prefect server for this project's stages at {state['api_url'].removesuffix('/api')}" in first.stderr
    second = subprocess.run(["t2", "data"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    out = first.stdout + first.stderr + second.stdout + second.stderr
    assert "Starting temporary server" not in out and "Prefect server for" not in second.stderr
    assert _server_state(root) == state  # the same process served both
    assert _flow_runs(root) == ["data", "data"]
    os.kill(state["pid"], signal.SIGTERM)
    _wait(lambda: not _alive(state["pid"]) and not _alive(state["server_pid"]), 60, "SIGTERM left a server")
    assert _server_state(root) is None


def test_shared_server_stops_after_its_killed_stage(tmp_path, mirror):
    root, env = _project(tmp_path, mirror)
    env["T2_PREFECT_SERVER_IDLE_S"] = "3"
    stage = _start_stage(root, env)
    try:
        _wait(lambda: _server_state(root) is not None or stage.poll() is not None, 600, "no server started")
        state = _server_state(root)
        assert state, "the stage ended before its server answered"
        stage.send_signal(signal.SIGKILL)  # its lease dies with it
        stage.wait()
        _wait(lambda: not _alive(state["pid"]) and not _alive(state["server_pid"]), 90,
              "the killed stage's shared server is still running")
        assert _server_state(root) is None
    finally:
        stage.kill()


def test_a_bad_server_mode_is_one_line(tmp_path, mirror):
    root, env = _project(tmp_path, mirror)
    for key, value, words in (("T2_PREFECT_SERVER", "bogus", "use 'shared'"),
                              ("T2_PREFECT_SERVER_IDLE_S", "soon", "a number >= 0")):
        proc = subprocess.run(["t2", "data"], cwd=root, env={**env, key: value}, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"t2: error: {key}={value!r}: ") and words in proc.stderr
    assert not (root / ".prefect" / "t2-server.json").exists()


def test_killed_stage_leaves_no_temporary_server(tmp_path, mirror):
    root, env = _project(tmp_path, mirror)
    env["T2_PREFECT_SERVER"] = "temporary"
    env["T2_FORKSERVER"] = "off"  # the server is the stage process's own child (forked stages: test_forkserver)
    stage = _start_stage(root, env)
    try:
        def server() -> list[int]:
            return [c for c in _children(stage.pid) if b"uvicorn" in _cmdline(c)]

        _wait(lambda: server() or stage.poll() is not None, 600, "the stage started no temporary server")
        uvicorn = server()
        assert uvicorn, "the stage ended before it started a temporary server"
        stage.send_signal(signal.SIGKILL)  # mid-run: its server is starting or serving its flow run
        stage.wait()
        _wait(lambda: not _alive(uvicorn[0]), 30, "the killed stage's Prefect server is still running")
    finally:
        for pid in [stage.pid] + _children(stage.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_repro_runs_every_stage_on_one_server(tmp_path, mirror):
    root, env = _project(tmp_path, mirror)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    proc = subprocess.run(["t2", "repro", "data"], cwd=root, env=env, capture_output=True, text=True, timeout=800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Running stage 'params'" in out and "Running stage 'data'" in out
    assert "Starting temporary server" not in out  # neither the stages nor `t2 repro` started one
    assert "Error logging to API" not in out  # the last logs reached the server before it stopped
    url = re.search(r"Prefect server for this project's stages at (http://127\.0\.0\.1:(\d+))", out)
    assert url, out[-2000:]
    import socket

    def port_free() -> bool:  # stopped after its idle time: its port is free again (for a server, which
        with socket.socket() as s:  # reuses the address past its closed connections)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", int(url.group(2))))
                s.listen()
            except OSError:
                return False
            return True

    _wait(port_free, 90, "the server still listens after its idle time")
    assert _server_state(root) is None
    db = sqlite3.connect(root / ".prefect" / "prefect.db")
    runs = {name: json.loads(tags) for name, tags in db.execute(
        "select flow.name, flow_run.tags from flow_run join flow on flow.id = flow_run.flow_id")}
    assert set(runs) == {"transformer2-repro", "data"}, runs  # both on this one server's database
    tag = [t for t in runs["transformer2-repro"] if t.startswith("t2-pipeline:")]
    assert tag and tag[0] in runs["data"]
    # every stage's flow run is a subflow of the repro's: under a tracking task run of it, whose state follows
    (repro,), = db.execute("select flow_run.id from flow_run join flow on flow.id = flow_run.flow_id "
                           "where flow.name = 'transformer2-repro'").fetchall()
    subflows = db.execute("select flow.name, task_run.flow_run_id, task_run.state_type from flow_run "
                          "join flow on flow.id = flow_run.flow_id "
                          "join task_run on task_run.id = flow_run.parent_task_run_id").fetchall()
    assert subflows == [("data", repro, "COMPLETED")], subflows
    assert json.loads((root / "metrics" / "data.json").read_text())["overhead_s"] > 0


def test_retries_from_params_and_never_on_bad_input():
    from prefect import task
    from prefect.states import Failed

    from flows.stages import _retryable, with_retries
    from tasks.stage_params import params_hash, stage_settings
    from transformer2.config import parse_params
    from transformer2.errors import UserError

    @task
    def probe() -> None: ...

    assert with_retries(probe, parse_params({})) is probe  # default: no retries
    params = parse_params({"execution": {"retries": 2, "retry_delay_s": 0.5}})
    retried = with_retries(probe, params)
    assert (retried.retries, retried.retry_delay_seconds) == (2, 0.5)
    assert _retryable(None, None, Failed(data=RuntimeError("lost the GPU"))) is True
    assert _retryable(None, None, Failed(data=UserError("artifacts/svd/index.json not found"))) is False
    # Execution-only: no stage's settings and no params_hash change, so DVC and the report see nothing new.
    base = parse_params({})
    assert params_hash(params) == params_hash(base)
    assert stage_settings(params, "expert", "gsm8k") == stage_settings(base, "expert", "gsm8k")
    with pytest.raises(Exception, match="retries"):
        parse_params({"execution": {"retries": "3"}})
