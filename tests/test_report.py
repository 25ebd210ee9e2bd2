import json

from transformer2.report import build_report, plot_cells, read_cells


def _cell(path, kind, task, value, n=10):
    path.joinpath(f"eval_{kind}_{task}.json").write_text(json.dumps(
        {"kind": kind, "task": task, "metric": "acc_norm,none", "value": value, "n_docs": n}))


def test_tables_show_measured_cells_and_dashes_elsewhere(tmp_path):
    _cell(tmp_path, "base", "arc_easy", 0.4)
    _cell(tmp_path, "svf", "arc_easy", 0.5)
    _cell(tmp_path, "base", "arc_challenge", 0.25, n=7)
    (tmp_path / "data.json").write_text("{}")  # other metrics files are ignored
    cells = read_cells(tmp_path)
    assert set(cells) == {("base", "arc_easy"), ("svf", "arc_easy"), ("base", "arc_challenge")}
    text = build_report(cells, {"Profile": "tiny"})
    assert "| ARC-Easy | acc_norm,none | 40.00 (n=10) | – | 50.00 (n=10) |" in text
    assert "| ARC-Challenge | acc_norm,none | 25.00 (n=7) | – | – | – |" in text
    assert "| GSM8K | – | – | – | – |" in text and "**Profile.** tiny" in text
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
        "prompt_loglik": {"accuracy": 0.5, "seconds": 1.5, "per_task_accuracy": {"math": 1.0, "gsm8k": 0.0}},
        "classifier_generate": {"accuracy": 0.25, "seconds": 3.0, "per_task_accuracy": {"math": 0.5}}}}))
    (tmp_path / "cem_math.json").write_text(json.dumps(
        {"task": "math", "experts": ["gsm8k", "mbpp"], "alpha": [0.7, 0.1], "shots": 5, "shot_split": "train",
         "population": 12, "generations": 4, "accuracy": 0.2, "loglik": -1.234, "search_seconds": 120.4}))
    from transformer2.report import read_stage_metrics

    cells = read_cells(tmp_path)
    classifier, cem = read_stage_metrics(tmp_path)
    text = build_report(cells, None, classifier, cem)
    assert "| MATH | exact_match,none | – | 10.00 (n=14) | – | 20.00 (n=14) |" in text
    assert "| MATH | prompt | 2.00 | 40.00 | 5.0% | – |" in text
    assert "| MATH | few-shot | 0.01 | 38.00 | 0.0% | CEM 120 s |" in text
    assert "| prompt | loglik | 50.0 | 0 | 100 | 1.5 |" in text  # GSM8K column before MATH
    assert "| classifier | generate | 25.0 | – | 50 | 3.0 |" in text
    assert "| MATH | 5 (train) | 12 × 4 | gsm8k 0.70, mbpp 0.10 | 20% | -1.234 | 120 |" in text


def test_no_two_pass_cells_no_extra_tables(tmp_path):
    _cell(tmp_path, "base", "math", 0.1)
    text = build_report(read_cells(tmp_path))
    assert "Table 3" not in text and "Dispatch" not in text and "CEM (" not in text
