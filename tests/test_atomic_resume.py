"""Atomic artifacts, kill-and-resume and determinism (issue 15, items 5 and 6), on the tiny profile through
library calls: a run SIGKILLed at a random point and resumed ends with the same bytes as an uninterrupted run
(decompose, an SVF expert, a LoRA adapter, the classifier z_c, a CEM search, an evaluation cell), each saved
as its stage saves it; damaged cache files are recomputed; two runs of the same params and seed write
byte-identical experts, adapters, CEM mixes and metrics (timings excluded)."""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformer2.files import atomic_dir, temp_siblings

from .conftest import ROOT


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def worker(job: str, project: Path, out: Path, kill_after: int | None = None, kill_within: float = 0.0,
           timeout: int = 900) -> list[float]:
    """Run tests/resume_worker.py and return the times (s) between its progress lines; with `kill_after`,
    SIGKILL it a uniformly random moment within `kill_within` s after that progress line: inside the next
    unit of work (the worker does not pause), which can be mid-step or mid-checkpoint."""
    cmd = [sys.executable, "-m", "tests.resume_worker", job, str(project), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamps = []
    try:
        for line in proc.stdout:
            if not line.startswith("progress "):
                continue
            stamps.append(time.perf_counter())
            if kill_after is not None and line.strip() == f"progress {kill_after}":
                wait = random.uniform(0, kill_within)
                time.sleep(wait)
                proc.send_signal(signal.SIGKILL)
                print(f"{job}: SIGKILL {wait:.3f} s after progress {kill_after} (a unit takes ~{kill_within:.3f} s)")
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    proc.stderr.close()
    if kill_after is None:
        assert proc.returncode == 0, err[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return [b - a for a, b in zip(stamps, stamps[1:])]


def test_atomic_dir_keeps_the_old_folder_on_error(tmp_path):
    target = tmp_path / "expert"
    with atomic_dir(target) as tmp:
        (tmp / "a.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.json").write_text("new")
            (tmp / "b.json").write_text("new")
            raise RuntimeError("killed mid-save")
    assert (target / "a.json").read_text() == "old"
    assert not (target / "b.json").exists() and not temp_siblings(target)


def test_an_adapters_records_are_part_of_its_one_unit(tmp_path):
    """validations.json (and z_c's dispatch.json, CEM's shots.json) are written inside the adapter's atomic_dir:
    a save that fails while writing them leaves the previous folder whole, records and weights of one run."""
    import torch

    from transformer2.svf import Expert, SVFConfig

    folder = tmp_path / "expert"
    Expert({"m": torch.ones(3)}, "fp", SVFConfig(), {"run": 1}).save(folder, extra={"validations.json": {"v": [1]}})
    before = files(folder)
    assert set(before) == {"expert.json", "expert.safetensors", "validations.json"}
    with pytest.raises(TypeError):  # not JSON: fails inside the unit, after the new weights were written
        Expert({"m": torch.zeros(3)}, "fp", SVFConfig(), {"run": 2}).save(folder, extra={"validations.json": {1j}})
    assert files(folder) == before and not temp_siblings(folder)
    with pytest.raises(ValueError, match="plain .json file name"):
        Expert({"m": torch.zeros(3)}, "fp", SVFConfig()).save(folder, extra={"../validations.json": {}})
    assert files(folder) == before

def test_model_stage_writes_one_portable_unit(tiny_model_dir, tmp_path):
    """checkpoint/ and model.json as one folder, the checkpoint named relative to it: a copy loads its own."""
    from transformer2.models import ModelError, ModelInfo, load_base

    record = json.loads((tiny_model_dir / "model.json").read_text())
    assert record["path"] == "checkpoint" and record["files"]["model.safetensors"] > 0
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, copy)
    assert ModelInfo.load(copy).path == str(copy / "checkpoint")
    load_base(copy)
    weights = copy / "checkpoint/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ModelError, match="damaged or incomplete"):
        load_base(copy)


def test_damaged_svd_factor_is_recomputed(tiny_project, tmp_path):
    from transformer2.models import load_base
    from transformer2.svd import SVDCacheError, decompose, load_factors
    from transformer2.svf import find_targets

    cache = tmp_path / "svd"
    shutil.copytree(tiny_project / "artifacts/svd", cache)
    good = files(cache)
    model, _, info = load_base(tiny_project / "artifacts/model")
    names = find_targets(model, "all")
    victim = cache / "factors" / f"{names[3]}.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(SVDCacheError, match="is damaged.*rerun the decompose stage"):
        load_factors(cache, info.fingerprint)
    decompose(model, names, cache, info.fingerprint)
    assert {k: v for k, v in files(cache).items() if k != "index.json"} == {
        k: v for k, v in good.items() if k != "index.json"}
    load_factors(cache, info.fingerprint)


def uninterrupted_and_resumed(job: str, project: Path, tmp_path: Path, kill_range: tuple[int, int],
                              output: str) -> tuple[Path, Path]:
    """`job` run once whole, and once SIGKILLed at a random moment of the unit of work after a random
    progress step (a unit lasts about the whole run's median gap between progress lines; its `output` not
    yet written), then rerun to the end: the two folders to compare."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    gaps = sorted(worker(job, project, whole))
    assert gaps, f"{job}: no progress lines to kill between"
    worker(job, project, resumed, kill_after=random.randint(*kill_range), kill_within=gaps[len(gaps) // 2])
    assert not (resumed / output).exists()
    worker(job, project, resumed)
    return whole, resumed


@pytest.mark.slow  # three interpreters with torch: ~150 s on 2 loaded cores
def test_decompose_killed_and_resumed_gives_the_same_cache(tiny_project, tmp_path):
    whole, resumed = uninterrupted_and_resumed("decompose", tiny_project, tmp_path, (2, 10), "svd/index.json")
    assert files(whole / "svd") == files(resumed / "svd")  # index.json too: no timing inside a DVC output


@pytest.mark.slow  # three interpreters with torch and a tiny model: ~290 s on 2 loaded cores
def test_expert_training_killed_and_resumed_gives_the_same_expert(tiny_project, tmp_path):
    whole, resumed = uninterrupted_and_resumed("expert", tiny_project, tmp_path, (1, 3), "expert")
    assert files(whole / "expert") == files(resumed / "expert")
    assert "validations.json" in files(whole / "expert")  # saved inside the expert's one unit
    same_final_state_and_history(whole, resumed)


def same_final_state_and_history(whole: Path, resumed: Path) -> None:
    """The adapter after the last step (not only the best one), the per-step metrics (timings excluded) and the
    validations are those of the uninterrupted run, and the second run did resume from a checkpoint."""
    import torch

    a, b = (torch.load(d / "final_state.pt") for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "history.json").read_text() == (resumed / "history.json").read_text()
    assert json.loads((whole / "run.json").read_text())["resumed_from"] == 0
    assert json.loads((resumed / "run.json").read_text())["resumed_from"] >= 1


@pytest.mark.slow  # three interpreters with torch and a tiny model: ~60 s on 2 loaded cores
def test_lora_training_killed_and_resumed_gives_the_same_adapter(tiny_project, tmp_path):
    """Next-token LoRA with dropout: the checkpoint carries the optimiser, the cosine schedule and the RNG."""
    whole, resumed = uninterrupted_and_resumed("lora", tiny_project, tmp_path, (1, 3), "lora")
    assert files(whole / "lora") == files(resumed / "lora")
    assert {"adapter_model.safetensors", "validations.json"} <= set(files(whole / "lora"))
    same_final_state_and_history(whole, resumed)


@pytest.mark.slow  # ~70 s on 2 loaded cores
def test_classifier_training_killed_and_resumed_gives_the_same_zc(tiny_project, tmp_path):
    whole, resumed = uninterrupted_and_resumed("classifier", tiny_project, tmp_path, (1, 3), "classifier")
    assert files(whole / "classifier") == files(resumed / "classifier")
    assert "validations.json" in files(whole / "classifier")
    # z_c's start (what the stage measures movement from) is the seeded init whether or not the run resumed
    assert files(whole / "start") == files(resumed / "start")
    assert (whole / "history.json").read_text() == (resumed / "history.json").read_text()
    assert json.loads((resumed / "run.json").read_text())["resumed_from"] >= 1


@pytest.mark.slow  # ~60 s on 2 loaded cores
def test_cem_killed_and_resumed_gives_the_same_mix(tiny_project, tmp_path):
    """The real search on the tiny model (two experts, ARC shots), killed after a random generation."""
    whole, resumed = uninterrupted_and_resumed("cem", tiny_project, tmp_path, (1, 3), "cem")
    assert files(whole / "cem") == files(resumed / "cem")  # alpha, cem.json with its history, shots.json
    assert json.loads((whole / "run.json").read_text())["resumed_from"] == 0
    assert json.loads((resumed / "run.json").read_text())["resumed_from"] >= 1


@pytest.mark.slow  # ~90 s on 2 loaded cores
def test_eval_cell_killed_and_resumed_gives_the_same_results(tiny_project, tmp_path):
    """An SVF cell on ARC-Easy (6 docs, 24 loglikelihood requests) killed while lm-eval fills its response
    cache: the rerun takes the cached responses, computes the rest, and writes the same results and samples."""
    whole, resumed = uninterrupted_and_resumed("eval", tiny_project, tmp_path, (2, 20), "cell")
    assert files(whole / "cell") == files(resumed / "cell")
    assert set(files(whole / "cell")) == {"results.json", "samples.jsonl"}
    first, second = (json.loads((d / "run.json").read_text()) for d in (whole, resumed))
    assert first == {"cached_responses": 0, "computed_responses": 24}
    assert second["cached_responses"] >= 1 and second["cached_responses"] + second["computed_responses"] == 24
    assert not list((resumed / "run").iterdir())  # the cache goes once the cell is written


@pytest.mark.slow
def test_two_runs_of_the_same_params_are_byte_identical(tiny_project, tmp_path):
    """Separate processes (their own hash seeds), same tiny params and seed: the same expert, LoRA adapter,
    CEM mix and metrics (timings excluded), byte for byte."""
    runs = [tmp_path / "one", tmp_path / "two"]
    for out in runs:
        worker("all", tiny_project, out)
    for part in ("expert", "lora", "cem"):
        assert files(runs[0] / part) == files(runs[1] / part), part
    assert (runs[0] / "metrics.json").read_text() == (runs[1] / "metrics.json").read_text()
