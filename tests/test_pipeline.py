"""The real pipeline path: `dvc repro` of dvc.yaml on a tiny profile, end to end."""
import csv
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
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # the default remote, beside the checkout
    return root, env


def test_dvc_repro_runs_every_stage(project):
    root, env = project
    proc = _run(["dvc", "repro"], root, env, timeout=1800)  # ~10 min on 2 idle cores; far more when shared
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "overrides existing task" not in proc.stdout + proc.stderr  # lm-eval's shadowing warnings are off
    assert json.loads((root / "stage_params/expert_gsm8k.json").read_text())["rl"]["max_new_tokens"] == 8
    outputs = [p for p in (root / "artifacts").rglob("*") if p.suffix in (".json", ".md") and "checkpoints" not in p.parts]
    assert outputs and not [p for p in outputs if "mlflow_run_id" in p.read_text()]  # run ids: metrics only
    assert not [p for p in outputs if str(root) in p.read_text()]  # no absolute paths either
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
    assert metrics["val_n"] == 3 and len(metrics["best_val_ci95"]) == 2  # validation with its interval
    assert metrics["movement"]["matrices"] == 14 and metrics["movement"]["z_max_abs_change"] >= 0
    lora = json.loads((root / "metrics/lora_gsm8k.json").read_text())
    assert len(lora["base_val_ci95"]) == 2 and len(lora["best_val_ci95"]) == 2  # LoRA's validation too
    curve = (root / "plots/expert_gsm8k.csv").read_text().splitlines()
    assert curve[0].startswith("step,reward") and len(curve) == 3
    # where the stage's time went: each step's phases, the validations apart (the base's included)
    assert curve[0].endswith("seconds_backward,seconds_validation") and curve[2].split(",")[-1] != ""
    assert metrics["validation_seconds"] > 0 and lora["validation_seconds"] > 0
    assert (root / "mlflow.db").is_file()
    lora = json.loads((root / "metrics/lora_gsm8k.json").read_text())
    assert lora["kind"] == "lora" and lora["objective"] == "next_token" and lora["trainable_parameters"] > 0
    assert (root / "artifacts/lora/gsm8k/adapter_config.json").is_file()
    for kind, task in (("base", "gsm8k"), ("base", "arc_easy"), ("svf", "gsm8k"), ("lora", "gsm8k")):
        cell = json.loads((root / f"metrics/eval_{kind}_{task}.json").read_text())
        assert cell["kind"] == kind and cell["task"] == task and 0 <= cell["value"] <= 1
        assert cell["mlflow_run_id"] and cell["params_hash"]
        assert set(json.loads((root / f"artifacts/eval/{kind}_{task}/results.json").read_text())) == {
            "results", "n_samples"}  # no timings in a DVC output
        assert (root / f"artifacts/eval/{kind}_{task}/results.json").is_file()
        samples = (root / f"artifacts/eval/{kind}_{task}/samples.jsonl").read_text().splitlines()
        assert len({json.loads(line)["doc_id"] for line in samples}) == 2 == cell["n_docs"] == cell["sample_n"]
        assert 0 <= cell["ci95"][0] <= cell["value"] <= cell["ci95"][1] <= 1  # Wilson, from the samples
        if kind != "base":  # paired with the base cell on the same 2 docs
            assert cell["paired_n"] == 2 and cell["test"] == "mcnemar_exact" and 0 <= cell["p_value"] <= 1
    for kind, task in (("svf", "gsm8k"), ("lora", "gsm8k"), ("classifier", "arc_challenge")):  # eval.overrides
        second = json.loads((root / f"metrics/eval_{kind}_{task}.json").read_text())["secondary"]
        assert second["style"] == "paper" and second["lm_eval_task"] == f"t2_{task}" and second["n_docs"] == 2
        assert second["paired_n"] == 2 and 0 <= second["p_value"] <= 1  # paired with base's paper-style samples
        assert (root / f"artifacts/eval/{kind}_{task}/paper/samples.jsonl").is_file()
    assert "secondary" not in json.loads((root / "metrics/eval_base_arc_easy.json").read_text())
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
    search = json.loads((root / "artifacts/cem/arc_challenge/cem.json").read_text())
    assert "seconds" not in search and all("seconds" not in h for h in search["history"])
    assert data["rows"]["humaneval"] == {"fewshot": 2, "test": 6}
    for kind in ("prompt", "classifier", "few_shot"):
        cell = json.loads((root / f"metrics/eval_{kind}_arc_challenge.json").read_text())
        assert cell["kind"] == kind and cell["n_docs"] == 2 and 0 <= cell["value"] <= 1
        assert cell["first_pass_s"] >= 0 and cell["second_pass_s"] > 0
    routed = json.loads((root / "metrics/eval_prompt_arc_challenge.json").read_text())["per_key"]
    assert set(routed) <= {"gsm8k", "None"}  # only the gsm8k expert exists: other categories get the base
    report = (root / "reports/results.md").read_text()
    assert "| GSM8K | exact_match,flexible-extract | 2 |" in report and "Δ " in report
    assert "| SVF GSM8K |" in report and "| classifier z_c |" in report  # the training table
    assert "Table 3" in report and "| ARC-Challenge | few-shot |" in report and "Dispatch accuracy" in report
    assert "Table 1 (secondary) — training tasks, paper style" in report and "Table 2 (secondary)" in report
    assert "paper" in {r["style"] for r in csv.DictReader((root / "reports/table2.csv").open())}
    assert (root / "plots/results.png").is_file()


def test_second_repro_does_nothing(project):
    root, env = project
    proc = _run(["dvc", "repro"], root, env)
    assert proc.returncode == 0
    assert "Data and pipelines are up to date" in proc.stdout
    assert "Running stage" not in proc.stdout


def test_t2_plots_draws_every_plot_of_the_run_offline(project):
    """After the tiny `dvc repro`: `t2 plots` draws every plot its DAG wrote, leaves out the figures of tasks
    the profile does not train (plain `dvc plots show` would warn "failed to load some plots"), offline."""
    root, env = project
    shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)  # as in a checkout
    proc = _run(["t2", "plots"], root, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "failed to load" not in out, out[-3000:]
    assert "not drawn, draws a task this profile does not run: validation_mbpp" in out and "not written" not in out
    html = (root / "dvc_plots" / "index.html").read_text()
    for plot in ("validation_gsm8k", "training_gsm8k", "expert_gsm8k.csv", "lora_gsm8k.csv", "classifier.csv",
                 "cem_arc_challenge.csv", "plots_results_png", "plots_dispatch_classifier_loglik_png"):
        assert plot in html, plot
    assert "validation_mbpp" not in html and "cdn.jsdelivr" not in html
    from .test_offline_plots import _chromium, _dump_dom

    if _chromium():  # the 6 vega plots drawn with no network
        dom = _dump_dom(_chromium(), root / "dvc_plots" / "index.html", root.parent / "browser-profile")
        assert dom.count('class="marks"') == 6


def test_pipeline_flow_through_dvc_skips_up_to_date_stages(project):
    root, env = project
    before = (root / "dvc.lock").read_text()
    proc = _run(["t2", "pipeline"], root, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "dvc-repro-expert" in proc.stdout + proc.stderr
    assert (root / "dvc.lock").read_text() == before


def test_pipeline_flow_without_dvc_trains_experts_in_parallel(tmp_path, mirror):
    params = parse_params({**TINY, "rl": {**TINY["rl"], "tasks": ["gsm8k", "arc_easy"]},
                           "eval": {**TINY["eval"], "tasks": ["gsm8k", "arc_easy", "arc_challenge"]},
                           "lora": {**TINY["lora"], "tasks": []},
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
    script = ("import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); "
              "runs = mlflow.search_runs(experiment_names=['tiny'], output_format='list'); "
              "parents = {r.info.run_id for r in runs if r.data.tags['stage'] == 'pipeline'}; "
              "print(len(parents), {r.data.tags.get('mlflow.parentRunId') in parents for r in runs "
              "if r.data.tags['stage'] != 'pipeline'})")
    proc = _run([sys.executable, "-c", script], tmp_path, env)
    assert proc.stdout.strip().splitlines()[-1] == "1 {True}", proc.stderr[-2000:]  # one parent, every stage under it


def test_mlflow_has_a_run_per_stage(project):
    """One run per stage unit (plus the parent run of `t2 pipeline`), tagged so that one filter lines the
    methods up per task: tags.stage = 'eval' and tags.task = '<task>', columns tags.method and the metric."""
    root, env = project
    script = ("import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); "
              "runs = mlflow.search_runs(experiment_names=['tiny'], output_format='list'); "
              "client = mlflow.MlflowClient(); "
              "print(json.dumps([{'tags': r.data.tags, 'params': r.data.params, 'metrics': r.data.metrics, "
              "'artifacts': [a.path for a in client.list_artifacts(r.info.run_id, 'samples')] "
              "if r.data.tags['stage'] == 'eval' else []} for r in runs]))")
    proc = _run([sys.executable, "-c", script], root, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    rl, lora, cem, ev = (TINY[k]["tasks"] for k in ("rl", "lora", "cem", "eval"))
    cells = len(ev) + len(rl) + len(lora) + 3 * len(TINY["eval"]["adapt_tasks"])  # base, svf, lora, strategies
    stages = sorted(["data", "decompose", "model", "classifier", "report", "pipeline"] + ["expert"] * len(rl)
                    + ["lora"] * len(lora) + ["cem"] * len(cem) + ["eval"] * cells)
    assert sorted(r["tags"]["stage"] for r in runs) == stages
    for r in runs:
        assert r["tags"]["base_model"] == TINY["model"]["name"] and r["tags"]["profile"] == "tiny"
        assert r["tags"]["params_hash"] and all("," not in m and "/" not in m for m in r["metrics"])
    evals = {(r["tags"]["method"], r["tags"]["task"]): r for r in runs if r["tags"]["stage"] == "eval"}
    assert set(evals) >= {("base", "gsm8k"), ("svf", "gsm8k"), ("lora", "gsm8k"), ("t2-prompt", "arc_challenge"),
                          ("t2-classifier", "arc_challenge"), ("t2-few-shot", "arc_challenge")}
    producers = {r["tags"].get("output_fingerprint"): r for r in runs}
    svf = evals[("svf", "gsm8k")]
    assert producers[svf["params"]["input.expert.fingerprint"]]["tags"]["unit"] == "expert@gsm8k"
    assert svf["params"]["input.expert.run_id"] != "unknown"
    assert evals[("t2-few-shot", "arc_challenge")]["params"]["input.cem.run_id"] != "unknown"
    assert evals[("t2-classifier", "arc_challenge")]["params"]["input.classifier.run_id"] != "unknown"
    for r in evals.values():
        assert r["tags"]["metric"] in r["metrics"] and r["metrics"]["n"] == 2
        assert "samples/samples.jsonl" in r["artifacts"]
    classifier = next(r for r in runs if r["tags"]["stage"] == "classifier")
    assert classifier["tags"]["kind"] == "classifier" and classifier["tags"]["method"] == "t2-classifier"


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

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "rl": {**TINY["rl"], "tasks": ["gsm8k", "mbpp"]},
                                                          "eval": {**TINY["eval"], "tasks": TINY["eval"]["tasks"] + ["mbpp"]}}))
    stages = {s.name: s for s in dag_stages(tmp_path / "params.yaml", ROOT / "dvc.yaml")}
    assert list(stages) == list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert stages["expert"].commands == ("t2 train-expert --task gsm8k --resume", "t2 train-expert --task mbpp --resume")
    assert stages["eval-few-shot"].commands == ("t2 eval --kind few_shot --task arc_challenge",)
    assert stages["model"].commands == ("t2 model",) and not stages["model"].foreach


def test_a_stages_output_reaches_the_pipeline_flows_log_as_it_comes():
    """`t2 pipeline` (through DVC) logs each stage's output in its task run line by line while the stage runs
    (flows/pipeline.py: `_stream`, which `dvc_repro_task` calls with the task's run logger), not at its end."""
    import time

    from flows.pipeline import _stream

    seen = []

    class Log:
        def info(self, line):
            seen.append((line, time.monotonic()))

    stage = "import sys, time; print('first', flush=True); time.sleep(2); print('second', file=sys.stderr); sys.exit(3)"
    code = _stream([sys.executable, "-c", stage], Log())
    ended = time.monotonic()
    assert code == 3 and [line for line, _ in seen] == ["first", "second"]  # stderr too; the exit code kept
    assert ended - seen[0][1] >= 1.5  # the first line was logged while the stage still ran


def test_dvc_push_and_pull_through_the_default_remote(project):
    """The remote in .dvc/config (a folder beside the checkout) shares every artifact: push, lose the
    workspace copies and the cache, pull, and the pipeline is up to date again."""
    root, env = project
    remote = root.parent / "transformer2-dvc-remote"
    proc = _run(["dvc", "push"], root, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(remote.rglob("*"))
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    cached = {o["path"] for s in lock.values() for o in s.get("outs", []) if o["path"].startswith("artifacts/")}
    for path in cached:  # the outputs only: DVC's .gitignore files beside them stay, as in a fresh clone
        shutil.rmtree(root / path)
    shutil.rmtree(root / ".dvc" / "cache")
    proc = _run(["dvc", "pull"], root, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "artifacts/experts/gsm8k/expert.safetensors").is_file()
    proc = _run(["dvc", "status"], root, env)
    assert "Data and pipelines are up to date" in proc.stdout, proc.stdout
