"""Evaluation metrics: pass@k against enumeration, majority voting, and per-source summaries worked by hand."""

import itertools
import math
from fractions import Fraction

import pytest

from dapo_jax.evaluation import format_table, maj_at_k, majority_vote, pass_at_k, summarize


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_pass_at_k_matches_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n", [1, 5, 16, 1000])
def test_pass_at_1_is_the_fraction_correct(n):
    for c in range(0, n + 1, max(1, n // 7)):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


@pytest.mark.parametrize("n", [1, 4, 32])
def test_pass_at_n_is_one_exactly_when_any_sample_is_correct(n):
    assert pass_at_k(n, 0, n) == 0.0
    for c in range(1, n + 1):
        assert pass_at_k(n, c, n) == 1.0


def test_pass_at_k_is_stable_where_the_binomials_overflow_a_float():
    n, c, k = 2000, 3, 700  # C(2000, 700) is about 1e568
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n, c, k, fix", [(4, 1, 5, "k <= 4"), (4, 1, 0, "k <= 4"),
                                          (4, -1, 1, "count the correct"), (4, 5, 1, "count the correct")])
def test_pass_at_k_rejects_impossible_counts_and_says_what_to_change(n, c, k, fix):
    with pytest.raises(ValueError, match=fix):
        pass_at_k(n, c, k)


def test_majority_vote_picks_the_most_common_prediction():
    assert majority_vote(["3", "5", "5", "3", "5"]) == "5"


def test_majority_vote_breaks_ties_by_first_occurrence():
    assert majority_vote(["7", "2", "2", "7"]) == "7"
    assert majority_vote(["2", "7", "7", "2"]) == "2"


def test_majority_vote_ignores_missing_and_invalid_predictions():
    assert majority_vote([None, "[INVALID]", "[INVALID]", "4", None]) == "4"


def test_majority_vote_is_none_without_a_valid_prediction():
    assert majority_vote([]) is None
    assert majority_vote([None, "[INVALID]"]) is None


def test_maj_at_k_scores_the_voted_answer():
    preds = ["12", "10", "12", "10", "10"]
    correct = [True, False, True, False, False]
    assert maj_at_k(preds, correct, 3) == 1.0  # "12" leads 2 to 1 among the first three
    assert maj_at_k(preds, correct, 5) == 0.0  # "10" leads 3 to 2 over all five
    assert maj_at_k(preds, correct, 4) == 1.0  # a 2-2 tie goes to "12", seen first


def test_maj_at_k_counts_no_valid_prediction_as_wrong():
    assert maj_at_k([None, "[INVALID]"], [False, False], 2) == 0.0


def test_maj_at_k_rejects_mismatched_lengths_and_too_large_k():
    with pytest.raises(ValueError, match="one flag per prediction"):
        maj_at_k(["1", "2"], [True], 1)
    with pytest.raises(ValueError, match="at least k samples"):
        maj_at_k(["1", "2"], [True, False], 3)


def sample(source: str, uid: str, correct: bool, pred: str | None) -> dict:
    return {"data_source": source, "uid": uid, "correct": correct, "pred": pred}


# Two sources of 4 samples per problem, the uids overlapping across sources and the problems interleaved.
#   aime p0: preds 5 3 3 5, correct T F F T   c=2  vote 5 (tie, first seen): right
#   aime p1: preds 7 - ! 7, all wrong         c=0  vote 7: wrong
#   math p0: preds 1 1 1 1, all right         c=4  vote 1: right
#   math p1: preds 2 4 2 3, correct F T F F   c=1  vote 2: wrong
#   math p2: no predictions, all wrong        c=0  no vote: wrong
TWO_SOURCES = [
    sample("aime", "p0", True, "5"), sample("math", "p0", True, "1"), sample("aime", "p1", False, "7"),
    sample("math", "p1", False, "2"), sample("math", "p2", False, None), sample("aime", "p0", False, "3"),
    sample("math", "p0", True, "1"), sample("aime", "p1", False, None), sample("math", "p1", True, "4"),
    sample("math", "p2", False, None), sample("aime", "p0", False, "3"), sample("math", "p0", True, "1"),
    sample("aime", "p1", False, "[INVALID]"), sample("math", "p1", False, "2"), sample("math", "p2", False, None),
    sample("aime", "p0", True, "5"), sample("math", "p0", True, "1"), sample("aime", "p1", False, "7"),
    sample("math", "p1", False, "3"), sample("math", "p2", False, None),
]


def test_summarize_reports_each_source_and_all_problems_weighted_equally():
    # pass@2 per problem is 1 - C(4-c, 2)/C(4, 2) with C(4, 2) = 6: c=0 -> 0, c=1 -> 1/2, c=2 -> 5/6, c=4 -> 1.
    expected = {
        "eval/aime/avg@4": (2 / 4 + 0) / 2, "eval/aime/pass@1": (2 / 4 + 0) / 2,
        "eval/aime/pass@2": (5 / 6 + 0) / 2, "eval/aime/pass@4": (1 + 0) / 2,
        "eval/aime/maj@4": (1 + 0) / 2, "eval/aime/problems": 2,
        "eval/math/avg@4": (1 + 1 / 4 + 0) / 3, "eval/math/pass@1": (1 + 1 / 4 + 0) / 3,
        "eval/math/pass@2": (1 + 1 / 2 + 0) / 3, "eval/math/pass@4": (1 + 1 + 0) / 3,
        "eval/math/maj@4": (1 + 0 + 0) / 3, "eval/math/problems": 3,
        "eval/all/avg@4": (2 / 4 + 0 + 1 + 1 / 4 + 0) / 5, "eval/all/pass@1": (2 / 4 + 0 + 1 + 1 / 4 + 0) / 5,
        "eval/all/pass@2": (5 / 6 + 0 + 1 + 1 / 2 + 0) / 5, "eval/all/pass@4": (1 + 0 + 1 + 1 + 0) / 5,
        "eval/all/maj@4": (1 + 0 + 1 + 0 + 0) / 5, "eval/all/problems": 5,
    }
    metrics = summarize(TWO_SOURCES)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_summarize_reports_pass_at_powers_of_two_and_at_n():
    samples = [sample("gsm", "q", i == 0, str(i)) for i in range(6)]
    metrics = summarize(samples)
    assert sorted(k for k in metrics if "/gsm/pass@" in k) == ["eval/gsm/pass@1", "eval/gsm/pass@2",
                                                                "eval/gsm/pass@4", "eval/gsm/pass@6"]


def test_summarize_emits_all_even_for_a_single_source():
    metrics = summarize([sample("gsm", "q", True, "1"), sample("gsm", "q", False, "2")])
    for name in ("avg@2", "pass@1", "pass@2", "maj@2", "problems"):
        assert metrics[f"eval/all/{name}"] == metrics[f"eval/gsm/{name}"]


def test_summarize_reports_all_at_the_smallest_n_when_sources_differ():
    # a: preds 1 2, correct T F (n=2); b: preds 3 3 5 5, correct F F T T (n=4).
    metrics = summarize([sample("a", "p", True, "1"), sample("a", "p", False, "2"),
                         sample("b", "q", False, "3"), sample("b", "q", False, "3"),
                         sample("b", "q", True, "5"), sample("b", "q", True, "5")])
    assert sorted(k for k in metrics if k.startswith("eval/all/")) == [
        "eval/all/avg@2", "eval/all/maj@2", "eval/all/pass@1", "eval/all/pass@2", "eval/all/problems"]
    assert metrics["eval/all/avg@2"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert metrics["eval/all/pass@2"] == pytest.approx((1 + (1 - 1 / 6)) / 2)  # b: 1 - C(2,2)/C(4,2)
    assert metrics["eval/all/maj@2"] == pytest.approx((1 + 0) / 2)  # b votes over its first two: "3", wrong


def test_summarize_rejects_a_source_with_unequal_sample_counts():
    samples = [sample("math", "p0", True, "1"), sample("math", "p0", True, "1"), sample("math", "p1", False, "2")]
    with pytest.raises(ValueError, match=r"'math'.*\{1: 1, 2: 1\}"):
        summarize(samples)


def test_summarize_rejects_empty_input():
    with pytest.raises(ValueError, match="no evaluation samples"):
        summarize([])


def test_summarize_rejects_the_reserved_source_name_all():
    with pytest.raises(ValueError, match="reserved"):
        summarize([sample("all", "p0", True, "1")])


def test_summarize_names_missing_sample_fields():
    with pytest.raises(ValueError, match=r"\['pred'\]"):
        summarize([{"data_source": "math", "uid": "p0", "correct": True}])


def test_format_table_has_a_line_per_source_with_all_last():
    table = format_table(summarize(TWO_SOURCES))
    header, *rows = table.splitlines()
    assert header.split() == ["source", "problems", "n", "avg@n", "pass@n", "maj@n"]
    assert [row.split()[0] for row in rows] == ["aime", "math", "all"]
    assert rows[0].split()[1:] == ["2", "4", "0.2500", "0.5000", "0.5000"]


def test_format_table_ignores_metrics_outside_eval():
    metrics = {**summarize(TWO_SOURCES), "train/loss": 0.5}
    assert format_table(metrics) == format_table(summarize(TWO_SOURCES))
