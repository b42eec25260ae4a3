"""Metrics on hand-made cases whose scores are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from linmem.evals.metrics import (
    Estimate,
    exact_hit,
    exact_match,
    keyword_accuracy,
    keyword_recall,
    keywords_of,
    locomo_f1,
    mean_ci,
    near_hit,
    normalize_answer,
    recall_at_k,
    reciprocal_rank,
    t_quantile_975,
    token_f1,
    words,
)

# Answer overlap


def test_normalize_answer() -> None:
    assert normalize_answer("The  Red, mug!") == "red mug"
    assert normalize_answer("An apple and a pear.") == "apple and pear"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("") == ""


def test_exact_match() -> None:
    assert exact_match("the Kitchen.", "kitchen") == 1.0
    assert exact_match("in the kitchen", "kitchen") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1() -> None:
    # pred {red, mug, shelf} vs gold {red, mug}: precision 2/3, recall 1 -> F1 0.8
    assert token_f1("the red mug, shelf", "A red mug") == pytest.approx(0.8)
    assert token_f1("blue cup", "red mug") == 0.0
    # Repeats count: pred [mug, mug] vs gold [mug]: common 1, precision 1/2, recall 1 -> 2/3
    assert token_f1("mug mug", "mug") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("", "mug") == 0.0 and token_f1("the", "mug") == 0.0


def test_locomo_single_hop_temporal_open_domain_are_stemmed_token_f1() -> None:
    assert locomo_f1("She went running", "running", 4) == pytest.approx(0.5)  # [she, went, run] vs [run]
    assert locomo_f1("Runs", "running", 2) == 1.0  # both stem to "run"
    # "and" is dropped as well as articles: [paint, hike] vs [hike, paint]
    assert locomo_f1("painting and hiking", "hiking, painting", 4) == 1.0
    assert locomo_f1("", "x", 2) == 0.0 and locomo_f1("", "", 2) == 0.0


def test_locomo_category_3_keeps_the_gold_before_the_semicolon() -> None:
    assert locomo_f1("Likely yes", "Likely yes; because she said so", 3) == 1.0
    assert locomo_f1("Likely yes", "Likely yes; because she said so", 4) < 1.0


def test_locomo_category_1_is_partial_f1_over_sub_answers() -> None:
    # gold parts "ran", "running park"; one prediction part [run, in, park]:
    # vs [ran]: 0; vs [run, park]: precision 2/3, recall 1 -> 0.8; mean 0.4
    assert locomo_f1("Running in the park", "ran, running park", 1) == pytest.approx(0.4)
    # gold parts painting (best 1.0) and "hiking and camping" = [hike, camp] vs [hike] -> 2/3
    assert locomo_f1("hiking, painting", "painting, hiking and camping", 1) == pytest.approx(5 / 6)


def test_locomo_category_5_scores_abstention() -> None:
    assert locomo_f1("That is NOT MENTIONED in the conversation.", "anything", 5) == 1.0
    assert locomo_f1("No information available", "", 5) == 1.0
    assert locomo_f1("She went to Paris", "Not mentioned in the conversation", 5) == 0.0


def test_locomo_unknown_category() -> None:
    with pytest.raises(ValueError, match="1-5"):
        locomo_f1("a", "a", 6)


# Clip retrieval


def test_exact_hit() -> None:
    assert exact_hit([4, 7, 2], 7, k=2) == 1.0
    assert exact_hit([4, 7, 2], 2, k=2) == 0.0
    assert exact_hit([4, 7, 2], {9, 2}, k=3) == 1.0
    assert exact_hit([4, 4, 4, 7], 7, k=2) == 1.0  # a repeat takes no second slot
    assert exact_hit([4, 7], 7, k=10) == 1.0 and exact_hit([], 7, k=5) == 0.0


def test_near_hit() -> None:
    assert near_hit([10, 20], 11, k=1) == 1.0
    assert near_hit([10, 20], 12, k=1) == 0.0
    assert near_hit([10, 20], 12, k=1, radius=2) == 1.0
    assert near_hit([10, 20], 21, k=1) == 0.0 and near_hit([10, 20], 21, k=2) == 1.0
    assert near_hit([5], [40, 6], k=3) == 1.0


def test_reciprocal_rank() -> None:
    assert reciprocal_rank([3, 1, 2], 3) == 1.0
    assert reciprocal_rank([3, 1, 2], 2) == pytest.approx(1 / 3)
    assert reciprocal_rank([3, 3, 1], 1) == pytest.approx(1 / 2)  # ranks count distinct clips
    assert reciprocal_rank([3, 1, 2], [2, 1]) == pytest.approx(1 / 2)  # the first gold found
    assert reciprocal_rank([3, 1], 9) == 0.0 and reciprocal_rank([], 9) == 0.0


def test_recall_at_k() -> None:
    assert recall_at_k([1, 2, 3, 4], {2, 4, 9}, k=2) == pytest.approx(1 / 3)
    assert recall_at_k([1, 2, 3, 4], {2, 4, 9}, k=4) == pytest.approx(2 / 3)
    assert recall_at_k([2, 2, 2], {2, 4}, k=3) == pytest.approx(1 / 2)  # duplicates do not inflate
    assert recall_at_k([5], 5, k=100) == 1.0
    assert recall_at_k([], {1}, k=5) == 0.0


@pytest.mark.parametrize(
    "metric",
    [
        lambda g: exact_hit([1], g, 1),
        lambda g: near_hit([1], g, 1),
        lambda g: reciprocal_rank([1], g),
        lambda g: recall_at_k([1], g, 1),
    ],
)
def test_empty_gold_cannot_be_scored(metric: object) -> None:
    with pytest.raises(ValueError, match="gold"):
        metric(set())  # type: ignore[operator]


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="k must"):
        exact_hit([1], 1, 0)


# Keywords


def test_words_and_keywords_of() -> None:
    assert words("The T-shirt's at 9:30.") == ["t", "shirt", "s", "at", "9", "30"]
    assert keywords_of("Lily put the red mug on the shelf, and the red mug stayed there.") == (
        "lily",
        "put",
        "red",
        "mug",
        "shelf",
        "stayed",
    )
    assert keywords_of("It was at 3 in a box") == ("3", "box")
    assert keywords_of("") == ()


def test_keyword_recall_and_accuracy() -> None:
    text = "Lily put the RED mug next to her keys."
    assert keyword_recall(text, ["red mug", "Lily", "wallet"]) == pytest.approx(2 / 3)
    assert keyword_accuracy(text, ["red mug", "Lily", "wallet"]) == 0.0
    assert keyword_accuracy(text, ["red mug", "lily", "keys"]) == 1.0
    assert keyword_recall(text, ["mug red"]) == 0.0  # phrases keep their order
    assert keyword_recall("a keyboard", ["key"]) == 0.0  # whole words only
    assert keyword_recall(text, ["the"]) == 0.0  # a keyword with no words is never present
    assert keyword_recall(text, keywords_of("Lily's red mug")) == 1.0
    with pytest.raises(ValueError, match="keywords"):
        keyword_recall(text, [])


# Intervals


def test_mean_ci_uses_wilson_for_accuracies() -> None:
    est = mean_ci([1] * 19 + [0])
    assert est.method == "wilson" and est.n == 20 and est.mean == pytest.approx(0.95)
    # Wilson 95% for 19/20: 0.7639 to 0.9911
    assert (est.low, est.high) == (pytest.approx(0.76387, abs=1e-5), pytest.approx(0.99112, abs=1e-5))
    perfect = mean_ci([True] * 10)
    assert perfect.high == 1.0 and perfect.low == pytest.approx(0.72247, abs=1e-5)
    assert mean_ci([0]).low == 0.0 and mean_ci([0]).high == pytest.approx(0.79346, abs=1e-5)


def test_mean_ci_uses_student_t_otherwise() -> None:
    est = mean_ci([0.5, 0.7, 0.9])
    # mean 0.7, s 0.2, t(0.975, 2) 4.302653: half-width 4.302653 * 0.2 / sqrt(3) = 0.496828
    assert (est.method, est.n, est.mean) == ("t", 3, pytest.approx(0.7))
    assert (est.low, est.high) == (pytest.approx(0.203172, abs=1e-6), pytest.approx(1.196828, abs=1e-6))
    assert mean_ci([0.4, 0.4]).low == pytest.approx(0.4)
    assert mean_ci([0.4]) == Estimate(0.4, None, None, 1, "t")
    assert mean_ci([0.5, 0.25]).to_dict()["n"] == 2
    with pytest.raises(ValueError):
        mean_ci([])


@pytest.mark.parametrize(
    ("df", "quantile"),
    # Student's t table, 0.975 quantiles
    [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423), (120, 1.9799), (1000, 1.9623)],
)
def test_t_quantile_975(df: int, quantile: float) -> None:
    assert t_quantile_975(df) == pytest.approx(quantile, abs=1e-4)


def test_t_quantile_is_continuous_across_the_switch_to_the_expansion() -> None:
    assert abs(t_quantile_975(200) - t_quantile_975(201)) < 1e-4
    assert t_quantile_975(10**9) == pytest.approx(1.959964, abs=1e-6)
    assert math.isfinite(t_quantile_975(201))
