"""The one training loop: batches → objective → clip → step, validation, best-keeping, resume.

Objectives (REINFORCE in `rl.py`, next-token in `sft.py`) are functions
`objective(docs) -> metrics` that run their own forward/backward (so they can micro-batch);
the loop owns the optimiser, the schedule, validation and checkpoints.

Checkpoints hold everything the next step depends on (adapter state, optimiser and schedule
state, step, RNG states, history, best so far) and are replaced atomically, so a run killed
with SIGKILL loses at most `checkpoint_every` steps and, resumed, ends with the same adapter
as an uninterrupted run with the same seed.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .adapters import Adapter
from .errors import UserError
from .files import atomic_save, load_torch_checkpoint
from .identity import docs_bytes, run_fingerprint
from .settings import LoopConfig
from .stats import wilson_interval

CHECKPOINT = "checkpoint.pt"
VALIDATIONS = "validations.json"  # a trained adapter's validation records, saved inside its folder
Objective = Callable[[list[dict]], dict]  # docs -> metrics (floats); gradients accumulated
Validate = Callable[[], float]            # accuracy of the adapter in its current state
Progress = Optional[Callable[[dict], None]]


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_step: int
    best_val_accuracy: float
    base_val_accuracy: float
    history: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    val_n: Optional[int] = None  # docs behind each validation accuracy (its records carry ci_low/ci_high)
    validation_seconds: float = 0.0  # this process's validations, the base's included (they decode: a large
                                     # share of a CPU profile's stage time, and not in any step's phases)

    def output_files(self) -> dict[str, dict]:
        """What a stage saves beside the adapter, in the same unit (`Expert.save` / `LoRAAdapter.save` extra):
        the validation records (no timings, so an identical run writes identical bytes)."""
        return {VALIDATIONS: {"validations": self.validations}}

    def validation_summary(self) -> dict:
        """The base's and the best step's validation accuracy with n and their 95% intervals, and the
        seconds this process spent validating, for metrics."""
        out: dict = {"val_n": self.val_n, "validation_seconds": round(self.validation_seconds, 3)}
        for name, step in (("base", 0), ("best", self.best_step)):
            record = next((v for v in self.validations if v["step"] == step and "ci_low" in v), None)
            if record is not None:
                out[f"{name}_val_ci95"] = [record["ci_low"], record["ci_high"]]
        return out


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Docs of a step: a seeded permutation per epoch, a pure function of the step (resume-safe)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[offset]))
    return out


def make_optimizer(params: Sequence[torch.Tensor], cfg: LoopConfig):
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; use adam or adamw")

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "constant":
            return 1.0
        raise UserError(f"unknown lr_schedule {cfg.lr_schedule!r}; use constant or cosine")

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def with_interval(record: dict, n: Optional[int]) -> dict:
    """A validation record with n and the Wilson 95% interval of its accuracy (k = accuracy·n)."""
    if n is None or "ci_low" in record:
        return record
    k = round(record["val_accuracy"] * n)
    if abs(record["val_accuracy"] * n - k) > 1e-6:
        raise ValueError(f"validation accuracy {record['val_accuracy']} is not a count out of val_n={n}")
    low, high = wilson_interval(k, n)
    return {**record, "n": n, "ci_low": low, "ci_high": high}


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save, atomically: a kill at any moment leaves the old or the new file."""
    atomic_save(path, lambda tmp: torch.save(payload, tmp))


def fit(adapter: Adapter, objective: Objective, validate: Validate, train_docs: Sequence[dict],
        cfg: LoopConfig, run_dir: str | Path, *, resume: bool = False, run_id: str = "",
        inputs: Sequence[Any] = (), progress: Progress = None, val_n: Optional[int] = None) -> TrainResult:
    """Train `adapter` with `objective` for cfg.steps steps, validating every cfg.eval_every steps.

    `val_n`: how many docs `validate` scores; each validation record then carries n, ci_low and
    ci_high (Wilson 95%), so a curve shows which differences are noise.
    The run's identity is the loop config, `run_id` (task, objective settings, base model), the
    training docs and `inputs` (e.g. the validation docs); a checkpoint of another run is never resumed.
    """
    if not train_docs:
        raise UserError("no training documents")
    ckpt_path = Path(run_dir) / CHECKPOINT
    opt, sched = make_optimizer(adapter.trainable(), cfg)
    identity = run_fingerprint({**asdict(cfg), "run_id": run_id}, [docs_bytes(train_docs), docs_bytes(inputs)])
    step, history, validations, best, resumed_from = 0, [], [], None, 0
    base_acc, validation_seconds = None, 0.0
    ckpt = load_torch_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None  # damaged: start afresh
    if ckpt is not None:
        if ckpt.get("identity") == identity:
            adapter.load_state(ckpt["adapter"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"])
            step, history = ckpt["step"], ckpt["history"]
            validations = [with_interval(v, val_n) for v in ckpt["validations"]]  # older checkpoints lack it
            best, base_acc, resumed_from = ckpt["best"], ckpt["base_val_accuracy"], ckpt["step"]
        else:
            print(f"note: {ckpt_path} belongs to a different config; starting afresh")
    if step == 0:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
    if base_acc is None:
        t = time.perf_counter()
        with adapter.disabled():
            base_acc = validate()
        validation_seconds += time.perf_counter() - t
        validations.append(with_interval({"step": 0, "val_accuracy": base_acc, "weights": "base"}, val_n))
    start = time.perf_counter()
    while step < cfg.steps:
        docs = [train_docs[i] for i in batch_indices(step, cfg.batch_size, len(train_docs), cfg.seed)]
        opt.zero_grad(set_to_none=True)
        metrics = objective(docs)
        t = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(adapter.trainable(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        metrics.update(step=step, grad_norm=float(grad_norm), lr=opt.param_groups[0]["lr"],
                       seconds_update=round(time.perf_counter() - t, 4))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            t = time.perf_counter()
            with adapter.inference():
                acc = validate()
            metrics["seconds_validation"] = round(time.perf_counter() - t, 4)
            validation_seconds += metrics["seconds_validation"]
            record = with_interval({"step": step, "val_accuracy": acc, "weights": adapter.kind}, val_n)
            metrics["val_accuracy"] = acc
            metrics.update({f"val_{k}": record[k] for k in ("n", "ci_low", "ci_high") if k in record})
            validations.append(record)
            if best is None or acc > best["val_accuracy"]:
                best = {"step": step, "val_accuracy": acc, "state": adapter.state()}
        history.append(metrics)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt_path, {
                "identity": identity, "step": step, "adapter": adapter.state(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), "history": history,
                "validations": validations, "best": best, "base_val_accuracy": base_acc})
        if progress:
            progress(metrics)
    assert best is not None  # the last step always validates
    return TrainResult(best_state=best["state"], best_step=best["step"], best_val_accuracy=best["val_accuracy"],
                       base_val_accuracy=base_acc, history=history, validations=validations,
                       seconds=round(time.perf_counter() - start, 3), resumed_from=resumed_from, val_n=val_n,
                       validation_seconds=validation_seconds)
