"""The real pipeline path: `dvc repro` of dvc.yaml on a tiny profile, end to end."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transformer2.config import parse_params

from .conftest import ROOT

TINY = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())


def _env(mirror: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["T2_DATA_DIR"] = str(mirror)
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 2400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory, mirror):
    """A fresh git + DVC project with this repo's dvc.yaml and a tiny params.yaml."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(ROOT / "profiles" / "tiny.yaml", root / "params.yaml")
    env = _env(mirror)
    env["PREFECT_HOME"] = str(root / ".prefect")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        proc = _run(cmd, root, env)
        assert proc.returncode == 0, proc.stderr
    return root, env


def test_dvc_repro_runs_every_stage(project):
    root, env = project
    proc = _run(["dvc", "repro"], root, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    model = json.loads((root / "artifacts/model/model.json").read_text())
    assert model["architecture"] == "LlamaForCausalLM"
    data = json.loads((root / "metrics/data.json").read_text())
    assert data["rows"]["gsm8k"] == {"train": 6, "validation": 6, "test": 6}
    decompose = json.loads((root / "metrics/decompose.json").read_text())
    assert decompose["modules"] == 14 and decompose["max_rel_reconstruction_error"] < 1e-5
    svd_index = json.loads((root / "artifacts/svd/index.json").read_text())
    assert svd_index["fingerprint"] == model["fingerprint"]
    expert = json.loads((root / "artifacts/experts/gsm8k/expert.json").read_text())
    assert expert["base_fingerprint"] == model["fingerprint"] and expert["provenance"]["task"] == "gsm8k"
    metrics = json.loads((root / "metrics/expert_gsm8k.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["best_val_accuracy"] <= 1
    curve = (root / "plots/expert_gsm8k.csv").read_text().splitlines()
    assert curve[0].startswith("step,reward") and len(curve) == 3
    assert (root / "mlflow.db").is_file()
    lora = json.loads((root / "metrics/lora_gsm8k.json").read_text())
    assert lora["kind"] == "lora" and lora["objective"] == "next_token" and lora["trainable_parameters"] > 0
    assert (root / "artifacts/lora/gsm8k/adapter_config.json").is_file()
    for kind, task in (("base", "gsm8k"), ("base", "arc_easy"), ("svf", "gsm8k"), ("lora", "gsm8k")):
        cell = json.loads((root / f"metrics/eval_{kind}_{task}.json").read_text())
        assert cell["kind"] == kind and cell["task"] == task and 0 <= cell["value"] <= 1
        assert (root / f"artifacts/eval/{kind}_{task}/results.json").is_file()
        samples = (root / f"artifacts/eval/{kind}_{task}/samples.jsonl").read_text().splitlines()
        assert len({json.loads(line)["doc_id"] for line in samples}) == 2 == cell["n_docs"]
    classifier = json.loads((root / "metrics/classifier.json").read_text())
    assert classifier["steps"] == 1 and classifier["train_docs"] == 6 and classifier["heldout_docs"] == 6
    assert set(classifier["dispatch"]) == {"prompt_generate", "prompt_loglik", "classifier_generate",
                                           "classifier_loglik"}
    for name in classifier["dispatch"]:
        assert (root / f"plots/dispatch/{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((root / "artifacts/classifier/expert.json").read_text())["provenance"]["task"] == "classify"
    cem = json.loads((root / "metrics/cem_arc_challenge.json").read_text())
    assert cem["experts"] == ["gsm8k"] and cem["shots"] == 2 and cem["shot_split"] == "train"
    assert (root / "artifacts/cem/arc_challenge/alpha.safetensors").is_file()
    assert data["rows"]["humaneval"] == {"fewshot": 2, "test": 6}
    for kind in ("prompt", "classifier", "few_shot"):
        cell = json.loads((root / f"metrics/eval_{kind}_arc_challenge.json").read_text())
        assert cell["kind"] == kind and cell["n_docs"] == 2 and 0 <= cell["value"] <= 1
        assert cell["first_pass_s"] >= 0 and cell["second_pass_s"] > 0
    routed = json.loads((root / "metrics/eval_prompt_arc_challenge.json").read_text())["per_key"]
    assert set(routed) <= {"gsm8k", "None"}  # only the gsm8k expert exists: other categories get the base
    report = (root / "reports/results.md").read_text()
    assert "| GSM8K |" in report and "(n=2)" in report
    assert "Table 3" in report and "| ARC-Challenge | few-shot |" in report and "Dispatch accuracy" in report
    assert (root / "plots/results.png").is_file()


def test_second_repro_does_nothing(project):
    root, env = project
    proc = _run(["dvc", "repro"], root, env)
    assert proc.returncode == 0
    assert "Data and pipelines are up to date" in proc.stdout
    assert "Running stage" not in proc.stdout


def test_pipeline_flow_through_dvc_skips_up_to_date_stages(project):
    root, env = project
    before = (root / "dvc.lock").read_text()
    proc = _run(["t2", "pipeline"], root, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "dvc-repro-expert" in proc.stdout + proc.stderr
    assert (root / "dvc.lock").read_text() == before


def test_pipeline_flow_without_dvc_trains_experts_in_parallel(tmp_path, mirror):
    params = parse_params({**TINY, "rl": {**TINY["rl"], "tasks": ["gsm8k", "arc_easy"]},
                           "eval": {**TINY["eval"], "tasks": ["arc_easy"]}, "lora": {**TINY["lora"], "tasks": []},
                           "data": {**TINY["data"], "tasks": ["gsm8k", "mbpp", "arc_easy", "arc_challenge"]}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    env = _env(mirror)
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    proc = _run(["t2", "pipeline", "--no-dvc", "--parallel"], tmp_path, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for task in ("gsm8k", "arc_easy"):
        assert (tmp_path / f"artifacts/experts/{task}/expert.safetensors").is_file()
        assert json.loads((tmp_path / f"metrics/expert_{task}.json").read_text())["task"] == task
        assert json.loads((tmp_path / f"metrics/eval_svf_{task}.json").read_text())["kind"] == "svf"


def test_mlflow_has_a_run_per_stage(project):
    root, env = project
    script = ("import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); "
              "runs = mlflow.search_runs(experiment_names=['tiny']); "
              "print(sorted(runs['tags.stage'].tolist()))")
    proc = _run([sys.executable, "-c", script], root, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rl, lora, cem, ev = (TINY[k]["tasks"] for k in ("rl", "lora", "cem", "eval"))
    cells = len(ev) + len(rl) + len(lora) + 3 * len(TINY["eval"]["adapt_tasks"])  # base, svf, lora, strategies
    stages = sorted(["data", "decompose", "model", "classifier", "report"] + ["expert"] * len(rl)
                    + ["lora"] * len(lora) + ["cem"] * len(cem) + ["eval"] * cells)
    assert proc.stdout.strip().splitlines()[-1] == str(stages)


def test_bad_params_fail_fast_with_the_key(project, tmp_path):
    root, env = project
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "svf": {"targest": "mlp"}}))
    proc = _run(["t2", "decompose", "--params", str(bad)], root, env, timeout=60)
    assert proc.returncode == 2
    assert "svf.targest: unknown key" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").glob("*.yaml")))
def test_profiles_are_valid_and_complete(profile):
    """Every profile validates and names every key (DVC needs each key a stage lists)."""
    data = yaml.safe_load((ROOT / "profiles" / profile).read_text())
    assert parse_params(data).model_dump() == data


def test_pipeline_flow_reads_its_stages_from_dvc_yaml(tmp_path):
    from flows.pipeline import dag_stages

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "rl": {**TINY["rl"], "tasks": ["gsm8k", "mbpp"]}}))
    stages = {s.name: s for s in dag_stages(tmp_path / "params.yaml", ROOT / "dvc.yaml")}
    assert list(stages) == list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert stages["expert"].commands == ("t2 train-expert --task gsm8k --resume", "t2 train-expert --task mbpp --resume")
    assert stages["eval-few-shot"].commands == ("t2 eval --kind few_shot --task arc_challenge",)
    assert stages["model"].commands == ("t2 model",) and not stages["model"].foreach
