"""Paper-style tables from the evaluation cells: Table 1 (training tasks: base / LoRA / SVF) and
Table 2 (unseen tasks: base → adaptation strategies), as Markdown and a bar chart.

Each cell is the headline metric of one `metrics/eval_<kind>_<task>.json` (in %, with the number
of test docs it is based on). Only the cells the caller expects (those the current DAG produces)
are read, so files another profile left on disk never enter a report: an expected cell that is
not on disk reads "missing", one written under other settings (its `params_hash` differs) "stale",
and a cell the run does not have "–". Nothing is guessed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from .cells import KIND_TITLES, TWO_PASS_KINDS
from .files import atomic_save, atomic_write_text
from .tasks import PAPER_TRAIN_TASKS as TRAIN_TASKS, PAPER_UNSEEN_TASKS as UNSEEN_TASKS, TASKS

Cells = dict[tuple[str, str], dict]  # (kind, task) -> the cell's metrics file content, or {"status": ...}
Expected = Union[Mapping[tuple[str, str], Optional[str]], Iterable[tuple[str, str]]]
MISSING, STALE = "missing", "stale"

TABLE1_KINDS = ("base", "lora", "svf")
TABLE2_KINDS = ("base", *TWO_PASS_KINDS)


def task_title(task: str) -> str:
    return TASKS[task].title if task in TASKS else task


def read_metrics(path: Path, params_hash: Optional[str] = None) -> dict:
    """One metrics file, or {"status": "missing"} / {"status": "stale"} (written under another `params_hash`)."""
    if not path.is_file():
        return {"status": MISSING}
    metrics = json.loads(path.read_text())
    if params_hash is not None and metrics.get("params_hash") != params_hash:
        return {"status": STALE}
    return metrics


def read_cells(metrics_dir: str | Path, expected: Expected) -> Cells:
    """The `expected` cells ((kind, task), or a mapping to the `params_hash` each must have been written
    under) from `metrics/eval_<kind>_<task>.json`; no other file is read."""
    hashes = expected if isinstance(expected, Mapping) else dict.fromkeys(expected)
    return {(kind, task): read_metrics(Path(metrics_dir) / f"eval_{kind}_{task}.json", h)
            for (kind, task), h in hashes.items()}


def measured(cells: Cells) -> Cells:
    """The cells that have a result (not missing, not stale)."""
    return {key: c for key, c in cells.items() if "status" not in c}


def secondary_cells(cells: Cells) -> dict[str, Cells]:
    """style -> the cells measured in their secondary style too (`eval.secondary_style`: the same docs,
    the other prompts and scorer), each as a cell of its own, by (kind, task)."""
    out: dict[str, Cells] = {}
    for (kind, task), c in cells.items():
        second = c.get("secondary")
        if second:
            out.setdefault(second["style"], {})[(kind, task)] = {**second, "kind": kind, "task": task}
    return out


STYLE_TITLES = {"harness": "harness style: lm-eval's own prompts and metrics",
                "paper": "paper style: the paper's chat prompts and the scorers the experts trained on"}

SIGNIFICANT = 0.05  # a Δ whose paired test gives p below this is marked
ONE_ANSWER = 0.5  # a cell whose most common stated answer covers this share of docs is flagged


def _pct(x: float, signed: bool = False) -> str:
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _interval(ci) -> str:
    """` [low, high]` in percent, or nothing for a record written before intervals were kept."""
    return f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""


def _fmt(cell: Optional[dict], show_n: bool = False) -> str:
    """`41.2 [35.8, 46.8]`, and for an adapted cell its paired Δ vs base: `Δ +3.8 [-0.6, +8.1], p = 0.09`
    (bold with * when p < SIGNIFICANT); n when the row's cells are not all on the same number of docs."""
    if cell is None:
        return "–"
    if "status" in cell:
        return cell["status"]
    text = _pct(cell["value"]) + _interval(cell.get("ci95"))
    if show_n and cell.get("n_docs"):
        text += f" (n={cell['n_docs']})"
    if "delta_vs_base" in cell:
        delta = f"Δ {_pct(cell['delta_vs_base'], True)} [{', '.join(_pct(x, True) for x in cell['delta_ci95'])}], " \
                f"p = {cell['p_value']:.2g}"
        text += f"<br>**{delta} \\***" if cell["p_value"] < SIGNIFICANT else f"<br>{delta}"
    elif cell.get("stats_error") and cell.get("kind") != "base":
        text += "<br>(not paired with base)"
    spread = cell.get("answer_spread")
    if spread and spread["most_common_share"] >= ONE_ANSWER:
        text += (f"<br>⚠ answers {spread['most_common_answer']} on {_pct(spread['most_common_share'])}% of docs "
                 f"(that answer alone scores {_pct(spread['constant_answer_accuracy'])})")
    return text


def table(cells: Cells, kinds: Sequence[str], tasks: Sequence[str], title: str) -> str:
    """One Markdown table: a row per task, a column per model kind; metric and n named per row."""
    head = "| task | metric | n | " + " | ".join(KIND_TITLES.get(k, k) for k in kinds) + " |"
    rows = [f"### {title}", "", head, "|" + "---|" * (len(kinds) + 3)]
    for task in tasks:
        row = [cells.get((k, task)) for k in kinds]
        metric = next((c["metric"] for c in row if c and "metric" in c), "–")
        ns = {c["n_docs"] for c in row if c and "n_docs" in c}
        n = str(next(iter(ns))) if len(ns) == 1 else "–"
        rows.append(f"| {task_title(task)} | {metric} | {n} | " + " | ".join(_fmt(c, len(ns) > 1) for c in row) + " |")
    return "\n".join(rows) + "\n"


def training_table(trained: Mapping[str, dict]) -> str:
    """The trained adapters behind Table 1 and the dispatch: trainable parameters, validation accuracy of
    the base and the kept step (95% intervals) and, for SVF vectors, how far z and σ moved."""
    if not trained:
        return ""
    rows = ["### Training (validation split; the kept step is the best by validation accuracy)", "",
            "| unit | trainable parameters | steps | val n | base val | best val (step) | max abs(z − z₀) | "
            "mean abs(σ′/σ − 1) | seconds |",
            "|---|---|---|---|---|---|---|---|---|"]

    def acc(m: dict, name: str) -> str:
        return _pct(m[f"{name}_val_accuracy"]) + _interval(m.get(f"{name}_val_ci95"))

    for unit, m in trained.items():
        move = m.get("movement") or {}
        z = f"{move['z_max_abs_change']:.3f}" if "z_max_abs_change" in move else "–"
        sigma = f"{100 * move['sigma_mean_rel_change']:.2f}%" if "sigma_mean_rel_change" in move else "–"
        params = m.get("svf_parameters", m.get("trainable_parameters"))
        rows.append(f"| {unit} | {params:,} | {m.get('steps', '–')} | {m.get('val_n') or m.get('val_docs', '–')} | "
                    f"{acc(m, 'base')} | {acc(m, 'best')} ({m.get('best_step', '–')}) | {z} | {sigma} | "
                    f"{m.get('seconds', 0):.0f} |")
    return "\n".join(rows) + "\n"


def read_stage_metrics(metrics_dir: str | Path, expected: Mapping[str, Optional[str]]) -> tuple[Optional[dict],
                                                                                            dict[str, dict],
                                                                                            dict[str, dict]]:
    """For the `expected` units (`classifier`, `cem_<task>`, `expert_<task>`, `lora_<task>` -> params_hash or
    None): the classifier stage's metrics (or None), the cem stage's per task, and every trained adapter's
    (SVF experts, LoRA baselines, z_c) by its display name; a missing or stale one is left out."""
    found = {unit: read_metrics(Path(metrics_dir) / f"{unit}.json", h) for unit, h in expected.items()}
    found = {unit: m for unit, m in found.items() if "status" not in m}
    trained = {}
    for unit, m in found.items():
        kind, _, task = unit.partition("_")
        if kind in ("expert", "lora"):
            trained[f"{'SVF' if kind == 'expert' else 'LoRA'} {task_title(task)}"] = m
    if "classifier" in found:
        trained["classifier z_c"] = found["classifier"]
    return found.get("classifier"), {m["task"]: m for unit, m in found.items() if unit.startswith("cem_")}, trained


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
        rows.append(f"| {who} | {mode} | {100 * r['accuracy']:.1f}{_interval(r.get('ci95'))} | "
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
                    f"{m['population']} × {m['generations']} | {shown} | {100 * m['accuracy']:.0f}%{_interval(m.get('ci95'))} | "
                    f"{m['loglik']:.3f} | {m['search_seconds']:.0f} |")
    return "\n".join(rows) + "\n"


def build_report(cells: Cells, notes: Mapping[str, str] | None = None, classifier: Optional[dict] = None,
                 cem: Optional[Mapping[str, dict]] = None, trained: Optional[Mapping[str, dict]] = None) -> str:
    parts = ["# Results", "",
             "Accuracy in % from lm-evaluation-harness (`metrics/eval_<kind>_<task>.json`) with its 95% interval "
             "(Wilson, from the per-sample outputs); n = test docs evaluated, the same docs in every cell of a row "
             "(a limit below the full test set is a CPU profile, not a paper number). Under each adapted cell: "
             "Δ vs base on those docs in points, its 95% interval (Newcombe, paired) and the exact McNemar "
             f"p-value; **bold \\*** marks p < {SIGNIFICANT}. ⚠ marks a cell whose most common stated answer "
             f"(multiple choice: the letter) covers ≥ {ONE_ANSWER:.0%} of docs, with what that one answer would score: "
             "a gain there can be a policy that learned one letter, not the task.", "",
             table(cells, TABLE1_KINDS, TRAIN_TASKS, "Table 1 — training tasks (base / LoRA / SVF expert)"),
             table(cells, TABLE2_KINDS, UNSEEN_TASKS,
                   "Table 2 — unseen tasks (base → prompt dispatch / classifier expert / few-shot CEM)")]
    for style, second in secondary_cells(cells).items():
        for number, kinds, tasks, what in ((1, TABLE1_KINDS, TRAIN_TASKS, "training tasks"),
                                           (2, TABLE2_KINDS, UNSEEN_TASKS, "unseen tasks")):
            shown = [t for t in tasks if any((k, t) in second for k in kinds)]
            if shown:
                parts.append(table(second, kinds, shown, f"Table {number} (secondary) — {what}, "
                                                         f"{STYLE_TITLES.get(style, style)}; same docs"))
    parts += [extra for extra in (training_table(trained or {}), timing_table(cells), dispatch_table(classifier),
                                  cem_table(cem or {})) if extra]
    absent = [f"{kind} on {task_title(task)} ({c['status']})" for (kind, task), c in cells.items() if "status" in c]
    if absent:
        parts += ["**Not measured in this run.** " + ", ".join(absent) + ": run `dvc repro` (stale: written under "
                  "other settings).", ""]
    for key, text in (notes or {}).items():
        parts += [f"**{key}.** {text}", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------- the tables as data (CSV)

TABLE_FIELDS = ("task", "task_title", "kind", "method", "style", "metric", "n_docs", "value", "ci95_low", "ci95_high",
                "delta_vs_base", "delta_ci95_low", "delta_ci95_high", "p_value", "status")
TIMING_FIELDS = ("task", "task_title", "kind", "method", "first_pass_s", "second_pass_s", "first_to_second",
                 "adaptation_search_s")


def table_rows(cells: Cells, kinds: Sequence[str], tasks: Sequence[str]) -> list[dict]:
    """Table 1 or 2 as long-format rows, one per cell this run expects (task order, then `kinds` order):
    accuracies and Δ as fractions (0-1, like the metrics files), blank where not measured; `status` is
    measured / missing / stale, so a CSV reader cannot take an absent cell for a zero."""
    rows = []
    for task in tasks:
        for kind in kinds:
            c = cells.get((kind, task))
            if c is None:
                continue
            ci, dci = c.get("ci95") or (None, None), c.get("delta_ci95") or (None, None)
            rows.append({"task": task, "task_title": task_title(task), "kind": kind,
                         "method": KIND_TITLES.get(kind, kind), "style": c.get("style"), "metric": c.get("metric"),
                         "n_docs": c.get("n_docs"),
                         "value": c.get("value"), "ci95_low": ci[0], "ci95_high": ci[1],
                         "delta_vs_base": c.get("delta_vs_base"), "delta_ci95_low": dci[0], "delta_ci95_high": dci[1],
                         "p_value": c.get("p_value"), "status": c.get("status", "measured")})
    return rows


def timing_rows(cells: Cells, kinds: Sequence[str] = TABLE2_KINDS[1:],
                tasks: Sequence[str] = UNSEEN_TASKS) -> list[dict]:
    """Table 3 as rows: seconds of the first and second pass of every two-pass cell that recorded them."""
    rows = []
    for task in tasks:
        for kind in kinds:
            c = cells.get((kind, task))
            if c and c.get("first_pass_s") is not None:
                rows.append({"task": task, "task_title": task_title(task), "kind": kind,
                             "method": KIND_TITLES.get(kind, kind), **{k: c.get(k) for k in TIMING_FIELDS[4:]}})
    return rows


def write_csv(path: str | Path, rows: Sequence[Mapping], fields: Sequence[str]) -> Path:
    """A header-always CSV (an empty table is still a file DVC can track), blank for None."""
    import csv
    import io

    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    return atomic_write_text(path, out.getvalue())


def write_tables(cells: Cells, out_dir: str | Path) -> list[Path]:
    """`table1.csv` (training tasks), `table2.csv` (unseen tasks), `table3.csv` (two-pass timings); the
    secondary style's cells follow the primary rows of tables 1 and 2 (column `style`)."""
    out_dir = Path(out_dir)
    second = secondary_cells(cells).values()

    def rows(kinds, tasks):
        return table_rows(cells, kinds, tasks) + [r for s in second for r in table_rows(s, kinds, tasks)]

    return [write_csv(out_dir / "table1.csv", rows(TABLE1_KINDS, TRAIN_TASKS), TABLE_FIELDS),
            write_csv(out_dir / "table2.csv", rows(TABLE2_KINDS, UNSEEN_TASKS), TABLE_FIELDS),
            write_csv(out_dir / "table3.csv", timing_rows(cells), TIMING_FIELDS)]


# ---------------------------------------------------------------- the bar chart

ZERO_GID = "zero:{kind}:{task}"  # gid of the marker that stands for a 0.0 bar (a bar of height 0 draws nothing)


def results_figure(cells: Cells):
    """Table 1 and Table 2 as grouped bars (one panel each, only tasks with a measured cell): accuracy in %
    with its 95% interval as an error bar, a marker and "0" for a cell that measured 0.0, and the status
    (missing / stale) written where an expected cell of a drawn task has no result. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = measured(cells)
    panels = [(title, kinds, [t for t in tasks if any((k, t) in done for k in kinds)])
              for title, kinds, tasks in (("Table 1: training tasks", TABLE1_KINDS, TRAIN_TASKS),
                                          ("Table 2: unseen tasks", TABLE2_KINDS, UNSEEN_TASKS))]
    panels = [p for p in panels if p[2]] or [("no measured cells", TABLE1_KINDS, [])]
    top = 0.0
    palette = plt.get_cmap("tab10")
    colors = {k: palette(i) for i, k in enumerate(dict.fromkeys(TABLE1_KINDS + TABLE2_KINDS))}
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(max(6.0, sum(1.3 * max(1, len(p[2])) + 1.2 for p in panels)), 4.2),
                             gridspec_kw={"width_ratios": [max(1, len(p[2])) for p in panels]})
    for ax, (title, kinds, tasks) in zip(axes[0], panels):
        shown = [k for k in kinds if any(cells.get((k, t)) is not None for t in tasks)]
        width = 0.8 / max(1, len(shown))
        for i, kind in enumerate(shown):
            for j, task in enumerate(tasks):
                x = j - 0.4 + (i + 0.5) * width
                c = cells.get((kind, task))
                if c is None:
                    continue
                if "status" in c:
                    ax.text(x, 1, c["status"], rotation=90, ha="center", va="bottom", fontsize=7, color="0.45")
                    continue
                y = 100 * c["value"]
                ci = c.get("ci95")
                err = [[y - 100 * ci[0]], [100 * ci[1] - y]] if ci else None
                ax.bar(x, y, width, color=colors[kind], yerr=err, capsize=3, ecolor="0.2",
                       error_kw={"elinewidth": 1}, label=KIND_TITLES.get(kind, kind))
                if y == 0:
                    ax.plot([x], [0], marker="_", markersize=max(6, 60 * width), markeredgewidth=5, zorder=3,
                            color=colors[kind], clip_on=False, gid=ZERO_GID.format(kind=kind, task=task))
                hi = 100 * ci[1] if ci else y
                top = max(top, hi)
                ax.text(x, hi + 1, f"{y:.1f}" if y else "0", ha="center", va="bottom", fontsize=7)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper right")
        ax.set_xticks(range(len(tasks)), [task_title(t) for t in tasks])
        ax.set_xlim(-0.6, max(1, len(tasks)) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[0]:  # one scale for both panels: bars compare across tables too
        ax.set_ylim(0, min(105.0, max(10.0, top * 1.15 + 5)))
    axes[0][0].set_ylabel("accuracy (%), 95% interval")
    fig.suptitle("transformer2: base vs adapted, per task", fontsize=11)
    fig.tight_layout()
    return fig


def plot_cells(cells: Cells, path: str | Path) -> Path:
    """`results_figure` as a PNG (written atomically: a reader never sees half a file)."""
    import matplotlib.pyplot as plt

    fig = results_figure(cells)
    try:
        return atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
