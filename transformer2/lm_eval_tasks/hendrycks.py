"""lm-eval's hendrycks_math subject tasks over one MATH file (the mirror keeps all subjects in
`math/<split>.jsonl`; the hub keeps one config per subject): filter on the `type` column, then
apply lm-eval's own `process_docs` (which extracts the \\boxed{} answer)."""
from __future__ import annotations

import importlib

SUBJECT_TYPES = {
    "algebra": "Algebra", "counting_and_prob": "Counting & Probability", "geometry": "Geometry",
    "intermediate_algebra": "Intermediate Algebra", "num_theory": "Number Theory",
    "prealgebra": "Prealgebra", "precalc": "Precalculus"}


def _process(subject: str):
    kind = SUBJECT_TYPES[subject]

    def process_docs(dataset):
        utils = importlib.import_module("lm_eval.tasks.hendrycks_math.utils")
        return utils.process_docs(dataset.filter(lambda doc: doc["type"] == kind))

    process_docs.__name__ = f"process_docs_{subject}"
    return process_docs


process_docs_algebra = _process("algebra")
process_docs_counting_and_prob = _process("counting_and_prob")
process_docs_geometry = _process("geometry")
process_docs_intermediate_algebra = _process("intermediate_algebra")
process_docs_num_theory = _process("num_theory")
process_docs_prealgebra = _process("prealgebra")
process_docs_precalc = _process("precalc")
