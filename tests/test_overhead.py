"""Per-stage overhead: `overhead_s` (process start, or the previous unit's end, to the unit's own
work) in every metrics file written through `record_metrics`."""
import json
import subprocess
import sys
import time

from tasks.tracking import StageRun, record_metrics, stage_run
from transformer2.config import parse_params
from transformer2.runtime import process_age_s


def test_process_age_counts_from_the_process_start():
    code = "import time; time.sleep(0.5); from transformer2.runtime import process_age_s; print(process_age_s())"
    t = time.monotonic()
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= age <= time.monotonic() - t + 0.05  # 10 ms clock ticks


def test_metrics_files_record_overhead(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setattr(StageRun, "last_end", None)
    params = parse_params({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "overhead"}})
    with stage_run(params, "model") as first:
        written = record_metrics(tmp_path / "model.json", {"seconds": 1.0}, first)
    assert 0 < first.overhead_s <= process_age_s()
    assert json.loads((tmp_path / "model.json").read_text())["overhead_s"] == first.overhead_s == written["overhead_s"]
    time.sleep(0.2)
    with stage_run(params, "data") as second:  # the same process: counted from the first unit's end
        record_metrics(tmp_path / "data.json", {"seconds": 1.0}, second, logged={"seconds": 1.0})
    assert 0.2 <= second.overhead_s < first.overhead_s + 30
    assert second.overhead_s < process_age_s() - first.overhead_s


def test_stage_checks_import_nothing_heavy(tmp_path):
    """`t2 <stage>` checks its inputs before Prefect starts, without torch, MLflow, lm-eval or Prefect (the
    checks imported torch for every stage: ~2 s before a data or report stage that never uses it)."""
    (tmp_path / "params.yaml").write_text("{}\n")
    code = ("import sys; from flows.cli import _parser, _check_before_start; from transformer2.config import "
            "load_params; _check_before_start(_parser().parse_args(['report']), load_params('params.yaml')); "
            "print(sorted(m for m in ('torch', 'mlflow', 'lm_eval', 'prefect', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _malloc_tuned(**env) -> bool:
    import os

    from transformer2.runtime import MALLOC_ENV, MALLOC_SWITCH

    keep = {k: v for k, v in os.environ.items() if k not in (*MALLOC_ENV, MALLOC_SWITCH)}
    code = "from transformer2.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**keep, **env})
    return out.stdout.strip() == "True"


def test_stages_keep_freed_memory_unless_told_otherwise():
    """`keep_freed_memory` (where a stage starts running) sets glibc's thresholds so freed activations
    are reused instead of faulted in again (its effect is measured in benchmarks/generation.py, not
    timed here); T2_MALLOPT=off or glibc's own MALLOC_* / GLIBC_TUNABLES variables leave malloc alone."""
    import ctypes.util

    if not sys.platform.startswith("linux") or "libc.so" not in (ctypes.util.find_library("c") or ""):
        return
    assert _malloc_tuned()
    assert not _malloc_tuned(T2_MALLOPT="off")
    assert not _malloc_tuned(MALLOC_TOP_PAD_="1048576")
    assert not _malloc_tuned(GLIBC_TUNABLES="glibc.malloc.top_pad=1048576")
