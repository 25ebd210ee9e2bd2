"""transformer2.stats against values computed by hand or published in textbooks."""
import json

import numpy as np
import pytest

from transformer2.stats import (PairingError, accuracy_summary, cell_statistics, compare, mcnemar_exact_p,
                                mcnemar_test, newcombe_paired_interval, pair_samples, paired_bootstrap, read_samples,
                                wilson_interval)


@pytest.mark.parametrize("k,n,low,high", [
    (0, 10, 0.0, 0.2775),     # Wilson 95% (e.g. Newcombe 1998, Brown-Cai-DasGupta 2001)
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 29, 0.0061, 0.1718),  # Newcombe (1998) example: 1/29
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998) example: 81/263
])
def test_wilson_matches_textbook_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_edges_and_errors():
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0
    low, high = wilson_interval(3, 4)
    assert accuracy_summary(3, 4) == {"accuracy": 0.75, "n": 4, "ci_low": low, "ci_high": high}
    for k, n in ((1, 0), (-1, 3), (4, 3)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)


@pytest.mark.parametrize("b,c,p", [
    (0, 0, 1.0),
    (0, 5, 2 / 2 ** 5),              # 2·P(X=0), X~Bin(5, 1/2)
    (1, 9, 2 * (1 + 10) / 2 ** 10),  # 2·(C(10,0) + C(10,1))/2^10
    (3, 3, 1.0),                     # 2·P(X<=3) > 1: capped
    (2, 5, 2 * (1 + 7 + 21) / 2 ** 7),
])
def test_mcnemar_exact_p_by_hand(b, c, p):
    assert mcnemar_exact_p(b, c) == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact_p(c, b) == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


def test_newcombe_paired_interval_matches_published_example():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8:
    Cavo et al. 2012, table [[59, 6], [16, 80]]: estimate −0.0621, 95% CI −0.1186 to −0.0046."""
    low, high = newcombe_paired_interval(both=59, b=16, c=6, neither=80)
    assert low == pytest.approx(-0.1186, abs=1e-4) and high == pytest.approx(-0.0046, abs=1e-4)


def _pairs(both, b, c, neither):
    ref = [1] * both + [1] * b + [0] * c + [0] * neither
    sys_ = [1] * both + [0] * b + [1] * c + [0] * neither
    return ref, sys_


def test_mcnemar_test_on_per_doc_outcomes():
    ref, sys_ = _pairs(59, 16, 6, 80)
    r = mcnemar_test(ref, sys_)
    assert (r.test, r.n, r.b, r.c) == ("mcnemar_exact", 161, 16, 6)
    assert r.delta == pytest.approx(-10 / 161) and r.p_value == pytest.approx(mcnemar_exact_p(16, 6))
    assert (r.ci_low, r.ci_high) == newcombe_paired_interval(59, 16, 6, 80)
    m = r.metrics()
    assert m["delta_vs_base"] == r.delta and m["p_value"] == r.p_value and m["test"] == "mcnemar_exact"
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_test([0.5, 1], [1, 1])
    with pytest.raises(PairingError):
        mcnemar_test([1, 0], [1])


def test_identical_systems_have_no_difference():
    ref = [1, 0, 1, 1, 0]
    for r in (mcnemar_test(ref, ref), paired_bootstrap(ref, ref, resamples=500)):
        assert r.delta == 0 and r.p_value == 1.0 and r.ci_low <= 0 <= r.ci_high


def test_paired_bootstrap_is_seeded_and_sensible():
    rng = np.random.default_rng(1)
    ref = rng.random(200) < 0.4
    sys_ = ref | (rng.random(200) < 0.3)  # strictly better on ~30% of the wrong ones
    a = paired_bootstrap(ref, sys_, resamples=2000, seed=7)
    assert a == paired_bootstrap(ref, sys_, resamples=2000, seed=7)
    assert a != paired_bootstrap(ref, sys_, resamples=2000, seed=8)
    assert a.delta == pytest.approx(float(np.mean(sys_) - np.mean(ref)))
    assert 0 < a.ci_low < a.delta < a.ci_high and a.p_value < 0.01
    assert a.p_value >= 1 / 2001  # smoothed: never 0
    graded = paired_bootstrap([0.2, 0.4, 0.1], [0.3, 0.4, 0.5], resamples=300)
    assert graded.delta == pytest.approx(1 / 6) and graded.test == "paired_bootstrap"


def test_compare_picks_the_test_by_score_type():
    assert compare([1, 0, 1], [1, 1, 1]).test == "mcnemar_exact"
    assert compare([1, 0.5, 1], [1, 1, 1]).test == "paired_bootstrap"


def _write_cell(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gsm8k_rows(scores, hashes=None):
    """lm-eval writes one row per doc and filter."""
    return [{"task": "gsm8k", "doc_id": i, "filter": f, "metrics": ["exact_match"],
             "exact_match": s if f == "flexible-extract" else 0.0, "doc_hash": (hashes or {}).get(i, f"h{i}")}
            for f in ("strict-match", "flexible-extract") for i, s in enumerate(scores)]


def test_read_and_pair_samples_by_headline_metric(tmp_path):
    base = _write_cell(tmp_path / "base_gsm8k/samples.jsonl", _gsm8k_rows([1, 0, 0, 1]))
    svf = _write_cell(tmp_path / "svf_gsm8k/samples.jsonl", _gsm8k_rows([1, 1, 0, 1]))
    assert read_samples(base, "exact_match,flexible-extract") == {("gsm8k", 0): 1, ("gsm8k", 1): 0,
                                                                  ("gsm8k", 2): 0, ("gsm8k", 3): 1}
    assert set(read_samples(base, "exact_match,strict-match").values()) == {0.0}
    keys, ref, sys_ = pair_samples(base, svf, "exact_match,flexible-extract")
    assert keys == [("gsm8k", i) for i in range(4)] and ref == [1, 0, 0, 1] and sys_ == [1, 1, 0, 1]
    with pytest.raises(PairingError, match="no per-sample 'acc'"):
        read_samples(base, "acc,flexible-extract")
    with pytest.raises(PairingError, match="no rows with filter"):
        read_samples(base, "exact_match,none")


def test_math_subtasks_are_kept_apart_and_other_docs_are_refused(tmp_path):
    rows = lambda subjects, ids: [{"task": f"hendrycks_math_{s}", "doc_id": i, "filter": "none", "exact_match": 1.0}
                                  for s in subjects for i in ids]
    a = _write_cell(tmp_path / "a.jsonl", rows(["algebra", "geometry"], [0, 1]))
    assert len(read_samples(a, "exact_match,none")) == 4  # same doc_id, two subjects
    b = _write_cell(tmp_path / "b.jsonl", rows(["algebra", "geometry"], [0, 2]))
    with pytest.raises(PairingError, match="not on the same docs"):
        pair_samples(a, b, "exact_match,none")
    c = _write_cell(tmp_path / "c.jsonl", _gsm8k_rows([1, 0], hashes={1: "other"}))
    d = _write_cell(tmp_path / "d.jsonl", _gsm8k_rows([1, 0]))
    with pytest.raises(PairingError, match="doc_hash"):
        pair_samples(c, d, "exact_match,flexible-extract")
    dup = _write_cell(tmp_path / "dup.jsonl", rows(["algebra"], [0, 0]))
    with pytest.raises(PairingError, match="twice"):
        read_samples(dup, "exact_match,none")


def test_cell_statistics_carries_n_interval_and_delta(tmp_path):
    base = _write_cell(tmp_path / "base.jsonl", _gsm8k_rows([0] * 10))
    svf = _write_cell(tmp_path / "svf.jsonl", _gsm8k_rows([1] * 5 + [0] * 5))
    own = cell_statistics(base, "exact_match,flexible-extract")
    assert own == {"accuracy": 0.0, "n": 10, "ci_low": 0.0, "ci_high": pytest.approx(0.2775, abs=1e-4),
                   "interval": "wilson"}
    s = cell_statistics(svf, "exact_match,flexible-extract", base)
    assert s["n"] == 10 and s["accuracy"] == 0.5 and s["interval"] == "wilson"
    assert s["delta_vs_base"] == 0.5 and s["test"] == "mcnemar_exact" and s["paired_n"] == 10
    assert s["p_value"] == pytest.approx(2 / 2 ** 5) and s["discordant_system_only"] == 5
    assert s["delta_ci_low"] < 0.5 < s["delta_ci_high"]
    graded = _write_cell(tmp_path / "graded.jsonl", [{"task": "t", "doc_id": i, "filter": "none", "f1": v}
                                                    for i, v in enumerate([0.5, 0.25, 1.0])])
    g = cell_statistics(graded, "f1,none")
    assert g["interval"] == "bootstrap_percentile" and g["ci_low"] <= g["accuracy"] <= g["ci_high"]


def test_answer_spread_flags_a_constant_answer():
    from transformer2.stats import answer_spread
    from transformer2.tasks import get_task

    arc = get_task("arc_easy")
    doc = {"question": "q", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}
    assert arc.gold(doc) == "B" and arc.stated(doc, "Think... the answer is (B).") == "B"
    assert arc.stated(doc, "no idea") is None
    s = answer_spread(["B", "B", "B", None], ["A", "B", "B", "C"])
    assert s == {"most_common_answer": "B", "most_common_share": 0.75, "no_answer_share": 0.25, "distinct_answers": 1,
                 "constant_answer_accuracy": 0.5}
    assert answer_spread([None, None], ["A", "B"])["constant_answer_accuracy"] == 0.0
    with pytest.raises(ValueError):
        answer_spread(["A"], [])
