"""lm-evaluation-harness integration. Importing it registers the lm-eval model `transformer2`:

    import transformer2.harness, lm_eval
    lm_eval.simple_evaluate(model="transformer2",
                           model_args="pretrained=artifacts/model,svd=artifacts/svd,expert=artifacts/experts/gsm8k",
                           tasks=["gsm8k"], task_manager=TaskManager(include_path=task_config_dir(...)))

- `model`: the lm-eval model (groups requests by the strategy's keys, sets weights per group);
- `task_configs`: task YAMLs for every registered task, harness and paper style;
- `cell`: one (model, task) evaluation with a resumable response cache;
- `cli`: lm-eval's command line with all of the above; `functions`: what the YAMLs name.
"""
from .cell import cache_files, cached_responses, evaluate_task, save_cell
from .cli import cli_main
from .errors import HarnessError
from .model import AdaptationStats, Transformer2LM
from .task_configs import (GENERATED, PAPER_GROUP, STYLES, headline_metric, lm_eval_task_name, read_task_yaml,
                           task_config_dir)

__all__ = ["GENERATED", "PAPER_GROUP", "STYLES", "AdaptationStats", "HarnessError", "Transformer2LM",
           "cache_files", "cached_responses", "cli_main", "evaluate_task", "headline_metric", "lm_eval_task_name",
           "read_task_yaml", "save_cell", "task_config_dir"]
