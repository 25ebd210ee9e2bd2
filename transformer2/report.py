"""Paper-style tables from the evaluation cells: Table 1 (training tasks: base / LoRA / SVF) and
Table 2 (unseen tasks: base → adaptation strategies), as Markdown and a bar chart.

Each cell is the headline metric of one `metrics/eval_<kind>_<task>.json` (in %, with the number
of test docs it is based on); a cell that has not run is shown as "–", never guessed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .cells import KIND_TITLES, TWO_PASS_KINDS
from .files import atomic_save
from .tasks import PAPER_TRAIN_TASKS as TRAIN_TASKS, PAPER_UNSEEN_TASKS as UNSEEN_TASKS, TASKS

Cells = dict[tuple[str, str], dict]  # (kind, task) -> the cell's metrics file content

TABLE1_KINDS = ("base", "lora", "svf")
TABLE2_KINDS = ("base", *TWO_PASS_KINDS)


def task_title(task: str) -> str:
    return TASKS[task].title if task in TASKS else task


def read_cells(metrics_dir: str | Path) -> Cells:
    cells: Cells = {}
    for path in sorted(Path(metrics_dir).glob("eval_*.json")):
        cell = json.loads(path.read_text())
        cells[(cell["kind"], cell["task"])] = cell
    return cells


def _fmt(cell: Optional[dict]) -> str:
    if cell is None:
        return "–"
    n = cell.get("n_docs")
    return f"{100 * cell['value']:.2f}" + (f" (n={n})" if n else "")


def table(cells: Cells, kinds: Sequence[str], tasks: Sequence[str], title: str) -> str:
    """One Markdown table: a row per task, a column per model kind; metric named per row."""
    head = "| task | metric | " + " | ".join(KIND_TITLES.get(k, k) for k in kinds) + " |"
    rows = [f"### {title}", "", head, "|" + "---|" * (len(kinds) + 2)]
    for task in tasks:
        row = [cells.get((k, task)) for k in kinds]
        metric = next((c["metric"] for c in row if c), "–")
        rows.append(f"| {task_title(task)} | {metric} | " + " | ".join(_fmt(c) for c in row) + " |")
    return "\n".join(rows) + "\n"


def read_stage_metrics(metrics_dir: str | Path) -> tuple[Optional[dict], dict[str, dict]]:
    """The classifier stage's metrics (or None) and the cem stage's, per task."""
    root = Path(metrics_dir)
    classifier = json.loads((root / "classifier.json").read_text()) if (root / "classifier.json").is_file() else None
    cem = {}
    for path in sorted(root.glob("cem_*.json")):
        m = json.loads(path.read_text())
        cem[m["task"]] = m
    return classifier, cem


def timing_table(cells: Cells, kinds: Sequence[str] = TABLE2_KINDS[1:], tasks: Sequence[str] = UNSEEN_TASKS) -> str:
    """Paper Table 3: seconds of the first pass (choosing z) and of the second (answering) per cell;
    empty when no cell recorded them."""
    rows = ["### Table 3 — cost of the first pass (seconds, same cell)", "",
            "| task | strategy | first pass | second pass | first / second | search before the cell |",
            "|---|---|---|---|---|---|"]
    for task in tasks:
        for kind in kinds:
            c = cells.get((kind, task))
            if not c or c.get("first_pass_s") is None:
                continue
            ratio = c.get("first_to_second")
            search = c.get("adaptation_search_s")
            rows.append(f"| {task_title(task)} | {KIND_TITLES.get(kind, kind)} | {c['first_pass_s']:.2f} | "
                        f"{c['second_pass_s']:.2f} | {'–' if ratio is None else f'{100 * ratio:.1f}%'} | "
                        f"{'–' if search is None else f'CEM {search:.0f} s'} |")
    return "\n".join(rows) + "\n" if len(rows) > 4 else ""


def dispatch_table(classifier: Optional[dict]) -> str:
    """Dispatch accuracy on held-out prompts: the base prompt vs the classification expert, per mode."""
    if not classifier or not classifier.get("dispatch"):
        return ""
    results = classifier["dispatch"]
    tasks = sorted({t for r in results.values() for t in r.get("per_task_accuracy", {})},
                   key=lambda t: (TRAIN_TASKS + UNSEEN_TASKS).index(t) if t in TRAIN_TASKS + UNSEEN_TASKS else 99)
    rows = [f"### Dispatch accuracy ({classifier.get('heldout_docs', '?')} held-out test prompts; "
            "confusion matrices in plots/dispatch/)", "",
            "| first pass | mode | accuracy | " + " | ".join(task_title(t) for t in tasks) + " | seconds |",
            "|" + "---|" * (len(tasks) + 4)]
    for name, r in results.items():
        who, _, mode = name.partition("_")
        per = r.get("per_task_accuracy", {})
        rows.append(f"| {who} | {mode} | {100 * r['accuracy']:.1f} | "
                    + " | ".join(f"{100 * per[t]:.0f}" if t in per else "–" for t in tasks)
                    + f" | {r.get('seconds', 0):.1f} |")
    return "\n".join(rows) + "\n"


def cem_table(cem: Mapping[str, dict]) -> str:
    """The few-shot mixes the cem stage found: α per expert, fitness on the shots, search time."""
    if not cem:
        return ""
    rows = ["### Few-shot CEM (α per expert; fitness on the shots, never on evaluated docs)", "",
            "| task | shots (split) | population × generations | α | shot accuracy | gold log-lik./token | seconds |",
            "|---|---|---|---|---|---|---|"]
    for task, m in cem.items():
        alpha = m.get("alpha")
        shown = "per matrix" if alpha is None else ", ".join(f"{k} {a:.2f}" for k, a in zip(m["experts"], alpha))
        rows.append(f"| {task_title(task)} | {m['shots']} ({m['shot_split']}) | "
                    f"{m['population']} × {m['generations']} | {shown} | {100 * m['accuracy']:.0f}% | "
                    f"{m['loglik']:.3f} | {m['search_seconds']:.0f} |")
    return "\n".join(rows) + "\n"


def build_report(cells: Cells, notes: Mapping[str, str] | None = None, classifier: Optional[dict] = None,
                 cem: Optional[Mapping[str, dict]] = None) -> str:
    parts = ["# Results", "",
             "Accuracy in % from lm-evaluation-harness (`metrics/eval_<kind>_<task>.json`); n = test docs "
             "evaluated (a limit below the full test set is a CPU profile, not a paper number).", "",
             table(cells, TABLE1_KINDS, TRAIN_TASKS, "Table 1 — training tasks (base / LoRA / SVF expert)"),
             table(cells, TABLE2_KINDS, UNSEEN_TASKS,
                   "Table 2 — unseen tasks (base → prompt dispatch / classifier expert / few-shot CEM)")]
    parts += [extra for extra in (timing_table(cells), dispatch_table(classifier), cem_table(cem or {})) if extra]
    for key, text in (notes or {}).items():
        parts += [f"**{key}.** {text}", ""]
    return "\n".join(parts)


def plot_cells(cells: Cells, path: str | Path) -> None:
    """Grouped bars per task for every kind that has a cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TRAIN_TASKS + UNSEEN_TASKS if any(task == t for _, task in cells)]
    kinds = [k for k in TABLE1_KINDS + TABLE2_KINDS[1:] if any(kind == k for kind, _ in cells)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 3.6))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        xs = [j + i * width for j, t in enumerate(tasks) if (kind, t) in cells]
        ys = [100 * cells[(kind, t)]["value"] for t in tasks if (kind, t) in cells]
        ax.bar(xs, ys, width, label=KIND_TITLES.get(kind, kind))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [task_title(t) for t in tasks])
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title("transformer2: base vs adapted, per task")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
