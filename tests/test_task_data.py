import pytest

from transformer2.tasks import (DataError, TaskError, benchmark_names, data_dir, export_splits, load_source,
                               load_split, prepare_splits, read_jsonl)

PAPER_COUNTS = {
    "gsm8k": {"train": 3737, "validation": 3736, "test": 1319},
    "arc_easy": {"train": 1126, "validation": 1125, "test": 2376},
    "mbpp": {"train": 200, "validation": 100, "test": 500},
    "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
    "math": {"train": 7500, "test": 5000},
    "humaneval": {"test": 164},
}


@pytest.mark.parametrize("name", benchmark_names())
def test_split_counts_on_mirror(name, mirror):
    splits = prepare_splits(name, mirror)
    assert {k: len(v) for k, v in splits.items()} == PAPER_COUNTS[name]


def test_splits_are_disjoint_and_deterministic(mirror):
    for name in ("gsm8k", "arc_easy", "mbpp"):
        a, b = prepare_splits(name, mirror), prepare_splits(name, mirror)
        assert a == b
        key = "task_id" if name == "mbpp" else ("id" if name == "arc_easy" else "question")
        train = {d[key] for d in a["train"]}
        assert not train & {d[key] for d in a["validation"]}
        assert not train & {d[key] for d in a["test"]}


def test_export_and_reload(mirror, tmp_path):
    counts = export_splits("arc_easy", tmp_path, mirror, max_rows=7)
    assert counts == {"train": 7, "validation": 7, "test": 7}
    docs = load_split(tmp_path, "arc_easy", "test")
    assert docs == read_jsonl(mirror / "arc_easy" / "test.jsonl")[:7]
    assert set(docs[0]) == {"id", "question", "choices", "answerKey"}


def test_missing_mirror_file_names_the_path(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(DataError, match="gsm8k/train.jsonl"):
        load_source("gsm8k", "train", tmp_path)


def test_hub_unreachable_names_t2_data_dir(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="T2_DATA_DIR"):
        load_source("humaneval", "test", None)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("T2_DATA_DIR", raising=False)
    assert data_dir(None) is None
    monkeypatch.setenv("T2_DATA_DIR", str(tmp_path))
    assert data_dir(None) == tmp_path
    with pytest.raises(DataError, match="data.dir points at"):
        data_dir(str(tmp_path / "missing"))
    with pytest.raises(TaskError, match="unknown task"):
        load_source("squad", "train", tmp_path)


def test_unexported_split_says_which_stage(tmp_path):
    with pytest.raises(DataError, match="run the data stage"):
        load_split(tmp_path, "gsm8k", "train")


def test_fewshot_holdout_only_for_tasks_without_train_split(mirror, tmp_path):
    from transformer2.tasks import FEWSHOT_SPLIT, shot_pool

    full = prepare_splits("humaneval", mirror)
    held = prepare_splits("humaneval", mirror, fewshot_holdout=10)
    assert len(held[FEWSHOT_SPLIT]) == 10 and len(held["test"]) == len(full["test"]) - 10
    ids = lambda docs: {d["task_id"] for d in docs}
    assert ids(held[FEWSHOT_SPLIT]).isdisjoint(ids(held["test"]))
    assert ids(held[FEWSHOT_SPLIT]) | ids(held["test"]) == ids(full["test"])
    assert prepare_splits("humaneval", mirror, fewshot_holdout=10) == held  # fixed seed: a stable eval set
    assert FEWSHOT_SPLIT not in prepare_splits("math", mirror, max_rows=5, fewshot_holdout=10)  # has a train split
    with pytest.raises(DataError, match="more than half"):
        prepare_splits("humaneval", mirror, fewshot_holdout=100)

    export_splits("humaneval", tmp_path, mirror, max_rows=20, fewshot_holdout=4)
    assert shot_pool(tmp_path, "humaneval")[0] == FEWSHOT_SPLIT and len(shot_pool(tmp_path, "humaneval")[1]) == 4
    export_splits("humaneval", tmp_path, mirror, max_rows=20)  # holdout switched off: the stale split goes
    with pytest.raises(DataError, match="fewshot_holdout"):
        shot_pool(tmp_path, "humaneval")
    export_splits("math", tmp_path, mirror, max_rows=5)
    assert shot_pool(tmp_path, "math")[0] == "train"


def test_math_cells_limit_docs_per_subject_in_both_styles(mirror):
    """`eval.limit` counts MATH docs per subject: lm-eval's harness group applies it to each subject
    task, and the paper-style t2_math (one task of every subject) takes the first limit x 7 of its docs
    interleaved by subject, so both styles score the same stratified docs (it took the first `limit` docs,
    all Algebra)."""
    from transformer2.harness.cell import docs_limit
    from transformer2.harness.functions.paper import load_dataset
    from transformer2.tasks import get_task, stratified_order

    subjects = [s.value for s in get_task("math").subsets]
    assert docs_limit("math", "paper", 2) == 14 and docs_limit("math", "harness", 2) == 2
    assert docs_limit("math", "paper", None) is None and docs_limit("gsm8k", "paper", 10) == 10
    test = load_dataset("math", str(mirror))["test"]
    first = list(test)[:docs_limit("math", "paper", 2)]
    assert sorted(d["type"] for d in first) == sorted(subjects * 2)
    source = load_source("math", "test", mirror)
    assert len(test) == len(source)
    for subject in subjects:  # each subject keeps its own order: the harness' docs of that subject
        assert [d["problem"] for d in first if d["type"] == subject] == \
            [d["problem"] for d in source if d["type"] == subject][:2]
    docs = [{"x": i} for i in range(3)]
    assert stratified_order("gsm8k", docs) is docs
