"""lm-eval's hendrycks_math subject tasks over one MATH file (the mirror keeps all subjects in
`math/<split>.jsonl`; the hub one config per subject): `process_docs_<subject>` filters on the
task's subset column, then applies lm-eval's own `process_docs` (which extracts the \\boxed{} answer).
The subjects are the MATH task's `subsets` (`transformer2.tasks.hendrycks_math`)."""
from __future__ import annotations

import importlib
from functools import lru_cache

PREFIX = "process_docs_"


@lru_cache(maxsize=None)
def _process(subject: str):
    from ...tasks import get_task

    task = get_task("math")
    value = {s.lm_eval: s.value for s in task.subsets}[subject]
    column = task.subset_column

    def process_docs(dataset):
        utils = importlib.import_module("lm_eval.tasks.hendrycks_math.utils")
        return utils.process_docs(dataset.filter(lambda doc: doc[column] == value))

    process_docs.__name__ = f"{PREFIX}{subject}"
    return process_docs


def __getattr__(name: str):
    if name.startswith(PREFIX):
        try:
            return _process(name[len(PREFIX):])
        except KeyError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
