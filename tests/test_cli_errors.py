"""Runtime errors through the `t2` command line are one `t2: error:` line naming the file and the stage
to run, in seconds, before Prefect or a model starts (issue 14, item 6)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, free_port

TINY = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())


def t2(cwd: Path, *args: str, timeout: int = 180) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(cwd / ".prefect")}
    start = time.perf_counter()
    proc = subprocess.run(["t2", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2: error: "), proc.stderr
    return lines[0].removeprefix("t2: error: ")


@pytest.fixture
def project(tiny_project, tmp_path):
    """A tiny project whose model, SVD and data stages have run, and nothing after them."""
    root = tmp_path / "p"
    shutil.copytree(tiny_project, root, ignore=shutil.ignore_patterns("experts", "classifier", "cem", "lora", "eval"))
    return root


def set_model_path(project: Path, path: str) -> None:
    record = project / "artifacts/model/model.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "path": path}))


def test_missing_expert_names_the_file_and_its_stage(project):
    (project / "artifacts/eval/base_gsm8k").mkdir(parents=True)
    (project / "artifacts/eval/base_gsm8k/samples.jsonl").write_text("")
    proc, seconds = t2(project, "eval", "--kind", "svf", "--task", "gsm8k")
    assert one_error(proc) == ("artifacts/experts/gsm8k/expert.json not found: run stage expert@gsm8k first "
                               "(`dvc repro expert@gsm8k`)")
    assert seconds < 60  # no Prefect server, no model: ~2 s idle (a bound, not a benchmark: CI cores are shared)
    proc, _ = t2(project, "eval", "--kind", "prompt", "--task", "arc_challenge")
    assert one_error(proc).startswith("artifacts/experts/gsm8k/expert.json not found")
    proc, _ = t2(project, "eval", "--kind", "lora", "--task", "mbpp")
    assert one_error(proc) == ("artifacts/lora/mbpp/adapter_config.json not found: run stage lora@mbpp first "
                               "(`dvc repro lora@mbpp`); mbpp is not in lora.tasks: add it")


def test_missing_stage_output_names_the_stage(project):
    (project / "artifacts/svd/index.json").unlink()
    proc, _ = t2(project, "train-expert", "--task", "gsm8k")
    assert one_error(proc) == "artifacts/svd/index.json not found: run stage decompose first (`dvc repro decompose`)"
    proc, _ = t2(project, "cem", "--task", "arc_challenge")
    assert one_error(proc).startswith("artifacts/svd/index.json not found")
    proc, _ = t2(project, "train-expert", "--task", "mbpp")
    assert one_error(proc) == "--task 'mbpp' is not in rl.tasks ['gsm8k']"


def test_bad_model_paths(project):
    (project / "bad.yaml").write_text(yaml.safe_dump({**TINY, "model": {**TINY["model"], "name": "/no/such/model"}}))
    proc, _ = t2(project, "model", "--params", "bad.yaml")
    assert one_error(proc).startswith("model.name /no/such/model: no such file or directory")
    set_model_path(project, "/elsewhere/checkpoint")
    proc, _ = t2(project, "decompose")
    assert one_error(proc).startswith("artifacts/model/model.json points at /elsewhere/checkpoint, which does not "
                                      "exist here")
    set_model_path(project, str(project / "artifacts/svd"))
    proc, _ = t2(project, "decompose")
    assert "holds no model (no config.json)" in one_error(proc)


def test_unreachable_tracking_server_fails_in_seconds(project):
    port = free_port()  # a port nobody listens on
    (project / "uri.yaml").write_text(yaml.safe_dump({**TINY, "tracking": {**TINY["tracking"],
                                                                          "uri": f"http://127.0.0.1:{port}"}}))
    proc, seconds = t2(project, "data", "--params", "uri.yaml")
    assert one_error(proc).startswith(f"tracking.uri http://127.0.0.1:{port}: no MLflow server answers")
    assert seconds < 60  # MLflow's own retries take ~260 s; the check answers in ~2 s on an idle machine


def test_an_error_inside_a_flow_is_one_line_without_prefects_traceback(project):
    """What cannot be checked up front (here a corrupt metrics file the report reads) still ends in one
    line; the traceback goes to a log file, and --debug would show it."""
    (project / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics/eval_base_gsm8k.json").write_text("{not json")
    proc, _ = t2(project, "report", timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines()  # (the project's path holds this test's name)
              if "error" in line.replace(str(project), "<project>").lower()]
    assert len(errors) == 1 and errors[0].startswith("t2: error: JSONDecodeError: "), proc.stderr
    assert "Traceback" in (project / ".prefect/t2-error.log").read_text()
