"""Sandboxed code metrics for lm-eval's mbpp and humaneval tasks.

lm-eval's own `utils.py` for these tasks loads HF `code_eval` at import time, which executes
model output in the evaluating process (guarded only by HF_ALLOW_CODE_EVAL). The generated
task YAMLs name these functions instead: each candidate is judged against its test code as
`code_eval` would, but by `transformer2.sandbox.run_tests` (the tests run in a process of their
own, the candidate in another, both confined), and anything but a clean pass - an exception, a
timeout, a blocked call, a value that is not plain data - scores 0.
"""
from __future__ import annotations

import ast
import re
from math import comb
from pathlib import Path
from typing import Optional, Sequence, Union

from ...sandbox import SandboxLimits, run_tests_many

# code_eval gives each program 3 s; the sandbox adds interpreter start-up, hence the wall margin.
LIMITS = SandboxLimits(timeout_s=5.0, cpu_s=3)
WORKERS = 2


def _pass_at(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def _entry_points(tests: str) -> list[str]:
    """The candidate's functions the tests call by name: HumanEval's `check(f)`, MBPP's `assert f(...)`."""
    names = re.findall(r"^check\((\w+)\)", tests, re.M)
    names += re.findall(r"^\s*assert\s*\(?\s*(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", tests, re.M)
    return sorted(set(names))


def pass_at_k(references: Sequence[str], predictions: Sequence[Sequence[str]],
              k: Union[int, Sequence[int], None] = None) -> dict[str, float]:
    """{"pass@k": mean over references} like HF code_eval; predictions[i] are candidates for references[i]."""
    ks = [1] if k is None else [k] if isinstance(k, int) else list(k)
    if isinstance(references, str):
        references = [references]
    predictions = [[p] if isinstance(p, str) else list(p) for p in predictions]
    if len(predictions) != len(references):
        raise ValueError(f"{len(references)} references but {len(predictions)} prediction lists")
    items = [{"candidate": cand, "tests": ref, "entry_points": _entry_points(ref)}
             for ref, cands in zip(references, predictions) for cand in cands]
    passed = iter(r.passed for r in run_tests_many(items, LIMITS, workers=WORKERS))
    counts = [(len(cands), sum(next(passed) for _ in cands)) for cands in predictions]
    out = {}
    for kk in ks:
        if counts and all(n >= kk for n, _ in counts):
            out[f"pass@{kk}"] = sum(_pass_at(n, c, kk) for n, c in counts) / len(counts)
    return out


def pass_at_1(references: Union[str, Sequence[str]], predictions: Union[str, Sequence]) -> float:
    """mbpp's metric: pass@1 of the (single) generation per reference."""
    if isinstance(predictions, str):
        predictions = [predictions]
    return pass_at_k(references, predictions, k=[1]).get("pass@1", 0.0)


def humaneval_build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's humaneval filter: the prompt (signature + docstring) followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def _literal_return(path: Path, function: str) -> object:
    """The literal a function in `path` returns, read without importing (importing runs code_eval)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            for stmt in node.body:
                if isinstance(stmt, ast.Return) and stmt.value is not None:
                    return ast.literal_eval(stmt.value)
    raise ValueError(f"{path}: no function {function}() returning a literal")


_MBPP_SHOTS: Optional[list[dict]] = None


def mbpp_fewshot_samples() -> list[dict]:
    """The three fixed mbpp shots of lm-eval (task_ids 2, 3, 4), as its utils.py lists them."""
    global _MBPP_SHOTS
    if _MBPP_SHOTS is None:
        import lm_eval

        path = Path(lm_eval.__file__).parent / "tasks" / "mbpp" / "utils.py"
        _MBPP_SHOTS = list(_literal_return(path, "list_fewshot_samples"))
    return [dict(s) for s in _MBPP_SHOTS]
