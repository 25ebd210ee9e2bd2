import csv
import json

from transformer2.report import build_report, measured, plot_cells, read_cells, read_stage_metrics


def _cell(path, kind, task, value, n=10, params_hash=None):
    path.joinpath(f"eval_{kind}_{task}.json").write_text(json.dumps(
        {"kind": kind, "task": task, "metric": "acc_norm,none", "value": value, "n_docs": n,
         **({"params_hash": params_hash} if params_hash else {})}))


def test_tables_show_measured_cells_and_dashes_elsewhere(tmp_path):
    _cell(tmp_path, "base", "arc_easy", 0.4)
    _cell(tmp_path, "svf", "arc_easy", 0.5)
    _cell(tmp_path, "base", "arc_challenge", 0.25, n=7)
    (tmp_path / "data.json").write_text("{}")  # other metrics files are ignored
    cells = read_cells(tmp_path, [("base", "arc_easy"), ("svf", "arc_easy"), ("base", "arc_challenge")])
    assert set(cells) == {("base", "arc_easy"), ("svf", "arc_easy"), ("base", "arc_challenge")}
    text = build_report(cells, {"Profile": "tiny"})
    assert "| ARC-Easy | acc_norm,none | 10 | 40.0 | – | 50.0 |" in text
    assert "| ARC-Challenge | acc_norm,none | 7 | 25.0 | – | – | – |" in text
    assert "| GSM8K | – | – | – | – | – |" in text and "**Profile.** tiny" in text
    plot_cells(cells, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_two_pass_timings_dispatch_and_cem_tables(tmp_path):
    path = tmp_path / "eval_prompt_math.json"
    path.write_text(json.dumps({"kind": "prompt", "task": "math", "metric": "exact_match,none", "value": 0.1,
                                "n_docs": 14, "first_pass_s": 2.0, "second_pass_s": 40.0, "first_to_second": 0.05}))
    (tmp_path / "eval_few_shot_math.json").write_text(json.dumps(
        {"kind": "few_shot", "task": "math", "metric": "exact_match,none", "value": 0.2, "n_docs": 14,
         "first_pass_s": 0.01, "second_pass_s": 38.0, "first_to_second": 0.0003, "adaptation_search_s": 120.4}))
    (tmp_path / "classifier.json").write_text(json.dumps({"heldout_docs": 6, "dispatch": {
        "prompt_loglik": {"accuracy": 0.5, "seconds": 1.5, "per_task_accuracy": {"math": 1.0, "gsm8k": 0.0},
                          "ci95": [0.188, 0.812]},
        "classifier_generate": {"accuracy": 0.25, "seconds": 3.0, "per_task_accuracy": {"math": 0.5}}}}))
    (tmp_path / "cem_math.json").write_text(json.dumps(
        {"task": "math", "experts": ["gsm8k", "mbpp"], "alpha": [0.7, 0.1], "shots": 5, "shot_split": "train",
         "population": 12, "generations": 4, "accuracy": 0.2, "ci95": [0.036, 0.624], "loglik": -1.234,
         "search_seconds": 120.4}))
    cells = read_cells(tmp_path, [("prompt", "math"), ("few_shot", "math")])
    classifier, cem, _ = read_stage_metrics(tmp_path, {"classifier": None, "cem_math": None})
    text = build_report(cells, None, classifier, cem)
    assert "| MATH | exact_match,none | 14 | – | 10.0 | – | 20.0 |" in text
    assert "| MATH | prompt | 2.00 | 40.00 | 5.0% | – |" in text
    assert "| MATH | few-shot | 0.01 | 38.00 | 0.0% | CEM 120 s |" in text
    assert "| prompt | loglik | 50.0 [18.8, 81.2] | 0 | 100 | 1.5 |" in text  # GSM8K column before MATH
    assert "| classifier | generate | 25.0 | – | 50 | 3.0 |" in text
    assert "| MATH | 5 (train) | 12 × 4 | gsm8k 0.70, mbpp 0.10 | 20% [3.6, 62.4] | -1.234 | 120 |" in text


def test_cells_show_intervals_and_paired_deltas_and_mark_significant_ones(tmp_path):
    """Intervals and Δ come from the cells' metrics (tasks/eval.py computes them with transformer2.stats)."""
    base = {"kind": "base", "task": "arc_easy", "metric": "acc,none", "value": 0.30, "n_docs": 300,
            "ci95": [0.2516, 0.3532]}
    svf = {**base, "kind": "svf", "value": 0.41, "ci95": [0.3560, 0.4662], "delta_vs_base": 0.11,
           "delta_ci95": [0.055, 0.164], "p_value": 0.00031}
    lora = {**base, "kind": "lora", "value": 0.32, "ci95": [0.27, 0.37], "delta_vs_base": 0.02,
            "delta_ci95": [-0.03, 0.07], "p_value": 0.48}
    for cell in (base, svf, lora):
        (tmp_path / f"eval_{cell['kind']}_arc_easy.json").write_text(json.dumps(cell))
    (tmp_path / "expert_arc_easy.json").write_text(json.dumps(
        {"task": "arc_easy", "svf_parameters": 51840, "steps": 16, "val_n": 64, "base_val_accuracy": 0.25,
         "base_val_ci95": [0.16, 0.37], "best_val_accuracy": 0.5, "best_val_ci95": [0.38, 0.62], "best_step": 12,
         "movement": {"z_max_abs_change": 0.2512, "sigma_mean_rel_change": 0.0312}, "seconds": 900}))
    (tmp_path / "lora_arc_easy.json").write_text(json.dumps(
        {"task": "arc_easy", "trainable_parameters": 460800, "steps": 16, "val_docs": 64, "base_val_accuracy": 0.25,
         "best_val_accuracy": 0.3, "best_step": 8, "seconds": 300}))
    cells = read_cells(tmp_path, [("base", "arc_easy"), ("lora", "arc_easy"), ("svf", "arc_easy")])
    _, _, trained = read_stage_metrics(tmp_path, {"expert_arc_easy": None, "lora_arc_easy": None})
    text = build_report(cells, None, None, None, trained)
    assert ("| ARC-Easy | acc,none | 300 | 30.0 [25.2, 35.3] | 32.0 [27.0, 37.0]<br>Δ +2.0 [-3.0, +7.0], p = 0.48 | "
            "41.0 [35.6, 46.6]<br>**Δ +11.0 [+5.5, +16.4], p = 0.00031 \\*** |") in text
    assert ("| SVF ARC-Easy | 51,840 | 16 | 64 | 25.0 [16.0, 37.0] | 50.0 [38.0, 62.0] (12) | 0.251 | 3.12% | 900 |"
            in text)
    assert "| LoRA ARC-Easy | 460,800 | 16 | 64 | 25.0 | 30.0 (8) | – | – | 300 |" in text


def test_a_cell_that_answers_one_letter_is_flagged(tmp_path):
    base = {"kind": "base", "task": "arc_easy", "metric": "exact_match,none", "value": 0.157, "n_docs": 300,
            "ci95": [0.12, 0.202], "answer_spread": {"most_common_answer": "D", "most_common_share": 0.383,
                                                      "constant_answer_accuracy": 0.2, "no_answer_share": 0.35,
                                                      "distinct_answers": 4}}
    svf = {**base, "kind": "svf", "value": 0.287, "ci95": [0.238, 0.34], "delta_vs_base": 0.13,
           "delta_ci95": [0.06, 0.199], "p_value": 0.00045,
           "answer_spread": {"most_common_answer": "B", "most_common_share": 0.903, "constant_answer_accuracy": 0.287,
                             "no_answer_share": 0.03, "distinct_answers": 3}}
    for cell in (base, svf):
        (tmp_path / f"eval_{cell['kind']}_arc_easy.json").write_text(json.dumps(cell))
    text = build_report(read_cells(tmp_path, [("base", "arc_easy"), ("svf", "arc_easy")]), None, None, None)
    assert "p = 0.00045 \\***<br>⚠ answers B on 90.3% of docs (that answer alone scores 28.7) |" in text
    assert text.count("⚠ answers") == 1  # the base's 38% on D is not flagged


def test_no_two_pass_cells_no_extra_tables(tmp_path):
    _cell(tmp_path, "base", "math", 0.1)
    text = build_report(read_cells(tmp_path, [("base", "math")]))
    assert "Table 3" not in text and "Dispatch" not in text and "CEM (" not in text


def test_only_expected_cells_enter_and_missing_or_stale_ones_say_so(tmp_path):
    """A profile switch leaves the other profile's files on disk: none of them enters the report."""
    _cell(tmp_path, "base", "mbpp", 0.9)  # another profile's cell, not in this DAG
    _cell(tmp_path, "svf", "arc_easy", 0.8, params_hash="other")  # this cell, but written under other settings
    _cell(tmp_path, "base", "arc_easy", 0.4, params_hash="h1")
    (tmp_path / "cem_math.json").write_text(json.dumps({"task": "math", "params_hash": "old"}))
    cells = read_cells(tmp_path, {("base", "arc_easy"): "h1", ("svf", "arc_easy"): "h2", ("lora", "arc_easy"): "h3"})
    assert set(measured(cells)) == {("base", "arc_easy")}
    text = build_report(cells, None, *read_stage_metrics(tmp_path, {"cem_math": "new"}))
    assert "| ARC-Easy | acc_norm,none | 10 | 40.0 | missing | stale |" in text
    assert "| MBPP | – | – | – | – | – |" in text and "90.0" not in text and "Few-shot CEM" not in text
    assert "**Not measured in this run.** svf on ARC-Easy (stale), lora on ARC-Easy (missing)" in text
    plot_cells(cells, tmp_path / "plot.png")


def test_a_profile_switch_cannot_mix_runs(tmp_path):
    """The report stage reads the cells dvc.yaml produces under the current params, checked by their
    params_hash: another profile's files (other tasks, or the same cell under other settings) stay out,
    of the Markdown, the plot and the MLflow report run alike."""
    import mlflow
    import yaml

    from flows.dag import dag_stages, eval_cells, report_units
    from tasks.report import expected_hashes, write_report
    from transformer2.config import load_params

    from .conftest import ROOT

    tiny = yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text())
    tiny["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "switch"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny))
    params = load_params(tmp_path / "params.yaml")
    stages = dag_stages(tmp_path / "params.yaml", ROOT / "dvc.yaml")
    cells, units = eval_cells(stages), report_units(stages)
    assert ("eval-svf", "svf", "gsm8k") in cells and ("cem", "arc_challenge") in units
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    good = expected_hashes(params, [("eval-base", "gsm8k")])["eval_base_gsm8k"]
    _cell(metrics, "base", "gsm8k", 0.25, n=2, params_hash=good)
    _cell(metrics, "svf", "gsm8k", 0.75, params_hash="default-profile")  # the default profile's run
    _cell(metrics, "base", "mbpp", 0.9, params_hash="default-profile")  # a task the tiny profile has no cell of
    out = write_report(params, str(metrics), cells, units, str(tmp_path / "results.md"), str(tmp_path / "r.png"),
                       str(tmp_path / "results.json"))
    assert out == {"cells": 1, "expected": len(cells)}
    assert json.loads((tmp_path / "results.json").read_text()) == {"score": {"base": {"gsm8k": 0.25}}}
    text = (tmp_path / "results.md").read_text()
    assert "| GSM8K | acc_norm,none | 2 | 25.0 | missing | stale |" in text
    assert "75.0" not in text and "90.0" not in text
    mlflow.set_tracking_uri(tiny["tracking"]["uri"])
    run = mlflow.search_runs(experiment_names=["switch"], output_format="list")[0]
    assert run.data.metrics == {"base.gsm8k": 0.25} and run.data.tags["stage"] == "report"


def test_curves_of_tasks_the_profile_does_not_train_are_named_as_stale(tmp_path):
    """dvc.yaml's plots draw every paper task's curves; a profile that trains one task leaves the others'
    CSVs of an earlier run on disk, which `dvc plots show` would draw: the report names them."""
    import yaml

    from flows.dag import dag_stages, eval_cells, report_units, stale_plots
    from tasks.report import write_report
    from transformer2.config import load_params

    from .conftest import ROOT

    evidence = yaml.safe_load((ROOT / "profiles/cpu-evidence.yaml").read_text())
    evidence["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "stale-plots"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(evidence))
    (tmp_path / "plots").mkdir()
    for name in ("expert_gsm8k", "expert_arc_easy", "lora_mbpp"):  # arc_easy: trained by this profile
        (tmp_path / "plots" / f"{name}.csv").write_text("step,reward\n1,0.5\n")
    stale = stale_plots(tmp_path / "params.yaml", ROOT / "dvc.yaml", root=tmp_path)
    assert stale == ["plots/expert_gsm8k.csv", "plots/lora_mbpp.csv"]
    stages = dag_stages(tmp_path / "params.yaml", ROOT / "dvc.yaml")
    (tmp_path / "metrics").mkdir()
    write_report(load_params(tmp_path / "params.yaml"), str(tmp_path / "metrics"), eval_cells(stages),
                 report_units(stages), str(tmp_path / "results.md"), str(tmp_path / "r.png"), stale_plots=stale)
    text = (tmp_path / "results.md").read_text()
    assert "`plots/expert_gsm8k.csv`, `plots/lora_mbpp.csv` are drawn by `dvc plots show` but not written" in text
    assert stale_plots(ROOT / "params.yaml", ROOT / "dvc.yaml", root=tmp_path / "empty") == []


def test_secondary_style_cells_get_their_own_tables_and_csv_rows(tmp_path):
    """A cell measured in its other style too (`eval.secondary_style`) shows in a secondary table of its own
    (with its interval and paired Δ); tasks without one are not in it, and the CSV rows say which style."""
    from transformer2.report import write_tables

    second = {"style": "harness", "metric": "acc_norm,none", "value": 0.35, "n_docs": 300, "ci95": [0.30, 0.40]}
    base = {"kind": "base", "task": "arc_easy", "style": "paper", "metric": "exact_match,none", "value": 0.16,
            "n_docs": 300, "ci95": [0.12, 0.20], "secondary": second}
    svf = {**base, "kind": "svf", "value": 0.24, "ci95": [0.20, 0.30], "delta_vs_base": 0.08,
           "delta_ci95": [0.015, 0.157], "p_value": 0.022,
           "secondary": {**second, "value": 0.33, "ci95": [0.28, 0.38], "delta_vs_base": -0.02,
                         "delta_ci95": [-0.05, 0.01], "p_value": 0.21}}
    for cell in (base, svf):
        (tmp_path / f"eval_{cell['kind']}_arc_easy.json").write_text(json.dumps(cell))
    _cell(tmp_path, "base", "gsm8k", 0.1)
    cells = read_cells(tmp_path, [("base", "arc_easy"), ("svf", "arc_easy"), ("base", "gsm8k")])
    text = build_report(cells)
    primary, _, secondary = text.partition("Table 1 (secondary) — training tasks, harness style")
    assert "| ARC-Easy | exact_match,none | 300 | 16.0 [12.0, 20.0] |" in primary
    assert ("| ARC-Easy | acc_norm,none | 300 | 35.0 [30.0, 40.0] | – | 33.0 [28.0, 38.0]<br>Δ -2.0 [-5.0, +1.0], "
            "p = 0.21 |") in secondary
    assert "GSM8K" not in secondary.partition("###")[0] and "Table 2 (secondary)" not in text
    rows = list(csv.DictReader(write_tables(cells, tmp_path / "reports")[0].open()))
    assert [(r["task"], r["kind"], r["style"], r["value"]) for r in rows if r["task"] == "arc_easy"] == [
        ("arc_easy", "base", "paper", "0.16"), ("arc_easy", "svf", "paper", "0.24"),
        ("arc_easy", "base", "harness", "0.35"), ("arc_easy", "svf", "harness", "0.33")]
