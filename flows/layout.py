"""Where each stage reads and writes, relative to the project root; mirrors dvc.yaml."""
from pathlib import Path

ARTIFACTS = Path("artifacts")
MODEL_DIR = ARTIFACTS / "model"
DATA_DIR = ARTIFACTS / "data"
SVD_DIR = ARTIFACTS / "svd"
EXPERTS_DIR = ARTIFACTS / "experts"
LORA_DIR = ARTIFACTS / "lora"
CLASSIFIER_DIR = ARTIFACTS / "classifier"
CEM_DIR = ARTIFACTS / "cem"
EVAL_DIR = ARTIFACTS / "eval"
CHECKPOINTS_DIR = ARTIFACTS / "checkpoints"  # resumable training state; not a DVC output
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")
RESULTS_FILE = Path("results.json")  # score.<method>.<task>: short `dvc exp show` columns
PARAMS = Path("params.yaml")
STAGE_PARAMS_DIR = Path("stage_params")  # what each stage unit reads (the `params` stage writes it)


def metrics_file(stage: str) -> Path:
    return METRICS_DIR / f"{stage}.json"


def base_samples(task: str) -> Path:
    """The base cell's per-sample outputs: every other cell of the task is paired against them."""
    return EVAL_DIR / f"base_{task}" / "samples.jsonl"
