"""The lm-eval model `transformer2`: an HFLM that answers with SVF experts.

Model args (besides every HFLM arg: batch_size, device, dtype, peft, ...):
- `pretrained`: a model-stage folder (with model.json: its checkpoint and fingerprint are
  used), or any checkpoint folder / hub id;
- `svd`: the SVD cache of that base (needed as soon as an expert is used);
- `expert`: one SVF expert folder, used for every request (strategy `fixed`);
- `experts`: named experts for a routing strategy, {name: folder} (a dict, a JSON object, or
  "name:folder;name:folder");
- `strategy`: a name in `strategies.STRATEGIES` (default `fixed`) or an AdaptationStrategy object;
- `strategy_args`: keyword arguments for the strategy (a dict or a JSON object);
- `engine`: `generate_until` through the project's decoding engine and `loglikelihood` (also
  rolling) through its continuation scorer `loglik.token_logprobs` (default true; false: HFLM's);
- `max_logits_mb`: the scorer's bound on the float32 logits one batch keeps (default 1024).

Transformer² adaptation is two passes. The first (`strategy.assign`) looks at each distinct
prompt and picks a key; `strategy.expert(key)` gives the z to use (None = base weights). This
model only groups requests by key, sets the weights once per group and lets HFLM answer the
group (second pass), returning results in lm-eval's order. Seconds spent in each pass are kept
in `lm.stats` and reported under `transformer2` in the results' config.
"""
from __future__ import annotations

import ast
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..models import MODEL_INFO, ModelInfo, fingerprint as model_fingerprint
from ..strategies import AdaptationStrategy, FixedStrategy, Key, build_strategy
from ..svd import load_factors
from ..svf import Expert, ExpertError, apply_svf, set_expert, svf_layers
from .errors import HarnessError


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


def _generation_eos(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


@register_model("transformer2")
class Transformer2LM(HFLM):
    """HFLM + SVF: a fixed expert, or per-request experts chosen by an adaptation strategy."""

    def __init__(self, pretrained: Any, svd: Optional[str] = None, expert: Optional[str] = None,
                 experts: Any = None, strategy: Any = "fixed", strategy_args: Any = None,
                 base_fingerprint: Optional[str] = None, engine: Any = True, max_logits_mb: Any = 1024,
                 **kwargs: Any) -> None:
        self.engine = str(engine).lower() not in ("false", "0", "no")  # decoding.generate, loglik.token_logprobs
        self.max_logits_mb = float(max_logits_mb)
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
        # Evaluation never trains. Frozen weights (as SVF patching leaves them) also keep results
        # bit-identical with and without experts loaded: torch.matmul folds a batch into one mm (other
        # rounding) only when the weight needs no grad, and the scorer's kept-logits slice hits that.
        self._model.requires_grad_(False)

        self.stats = AdaptationStats()
        self.base_fingerprint: Optional[str] = fp
        self.experts: dict[str, Expert] = loaded
        if loaded:
            self._patch(loaded, svd)
        if isinstance(strategy, str):
            strategy = build_strategy(strategy, self.model, self.tokenizer, loaded,
                                      _as_mapping(strategy_args, "strategy_args"))
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
        """Answer `requests` with HFLM's `method` under one expert (also for strategies' own first pass);
        generation goes through the project's decoding engine and scoring through `loglik.token_logprobs`
        (HFLM's `loglikelihood` tokenizes, then calls `_loglikelihood_tokens`) unless `engine=false` was given."""
        self._set(expert)
        if method == "generate_until" and self.engine:
            return self._engine_generate_until(requests)
        disable_tqdm = disable_tqdm or not sys.stderr.isatty()  # HFLM's bars (disable=False beats TQDM_DISABLE)
        return getattr(HFLM, method)(self, requests, disable_tqdm=disable_tqdm)  # only on a terminal, not in logs

    def _engine_generate_until(self, requests: list[Instance]) -> list[str]:
        """HFLM's generate_until through `decoding.generate`: the same contexts (left-truncated to
        leave room for max_gen_toks), stop sequences and post-processing, but every request with
        the same generation kwargs is one continuously batched call instead of padded batches."""
        from lm_eval.models.huggingface import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from ..decoding import generate

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        stop_ids = sorted({self.eot_token_id, *_generation_eos(self._model)})
        think = self.think_end_token if isinstance(self.think_end_token, str) else None
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            contexts = [self.tok_batch_encode([requests[i].args[0]], left_truncate_len=self.max_length - max_gen,
                                              truncation=self.truncation)[0][0].tolist() for i in idx]

            def stop_check(row: int, ids: list, tail: int = 8) -> bool:
                text = self.tok_decode(ids[-tail:])
                return any(s in text for s in until)

            ids = generate(self._model, contexts, max_new_tokens=max_gen, stop_ids=stop_ids,
                           pad_id=self.tokenizer.pad_token_id or 0, do_sample=bool(kwargs.get("do_sample")),
                           temperature=float(kwargs.get("temperature") or 1.0), top_p=float(kwargs.get("top_p") or 1.0),
                           stop_check=stop_check if until else None)
            for i, toks in zip(idx, ids):
                text = postprocess_generated_text(generation=self.tok_decode(toks), stop=until, think_end_token=think)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: Optional[int] = None) -> list[tuple[float, bool]]:
        """HFLM's scoring of lm-eval's tokenized (request, context ids, continuation ids) through
        `loglik.token_logprobs`: the same left truncation to max_length + 1 tokens, but each distinct
        context runs once for all its continuations, the contexts' common prefix (few-shot examples)
        once for all, and `batch_size` counts contexts within the `max_logits_mb` bound."""
        if not self.engine or self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from ..loglik import token_logprobs

        slot: dict[tuple, int] = {}
        conts: list[list[list[int]]] = []
        where: list[tuple[int, int]] = []  # request -> (context slot, continuation slot)
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise HarnessError(f"a continuation of {len(continuation)} tokens: lm-eval scores 1..max_length "
                                   f"({self.max_length}) tokens")
            window = (list(context) + list(continuation))[-(self.max_length + 1):]
            key = tuple(window[:len(window) - len(continuation)])
            if key not in slot:
                slot[key] = len(conts)
                conts.append([])
            where.append((slot[key], len(conts[slot[key]])))
            conts[slot[key]].append(list(continuation))
        size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else self.max_batch_size or 64)
        pad = self.tokenizer.pad_token_id
        scores = token_logprobs(self._model, [list(k) for k in slot], conts, batch_size=int(size),
                                pad_id=self.eot_token_id if pad is None else pad, max_logits_mb=self.max_logits_mb)
        out = []
        for (request, _, _), (p, c) in zip(requests, where):
            answer = (scores.logprob[p][c], scores.greedy[p][c])
            out.append(answer)
            if request is not None:  # loglikelihood_rolling's windows have none: it adds its own
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return out

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
