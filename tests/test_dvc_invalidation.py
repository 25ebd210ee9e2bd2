"""DVC reruns exactly what a change reads (issue 14, item 1), checked with `dvc status --json` on the real
dvc.yaml: every output is a placeholder committed with `dvc commit -f`, so nothing trains."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.dag import dag_stages

from .conftest import ROOT

TINY = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
TWO_TASKS = {**TINY, "rl": {**TINY["rl"], "tasks": ["gsm8k", "arc_easy"]},
             "lora": {**TINY["lora"], "tasks": ["gsm8k", "arc_easy"]}}


def _run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert not check or proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def _paths(entries: list, item) -> list[str]:
    return [(next(iter(e)) if isinstance(e, dict) else e).replace("${item}", str(item)) for e in entries or []]


def _placeholders(root: Path) -> None:
    """Every output of every unit as a small file (a folder output gets one file), plus the data folders."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for stage in dag_stages(root / "params.yaml", root / "dvc.yaml"):
        body = spec[stage.name].get("do", spec[stage.name])
        for item in stage.items:
            for out in _paths(body.get("outs"), item) + _paths(body.get("metrics"), item) + _paths(body.get("plots"), item):
                path = root / out
                if out.startswith("stage_params"):
                    continue
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"value": 0.5, "unit": f"{stage.name}@{item}"}))
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder.txt").write_text(f"{stage.name}@{item}")
    for task in TINY["data"]["tasks"]:
        (root / "artifacts/data" / task).mkdir(parents=True, exist_ok=True)
        (root / "artifacts/data" / task / "test.jsonl").write_text("{}\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("invalidation")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(TWO_TASKS, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    # artifacts/ ignored as a whole, so DVC writes no .gitignore into its folders and a temporary
    # checkout (`dvc exp run --dry`, which implies --temp) has no half-present artifacts/experts.
    (root / ".gitignore").write_text("/artifacts/\n")
    _run(["t2", "params"], root, env)
    _placeholders(root)
    _run(["dvc", "commit", "-f", "-q"], root, env)
    assert _status(root, env) == set()
    return root, env


def _status(root: Path, env: dict) -> set[str]:
    return set(json.loads(_run(["dvc", "status", "--json"], root, env).stdout or "{}"))


def _after(project, change: dict, preview: list | None = None) -> set[str]:
    """The units `dvc status` reports once `params` has resolved `change` (a deep update of params.yaml);
    `preview` gets what `t2 params --dry` said first. The project is put back afterwards."""
    root, env = project
    baseline = (root / "params.yaml").read_text()
    params = yaml.safe_load(baseline)
    for dotted, value in change.items():
        *parents, key = dotted.split(".")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    try:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if preview is not None:
            preview.append(_run(["t2", "params", "--dry"], root, env).stdout.strip())
        _run(["dvc", "repro", "-q", "params"], root, env)
        return _status(root, env)
    finally:
        (root / "params.yaml").write_text(baseline)
        _run(["dvc", "repro", "-q", "params"], root, env)


def test_one_experts_override_reruns_that_expert_and_its_lora_baseline_only(project):
    """LoRA validates with its task's rl.max_new_tokens; nothing else reads arc_easy's rl override."""
    preview: list = []
    assert _after(project, {"rl.overrides": {"arc_easy": {"max_new_tokens": 4}}}, preview) == {"expert@arc_easy",
                                                                                             "lora@arc_easy"}
    assert preview == ["stage_params/: 2 would change: expert_arc_easy, lora_arc_easy"]


def test_kl_coef_reruns_the_experts_not_the_next_token_lora_baselines(project):
    assert _after(project, {"rl.kl_coef": 0.1}) == {"expert@gsm8k", "expert@arc_easy"}
    assert _after(project, {"rl.kl_coef": 0.1, "lora.objective": "reinforce"}) == {
        "expert@gsm8k", "expert@arc_easy", "lora@gsm8k", "lora@arc_easy"}


def test_one_cells_eval_override_reruns_that_tasks_cells_and_the_report(project):
    assert _after(project, {"eval.overrides": {**TINY["eval"]["overrides"], "arc_easy": {"limit": 1}}}) == {
        "eval-base@arc_easy", "eval-svf@arc_easy", "eval-lora@arc_easy", "report"}
    assert _after(project, {"eval.dispatch_mode": "generate"}) == {"eval-prompt@arc_challenge",
                                                                   "eval-classifier@arc_challenge", "report"}


def test_eval_dtype_reruns_every_cell_and_the_report_nothing_trained(project):
    """eval.dtype is inference only: the experts, LoRA baselines, z_c and CEM keep model.dtype's runs."""
    root, _ = project
    cells = {f"{s.name}@{item}" for s in dag_stages(root / "params.yaml", root / "dvc.yaml")
             if s.name.startswith("eval-") for item in s.items}
    assert len(cells) >= 6
    assert _after(project, {"eval.dtype": "bfloat16"}) == cells | {"report"}
    assert _after(project, {"eval.dtype": TINY["model"]["dtype"]}) == {"report"}  # the same dtype: cells stay


def test_a_retrained_expert_reruns_what_reads_it(project):
    root, env = project
    placeholder = root / "artifacts/experts/arc_easy/placeholder.txt"
    before = placeholder.read_text()
    try:
        placeholder.write_text("retrained")
        assert _status(root, env) == {"expert@arc_easy", "eval-svf@arc_easy", "cem@arc_challenge",
                                      "eval-prompt@arc_challenge", "eval-classifier@arc_challenge",
                                      "eval-few-shot@arc_challenge"}
    finally:
        placeholder.write_text(before)
    assert _status(root, env) == set()


def test_exp_run_dry_with_a_set_param(project):
    """The documented preview of an experiment: it lists the params stage (what each unit reads is only
    known once it has run: `t2 params --dry` names the units)."""
    root, env = project
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline"], root, env)
    proc = _run(["dvc", "exp", "run", "--dry", "--allow-missing", "-S", "rl.kl_coef=0.1"], root, env)
    assert "Running stage 'params'" in proc.stdout
    assert yaml.safe_load((root / "params.yaml").read_text())["rl"]["kl_coef"] == 0.0  # the workspace is untouched


def test_the_readmes_sweep_table_fits_a_terminal(tmp_path):
    """README's `dvc exp show` after the λ sweep: the experiment, λ and each SVF expert's score, nothing else
    (all of `dvc exp show` is one column per metric and param: thousands of characters wide on the default)."""
    import re

    command = re.search(r"^  (dvc exp show --drop .*?)\s+#", (ROOT / "README.md").read_text(), re.M)
    assert command, "README: no `dvc exp show --drop ...` line"
    argv = [a.strip("'") for a in command.group(1).split()]
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "COLUMNS": "200"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"rl": {"kl_coef": 0.1, "lr": 0.002}, "seed": 0}))
    trained, unseen = ("gsm8k", "mbpp", "arc_easy"), ("math", "humaneval", "arc_challenge")  # the default's
    (tmp_path / "results.json").write_text(json.dumps({"score": {  # as `t2 report` writes it
        method: {task: 0.25 for task in (trained + unseen if method == "base" else unseen if "-" in method else trained)}
        for method in ("base", "lora", "svf", "t2-prompt", "t2-classifier", "t2-few-shot")}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"overhead_s": 1.5, "seconds": 20.0}))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": {
        "cmd": "true", "params": ["rl.kl_coef", "rl.lr", "seed"],
        "metrics": [{"results.json": {"cache": False}}, {"metrics.json": {"cache": False}}]}}}))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "commit", "-f", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "run"]):
        _run([sys.executable, "-m", "dvc", *cmd[1:]] if cmd[0] == "dvc" else cmd, tmp_path, env)
    out = _run([sys.executable, "-m", "dvc", *argv[1:], "--no-pager"], tmp_path, env).stdout
    header = next(line for line in out.splitlines() if "Experiment" in line).split()
    assert header == ["Experiment", "score.svf.gsm8k", "score.svf.mbpp", "score.svf.arc_easy", "rl.kl_coef"], out
    assert max(len(line) for line in out.splitlines()) <= 100, out  # ~80 here
