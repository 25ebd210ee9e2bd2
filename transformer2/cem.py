"""Few-shot adaptation: z' = Σ_k α_k z_k with α found by the Cross-Entropy Method on k shots.

Search (the reference's CEM): α ~ N(mean, std) clamped to [0, 1]; initial mean 1/K, initial
std 0.5; α is one weight per expert (K,) or per expert and matrix (K, M) (`per_matrix`); the
elites (the best `elite_ratio` of the population) give the next mean and std; with
`keep_best` (the reference's re_eval_best) member 0 of every population is the best α so far.
Mixing happens in z space, so a mix goes through the same f(z) and norm as each expert.

Fitness of a candidate α on the shots: accuracy first; ties broken by the mean log-likelihood
of the GOLD answer (per token, averaged over the shots) — defined for every candidate, and
higher when the mix is more confident in the right answer. (The reference breaks ties by the
log-likelihood of the model's own answers on the shots it got right, 0 when it got none right,
which rewards confident answers whatever they are and compares candidates on different shots.)
Elites are taken by the same order (accuracy, then log-likelihood).
- multiple choice (ARC): each option's continuation "The answer is (X" is scored after the
  paper's chat prompt (no decoding); the prediction is the most likely option, the gold
  log-likelihood that of the correct option;
- generation tasks: greedy answer to the chat prompt scored by the task's scorer; the gold
  log-likelihood is that of `prompts.reference_answer` (teacher-forced).

Resume: with a `run_dir`, the search state (mean, std, generator, best so far, history) is
checkpointed after every generation; a run killed with SIGKILL and started again with
`resume=True` continues at the next generation and ends with the same α as an uninterrupted run.

Evaluation of a population, two ways that give the same fitness:
- `batched`: every (candidate, shot) pair is a row of one batch with its own z (the per-sample
  factored path of SVFLinear, z of shape (B, r)): no weight rebuild at all;
- `naive`: the reference's loop, one weight rebuild per candidate (`set_expert(mix)`), then the
  shots.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .generation import left_padding
from .loglik import continuation_logprobs
from .errors import UserError
from .files import atomic_dir, atomic_write_text, load_torch_checkpoint, safetensors_bytes, write_json_files
from .settings import CEMConfig
from .svf import Expert, mix_experts, preserved_svf_state, set_expert
from .tasks import get_task, reference_answer, score_batch

METHODS = ("batched", "naive")
CEM_RESULT = "cem.json"
CHECKPOINT = "cem_checkpoint.pt"
ALPHA_WEIGHTS = "alpha.safetensors"  # the same α as a tensor, for tools that read only weights


class CEMError(UserError, ValueError):
    """A CEM setting or input that cannot work; the message says what to change."""


@dataclass
class Fitness:
    """Per candidate: accuracy on the shots (P,) and mean per-token gold log-likelihood (P,)."""

    accuracy: torch.Tensor
    loglik: torch.Tensor

    def order(self) -> list[int]:
        """Candidates best first: accuracy, then log-likelihood, then index (stable)."""
        acc, ll = self.accuracy.tolist(), [(-math.inf if math.isnan(v) else v) for v in self.loglik.tolist()]
        return sorted(range(len(acc)), key=lambda i: (-acc[i], -ll[i], i))


# ---------------------------------------------------------------- the search

class CEM:
    """Ask/tell Cross-Entropy Method over α in [0, 1]^shape; shape[0] = K experts."""

    def __init__(self, shape: Sequence[int], config: CEMConfig):
        if config.population < 2:
            raise CEMError("cem.population must be at least 2")
        self.shape, self.config = tuple(shape), config
        dim = math.prod(self.shape)
        self.mean = torch.full((dim,), 1.0 / self.shape[0])
        self.std = torch.full((dim,), float(config.init_std))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.best_alpha: Optional[torch.Tensor] = None
        self.best_key: tuple[float, float] = (-math.inf, -math.inf)
        self.history: list[dict] = []
        self.seconds = 0.0  # search time over every run that contributed (resumes included)
        self.resumed_from = 0  # generations restored from a checkpoint

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std, "generator": self.generator.get_state(),
                "best_alpha": self.best_alpha, "best_key": self.best_key, "history": self.history,
                "seconds": self.seconds}

    def load_state(self, state: dict) -> None:
        self.mean, self.std = state["mean"], state["std"]
        self.generator.set_state(state["generator"])
        self.best_alpha, self.best_key = state["best_alpha"], tuple(state["best_key"])
        self.history, self.seconds = list(state["history"]), float(state["seconds"])
        self.resumed_from = len(self.history)

    def ask(self) -> torch.Tensor:
        """The next population, (P, *shape), clamped to [0, 1]."""
        P = self.config.population
        x = self.mean + self.std * torch.randn((P, self.mean.numel()), generator=self.generator)
        x = x.clamp(0.0, 1.0)
        if self.config.keep_best and self.best_alpha is not None:
            x[0] = self.best_alpha.flatten()
        return x.view(P, *self.shape)

    def tell(self, alphas: torch.Tensor, fitness: Fitness, seconds: float = 0.0) -> dict:
        """Update mean/std from the elites and the best so far; returns this generation's record."""
        P = alphas.shape[0]
        flat = alphas.reshape(P, -1).float()
        order = fitness.order()
        elite = flat[order[:self.config.num_elites]]
        self.mean = elite.mean(0)
        self.std = elite.std(0, correction=1) if len(elite) > 1 else torch.zeros_like(self.mean)
        b = order[0]
        key = (float(fitness.accuracy[b]), float(fitness.loglik[b]))
        if key > self.best_key:
            self.best_key, self.best_alpha = key, flat[b].view(self.shape).clone()
        record = {
            "generation": len(self.history), "best_accuracy": key[0], "best_loglik": round(key[1], 5),
            "mean_accuracy": float(fitness.accuracy.float().mean()),
            "elite_accuracy": float(fitness.accuracy[order[:self.config.num_elites]].float().mean()),
            "best_so_far_accuracy": self.best_key[0], "best_so_far_loglik": round(self.best_key[1], 5),
            "mean_alpha": self.mean.view(self.shape).reshape(self.shape[0], -1).mean(1).tolist(),
            "mean_std": float(self.std.mean()), "seconds": round(seconds, 4)}
        self.history.append(record)
        return record


def cem_search(evaluate: Callable[[torch.Tensor], Fitness], shape: Sequence[int], config: CEMConfig,
               progress: Optional[Callable[[dict], None]] = None, *, run_dir: str | Path | None = None,
               resume: bool = False, run_id: str = "") -> CEM:
    """Run `config.generations` generations of CEM with `evaluate(alphas (P, *shape)) -> Fitness`.

    With `run_dir`, a checkpoint is written after every generation; `resume` continues from it
    when it belongs to the same run (`config`, `shape` and `run_id`: what else the fitness
    depends on), and starts afresh otherwise.
    """
    from .identity import run_fingerprint
    from .training import save_checkpoint

    cem = CEM(shape, config)
    ckpt = Path(run_dir) / CHECKPOINT if run_dir is not None else None
    identity = run_fingerprint({**asdict(config), "shape": list(shape), "run_id": run_id})
    saved = load_torch_checkpoint(ckpt) if resume and ckpt is not None and ckpt.exists() else None
    if saved is not None:
        if saved.get("identity") == identity:
            cem.load_state(saved["cem"])
        else:
            print(f"note: {ckpt} belongs to a different CEM run; starting afresh")
    while len(cem.history) < config.generations:
        alphas = cem.ask()
        t = time.perf_counter()
        fitness = evaluate(alphas)
        seconds = time.perf_counter() - t
        record = cem.tell(alphas, fitness, seconds)
        cem.seconds += seconds
        if ckpt is not None:
            save_checkpoint(ckpt, {"identity": identity, "cem": cem.state()})
        if progress:
            progress(record)
    return cem


# ---------------------------------------------------------------- α → z

def alpha_shape(experts: Sequence[Expert], per_matrix: bool) -> tuple[int, ...]:
    return (len(experts), len(experts[0].vectors)) if per_matrix else (len(experts),)


def population_z(experts: Sequence[Expert], alphas: torch.Tensor) -> dict[str, torch.Tensor]:
    """z' per candidate for every module: {name: (P, r)}, the same mix as `mix_experts` row by row."""
    names = list(experts[0].vectors)
    K = len(experts)
    alphas = torch.as_tensor(alphas, dtype=torch.float32)
    if alphas.dim() == 2 and alphas.shape[1] == K:  # (P, K): one weight per expert
        alphas = alphas[:, :, None].expand(-1, K, len(names))
    if alphas.dim() != 3 or alphas.shape[1:] != (K, len(names)):
        raise CEMError(f"alphas must be (P, {K}) or (P, {K}, {len(names)}), got {tuple(alphas.shape)}")
    out = {}
    for j, name in enumerate(names):
        z = torch.zeros(alphas.shape[0], experts[0].vectors[name].numel())
        for k in range(K):  # same summation order as mix_experts
            z = z + alphas[:, k, j, None] * experts[k].vectors[name].float()[None]
        out[name] = z
    return out


# ---------------------------------------------------------------- fitness on the shots

def shot_indices(n: int, k: int, seed: int = 0) -> list[int]:
    """k seeded positions out of n docs, in order."""
    import random

    if k > n:
        raise CEMError(f"{k} shots asked from {n} docs")
    return sorted(random.Random(seed).sample(range(n), k))


def draw_shots(docs: Sequence[dict], k: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """k seeded shots and the remaining docs (evaluate on the rest: the shots never count)."""
    idx = set(shot_indices(len(docs), k, seed))
    return [docs[i] for i in sorted(idx)], [d for i, d in enumerate(docs) if i not in idx]


def _mc_items(task: str, shots: Sequence[dict]) -> tuple[list[list[str]], list[int]]:
    items = [get_task(task).choices(doc) for doc in shots]
    return [options for options, _ in items], [gold for _, gold in items]


def _mc_rows(model, tokenizer, prompts, options, gold, batch_size, group_z=None, row_group=None
             ) -> tuple[list[bool], list[float]]:
    scores = continuation_logprobs(model, tokenizer, prompts, options, batch_size=batch_size, group_z=group_z,
                                   row_group=row_group)
    correct, ll = [], []
    for lp, n, g in zip(scores.logprob, scores.tokens, gold):
        correct.append(max(range(len(lp)), key=lp.__getitem__) == g)
        ll.append(lp[g] / n[g])
    return correct, ll


def _gold_ll(model, tokenizer, prompts, answers, batch_size, group_z=None, row_group=None) -> list[float]:
    scores = continuation_logprobs(model, tokenizer, prompts, [[a] for a in answers], batch_size=batch_size,
                                   group_z=group_z, row_group=row_group)
    return [lp[0] / n[0] for lp, n in zip(scores.logprob, scores.tokens)]


@torch.no_grad()
def population_fitness(model, tokenizer, experts: Sequence[Expert], task: str, shots: Sequence[dict],
                       alphas: torch.Tensor, *, method: str = "batched", batch_size: int = 16,
                       max_new_tokens: int = 128) -> Fitness:
    """Fitness of each α in `alphas` (P, K) or (P, K, M) on the shots; the model's SVF state is restored.

    `batched`: rows are (shot, candidate) pairs, shot-major, `batch_size` rows per forward, one
    z per row. `naive`: one weight rebuild per candidate, then its shots in batches.
    """
    from .generation import chat_prompts, generate_texts

    if method not in METHODS:
        raise CEMError(f"method must be one of {METHODS}, got {method!r}")
    if not shots:
        raise CEMError("no shots to evaluate the candidates on")
    P, k = alphas.shape[0], len(shots)
    prompts = chat_prompts(tokenizer, task, shots)
    mc = get_task(task).multiple_choice
    if mc:
        options, gold = _mc_items(task, shots)
    else:
        answers = [reference_answer(task, d) for d in shots]
    correct = torch.zeros(P, k)
    ll = torch.zeros(P, k)
    with preserved_svf_state(model), left_padding(tokenizer):
        if method == "batched":
            device = next(model.parameters()).device
            zpop = {n: z.to(device) for n, z in population_z(experts, alphas).items()}
            row_group = torch.arange(P).repeat(k)  # row s*P + p runs candidate p on shot s
            rows_prompts = [p for p in prompts for _ in range(P)]
            if mc:
                c, l = _mc_rows(model, tokenizer, rows_prompts, [o for o in options for _ in range(P)],
                                [g for g in gold for _ in range(P)], batch_size, zpop, row_group)
            else:
                texts = generate_texts(model, tokenizer, rows_prompts, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, row_z=zpop, row_group=row_group)
                c = score_batch(task, [d for d in shots for _ in range(P)], texts)
                l = _gold_ll(model, tokenizer, rows_prompts, [a for a in answers for _ in range(P)], batch_size,
                             zpop, row_group)
            correct = torch.tensor(c, dtype=torch.float32).view(k, P).T
            ll = torch.tensor(l, dtype=torch.float32).view(k, P).T
        else:
            for p in range(P):
                set_expert(model, mix_experts(experts, alphas[p]))  # the rebuild the batched path avoids
                if mc:
                    c, l = _mc_rows(model, tokenizer, prompts, options, gold, batch_size)
                else:
                    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
                    c = score_batch(task, list(shots), texts)
                    l = _gold_ll(model, tokenizer, prompts, answers, batch_size)
                correct[p] = torch.tensor(c, dtype=torch.float32)
                ll[p] = torch.tensor(l, dtype=torch.float32)
    return Fitness(correct.mean(1), ll.mean(1))


# ---------------------------------------------------------------- few-shot adaptation

@dataclass
class CEMResult:
    alpha: list  # (K,) or (K, M), nested lists
    keys: list[str]  # expert names in α's order
    accuracy: float
    loglik: float
    history: list[dict] = field(default_factory=list)
    task: str = ""
    shots: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    method: str = "batched"
    resumed_from: int = 0  # generations restored from a checkpoint of a killed run

    def mixed(self, experts: Mapping[str, Expert]) -> Expert:
        missing = sorted(set(self.keys) - set(experts))
        if missing:
            raise CEMError(f"CEM result mixes experts {missing} that were not given (have {sorted(experts)})")
        expert = mix_experts([experts[k] for k in self.keys], torch.tensor(self.alpha))
        expert.provenance.update(task=self.task, strategy="few_shot", cem_accuracy=self.accuracy)
        return expert

    def save(self, path: str | Path, *, timings: bool = True, extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write JSON to `path` (a file, or a folder that gets cem.json, alpha.safetensors and the JSON files
        of `extra`, as one unit), atomically."""
        path = Path(path)
        if path.suffix == ".json":
            return atomic_write_text(path, json.dumps(self.to_dict(timings), indent=2) + "\n")
        with atomic_dir(path) as tmp:  # α and cem.json as one unit
            (tmp / ALPHA_WEIGHTS).write_bytes(safetensors_bytes({"alpha": torch.tensor(self.alpha, dtype=torch.float32)},
                                                                {"keys": json.dumps(self.keys), "task": self.task}))
            (tmp / CEM_RESULT).write_text(json.dumps(self.to_dict(timings), indent=2) + "\n")
            write_json_files(tmp, extra)
        return path / CEM_RESULT

    def to_dict(self, timings: bool = True) -> dict:
        """timings=False leaves out what differs between identical searches (seconds, the generation a
        resume started from), so a rerun that finds the same α writes the same bytes."""
        data = asdict(self)
        if not timings:
            for key in ("seconds", "resumed_from"):
                data.pop(key)
            data["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in data["history"]]
        return data

    @classmethod
    def load(cls, path: str | Path) -> "CEMResult":
        path = Path(path)
        if path.is_dir():
            path = path / CEM_RESULT
        if not path.is_file():
            raise CEMError(f"{path} not found: run the few-shot CEM stage first")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise CEMError(f"{path} is not a CEM result ({type(err).__name__}: {err}): rerun the few-shot CEM "
                           "stage") from None


def _run_id(experts: Sequence[Expert], keys: Sequence[str], task: str, shots: Sequence[dict], method: str,
            max_new_tokens: int) -> str:
    """Everything the fitness depends on besides the CEM config: a checkpoint of other experts,
    shots or decoding settings is never resumed."""
    from .identity import run_fingerprint

    vectors = (e.vectors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
               for e in experts for name in sorted(e.vectors))
    return run_fingerprint([task, list(keys), method, max_new_tokens, list(shots),
                            [(e.base_fingerprint, sorted(e.vectors)) for e in experts]], vectors)


def few_shot_cem(model, tokenizer, experts: Mapping[str, Expert], task: str, shots: Sequence[dict],
                 config: CEMConfig, *, method: str = "batched", batch_size: int = 16, max_new_tokens: int = 128,
                 progress: Optional[Callable[[dict], None]] = None, run_dir: str | Path | None = None,
                 resume: bool = False) -> CEMResult:
    """CEM over α for the named experts (in mapping order) on the labelled `shots` of `task`.

    `run_dir`/`resume`: checkpoint every generation and continue a killed search (`cem_search`).
    """
    if not experts:
        raise CEMError("few-shot CEM needs at least one expert")
    keys = list(experts)
    ordered = [experts[k] for k in keys]

    def evaluate(alphas: torch.Tensor) -> Fitness:
        return population_fitness(model, tokenizer, ordered, task, shots, alphas, method=method,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens)

    cem = cem_search(evaluate, alpha_shape(ordered, config.per_matrix), config, progress, run_dir=run_dir,
                     resume=resume, run_id=_run_id(ordered, keys, task, shots, method, max_new_tokens))
    assert cem.best_alpha is not None
    return CEMResult(alpha=cem.best_alpha.tolist(), keys=keys, accuracy=cem.best_key[0], loglik=cem.best_key[1],
                     history=cem.history, task=task, shots=len(shots), seconds=round(cem.seconds, 3),
                     config=asdict(config), method=method, resumed_from=cem.resumed_from)


__all__ = ["CEM", "CEMConfig", "CEMError", "CEMResult", "Fitness", "METHODS", "alpha_shape", "cem_search",
           "draw_shots", "few_shot_cem", "population_fitness", "population_z", "shot_indices"]
