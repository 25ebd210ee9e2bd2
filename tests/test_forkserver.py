"""Stages forked from the project's forkserver (flows/forkserver.py): the child is the stage process (its
stdio, cwd, umask, environment, exit status, signals), imports the project's code fresh, dies with a
killed stage process, and a real stage gives the same outputs as a fresh process."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import alive as _alive, wait_until as _wait

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import json, os, sys, time

def main(argv):
    if argv[0] == "describe":
        from transformer2.runtime import process_age_s
        print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "cwd": os.getcwd(),
                          "run": os.environ.get("T2_PIPELINE_RUN"), "umask": os.umask(0o22), "argv": sys.argv,
                          "age": process_age_s(), "torch": "torch" in sys.modules}))
        print("to stderr", file=sys.stderr)
        return int(argv[1])
    if argv[0] == "sleep":
        with open(argv[1], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
'''
CLIENT = ("import sys; from flows.forkserver import run_forked; "
          "code = run_forked(sys.argv[2:], entry=sys.argv[1], log=lambda line: print(line, file=sys.stderr)); "
          "sys.exit(99 if code is None else code)")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("forked")
    (root / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{ROOT}", "PREFECT_HOME": str(root / ".prefect"),
           "T2_FORKSERVER_IDLE_S": "60"}
    env.pop("T2_FORKSERVER", None)
    yield root, env
    log = root / ".prefect" / "t2-forkserver.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("t2-forkserver ") and line.endswith("serving"):
            try:
                os.kill(int(line.split()[1].rstrip(":")), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


def _client(env: dict, *argv: str, entry: str = "probe:main", **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT, entry, *argv], env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_a_forked_child_is_the_stage_process(project):
    root, env = project
    (root / "sub").mkdir(exist_ok=True)
    started = time.monotonic()
    first = _client({**env, "T2_PIPELINE_RUN": "abc"}, "describe", "7", cwd=root / "sub", umask=0o027)
    elapsed = time.monotonic() - started
    assert first.returncode == 7, first.stderr
    seen = json.loads(first.stdout)
    assert seen["cwd"] == str(root / "sub") and seen["run"] == "abc" and seen["umask"] == 0o027
    assert seen["argv"][1:] == ["describe", "7"] and seen["pgid"] == seen["pid"]
    assert seen["torch"]  # preloaded by the forkserver, not imported by the probe
    assert 0 <= seen["age"] <= elapsed + 0.05  # counted from the stage process's start, not the fork
    assert first.stderr.splitlines()[-1] == "to stderr"
    second = _client({**env, "T2_PIPELINE_RUN": "def"}, "describe", "0", cwd=root)
    assert second.returncode == 0 and json.loads(second.stdout)["run"] == "def"
    assert json.loads(second.stdout)["ppid"] == seen["ppid"]  # a per-run id starts no other forkserver
    assert "forkserver ready" not in second.stderr


def test_every_child_imports_the_projects_code_as_it_is_now(project):
    root, env = project
    seen = []
    for value in (1, 2):
        (root / "edited.py").write_text(f"def main(argv):\n    print({value})\n    return 0\n")
        out = _client(env, entry="edited:main")
        assert out.returncode == 0, out.stderr
        seen.append(out.stdout.strip())
    assert seen == ["1", "2"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_stage_process_reaches_its_child(project, signum):
    root, env = project
    pidfile = root / f"child-{signum}"
    client = subprocess.Popen([sys.executable, "-c", CLIENT, "probe:main", "sleep", str(pidfile)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: pidfile.exists() and pidfile.read_text(), 120, "the child never started")
        child = int(pidfile.read_text())
        client.send_signal(signum)
        code = client.wait(timeout=60)
        _wait(lambda: not _alive(child), 30, f"the child outlived its stage process ({signum!r})")
        if signum == signal.SIGINT:  # KeyboardInterrupt's traceback, exit 1, as a fresh process
            assert code == 1 and "KeyboardInterrupt" in client.stderr.read()
        else:  # the stage process dies of the child's signal (SIGKILL: its own)
            assert code == -signum
    finally:
        client.kill()


def test_another_environment_gets_its_own_forkserver_which_stops_when_idle(project):
    root, env = project
    base = json.loads(_client(env, "describe", "0").stdout)["ppid"]
    other = _client({**env, "T2_FORKSERVER_IDLE_S": "1"}, "describe", "0")
    assert other.returncode == 0 and "forkserver ready" in other.stderr
    ppid = json.loads(other.stdout)["ppid"]
    assert ppid != base
    _wait(lambda: not _alive(ppid), 60, "the idle forkserver is still running")
    assert "stopped (1 s without a stage)" in (root / ".prefect" / "t2-forkserver.log").read_text()
    assert _alive(base)


def _stage_project(tmp_path: Path, mirror: Path, name: str) -> tuple[Path, dict]:
    root = tmp_path / name
    root.mkdir()
    params = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    params["data"]["dir"] = str(mirror)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(root / ".prefect")}
    for key in ("PREFECT_API_URL", "T2_PIPELINE_RUN", "MLFLOW_PARENT_RUN_ID", "T2_FORKSERVER"):
        env.pop(key, None)
    return root, env


def test_a_forked_stage_writes_what_a_fresh_process_writes(tmp_path, mirror):
    outputs = {}
    for switch in ("off", "on"):
        root, env = _stage_project(tmp_path, mirror, switch)
        for stage in ("model", "data"):
            out = subprocess.run(["t2", stage], cwd=root, env={**env, "T2_FORKSERVER": switch},
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
        log = root / ".prefect" / "t2-forkserver.log"
        assert log.exists() == (switch == "on")
        if switch == "on":
            assert "stage pid" in log.read_text() and "exited with 0" in log.read_text()
        metrics = json.loads((root / "metrics" / "data.json").read_text())
        assert metrics["overhead_s"] > 0
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "artifacts").rglob("*"))
                 if p.is_file()}
        volatile = ("seconds", "overhead_s", "mlflow_run_id", "peak_rss_mb")
        outputs[switch] = files, {k: v for k, v in metrics.items() if k not in volatile}
    assert outputs["on"] == outputs["off"]


def test_bad_forkserver_settings_are_one_line(tmp_path, mirror):
    root, env = _stage_project(tmp_path, mirror, "bad")
    for key, value, words in (("T2_FORKSERVER", "maybe", "use 'on'"), ("T2_FORKSERVER_IDLE_S", "soon", ">= 0")):
        out = subprocess.run(["t2", "data"], cwd=root, env={**env, key: value}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(f"t2: error: {key}={value!r}: ") and words in out.stderr
    assert not (root / ".prefect" / "t2-server.json").exists()  # refused before any server started
