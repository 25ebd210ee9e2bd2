"""One Prefect server per pipeline run, and no server left behind (issues 12.3 and 14).

- `t2 repro ARGS` runs `dvc repro ARGS` with one server for all its stages: no stage starts a temporary
  server, every stage's flow run carries the run's `t2-pipeline:<id>` tag, and the server is gone after.
- A stage run on its own starts Prefect's temporary server as a child that dies with it: SIGKILL the stage
  mid-run and the server goes too (Prefect 3.8 alone leaves it running: it stops it only at exit).
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

from .conftest import ROOT

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


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_stage_leaves_no_server(tmp_path, mirror):
    root, env = _project(tmp_path, mirror)
    stage = subprocess.Popen(["t2", "data"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (server := [c for c in _children(stage.pid) if b"uvicorn" in _cmdline(c)]):
            assert stage.poll() is None and time.monotonic() < deadline, "the stage started no temporary server"
            time.sleep(0.2)
        stage.send_signal(signal.SIGKILL)  # mid-run: its server is starting or serving its flow run
        stage.wait()
        deadline = time.monotonic() + 30
        while _alive(server[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server[0]), "the killed stage's Prefect server is still running"
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
    url = re.search(r"Prefect server for this run at (http://127\.0\.0\.1:(\d+))", out)
    assert url, out[-2000:]
    import socket

    with socket.socket() as s:  # stopped at the end: its port is free again (for a server, which reuses
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the address past its closed connections)
        s.bind(("127.0.0.1", int(url.group(2))))
        s.listen()
    db = sqlite3.connect(root / ".prefect" / "prefect.db")
    runs = {name: json.loads(tags) for name, tags in db.execute(
        "select flow.name, flow_run.tags from flow_run join flow on flow.id = flow_run.flow_id")}
    assert set(runs) == {"transformer2-repro", "data"}, runs  # both on this one server's database
    tag = [t for t in runs["transformer2-repro"] if t.startswith("t2-pipeline:")]
    assert tag and tag[0] in runs["data"]
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
