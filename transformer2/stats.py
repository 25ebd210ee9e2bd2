"""Uncertainty of the numbers we report: stdlib + numpy only, so any stage or notebook can use it.

- `wilson_interval` / `accuracy_summary`: a 95% interval for an accuracy of k correct out of n
  (Wilson's score interval: sane at 0/n and n/n, where the normal one collapses to a point).
- `mcnemar_test` / `paired_bootstrap` / `compare`: Δ of a system vs a reference on the *same*
  docs, with its 95% interval and a two-sided p-value. Pairing matters: two cells on the same
  docs differ far less by chance than two independent samples would.
- `read_samples` / `pair_samples`: per-doc scores from an eval cell's `samples.jsonl`
  (lm-eval's per-sample outputs), keyed by (task, doc_id) so MATH's subtasks stay apart, and
  paired only when both cells saw exactly the same docs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Optional, Sequence

import numpy as np

Key = tuple[str, int]  # (lm-eval task or subtask, doc_id)


class PairingError(ValueError):
    """Two cells that cannot be compared doc by doc; the message says why."""


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z, p = _z(confidence), k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)  # exact at the edges


def accuracy_summary(k: int, n: int, confidence: float = 0.95) -> dict:
    """{"accuracy", "n", "ci_low", "ci_high"}: what every reported accuracy carries."""
    low, high = wilson_interval(k, n, confidence)
    return {"accuracy": k / n, "n": n, "ci_low": low, "ci_high": high}


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p: the discordant pairs b (only the reference right) and c (only
    the system right) under H0 are Binomial(b + c, 1/2); p = P(as or more extreme), capped at 1."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** m)  # exact integer arithmetic, one rounding


@dataclass(frozen=True)
class PairedComparison:
    """Δ = mean(system) − mean(reference) on the same n docs, its interval and p-value."""

    test: str          # "mcnemar_exact" or "paired_bootstrap"
    n: int
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    interval: str      # how the interval was computed
    b: Optional[int] = None  # discordant pairs: only the reference right
    c: Optional[int] = None  # only the system right

    def metrics(self) -> dict:
        """The keys an eval cell records for its Δ vs base (see `compare`)."""
        out = {"delta_vs_base": self.delta, "delta_ci_low": self.ci_low, "delta_ci_high": self.ci_high,
               "p_value": self.p_value, "test": self.test, "paired_n": self.n}
        if self.b is not None:
            out.update(discordant_base_only=self.b, discordant_system_only=self.c)
        return out


def _paired_arrays(reference: Sequence[float], system: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    ref, sys_ = np.asarray(reference, dtype=float), np.asarray(system, dtype=float)
    if ref.shape != sys_.shape or ref.ndim != 1 or len(ref) == 0:
        raise PairingError(f"paired scores must be two non-empty 1-d sequences of equal length, "
                           f"got {ref.shape} and {sys_.shape}")
    return ref, sys_


def _binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def newcombe_paired_interval(both: int, b: int, c: int, neither: int,
                             confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's (1998, method 10) interval for Δ = p_system − p_reference of paired 0/1 outcomes
    (both: docs both got right, b: only the reference, c: only the system): the Wilson limits of
    both proportions combined with their correlation; good coverage at small n, never outside [−1, 1]."""
    n = both + b + c + neither
    p_ref, p_sys = (both + b) / n, (both + c) / n
    l_ref, u_ref = wilson_interval(both + b, n, confidence)
    l_sys, u_sys = wilson_interval(both + c, n, confidence)
    margins = (both + b) * (c + neither) * (both + c) * (b + neither)
    cross = both * neither - b * c  # Newcombe's continuity-corrected correlation
    cross = cross - n / 2 if cross > n / 2 else (0 if cross >= 0 else cross)
    phi = cross / math.sqrt(margins) if margins > 0 else 0.0
    delta = p_sys - p_ref
    lower = math.sqrt(max(0.0, (p_sys - l_sys) ** 2 - 2 * phi * (p_sys - l_sys) * (u_ref - p_ref)
                          + (u_ref - p_ref) ** 2))
    upper = math.sqrt(max(0.0, (u_sys - p_sys) ** 2 - 2 * phi * (u_sys - p_sys) * (p_ref - l_ref)
                          + (p_ref - l_ref) ** 2))
    return max(-1.0, delta - lower), min(1.0, delta + upper)


def mcnemar_test(reference: Sequence[float], system: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Exact McNemar test of paired 0/1 outcomes, with Newcombe's interval for Δ."""
    ref, sys_ = _paired_arrays(reference, system)
    if not (_binary(ref) and _binary(sys_)):
        raise ValueError("McNemar needs 0/1 scores per doc; use paired_bootstrap for graded ones")
    both = int(np.sum((ref == 1) & (sys_ == 1)))
    b = int(np.sum((ref == 1) & (sys_ == 0)))
    c = int(np.sum((ref == 0) & (sys_ == 1)))
    neither = len(ref) - both - b - c
    low, high = newcombe_paired_interval(both, b, c, neither, confidence)
    return PairedComparison("mcnemar_exact", len(ref), (c - b) / len(ref), low, high, mcnemar_exact_p(b, c),
                            "newcombe_paired_score", b, c)


def _bootstrap_means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` seeded resamples (with replacement) of x."""
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory for big test sets
        idx = rng.integers(0, len(x), size=(min(1000, resamples - start), len(x)))
        out[start:start + len(idx)] = x[idx].mean(axis=1)
    return out


def paired_bootstrap(reference: Sequence[float], system: Sequence[float], *, resamples: int = 10_000,
                     seed: int = 0, confidence: float = 0.95) -> PairedComparison:
    """Docs resampled with replacement (seeded, so reruns agree); works for graded scores too.
    Interval: percentiles of Δ*. p: share of resamples whose Δ* − Δ is at least as far from 0
    as Δ (the null-shifted distribution), +1 smoothed so it is never 0."""
    ref, sys_ = _paired_arrays(reference, system)
    diff = sys_ - ref
    delta = float(diff.mean())
    stats = _bootstrap_means(diff, resamples, seed)
    alpha = 1 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.sum(np.abs(stats - delta) >= abs(delta) - 1e-12))
    return PairedComparison("paired_bootstrap", len(diff), delta, float(low), float(high),
                            min(1.0, (extreme + 1) / (resamples + 1)), f"bootstrap_percentile_{resamples}_seed{seed}")


def compare(reference: Sequence[float], system: Sequence[float], *, seed: int = 0,
            confidence: float = 0.95) -> PairedComparison:
    """The project's paired test: exact McNemar for 0/1 per-doc scores (every task we score),
    the paired bootstrap otherwise."""
    ref, sys_ = _paired_arrays(reference, system)
    if _binary(ref) and _binary(sys_):
        return mcnemar_test(ref, sys_, confidence)
    return paired_bootstrap(ref, sys_, seed=seed, confidence=confidence)


# ------------------------------------------------------------------ eval cells' per-sample outputs

def answer_spread(stated: Sequence[Optional[str]], gold: Sequence[str]) -> dict:
    """How concentrated the stated answers are. A policy that collapsed onto one option ("B" on
    every doc) scores that option's share of gold answers without reading a question: a cell's
    gain means little when its accuracy is near `constant_answer_accuracy`."""
    n = len(stated)
    if n == 0 or n != len(gold):
        raise ValueError(f"answer_spread needs one gold per stated answer (got {n} and {len(gold)})")
    counts: dict[Optional[str], int] = {}
    for a in stated:
        counts[a] = counts.get(a, 0) + 1
    top, count = max(((a, c) for a, c in counts.items() if a is not None), key=lambda x: x[1], default=(None, 0))
    return {"most_common_answer": top, "most_common_share": count / n, "no_answer_share": counts.get(None, 0) / n,
            "distinct_answers": len([a for a in counts if a is not None]),
            "constant_answer_accuracy": sum(g == top for g in gold) / n if top is not None else 0.0}


def samples_answer_spread(samples: str | Path, task: str) -> Optional[dict]:
    """`answer_spread` of a paper-style cell's per-sample outputs (`write_samples`' format), or None
    for a task that states no comparable answer (code, free-form maths)."""
    from .tasks import get_task

    t = get_task(task)
    if t.stated is None or t.gold is None:
        return None
    rows = [json.loads(line) for line in Path(samples).read_text().splitlines() if line.strip()]
    texts = [str((row.get("filtered_resps") or row.get("resps") or [""])[0]) for row in rows]
    return answer_spread([t.stated(row["doc"], text) for row, text in zip(rows, texts)],
                         [t.gold(row["doc"]) for row in rows])


def write_samples(path: str | Path, samples: dict[str, list[dict]]) -> None:
    """lm-eval's per-sample outputs ({subtask: rows}) as one JSON Lines file, each row tagged with its
    subtask: the file `read_samples` and `pair_samples` read."""
    from .files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"task": sub, **row}, default=str) + "\n"
                                    for sub, rows in samples.items() for row in rows))


def read_samples(path: str | Path, metric: str) -> dict[Key, float]:
    """Per-doc scores of one eval cell: {(task, doc_id): score}.

    `metric` is the cell's headline as lm-eval names it, "name,filter" (e.g.
    "exact_match,flexible-extract", "acc,none"): lm-eval writes one row per doc and filter, and
    the score is that row's `name` field. Each row keeps a `doc_hash` to check pairing with.
    """
    name, _, filt = metric.partition(",")
    return _read(path, name, filt or "none")[0]


def _read(path: str | Path, name: str, filt: str) -> tuple[dict[Key, float], dict[Key, Optional[str]]]:
    scores: dict[Key, float] = {}
    hashes: dict[Key, Optional[str]] = {}
    path = Path(path)
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("filter", "none") != filt:
            continue
        key = (str(row["task"]), int(row["doc_id"]))
        if name not in row:
            raise PairingError(f"{path}:{lineno}: no per-sample {name!r} (has {sorted(row.get('metrics', []))})")
        if key in scores:
            raise PairingError(f"{path}:{lineno}: doc {key} appears twice for filter {filt!r}")
        scores[key] = float(row[name])
        hashes[key] = row.get("doc_hash")
    if not scores:
        raise PairingError(f"{path}: no rows with filter {filt!r}")
    return scores, hashes


def pair_samples(reference: str | Path, system: str | Path, metric: str) -> tuple[list[Key], list[float], list[float]]:
    """(keys, reference scores, system scores) of two cells, in one doc order.

    Refuses (PairingError) cells on different docs: other (task, doc_id) sets, or a doc_id whose
    document differs (lm-eval's doc_hash), e.g. after a data change or another eval.limit.
    """
    name, _, filt = metric.partition(",")
    ref, ref_hash = _read(reference, name, filt or "none")
    sys_, sys_hash = _read(system, name, filt or "none")
    if set(ref) != set(sys_):
        only_ref, only_sys = sorted(set(ref) - set(sys_)), sorted(set(sys_) - set(ref))
        raise PairingError(f"{reference} and {system} are not on the same docs: {len(only_ref)} only in the first "
                           f"{only_ref[:3]}, {len(only_sys)} only in the second {only_sys[:3]}")
    changed = [k for k in ref if ref_hash[k] and sys_hash[k] and ref_hash[k] != sys_hash[k]]
    if changed:
        raise PairingError(f"{reference} and {system}: {len(changed)} docs have the same id but other content "
                           f"(doc_hash), e.g. {changed[:3]}")
    keys = sorted(ref)
    return keys, [ref[k] for k in keys], [sys_[k] for k in keys]


def cell_statistics(samples: str | Path, metric: str, base_samples: Optional[str | Path] = None, *,
                    seed: int = 0, confidence: float = 0.95) -> dict:
    """What an eval cell's metrics carry: n, accuracy and its Wilson interval (0/1 scores; graded
    ones get the bootstrap interval of the mean) and, against the base cell on the same docs,
    Δ, its interval, p-value and the test's name (`PairedComparison.metrics`)."""
    name, _, filt = metric.partition(",")
    scores = list(_read(samples, name, filt or "none")[0].values())
    arr = np.asarray(scores)
    if _binary(arr):
        out = accuracy_summary(int(arr.sum()), len(arr), confidence)
        out["interval"] = "wilson"
    else:
        alpha = 1 - confidence
        low, high = np.quantile(_bootstrap_means(arr, 10_000, seed), [alpha / 2, 1 - alpha / 2])
        out = {"accuracy": float(arr.mean()), "n": len(arr), "ci_low": float(low), "ci_high": float(high),
               "interval": "bootstrap_percentile"}
    if base_samples is not None:
        _, ref, sys_ = pair_samples(base_samples, samples, metric)
        out.update(compare(ref, sys_, seed=seed, confidence=confidence).metrics())
    return out
