"""lm-evaluation-harness integration: the `transformer2` model, adaptation strategies, tasks.

Importing this module registers the lm-eval model `transformer2`, an `HFLM` that can answer
with SVF experts:

    import transformer2.harness, lm_eval
    lm_eval.simple_evaluate(model="transformer2",
                           model_args="pretrained=artifacts/model,svd=artifacts/svd,expert=artifacts/experts/gsm8k",
                           tasks=["gsm8k"], task_manager=TaskManager(include_path=task_config_dir(...)))

Model args (besides every HFLM arg: batch_size, device, dtype, peft, ...):
- `pretrained`: a model-stage folder (with model.json: its checkpoint and fingerprint are
  used), or any checkpoint folder / hub id;
- `svd`: the SVD cache of that base (needed as soon as an expert is used);
- `expert`: one SVF expert folder, used for every request (strategy `fixed`);
- `experts`: named experts for a routing strategy, {name: folder} (a dict, a JSON object, or
  "name:folder;name:folder");
- `strategy`: a name in STRATEGIES (default `fixed`) or an AdaptationStrategy object;
- `strategy_args`: keyword arguments for the strategy factory (a dict or a JSON object).

Transformer² adaptation is two passes. The first pass (`AdaptationStrategy.assign`) looks at
each distinct prompt and picks a key; `expert(key)` gives the z to use (an Expert, or None
for the base weights). The model then groups requests by key, sets the weights once per group
and lets HFLM answer the group (second pass), returning results in lm-eval's order. Seconds
spent in each pass are kept in `lm.stats` and reported under `transformer2` in the results'
config.

`task_config_dir` writes lm-eval task YAMLs: the built-in tasks re-pointed at local JSON Lines
("harness" style, same names, prompts and metrics; code runs in the project's sandbox) and the
paper's chat prompts scored by `transformer2.scoring` ("paper" style, `t2_<task>`).
"""
from __future__ import annotations

import ast
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (Any, Callable, Hashable, Mapping, Optional, Protocol, Sequence,
                    runtime_checkable)

import lm_eval
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .errors import UserError
from .lm_eval_tasks.hendrycks import SUBJECT_TYPES
from .models import MODEL_INFO, ModelInfo, fingerprint as model_fingerprint
from .svd import load_factors
from .svf import Expert, ExpertError, apply_svf, set_expert, svf_layers

log = logging.getLogger(__name__)

Key = Hashable


class HarnessError(UserError, ValueError):
    """Model args or task settings that cannot work; the message says what to change."""


# ---------------------------------------------------------------- adaptation strategies

@runtime_checkable
class AdaptationStrategy(Protocol):
    """The first pass of Transformer²: which expert answers which request.

    `assign` sees one request per distinct context (requests that share a context, like the
    choices of one multiple-choice question, always get the same key) and returns one key per
    request; `expert(key)` is the z for that key (None = base weights).
    """

    def assign(self, requests: Sequence[Instance]) -> list[Key]: ...

    def expert(self, key: Key) -> Optional[Expert]: ...


class FixedStrategy:
    """One expert (or the base weights) for every request: no first pass at all."""

    KEY = "fixed"

    def __init__(self, expert: Optional[Expert] = None):
        self._expert = expert

    def assign(self, requests: Sequence[Instance]) -> list[Key]:
        return [self.KEY] * len(requests)

    def expert(self, key: Key) -> Optional[Expert]:
        return self._expert


class RouterStrategy:
    """Routes each request by a function of its context string to a named expert (None = base)."""

    def __init__(self, route: Callable[[str], Optional[str]], experts: Mapping[str, Expert]):
        self.route = route
        self.experts = dict(experts)

    def assign(self, requests: Sequence[Instance]) -> list[Key]:
        keys = [self.route(request.args[0]) for request in requests]
        unknown = sorted({k for k in keys if k is not None and k not in self.experts})
        if unknown:
            raise HarnessError(f"the router chose experts {unknown} that were not given "
                               f"(known: {sorted(self.experts)})")
        return keys

    def expert(self, key: Key) -> Optional[Expert]:
        return None if key is None else self.experts[key]


def keyword_route(routes: Mapping[str, Sequence[str]], default: Optional[str] = None,
                  case_sensitive: bool = False) -> Callable[[str], Optional[str]]:
    """context -> the first expert (in `routes` order) one of whose keywords occurs, else `default`."""
    table = [(name, [w if case_sensitive else w.lower() for w in ([words] if isinstance(words, str) else words)])
             for name, words in routes.items()]

    def route(context: str) -> Optional[str]:
        text = context if case_sensitive else context.lower()
        for name, words in table:
            if any(w in text for w in words):
                return name
        return default

    return route


StrategyFactory = Callable[..., AdaptationStrategy]  # factory(lm, experts, **strategy_args)


def _fixed(lm: "Transformer2LM", experts: Mapping[str, Expert], key: Optional[str] = None) -> FixedStrategy:
    if not experts:
        return FixedStrategy(None)
    if key is None:
        if len(experts) != 1:
            raise HarnessError(f"strategy fixed with {len(experts)} experts: say which one with "
                               f"strategy_args={{\"key\": ...}} (one of {sorted(experts)})")
        key = next(iter(experts))
    if key not in experts:
        raise HarnessError(f"strategy fixed: no expert named {key!r} (known: {sorted(experts)})")
    return FixedStrategy(experts[key])


def _keyword(lm: "Transformer2LM", experts: Mapping[str, Expert], routes: Mapping[str, Sequence[str]],
             default: Optional[str] = None, case_sensitive: bool = False) -> RouterStrategy:
    unknown = sorted((set(routes) | ({default} if default else set())) - set(experts))
    if unknown:
        raise HarnessError(f"strategy keyword routes to experts {unknown} that were not given "
                           f"(experts: {sorted(experts)})")
    return RouterStrategy(keyword_route(routes, default, case_sensitive), experts)


# name -> factory(lm, experts, **strategy_args). The two-pass strategies of the paper (prompt,
# classifier, few-shot) register here too.
STRATEGIES: dict[str, StrategyFactory] = {"fixed": _fixed, "keyword": _keyword}


# ---------------------------------------------------------------- the paper's two-pass strategies
# prompt / classifier: the model classifies each question (dispatch.py), classifier with z_c;
# few_shot: one mix z' = Σ α_k z_k found by CEM on labelled shots (cem.py). Their first pass
# runs inside `assign`, so `lm.stats.first_pass_s` / `second_pass_s` separate the two.

def _dispatch_strategy(name: str, lm: "Transformer2LM", experts: Mapping[str, Expert],
                       classifier: Optional[Expert], mode: str, routes: Optional[Mapping[str, Optional[str]]],
                       batch_size: int, max_new_tokens: int, max_question_chars: Optional[int]):
    from .dispatch import DispatchError, DispatchStrategy

    try:
        return DispatchStrategy(lm.model, lm.tokenizer, experts, mode=mode, classifier=classifier, routes=routes,
                                batch_size=batch_size, max_new_tokens=max_new_tokens,
                                max_question_chars=max_question_chars)
    except DispatchError as err:
        raise HarnessError(f"strategy {name}: {err}") from None


def _prompt(lm: "Transformer2LM", experts: Mapping[str, Expert], mode: str = "loglik",
            routes: Optional[Mapping[str, Optional[str]]] = None, batch_size: int = 8, max_new_tokens: int = 32,
            max_question_chars: Optional[int] = 4000):
    """experts named by task (gsm8k, mbpp, arc_easy); the base model classifies (mode generate | loglik)."""
    return _dispatch_strategy("prompt", lm, experts, None, mode, routes, batch_size, max_new_tokens,
                              max_question_chars)


def _classifier(lm: "Transformer2LM", experts: Mapping[str, Expert], classifier: str = "classifier",
                mode: str = "loglik", routes: Optional[Mapping[str, Optional[str]]] = None, batch_size: int = 8,
                max_new_tokens: int = 32, max_question_chars: Optional[int] = 4000):
    """As `prompt`, but the first pass runs with the classification expert experts[classifier] (z_c)."""
    if classifier not in experts:
        raise HarnessError(f"strategy classifier: no expert named {classifier!r} (the classification expert z_c); "
                           f"known: {sorted(experts)}")
    rest = {k: v for k, v in experts.items() if k != classifier}
    return _dispatch_strategy("classifier", lm, rest, experts[classifier], mode, routes, batch_size, max_new_tokens,
                              max_question_chars)


def _few_shot(lm: "Transformer2LM", experts: Mapping[str, Expert], alpha: Any = None, keys: Optional[list] = None,
              result: Optional[str] = None, task: Optional[str] = None, data_root: Optional[str] = None,
              split: str = "train", shots: int = 10, seed: int = 0, population: int = 32,
              elite_ratio: float = 0.2, generations: int = 10, init_std: float = 0.5, per_matrix: bool = False,
              method: str = "batched", batch_size: int = 16, max_new_tokens: int = 128):
    """A fixed mix: from `alpha` (+ `keys`, default every expert but "classifier"), from a saved CEM
    `result` (cem.json), or found by CEM on `shots` docs of `task`'s `split` at the first request."""
    from .cem import CEMConfig, CEMError, CEMResult, FewShotStrategy, draw_shots

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
            return FewShotStrategy(lm.model, lm.tokenizer, experts, result=res)
        if task is None:
            raise CEMError("give alpha, a CEM result, or task (+ data_root, split, shots) to run CEM on")
        if split == "test":
            raise CEMError("shots must not come from the test split the cell is evaluated on; use train/validation, "
                           "or run CEM beforehand on shots removed from the evaluation set and pass result=")
        from .benchmarks import data_dir, load_source, load_split

        docs = (load_split(data_root, task, split) if data_root is not None
                else load_source(task, split, data_dir()))
        names = list(keys) if keys else [k for k in experts if k != "classifier"]
        cfg = CEMConfig(population=population, elite_ratio=elite_ratio, generations=generations, init_std=init_std,
                        per_matrix=per_matrix, seed=seed)
        return FewShotStrategy(lm.model, lm.tokenizer, {k: experts[k] for k in names}, task=task,
                               shots=draw_shots(docs, shots, seed)[0], config=cfg, method=method,
                               batch_size=batch_size, max_new_tokens=max_new_tokens)
    except (CEMError, KeyError) as err:
        raise HarnessError(f"strategy few_shot: {err}") from None


STRATEGIES.update({"prompt": _prompt, "classifier": _classifier, "few_shot": _few_shot})


@dataclass
class AdaptationStats:
    """Where the time went: first pass (choosing z) and second pass (answering), in seconds."""

    first_pass_s: float = 0.0
    second_pass_s: float = 0.0
    requests: int = 0
    contexts: int = 0  # distinct contexts the first pass saw
    groups: int = 0  # weight switches (one per group per call)
    per_key: dict[str, int] = field(default_factory=dict)  # requests answered per key

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["first_pass_s"], d["second_pass_s"] = round(self.first_pass_s, 4), round(self.second_pass_s, 4)
        return d


# ---------------------------------------------------------------- the lm-eval model

def _as_mapping(value: Any, what: str) -> dict:
    """A dict from a dict, a JSON object string, or "k:v;k:v" (what lm-eval's arg string can carry)."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                return dict(json.loads(text))
            except json.JSONDecodeError:
                try:
                    return dict(ast.literal_eval(text))
                except (ValueError, SyntaxError):
                    pass
            raise HarnessError(f"{what}: cannot parse {value!r} as a JSON object")
        if what == "experts":
            pairs = [p.split(":", 1) for p in text.split(";") if p.strip()]
            if all(len(p) == 2 for p in pairs):
                return {k.strip(): v.strip() for k, v in pairs}
    raise HarnessError(f"{what}: expected a mapping, a JSON object or \"name:folder;...\", got {value!r}")


def _check_experts(experts: Mapping[str, Expert], base_fingerprint: str) -> None:
    first = next(iter(experts.values()))
    for name, e in experts.items():
        if e.base_fingerprint != base_fingerprint:
            raise ExpertError(
                f"expert {name!r} was trained on base weights {e.base_fingerprint[:12]}…, but pretrained= "
                f"is {base_fingerprint[:12]}…: evaluate it on the base it was trained on (that model-stage "
                "folder), or train an expert for this base")
        if e.config != first.config or set(e.vectors) != set(first.vectors):
            raise ExpertError(f"expert {name!r} patches other modules or uses another SVF config than "
                              f"{next(iter(experts))!r}; experts used together must share both")


@register_model("transformer2")
class Transformer2LM(HFLM):
    """HFLM + SVF: a fixed expert, or per-request experts chosen by an adaptation strategy."""

    def __init__(self, pretrained: Any, svd: Optional[str] = None, expert: Optional[str] = None,
                 experts: Any = None, strategy: Any = "fixed", strategy_args: Any = None,
                 base_fingerprint: Optional[str] = None, **kwargs: Any) -> None:
        fp = base_fingerprint
        if isinstance(pretrained, (str, Path)) and (Path(pretrained) / MODEL_INFO).is_file():
            info = ModelInfo.load(pretrained)  # a model-stage folder: its checkpoint and fingerprint
            pretrained, fp = info.path, fp or info.fingerprint
            if info.revision:
                kwargs.setdefault("revision", info.revision)
        elif isinstance(pretrained, Path):
            pretrained = str(pretrained)
        folders = _as_mapping(experts, "experts")
        if expert not in (None, ""):
            if folders:
                raise HarnessError("give either expert= (one expert) or experts= (named experts), not both")
            folders = {"expert": expert}
        if folders and kwargs.get("peft"):
            raise HarnessError("SVF experts and a PEFT adapter cannot be combined: experts were trained on "
                               "the base weights, not on base + LoRA")
        loaded = {name: f if isinstance(f, Expert) else Expert.load(f) for name, f in folders.items()}
        if loaded and svd in (None, ""):
            raise HarnessError("experts need the base model's SVD cache: pass svd=<folder of the decompose stage>")
        if loaded and fp is not None:
            _check_experts(loaded, fp)  # before loading any weights

        super().__init__(pretrained=pretrained, **kwargs)

        self.stats = AdaptationStats()
        self.base_fingerprint: Optional[str] = fp
        self.experts: dict[str, Expert] = loaded
        if loaded:
            self._patch(loaded, svd)
        if isinstance(strategy, str):
            if strategy not in STRATEGIES:
                raise HarnessError(f"unknown strategy {strategy!r}; known: {sorted(STRATEGIES)}")
            strategy = STRATEGIES[strategy](self, loaded, **_as_mapping(strategy_args, "strategy_args"))
        if not isinstance(strategy, AdaptationStrategy):
            raise HarnessError(f"strategy must be a name in STRATEGIES or an AdaptationStrategy, got {strategy!r}")
        self.strategy: AdaptationStrategy = strategy

    # -- weights

    def _patch(self, experts: Mapping[str, Expert], svd: str) -> None:
        """Check every expert against the base, then wrap the targeted layers with their SVD factors."""
        if self.base_fingerprint is None:  # not a model-stage folder: fingerprint the loaded weights
            if svf_layers(self._model):
                raise HarnessError("the model is already SVF-patched: pass base_fingerprint= with it")
            self.base_fingerprint = model_fingerprint(self._model)
        _check_experts(experts, self.base_fingerprint)
        first = next(iter(experts.values()))
        if not svf_layers(self._model):
            factors = load_factors(svd, self.base_fingerprint, modules=list(first.vectors))
            apply_svf(self._model, factors, first.config)

    def use_expert(self, expert: Optional[Expert]) -> None:
        """Switch to fixed mode with this expert (None = the exact base weights)."""
        if expert is not None and not svf_layers(self._model):
            raise HarnessError("this model was loaded without experts, so it has no SVF layers: "
                               "load it with svd= and an expert")
        self.strategy = FixedStrategy(expert)
        self._set(expert)

    def _set(self, expert: Optional[Expert]) -> None:
        if not svf_layers(self._model):
            if expert is not None:
                raise HarnessError("the strategy chose an expert but the model has no SVF layers")
            return
        set_expert(self._model, expert, base_fingerprint=self.base_fingerprint)

    def run_with(self, expert: Optional[Expert], method: str, requests: list[Instance],
                 disable_tqdm: bool = False) -> list:
        """Answer `requests` with HFLM's `method` under one expert (also for strategies' own first pass)."""
        self._set(expert)
        return getattr(HFLM, method)(self, requests, disable_tqdm=disable_tqdm)

    # -- two passes

    def _adapted(self, method: str, requests: list[Instance], disable_tqdm: bool) -> list:
        if not requests:
            return []
        t0 = time.perf_counter()
        slot: dict[Any, int] = {}
        distinct: list[Instance] = []
        for r in requests:
            if r.args[0] not in slot:
                slot[r.args[0]] = len(distinct)
                distinct.append(r)
        keys = list(self.strategy.assign(distinct))
        if len(keys) != len(distinct):
            raise HarnessError(f"strategy returned {len(keys)} keys for {len(distinct)} requests")
        groups: dict[Key, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(keys[slot[r.args[0]]], []).append(i)
        t1 = time.perf_counter()
        out: list = [None] * len(requests)
        for key, idx in groups.items():
            results = self.run_with(self.strategy.expert(key), method, [requests[i] for i in idx], disable_tqdm)
            for i, result in zip(idx, results):
                out[i] = result
            self.stats.per_key[str(key)] = self.stats.per_key.get(str(key), 0) + len(idx)
        t2 = time.perf_counter()
        self.stats.first_pass_s += t1 - t0
        self.stats.second_pass_s += t2 - t1
        self.stats.requests += len(requests)
        self.stats.contexts += len(distinct)
        self.stats.groups += len(groups)
        return out

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._adapted("loglikelihood", requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._adapted("loglikelihood_rolling", requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._adapted("generate_until", requests, disable_tqdm)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["transformer2"] = {
            "base_fingerprint": self.base_fingerprint,
            "strategy": type(self.strategy).__name__,
            "experts": {name: e.provenance for name, e in self.experts.items()},
            **self.stats.as_dict(),
        }
        return info


# ---------------------------------------------------------------- task configs

GENERATED = "# generated by transformer2.harness.task_config_dir: do not edit\n"
STYLES = ("harness", "paper", "all")
TASKS_PKG = "transformer2.lm_eval_tasks"


class _Function(str):
    """A `!function` reference in a task YAML, kept unresolved."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value), style=""))
_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(  # prompts stay readable
    "tag:yaml.org,2002:str", value, style=None if "\n" not in value else "|" if len(value) > 40 else '"'))


def lm_eval_tasks_dir() -> Path:
    return Path(lm_eval.__file__).parent / "tasks"


def read_task_yaml(path: Path) -> dict:
    """A task YAML with its `include`s merged (local keys win), functions left unresolved."""
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    merged: dict = {}
    includes = cfg.pop("include", None)
    for inc in ([] if includes is None else includes if isinstance(includes, list) else [includes]):
        merged.update(read_task_yaml(Path(inc) if Path(inc).is_absolute() else path.parent / inc))
    merged.update(cfg)
    return merged


@dataclass(frozen=True)
class HarnessTask:
    """A built-in lm-eval task and where our copy of its data lives."""

    builtin: str  # YAML path under lm_eval/tasks
    data: str  # folder under the data root
    functions: Optional[dict[str, str]] = None  # code tasks: built-in !function -> ours (no include)
    local: Optional[dict] = None  # further overrides when the data is local


_CODE = f"{TASKS_PKG}.code"

HARNESS_TASKS: dict[str, HarnessTask] = {
    "gsm8k": HarnessTask("gsm8k/gsm8k.yaml", "gsm8k"),
    "arc_easy": HarnessTask("arc/arc_easy.yaml", "arc_easy"),
    "arc_challenge": HarnessTask("arc/arc_challenge.yaml", "arc_challenge"),
    "mbpp": HarnessTask("mbpp/mbpp.yaml", "mbpp", {
        "utils.pass_at_1": f"{_CODE}.pass_at_1", "utils.list_fewshot_samples": f"{_CODE}.mbpp_fewshot_samples"}),
    "humaneval": HarnessTask("humaneval/humaneval.yaml", "humaneval", {
        "utils.pass_at_k": f"{_CODE}.pass_at_k", "utils.build_predictions": f"{_CODE}.humaneval_build_predictions"}),
    **{f"hendrycks_math_{s}": HarnessTask(f"hendrycks_math/hendrycks_math_{s}.yaml", "math", local={
        "process_docs": _Function(f"{TASKS_PKG}.hendrycks.process_docs_{s}")}) for s in SUBJECT_TYPES},
}
HARNESS_GROUPS = {"hendrycks_math": "hendrycks_math/hendrycks_math.yaml"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")

# The paper's evaluation: chat prompts of transformer2.prompts, greedy, scored by transformer2.scoring.
PAPER_TASKS = ("gsm8k", "arc_easy", "arc_challenge", "mbpp", "math", "humaneval")
PAPER_MAX_NEW_TOKENS = {"math": 1024}  # else 512, as in the reference code
PAPER_GROUP = "t2_paper"


def _replace_functions(value: Any, table: Mapping[str, str], where: str) -> Any:
    if isinstance(value, _Function):
        if value not in table:
            raise HarnessError(f"{where}: lm-eval's task uses function {value!r}, which transformer2 has no "
                               "sandboxed replacement for (lm-eval version changed?)")
        return _Function(table[value])
    if isinstance(value, dict):
        return {k: _replace_functions(v, table, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_functions(v, table, where) for v in value]
    return value


def _harness_config(name: str, spec: HarnessTask, data_root: Optional[Path]) -> Optional[dict]:
    builtin = lm_eval_tasks_dir() / spec.builtin
    merged = read_task_yaml(builtin)
    if spec.functions is not None:  # code task: a standalone copy, so lm-eval's code_eval is never imported
        cfg = _replace_functions(merged, spec.functions, name)
        cfg["unsafe_code"] = False  # model code runs in transformer2.sandbox, never in this process
    else:
        cfg = {"include": str(builtin), "task": name}
    if data_root is None:
        return cfg
    cfg.update(spec.local or {})
    folder = data_root / spec.data
    files: dict[str, str] = {}
    for key in SPLIT_KEYS:
        split = merged.get(key)
        if split is None:
            continue
        path = folder / f"{split}.jsonl"
        if path.is_file():
            files[split] = str(path.resolve())
        elif key == "test_split":
            log.warning("%s: %s not found; the task keeps lm-eval's hub dataset", name, path)
            return None
        else:
            cfg[key] = None  # e.g. no validation file: lm-eval does without it
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    return cfg


def _paper_config(task: str, data_root: Optional[Path]) -> dict:
    from .prompts import SYSTEM_PROMPTS

    fn = f"{TASKS_PKG}.paper"
    return {
        "task": f"t2_{task}",
        "tag": [PAPER_GROUP],
        "custom_dataset": _Function(f"{fn}.load_dataset"),
        "dataset_kwargs": {"t2_task": task, "t2_data_root": str(data_root.resolve()) if data_root else None},
        "output_type": "generate_until",
        "test_split": "test",
        "description": SYSTEM_PROMPTS[task],
        "doc_to_text": _Function(f"{fn}.doc_to_text_{task}"),
        "doc_to_target": _Function(f"{fn}.doc_to_target_{task}"),
        "process_results": _Function(f"{fn}.process_results_{task}"),
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "generation_kwargs": {"until": [], "max_gen_toks": PAPER_MAX_NEW_TOKENS.get(task, 512),
                              "do_sample": False},
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "note": "run with --apply_chat_template (the paper's chat prompts)"},
    }


def task_config_dir(data_root: Optional[Path], out_dir: Path, style: str = "all") -> Path:
    """Write lm-eval task YAMLs into `out_dir` (pass it as include_path) and return it.

    style "harness": gsm8k, arc_easy, arc_challenge, mbpp, humaneval and the hendrycks_math
    group (+ its 7 subject tasks) keep lm-eval's names, prompts and metrics but read
    `<data_root>/<task>/<split>.jsonl` (the shared mirror or the data stage's output); with
    data_root None the datasets stay on the hub, and only the code tasks are rewritten (to run
    in the sandbox). style "paper": `t2_<task>` for the six tasks plus the tag `t2_paper`.
    "all": both.
    """
    if style not in STYLES:
        raise HarnessError(f"style must be one of {STYLES}, got {style!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root is not None else None
    configs: dict[str, dict] = {}
    if style in ("harness", "all"):
        for name, spec in HARNESS_TASKS.items():
            cfg = _harness_config(name, spec, root)
            if cfg is not None:
                configs[name] = cfg
        for name, builtin in HARNESS_GROUPS.items():
            configs[name] = {"include": str(lm_eval_tasks_dir() / builtin)}
    if style in ("paper", "all"):
        for task in PAPER_TASKS:
            configs[f"t2_{task}"] = _paper_config(task, root)
    for old in out_dir.glob("*.yaml"):  # drop what an earlier call generated and this one does not
        if old.stem not in configs and old.read_text(encoding="utf-8").startswith(GENERATED):
            old.unlink()
    for name, cfg in configs.items():
        text = GENERATED + yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
        tmp = out_dir / f".{name}.yaml.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / f"{name}.yaml")
    return out_dir


# ---------------------------------------------------------------- one evaluation cell

HARNESS_NAMES = {"math": "hendrycks_math"}  # our task name -> lm-eval's, where they differ
HEADLINE = {"gsm8k": "exact_match,flexible-extract", "arc_easy": "acc_norm,none", "arc_challenge": "acc_norm,none",
            "mbpp": "pass_at_1,none", "humaneval": "pass@1,create_test", "math": "exact_match,none"}


def lm_eval_task_name(task: str, style: str) -> str:
    if style == "paper":
        return f"t2_{task}"
    if style == "harness":
        return HARNESS_NAMES.get(task, task)
    raise HarnessError(f"eval style must be harness or paper, got {style!r}")


def evaluate_task(model_args: Mapping[str, Any], task: str, *, data_root: Optional[Path], style: str = "harness",
                  limit: Optional[int] = None, batch_size: int = 8, num_fewshot: Optional[int] = None,
                  apply_chat_template: bool = False, gen_kwargs: Optional[dict] = None,
                  device: str = "cpu", dtype: str = "float32", seed: int = 0,
                  response_cache: str | Path | None = None) -> dict:
    """Run one (model, task) cell through lm-eval's `simple_evaluate` with the `transformer2` model.

    `response_cache`: lm-eval's sqlite cache of model responses (written as they are computed),
    so a killed cell rerun with the same cache only computes what is missing. The caller owns
    its identity: responses are keyed by request alone, not by model.
    Returns {"metrics": {name: value}, "headline": (name, value), "results": lm-eval's results
    dict (JSON-ready), "samples": per-sample outputs, "adaptation": first/second pass stats
    of the requests computed in this run, "cached_responses": responses found in the cache}.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = lm_eval_task_name(task, style)
    cached = cached_responses(response_cache) if response_cache is not None else 0
    with tempfile.TemporaryDirectory(prefix="t2-tasks-") as tmp:
        include = task_config_dir(data_root, Path(tmp), style=style)
        manager = TaskManager(include_path=str(include), include_defaults=True)
        out = lm_eval.simple_evaluate(
            model="transformer2", model_args={"device": device, "dtype": dtype, **model_args}, tasks=[name], limit=limit, batch_size=batch_size,
            num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, gen_kwargs=gen_kwargs,
            task_manager=manager, log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
            use_cache=str(response_cache) if response_cache is not None else None)
    results = json.loads(json.dumps(out["results"], default=str))
    metrics = {k: v for k, v in results.get(name, {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
    key = "acc,none" if style == "paper" else HEADLINE[task]
    if key not in metrics:
        raise HarnessError(f"{name}: lm-eval reported no {key!r} (got {sorted(metrics)})")
    samples = json.loads(json.dumps(out.get("samples", {}), default=str))
    adaptation = out.get("config", {}).get("transformer2", {})
    return {"task": name, "metrics": metrics, "headline": {"metric": key, "value": metrics[key]},
            "results": results, "samples": samples, "adaptation": adaptation,
            "n_samples": out.get("n-samples", {}).get(name, {}), "cached_responses": cached}


def cache_files(response_cache: str | Path) -> list[Path]:
    """The sqlite files lm-eval writes for `use_cache=response_cache` (one per rank)."""
    base = Path(response_cache)
    return sorted(base.parent.glob(base.name + "_rank*.db"))


def cached_responses(response_cache: str | Path) -> int:
    from sqlitedict import SqliteDict

    total = 0
    for db in cache_files(response_cache):
        with SqliteDict(str(db), flag="r") as responses:
            total += len(responses)
    return total


# ---------------------------------------------------------------- CLI

def cli_main(argv: Sequence[str], data_root: Optional[Path] = None) -> int:
    """lm-eval's own CLI (`lm-eval run/ls/validate ...`) with the `transformer2` model registered.

    Unless `--include_path` is given, the project's task configs are generated for `data_root`
    (default: the mirror named by T2_DATA_DIR, else the hub) and passed as `--include_path`,
    so the built-in task names read local data and the `t2_*` tasks exist. Returns the exit
    status.
    """
    from lm_eval.__main__ import cli_evaluate

    from .benchmarks import data_dir

    argv = list(argv)
    asks_help = not argv or any(a in ("-h", "--help") for a in argv)
    old_argv = sys.argv
    with tempfile.TemporaryDirectory(prefix="t2-lm-eval-tasks-") as tmp:
        if not asks_help and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            try:
                root = Path(data_root) if data_root is not None else data_dir()
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            argv += ["--include_path", str(task_config_dir(root, Path(tmp)))]
        sys.argv = ["lm-eval", *argv]
        try:
            cli_evaluate()
        except SystemExit as exit_:
            code = exit_.code
            if code is None or isinstance(code, int):
                return code or 0
            print(code, file=sys.stderr)
            return 1
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            sys.argv = old_argv
    return 0


__all__ = ["AdaptationStats", "AdaptationStrategy", "FixedStrategy", "HARNESS_TASKS", "HarnessError",
           "PAPER_TASKS", "RouterStrategy", "STRATEGIES", "Transformer2LM", "cli_main", "keyword_route",
           "read_task_yaml", "task_config_dir"]
