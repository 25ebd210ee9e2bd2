"""The classification expert z_c: its data, its RL training, and dispatch accuracy.

z_c is an SVF expert trained with the same REINFORCE recipe as the task experts (reward ±1
for the right \\boxed{label}) on the pseudo-task "classify" (prompts.CLASSIFY_TASK). Its
prompts come ONLY from the TRAINING splits of the expert tasks (GSM8K → math, MBPP → code,
ARC-Easy → reasoning), balanced per category and drawn with a seed; its validation prompts
from their validation splits. Never a test split, never an unseen task (the reference
trained on GSM8K test, MBPP and ARC-Challenge test items, which leaks into the ARC-Challenge
evaluation). There is no "other" class in the data: no expert task supplies one without
inventing prompts.

Two training modes, matching the two first-pass modes:
- `generate` (the paper's): the rollout is decoded and scored by its \\boxed{label};
- `loglik`: the action is the most likely of the four `\\boxed{label}` continuations (no
  decoding) and REINFORCE raises or lowers its log-probability by the ±1 reward, with the
  same KL penalty on the label tokens. A small model that never writes \\boxed{label} gets
  reward −1 on every generate rollout and learns nothing; in loglik mode it has a signal
  (and the validation accuracy is the loglik dispatch accuracy, the mode it is used in).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import UserError
from .files import atomic_save
from .stats import wilson_interval
from .tasks import CATEGORIES, CLASSIFY_TASK, PAPER_TRAIN_TASKS, PAPER_UNSEEN_TASKS, get_task, load_split, question_text

SPLITS = ("train", "validation")  # what classifier data may be drawn from
TRAIN_MODES = ("generate", "loglik")


class ClassifierDataError(UserError, ValueError):
    """Classifier data asked from a split or task it must never use."""


def classifier_docs(data_root: str | Path, split: str = "train", per_class: Optional[int] = None, seed: int = 0,
                    sources: Sequence[str] = PAPER_TRAIN_TASKS,
                    unseen: Sequence[str] = PAPER_UNSEEN_TASKS) -> list[dict]:
    """Balanced, seeded classification docs {"question", "label", "source", "index"} from one split.

    `split` is "train" (training data) or "validation" (held-out); each source task gives
    the same number of prompts (`per_class`, capped by the smallest source), shuffled together;
    its label is the task's category. `unseen` tasks (evaluation data) are refused as sources.
    """
    if split not in SPLITS:
        raise ClassifierDataError(f"classifier data comes from the {SPLITS} splits of the expert tasks only, "
                                  f"not {split!r}")
    bad = sorted(set(sources) & set(unseen))
    if bad:
        raise ClassifierDataError(f"classifier sources must be expert tasks, not {bad} "
                                  "(unseen tasks are evaluation data)")
    pools = {task: load_split(data_root, task, split) for task in sources}
    n = min(len(p) for p in pools.values())
    if per_class is not None:
        n = min(n, per_class)
    rng = random.Random(seed)
    docs = []
    for task in sources:
        for i in sorted(rng.sample(range(len(pools[task])), n)):
            docs.append({"question": question_text(task, pools[task][i]), "label": get_task(task).category,
                         "source": task, "index": i})
    rng.shuffle(docs)
    return docs


def heldout_docs(data_root: str | Path, tasks: Sequence[str], per_task: Optional[int] = None,
                 seed: int = 0) -> list[dict]:
    """Held-out prompts for dispatch accuracy: seeded test docs of each task, labelled by its category.

    Test splits are never classifier training data (`classifier_docs` refuses them), so these
    measure dispatch as the evaluation cells meet it.
    """
    rng = random.Random(seed)
    docs = []
    for task in tasks:
        pool = load_split(data_root, task, "test")
        idx = range(len(pool)) if per_task is None or per_task >= len(pool) else sorted(rng.sample(range(len(pool)),
                                                                                                    per_task))
        docs += [{"question": question_text(task, pool[i]), "label": get_task(task).category, "source": task,
                  "index": i} for i in idx]
    return docs


def per_source_accuracy(docs: Sequence[dict], pred: Sequence[Optional[str]]) -> dict[str, float]:
    """Dispatch accuracy per source task (e.g. how often a MATH prompt was called math)."""
    hits: dict[str, list[bool]] = {}
    for d, p in zip(docs, pred):
        hits.setdefault(d["source"], []).append((p or "other") == d["label"])
    return {task: sum(h) / len(h) for task, h in hits.items()}


def loglik_objective(model, tokenizer, adapter, kl_coef: float = 0.0, micro_batch_size: int = 8):
    """REINFORCE on the loglik first pass: action = argmax label, reward ±1, + λ·KL on its tokens."""
    import time

    import torch

    from .dispatch import label_logprobs
    from .rl import kl_to_base

    def objective(docs: Sequence[dict]) -> dict:
        n, reward, kl_sum = len(docs), 0.0, 0.0
        seconds = {"seconds_logprob": 0.0, "seconds_backward": 0.0}  # the phases RL steps report
        for start in range(0, n, micro_batch_size):
            t0 = time.perf_counter()
            chunk = docs[start:start + micro_batch_size]
            questions = [d["question"] for d in chunk]
            scores, target_mask, logits = label_logprobs(model, tokenizer, questions)
            action = scores.argmax(1)
            rewards = torch.tensor([1.0 if CATEGORIES[a] == d["label"] else -1.0 for a, d in zip(action.tolist(), chunk)],
                                   device=scores.device)
            loss = -(scores.gather(1, action[:, None]).squeeze(1) * rewards).sum() / n
            kl = torch.zeros(())
            if kl_coef > 0:
                with torch.no_grad(), adapter.disabled():
                    _, _, base_logits = label_logprobs(model, tokenizer, questions)
                rows = action + torch.arange(len(chunk), device=action.device) * len(CATEGORIES)  # the chosen labels
                kl = kl_to_base(logits[rows], base_logits[rows], target_mask[rows])
                loss = loss + kl_coef * kl * (len(chunk) / n)
            t1 = time.perf_counter()
            loss.backward()
            seconds["seconds_logprob"] += t1 - t0
            seconds["seconds_backward"] += time.perf_counter() - t1
            reward += float(rewards.sum())
            kl_sum += float(kl.detach()) * len(chunk)
        return {"reward": reward / n, "accuracy": (reward / n + 1) / 2, "kl": kl_sum / n,
                **{k: round(v, 4) for k, v in seconds.items()}}

    return objective


def train_classifier_expert(model, tokenizer, base_fingerprint: str, svf_config, train_docs: Sequence[dict],
                            val_docs: Sequence[dict], loop, objective_cfg, run_dir, *, resume: bool = False,
                            eval_batch_size: int = 8, init_seed: int = 0, progress=None, mode: str = "generate"):
    """Train z_c with REINFORCE on the "classify" pseudo-task; returns (best Expert, TrainResult, start):
    `start` is the Expert z_c started from (to measure how far training moved it).

    `mode` generate: `rl.train_svf_expert` (decode, score \\boxed{label}); loglik: `loglik_objective`,
    validated by loglik dispatch accuracy. `model` must be SVF-patched; z_c starts from the
    reference init (seeded by `init_seed`).
    """
    import torch

    from .adapters import SVFAdapter
    from .dispatch import loglik_categories
    from .rl import train_svf_expert
    from .svf import Expert, init_expert
    from .training import fit

    if mode not in TRAIN_MODES:
        raise UserError(f"classifier.train_mode must be one of {TRAIN_MODES}, got {mode!r}")
    expert = init_expert(model, base_fingerprint, svf_config, torch.Generator().manual_seed(init_seed),
                         provenance={"task": CLASSIFY_TASK})
    if mode == "generate":
        result, _ = train_svf_expert(model, tokenizer, expert, CLASSIFY_TASK, train_docs, val_docs, loop,
                                     objective_cfg, run_dir, resume=resume, eval_batch_size=eval_batch_size,
                                     run_id="classifier", progress=progress)
    else:
        adapter = SVFAdapter(model, expert)
        objective = loglik_objective(model, tokenizer, adapter, objective_cfg.kl_coef, objective_cfg.micro_batch_size)

        def validate() -> float:  # loglik dispatch accuracy under the weights fit made active (base or z_c)
            pred = loglik_categories(model, tokenizer, [d["question"] for d in val_docs], batch_size=eval_batch_size)
            return sum(p == d["label"] for p, d in zip(pred, val_docs)) / len(val_docs)

        result = fit(adapter, objective, validate, train_docs, loop, run_dir, resume=resume, inputs=val_docs,
                     run_id=f"classifier-loglik|{base_fingerprint}|{objective_cfg.kl_coef}", progress=progress,
                     val_n=len(val_docs))
    best = Expert({k: v.clone() for k, v in result.best_state.items()}, base_fingerprint, svf_config,
                  {"task": CLASSIFY_TASK, "train_mode": mode, "best_step": result.best_step,
                   "best_val_accuracy": result.best_val_accuracy, "base_val_accuracy": result.base_val_accuracy,
                   "train_docs": len(train_docs), "sources": sorted({d.get("source", "?") for d in train_docs})})
    return best, result, expert  # training copies the start's vectors (set_expert): `expert` is still z_c's start


# ---------------------------------------------------------------- dispatch accuracy

def dispatch_confusion(pred: Sequence[Optional[str]], true: Sequence[str],
                       labels: Sequence[str] = CATEGORIES) -> np.ndarray:
    """Counts, rows = true category, columns = predicted (None / unknown counts as "other")."""
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions but {len(true)} labels")
    pos = {c: i for i, c in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for p, t in zip(pred, true):
        m[pos[t], pos.get(p or "other", pos["other"])] += 1
    return m


def dispatch_metrics(matrix: np.ndarray, labels: Sequence[str] = CATEGORIES) -> dict:
    """Accuracy and per-category recall / precision of a confusion matrix (rows true)."""
    total = int(matrix.sum())
    out: dict = {"n": total, "accuracy": float(np.trace(matrix) / total) if total else 0.0}
    if total:
        out["ci95"] = list(wilson_interval(int(np.trace(matrix)), total))
    for i, c in enumerate(labels):
        support, predicted = int(matrix[i].sum()), int(matrix[:, i].sum())
        if support:
            out[f"recall_{c}"] = float(matrix[i, i] / support)
        if predicted:
            out[f"precision_{c}"] = float(matrix[i, i] / predicted)
    return out


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each true category's row as shares of its prompts (recall on the diagonal); NaN for a row with none,
    so a category the held-out set lacks is not drawn as "never routed right"."""
    m = np.asarray(matrix, dtype=float)
    support = m.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, m / support, np.nan)


DISPATCH_TITLES = {"prompt": "the base model's prompt", "classifier": "the classification expert z_c"}
MODE_TITLES = {"loglik": "log-likelihood of each category", "generate": "generated category name"}


def dispatch_title(who: str, mode: str) -> str:
    """`Dispatch by the classification expert z_c` / `first pass: log-likelihood of each category`."""
    return f"Dispatch by {DISPATCH_TITLES.get(who, who)}\nfirst pass: {MODE_TITLES.get(mode, mode)}"


def confusion_figure(matrix: np.ndarray, labels: Sequence[str] = CATEGORIES, title: str = "dispatch"):
    """Row-normalised heat map on a fixed 0-1 scale (matrices of different runs compare by colour), each
    cell `share` over `count/row total`; rows true, columns predicted. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    shares = normalise_rows(matrix)
    support = matrix.sum(1)
    fig, ax = plt.subplots(figsize=(5.0, 4.6), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(shares), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true category's prompts")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), [f"{c} ({int(n)})" for c, n in zip(labels, support)])
    ax.set_xlabel("predicted category")
    ax.set_ylabel("true category (prompts)")
    total = int(matrix.sum())
    acc = np.trace(matrix) / total if total else 0.0
    ax.set_title(f"{title}\naccuracy {acc:.0%} on {total} held-out prompts", fontsize=9)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            share = shares[i, j]
            text = "–" if np.isnan(share) else f"{share:.2f}\n{int(matrix[i, j])}/{int(support[i])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(share) and share > 0.5 else "black")
    fig.tight_layout()
    return fig


def plot_confusion(matrix: np.ndarray, path: str | Path, labels: Sequence[str] = CATEGORIES,
                   title: str = "dispatch") -> Path:
    """Write `confusion_figure` as a PNG."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = confusion_figure(matrix, labels, title)
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def evaluate_dispatch(model, tokenizer, docs: Sequence[dict], *, mode: str = "loglik", classifier=None,
                      batch_size: int = 8, max_new_tokens: int = 32) -> dict:
    """Classify held-out classifier docs: {"pred", "true", "confusion", "metrics", "seconds"}."""
    import time

    from .dispatch import classify

    t = time.perf_counter()
    pred = classify(model, tokenizer, [d["question"] for d in docs], mode=mode, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, classifier=classifier)
    seconds = time.perf_counter() - t
    true = [d["label"] for d in docs]
    matrix = dispatch_confusion(pred, true)
    return {"pred": pred, "true": true, "confusion": matrix.tolist(), "labels": list(CATEGORIES),
            "metrics": {**dispatch_metrics(matrix), "seconds": round(seconds, 3), "mode": mode,
                        "classifier": classifier is not None}}


DISPATCHERS = ("prompt", "classifier")  # the base model's own answer / the classification expert z_c


def measure_dispatch(model, tokenizer, heldout: Sequence[dict], classifier, modes: Sequence[str], plots_dir: str | Path,
                     *, batch_size: int = 8, max_new_tokens: int = 32, progress=None) -> tuple[dict, dict, list[Path]]:
    """Dispatch accuracy of the base prompt and of z_c (`classifier`) in every first-pass mode on the
    held-out prompts: (metrics per "<who>_<mode>", per-prompt details, confusion-matrix PNGs written)."""
    dispatch, details, pngs = {}, {}, []
    for who in DISPATCHERS:
        for mode in modes:
            out = evaluate_dispatch(model, tokenizer, heldout, mode=mode,
                                    classifier=classifier if who == "classifier" else None,
                                    batch_size=batch_size, max_new_tokens=max_new_tokens)
            name = f"{who}_{mode}"
            dispatch[name] = {**out["metrics"], "per_task_accuracy": per_source_accuracy(heldout, out["pred"])}
            details[name] = {"confusion": out["confusion"], "labels": out["labels"], "pred": out["pred"],
                             "true": out["true"], "source": [d["source"] for d in heldout]}
            pngs.append(plot_confusion(np.array(out["confusion"]), Path(plots_dir) / f"{name}.png",
                                       title=dispatch_title(who, mode)))
            if progress:
                progress(f"dispatch {name}: accuracy {out['metrics']['accuracy']:.3f} on {len(heldout)} prompts")
    return dispatch, details, pngs

__all__ = ["ClassifierDataError", "classifier_docs", "dispatch_confusion", "dispatch_metrics",
           "evaluate_dispatch", "heldout_docs", "measure_dispatch", "loglik_objective", "per_source_accuracy",
           "plot_confusion", "train_classifier_expert", "confusion_figure", "dispatch_title",
           "normalise_rows"]
