"""`few_shot`: one expert mix for every request, its α found by few-shot CEM (`cem.py`) on labelled
shots that the evaluation never sees, or given."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..cem import CEMConfig, CEMError, CEMResult, draw_shots, few_shot_cem
from ..svf import Expert
from ..tasks import data_dir, load_source, load_split
from .base import StrategyError, register_strategy


@register_strategy("few_shot")
class FewShotStrategy:
    """One mixed expert z' = Σ α_k z_k for every request.

    Given `result` (a CEMResult), the mix is fixed; given `task` and `shots`, CEM runs on the
    first call to `assign`, so its time is the first pass of the evaluation cell.
    """

    KEY = "few_shot"

    def __init__(self, model, tokenizer, experts: Mapping[str, Expert], *, result: Optional[CEMResult] = None,
                 task: Optional[str] = None, shots: Optional[Sequence[dict]] = None,
                 config: Optional[CEMConfig] = None, method: str = "batched", batch_size: int = 16,
                 max_new_tokens: int = 128):
        if result is None and (task is None or not shots):
            raise CEMError("few_shot needs a CEM result (alpha) or a task and its shots to run CEM on")
        self.model, self.tokenizer, self.experts = model, tokenizer, dict(experts)
        self.result, self.task, self.shots = result, task, list(shots or [])
        self.config, self.method = config or CEMConfig(), method
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._expert: Optional[Expert] = result.mixed(self.experts) if result is not None else None

    @classmethod
    def from_args(cls, model, tokenizer, experts: Mapping[str, Expert], alpha: Any = None, keys: Optional[list] = None,
                  result: Optional[str] = None, task: Optional[str] = None, data_root: Optional[str] = None,
                  split: str = "train", shots: int = 10, seed: int = 0, population: int = 32,
                  elite_ratio: float = 0.2, generations: int = 10, init_std: float = 0.5, per_matrix: bool = False,
                  method: str = "batched", batch_size: int = 16, max_new_tokens: int = 128) -> "FewShotStrategy":
        """A fixed mix: from `alpha` (+ `keys`, default every expert but "classifier"), from a saved CEM
        `result` (cem.json), or found by CEM on `shots` docs of `task`'s `split` at the first request."""
        try:
            if result is not None:
                res = CEMResult.load(result)
            elif alpha is not None:
                names = list(keys) if keys else [k for k in experts if k != "classifier"]
                res = CEMResult(alpha=alpha if isinstance(alpha, list) else list(alpha), keys=names,
                                accuracy=float("nan"), loglik=float("nan"))
            else:
                res = None
            if res is not None:
                return cls(model, tokenizer, experts, result=res)
            if task is None:
                raise CEMError("give alpha, a CEM result, or task (+ data_root, split, shots) to run CEM on")
            if split == "test":
                raise CEMError("shots must not come from the test split the cell is evaluated on; use "
                               "train/validation, or run CEM beforehand on shots removed from the evaluation set "
                               "and pass result=")
            docs = (load_split(data_root, task, split) if data_root is not None
                    else load_source(task, split, data_dir()))
            names = list(keys) if keys else [k for k in experts if k != "classifier"]
            cfg = CEMConfig(population=population, elite_ratio=elite_ratio, generations=generations,
                            init_std=init_std, per_matrix=per_matrix, seed=seed)
            return cls(model, tokenizer, {k: experts[k] for k in names}, task=task,
                       shots=draw_shots(docs, shots, seed)[0], config=cfg, method=method,
                       batch_size=batch_size, max_new_tokens=max_new_tokens)
        except (CEMError, KeyError) as err:
            raise StrategyError(f"strategy few_shot: {err}") from None

    def assign(self, requests: Sequence) -> list[str]:
        if self._expert is None:
            self.result = few_shot_cem(self.model, self.tokenizer, self.experts, self.task, self.shots, self.config,
                                       method=self.method, batch_size=self.batch_size,
                                       max_new_tokens=self.max_new_tokens)
            self._expert = self.result.mixed(self.experts)
        return [self.KEY] * len(requests)

    def expert(self, key) -> Optional[Expert]:
        return self._expert
