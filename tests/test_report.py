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
