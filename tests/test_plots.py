"""Plots and table files of the report (issue 14, item 5): no model, small metrics files only."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from transformer2.report import ZERO_GID, plot_cells, read_cells, results_figure, write_tables

from .conftest import ROOT


def _write(path, kind, task, value, ci=None, **extra):
    path.joinpath(f"eval_{kind}_{task}.json").write_text(json.dumps(
        {"kind": kind, "task": task, "metric": "acc,none", "value": value, "n_docs": 40,
         **({"ci95": ci} if ci else {}), **extra}))


@pytest.fixture()
def cells(tmp_path):
    _write(tmp_path, "base", "arc_easy", 0.0, [0.0, 0.0876])  # a measured zero
    _write(tmp_path, "svf", "arc_easy", 0.25, [0.142, 0.403], delta_vs_base=0.25, delta_ci95=[0.11, 0.39],
           p_value=0.0005)
    _write(tmp_path, "base", "math", 0.05, [0.014, 0.165])
    _write(tmp_path, "prompt", "math", 0.1, [0.04, 0.23], first_pass_s=1.5, second_pass_s=30.0,
           first_to_second=0.05)
    return read_cells(tmp_path, [("base", "arc_easy"), ("lora", "arc_easy"), ("svf", "arc_easy"),
                                 ("base", "math"), ("prompt", "math")])


def test_results_figure_draws_error_bars_and_a_visible_zero_bar(cells, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer, ErrorbarContainer

    fig = results_figure(cells)
    try:
        table1, table2 = fig.axes
        assert "Table 1" in table1.get_title() and "Table 2" in table2.get_title()
        bars = {round(b.get_height(), 6) for c in table1.containers if isinstance(c, BarContainer) for b in c}
        assert bars == {0.0, 25.0}
        # The interval of the SVF cell, in %: the error bar spans exactly ci95.
        spans = []
        for c in table1.containers:
            if isinstance(c, ErrorbarContainer):
                for seg in c.lines[2][0].get_segments():
                    spans.append(tuple(np.round(seg[:, 1], 1)))
        assert (14.2, 40.3) in spans and (0.0, 8.8) in spans
        zero = [ln for ln in table1.get_lines() if ln.get_gid() == ZERO_GID.format(kind="base", task="arc_easy")]
        assert len(zero) == 1 and zero[0].get_visible() and zero[0].get_markeredgewidth() >= 3
        assert "missing" in [t.get_text() for t in table1.texts]  # the LoRA cell never ran: said, not blank
        assert not [ln for ln in table2.get_lines() if ln.get_gid()]  # no zero in Table 2
        assert table1.get_ylim() == table2.get_ylim()  # one scale for both panels
    finally:
        plt.close(fig)
    path = plot_cells(cells, tmp_path / "plots" / "results.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_as_csv(cells, tmp_path):
    t1, t2, t3 = write_tables(cells, tmp_path / "reports")
    assert [p.name for p in (t1, t2, t3)] == ["table1.csv", "table2.csv", "table3.csv"]
    rows = list(csv.DictReader(t1.open()))
    assert [(r["task"], r["kind"], r["status"]) for r in rows] == [
        ("arc_easy", "base", "measured"), ("arc_easy", "lora", "missing"), ("arc_easy", "svf", "measured")]
    assert rows[0]["value"] == "0.0" and rows[0]["ci95_high"] == "0.0876"
    assert rows[1]["value"] == ""  # not measured is blank, never 0
    assert (rows[2]["method"], rows[2]["delta_vs_base"], rows[2]["p_value"]) == ("SVF", "0.25", "0.0005")
    assert rows[2]["metric"] == "acc,none" and rows[2]["n_docs"] == "40"
    rows2 = list(csv.DictReader(t2.open()))
    assert [(r["task"], r["kind"]) for r in rows2] == [("math", "base"), ("math", "prompt")]
    assert list(csv.DictReader(t3.open())) == [
        {"task": "math", "task_title": "MATH", "kind": "prompt", "method": "prompt", "first_pass_s": "1.5",
         "second_pass_s": "30.0", "first_to_second": "0.05", "adaptation_search_s": ""}]
    empty = write_tables({}, tmp_path / "empty")  # no cells: header-only files DVC can still track
    assert all(p.read_text().count("\n") == 1 for p in empty)


def test_dvc_yaml_plots_pair_each_expert_with_its_lora_baseline():
    """One validation figure per training task with both curves, one with its expert's reward and KL, all with
    the `points` template (blank rows skipped), and the tables as untracked-by-cache outs of `report`."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    plots = {name: spec for entry in dvc["plots"] for name, spec in entry.items()}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for task in params["rl"]["tasks"]:
        spec = plots[f"validation_{task}"]
        assert spec["y"] == {f"plots/expert_{task}.csv": "val_accuracy", f"plots/lora_{task}.csv": "val_accuracy"}
        assert spec["x"] == "step" and spec["template"] == "points"
        assert plots[f"training_{task}"]["y"] == {f"plots/expert_{task}.csv": ["reward", "kl"]}
    for name, spec in plots.items():  # one task per figure: `t2 plots` can leave out a task a profile does not run
        assert len({f.split("_", 1)[1] for f in spec["y"]}) == 1, name
    assert (ROOT / ".dvc" / "plots" / "points.json").is_file()
    template = json.loads((ROOT / ".dvc" / "plots" / "points.json").read_text())
    assert "<DVC_METRIC_DATA>" in json.dumps(template) and "!== ''" in template["transform"][0]["filter"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["report"]["outs"]]
    assert {"reports/table1.csv", "reports/table2.csv", "reports/table3.csv"} <= set(outs)
    # The curves the plots read carry the columns they name (tasks/tracking.py writes them).
    from tasks.tracking import CURVE_FIELDS

    assert {"step", "val_accuracy", "reward", "kl"} <= set(CURVE_FIELDS)


def test_confusion_matrix_is_row_normalised_with_a_readable_title(tmp_path):
    import matplotlib.pyplot as plt

    from transformer2.classifier import confusion_figure, dispatch_title, normalise_rows, plot_confusion

    m = np.array([[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 4, 0], [0, 0, 0, 0]])  # no "other" prompt held out
    shares = normalise_rows(m)
    assert np.allclose(shares[:3].sum(1), 1) and shares[0, 0] == 0.75 and np.isnan(shares[3]).all()
    title = dispatch_title("classifier", "loglik")
    assert title.splitlines() == ["Dispatch by the classification expert z_c",
                                  "first pass: log-likelihood of each category"]
    fig = confusion_figure(m, title=title)
    try:
        ax = fig.axes[0]
        assert ax.get_title().endswith("accuracy 75% on 12 held-out prompts")
        assert ax.images[0].get_clim() == (0.0, 1.0)  # one colour scale for every matrix
        texts = [t.get_text() for t in ax.texts]
        assert "0.75\n3/4" in texts and texts.count("–") == 4
        assert [t.get_text() for t in ax.get_yticklabels()][0] == "code (4)"
    finally:
        plt.close(fig)
    assert plot_confusion(m, tmp_path / "d" / "c.png", title=title).read_bytes()[:4] == b"\x89PNG"


def _curves(root, names):
    (root / "plots").mkdir(exist_ok=True)
    for name in names:
        (root / "plots" / f"{name}.csv").write_text("step,reward,kl,val_accuracy\n1,-1.0,0.0,0.5\n2,0.0,0.1,\n")


def test_plot_targets_are_the_current_dags_plots_only(tmp_path):
    """The tiny profile trains GSM8K only: its curves are drawn, MBPP's and ARC-Easy's figures are left out
    (an MBPP curve of another profile's run is on disk: not drawn), unwritten outputs are named as such."""
    from flows.dag import plot_targets

    shutil.copy(ROOT / "profiles" / "tiny.yaml", tmp_path / "params.yaml")
    _curves(tmp_path, ["expert_gsm8k", "lora_gsm8k", "expert_mbpp", "lora_mbpp"])
    targets, left_out = plot_targets(tmp_path / "params.yaml", ROOT / "dvc.yaml", root=tmp_path)
    assert targets == ["plots/expert_gsm8k.csv", "plots/lora_gsm8k.csv", "validation_gsm8k", "training_gsm8k"]
    other = "draws a task this profile does not run"
    assert {k: v for k, v in left_out.items() if v == other} == {
        f"{kind}_{task}": other for kind in ("validation", "training") for task in ("mbpp", "arc_easy")}
    assert {k for k, v in left_out.items() if v != other} == {  # this DAG's, not run yet
        "plots/classifier.csv", "plots/dispatch", "plots/cem_arc_challenge.csv", "plots/results.png"}
    targets, left_out = plot_targets(ROOT / "params.yaml", ROOT / "dvc.yaml", root=tmp_path / "nothing")
    assert targets == [] and all(v != other for v in left_out.values())  # the default DAG runs every figure


def _dvc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def test_t2_plots_draws_this_dags_plots_without_dvcs_warning(tmp_path, monkeypatch, capfd):
    """`dvc plots show` under the tiny profile warns "failed to load some plots" (figures of tasks it does not
    train) and draws another run's MBPP curve; `t2 plots` draws exactly this DAG's, offline, with no warning."""
    from flows.cli import main

    assert _dvc("init", "--no-scm", "-q", cwd=tmp_path).returncode == 0
    shutil.copytree(ROOT / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    assert _dvc("config", "plots.html_template", "plots/offline.html", cwd=tmp_path).returncode == 0
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "profiles" / "tiny.yaml", tmp_path / "params.yaml")
    _curves(tmp_path, ["expert_gsm8k", "lora_gsm8k", "expert_mbpp"])
    plain = _dvc("plots", "show", cwd=tmp_path)
    assert plain.returncode == 0 and "failed to load some plots" in plain.stdout + plain.stderr
    assert "expert_mbpp.csv" in (tmp_path / "dvc_plots" / "index.html").read_text()  # another run's curve drawn
    shutil.rmtree(tmp_path / "dvc_plots")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    assert main(["plots"]) == 0
    out, err = capfd.readouterr()
    assert "failed to load" not in out + err
    assert "t2 plots: not drawn, draws a task this profile does not run: validation_mbpp" in err
    html = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "validation_gsm8k" in html and "training_gsm8k" in html and "plots/expert_gsm8k.csv" in html
    assert "expert_mbpp" not in html and "validation_mbpp" not in html
    assert "cdn.jsdelivr" not in html  # the offline template
    from .test_offline_plots import _chromium, _dump_dom

    if _chromium():  # drawn with no network: the 2 stage curves and the 2 figures
        dom = _dump_dom(_chromium(), tmp_path / "dvc_plots" / "index.html", tmp_path / "browser")
        assert dom.count('class="marks"') == 4 and 'id="vega-scripts-missing"' not in dom
