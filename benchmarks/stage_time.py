"""Stage time of two whole-DAG runs side by side: the sum of every stage's `seconds`, by kind of stage.

    python benchmarks/stage_time.py --before REV_OR_DIR --after REV_OR_DIR [--out benchmarks/results/stage_time.json]

Each side is a checkout that ran `dvc repro` (its metrics/*.json, plots/*.csv and params.yaml), or a git
revision of this repository (the files committed there). The training stages (experts, LoRA, classifier)
are also split by phase from their per-step curves (plots/<stage>.csv): rollouts, the gradient pass
(log-probs / forward + backward), validation where the run recorded it, and the rest of the stage
(validation in runs that did not record it, loading, saving): what the decoding engine touches and what
it does not. Both sides' params are read with this
checkout's validator and compared without `execution` and `tracking` (how and where a run is
recorded, not what it computes): the table says whether they are the same, which is what makes a
before/after of stage time mean anything. Prints the table; writes the JSON.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from transformer2.config import ConfigError, load_params

RUN_WRITES = ("dvc.lock", "results.json", "metrics/", "plots/", "reports/", "stage_params/")  # a run's own outputs
KINDS = (("eval cells", "eval_"), ("experts", "expert_"), ("LoRA", "lora_"), ("CEM", "cem_"),
         ("classifier", "classifier"))


def git(*args: str, where: str = ".") -> str:
    return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, check=True).stdout


def read_run(source: str) -> tuple[dict[str, dict], dict[str, str], str]:
    """(stage -> its metrics, stage -> its curve's CSV text, params.yaml text) of a checkout folder or a
    git revision."""
    folder = Path(source)
    if folder.is_dir():
        metrics = {p.stem: json.loads(p.read_text()) for p in sorted((folder / "metrics").glob("*.json"))}
        curves = {p.stem: p.read_text() for p in sorted((folder / "plots").glob("*.csv"))}
        return metrics, curves, (folder / "params.yaml").read_text()
    try:
        names = git("ls-tree", "--name-only", f"{source}:metrics").split()
    except subprocess.CalledProcessError:
        raise SystemExit(f"stage_time.py: {source!r} is neither a folder nor a git revision with metrics/")
    metrics = {Path(n).stem: json.loads(git("show", f"{source}:metrics/{n}")) for n in names if n.endswith(".json")}
    try:
        plots = [n for n in git("ls-tree", "--name-only", f"{source}:plots").split() if n.endswith(".csv")]
    except subprocess.CalledProcessError:
        plots = []
    curves = {Path(n).stem: git("show", f"{source}:plots/{n}") for n in plots}
    return metrics, curves, git("show", f"{source}:params.yaml")


def checkout(source: str) -> dict:
    """The commit a folder's checkout was at and the tracked files it had changed besides what a run
    writes (a swapped params.yaml, say)."""
    try:
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no", where=source).splitlines()
                   if line[3:] not in RUN_WRITES and not line[3:].startswith(RUN_WRITES)]
        return {"commit": git("rev-parse", "--short", "HEAD", where=source).strip(), "changed": changed}
    except (subprocess.CalledProcessError, OSError):
        return {}


def computed_params(text: str) -> dict:
    """The params as this checkout resolves them, less what does not change what a stage computes."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        params = load_params(f.name).model_dump()
    return {k: v for k, v in params.items() if k not in ("execution", "tracking")}


def kind(stage: str) -> str:
    return next((name for name, prefix in KINDS if stage.startswith(prefix)), "the rest")


def summary(metrics: dict[str, dict]) -> dict:
    seconds = {s: m["seconds"] for s, m in metrics.items() if isinstance(m.get("seconds"), (int, float))}
    by_kind: dict[str, float] = {}
    for stage, s in seconds.items():
        by_kind[kind(stage)] = by_kind.get(kind(stage), 0.0) + s
    overhead = [m["overhead_s"] for m in metrics.values() if isinstance(m.get("overhead_s"), (int, float))]
    return {"stages": len(seconds), "minutes": round(sum(seconds.values()) / 60, 2),
            "minutes_by_kind": {k: round(v / 60, 2) for k, v in by_kind.items()},
            "overhead_s_median": round(statistics.median(overhead), 2) if overhead else None,
            "seconds": {s: round(v, 1) for s, v in sorted(seconds.items())}}


TRAINING = ("expert_", "lora_", "classifier")
PHASES = (("rollouts", ("seconds_rollout",)),
          ("gradient pass", ("seconds_logprob", "seconds_forward", "seconds_backward")),
          ("validation", ("seconds_validation",)))


def training_phases(metrics: dict[str, dict], curves: dict[str, str]) -> dict[str, float]:
    """Seconds of the training stages by phase, summed over their curves' steps; what a stage's
    `seconds` holds beyond its curve is "the rest" (loading, saving, and validation in runs that did
    not record it)."""
    out = {name: 0.0 for name, _ in PHASES} | {"the rest": 0.0}
    for stage, m in metrics.items():
        if not stage.startswith(TRAINING) or not isinstance(m.get("seconds"), (int, float)):
            continue
        counted = 0.0
        for row in csv.DictReader(io.StringIO(curves.get(stage, ""))):
            for name, columns in PHASES:
                s = sum(float(row[c]) for c in columns if row.get(c))
                out[name] += s
                counted += s
        out["the rest"] += m["seconds"] - counted
    return {k: round(v / 60, 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a checkout folder that ran dvc repro, or a git revision")
    ap.add_argument("--after", required=True)
    ap.add_argument("--out", default="benchmarks/results/stage_time.json")
    args = ap.parse_args()
    (m0, c0, p0), (m1, c1, p1) = read_run(args.before), read_run(args.after)
    try:
        same = computed_params(p0) == computed_params(p1)
    except ConfigError as err:
        raise SystemExit(f"stage_time.py: {err}")
    before = {**summary(m0), "training_minutes_by_phase": training_phases(m0, c0)}
    after = {**summary(m1), "training_minutes_by_phase": training_phases(m1, c1)}
    result = {"before": {"source": args.before, **checkout(args.before), **before},
              "after": {"source": args.after, **checkout(args.after), **after},
              "same_params": same, "ratio": round(after["minutes"] / before["minutes"], 3) if before["minutes"] else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"same params (less execution / tracking): {'yes' if same else 'NO: the times below are not comparable'}")
    print(f"{'':<14}{'before':>10}{'after':>10}{'after/before':>14}")
    for name in [k for k, _ in KINDS] + ["the rest"]:
        b, a = before["minutes_by_kind"].get(name, 0.0), after["minutes_by_kind"].get(name, 0.0)
        print(f"{name:<14}{b:>9.1f}m{a:>9.1f}m{(a / b if b else float('nan')):>14.2f}")
    print(f"{'all stages':<14}{before['minutes']:>9.1f}m{after['minutes']:>9.1f}m{result['ratio'] or float('nan'):>14.2f}"
          f"   ({before['stages']} / {after['stages']} stages; median overhead_s {before['overhead_s_median']} / "
          f"{after['overhead_s_median']})")
    print("training stages (experts, LoRA, classifier) by phase, from their per-step curves:")
    for name in before["training_minutes_by_phase"]:
        b, a = before["training_minutes_by_phase"][name], after["training_minutes_by_phase"][name]
        print(f"  {name:<14}{b:>7.1f}m{a:>9.1f}m{(a / b if b else float('nan')):>14.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
