"""Scoring functions: answer overlap (SQuAD, LoCoMo), clip retrieval (the seed paper's Exact Hit@k,
Near Hit, MRR, Recall@k), keyword checks, and a mean with its 95% interval.

All are pure functions of their arguments. Each docstring says where its definition comes from.
This module holds the canonical keyword extractor (`keywords_of`); tasks should use it.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from statistics import NormalDist
from typing import Any

_PUNCTUATION = set(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
# LoCoMo's normalisation also drops "and" (task_eval/evaluation.py, normalize_answer).
_LOCOMO_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
# LoCoMo's category-5 (adversarial) questions are right when the answer abstains with these words.
_ABSTENTIONS = ("no information available", "not mentioned")


# Answer overlap


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles (a, an, the) removed, whitespace collapsed.

    The SQuAD v1.1 evaluation script's `normalize_answer`, which LoCoMo's evaluation also follows.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 when the normalised prediction equals the normalised gold answer (SQuAD's EM)."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens, counting repeats
    (SQuAD's F1). As in SQuAD v2, two empty answers score 1.0 and one empty answer 0.0."""
    return _f1(normalize_answer(pred).split(), normalize_answer(gold).split())


def locomo_f1(pred: str, gold: str, category: int) -> float:
    """LoCoMo's own QA score for one question (snap-research/LoCoMo, task_eval/evaluation.py,
    `eval_question_answering`).

    Tokens are normalised as there (commas and "and" dropped as well) and Porter-stemmed (NLTK).

    - category 1 (multi-hop): the gold answer and the prediction are split at commas into
      sub-answers; the score is the mean over gold parts of the best F1 against any prediction part;
    - category 3: only the gold answer before the first ';' counts; then token F1;
    - category 5 (adversarial): 1.0 iff the prediction abstains ("no information available" or
      "not mentioned", any case), else 0.0; the gold answer is not used;
    - categories 2 and 4: token F1.

    Unlike SQuAD's F1, an empty prediction or gold answer scores 0.0, as in LoCoMo.
    """
    if category == 5:
        return float(any(a in pred.lower() for a in _ABSTENTIONS))
    if category == 1:
        preds = [p.strip() for p in pred.split(",")]
        golds = [g.strip() for g in gold.split(",")]
        return sum(max(_locomo_token_f1(p, g) for p in preds) for g in golds) / len(golds)
    if category == 3:
        gold = gold.partition(";")[0].strip()
    if category in (2, 3, 4):
        return _locomo_token_f1(pred, gold)
    raise ValueError(f"LoCoMo categories are 1-5, found {category!r}")


def _locomo_token_f1(pred: str, gold: str) -> float:
    p, g = _locomo_tokens(pred), _locomo_tokens(gold)
    return _f1(p, g) if p and g else 0.0


def _locomo_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.replace(",", "").lower() if ch not in _PUNCTUATION)
    stem = _stemmer().stem
    return [stem(w) for w in _LOCOMO_ARTICLES.sub(" ", text).split()]


@cache
def _stemmer() -> Any:
    from nltk.stem import PorterStemmer

    return PorterStemmer()


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


# Clip retrieval (the seed paper's retrieval ablation; definitions in research/m3agent.md section 6).
# `ranked` is best first. A clip repeated in a ranking counts once, at its first position. `gold` is
# one clip id or a collection of them; an empty gold set cannot be scored and raises ValueError.


def exact_hit(ranked: Sequence[int], gold: int | Collection[int], k: int) -> float:
    """Exact Hit@k: 1.0 iff a gold clip is among the first `k` distinct clips of the ranking."""
    targets = _gold(gold)
    return float(any(c in targets for c in _top(ranked, k)))


def near_hit(ranked: Sequence[int], gold: int | Collection[int], k: int, radius: int = 1) -> float:
    """Near Hit@k: 1.0 iff one of the first `k` distinct clips is within `radius` clips of a gold
    clip (the seed paper's "target ±1 clip")."""
    targets = _gold(gold)
    return float(any(abs(c - t) <= radius for c in _top(ranked, k) for t in targets))


def reciprocal_rank(ranked: Sequence[int], gold: int | Collection[int]) -> float:
    """1 / the rank of the first gold clip in the ranking (1-based, distinct clips), 0.0 when no
    gold clip is ranked; its mean over queries is the MRR."""
    targets = _gold(gold)
    for rank, c in enumerate(_unique(ranked), start=1):
        if c in targets:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranked: Sequence[int], gold: int | Collection[int], k: int) -> float:
    """Recall@k: |first `k` distinct clips ∩ gold| / |gold|."""
    targets = _gold(gold)
    return len(set(_top(ranked, k)) & targets) / len(targets)


def _gold(gold: int | Collection[int]) -> set[int]:
    targets = {gold} if isinstance(gold, int) else set(gold)
    if not targets:
        raise ValueError("no gold clips: a retrieval example needs at least one")
    return targets


def _top(ranked: Sequence[int], k: int) -> list[int]:
    if k < 1:
        raise ValueError(f"k must be at least 1, found {k}")
    return _unique(ranked)[:k]


def _unique(ranked: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ranked))


# Keywords (the seed paper's summarisation check: "a natural-language answer verified by keyword
# matching", scored as accuracy and keyword recall).

# Function words that carry no fact of their own; everything else can be a keyword.
_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each either few for from further
    had has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself neither no nor not now of off on once only or other our ours ourselves out
    over own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who whom
    why will with would yet you your yours yourself yourselves""".split()
)
_ARTICLES = frozenset({"a", "an", "the"})


def words(text: str) -> list[str]:
    """Lower-case runs of letters and digits, articles dropped: the units keywords are matched in.
    Punctuation separates words ("t-shirt" is "t shirt", "9:30" is "9 30")."""
    return [w for w in re.findall(r"[^\W_]+", text.lower()) if w not in _ARTICLES]


def keywords_of(text: str) -> tuple[str, ...]:
    """The content words of `text` (a gold answer or a fact), in order, without repeats: its
    `words` minus English function words. Numbers are kept; other one-letter words are not."""
    found = [w for w in words(text) if w not in _STOPWORDS and (len(w) > 1 or w.isdigit())]
    return tuple(dict.fromkeys(found))


def keyword_recall(text: str, keywords: Collection[str]) -> float:
    """The fraction of `keywords` present in `text`. A keyword is present when its `words` occur in
    `text`'s words contiguously, so "red mug" needs those two words side by side and "key" does not
    match "keyboard". Case and punctuation do not matter. An empty keyword list raises ValueError."""
    return sum(_present(text, keywords)) / len(keywords)


def keyword_accuracy(text: str, keywords: Collection[str]) -> float:
    """1.0 iff every keyword is present in `text` (as in `keyword_recall`), else 0.0."""
    return float(all(_present(text, keywords)))


def _present(text: str, keywords: Collection[str]) -> list[bool]:
    if not keywords:
        raise ValueError("no keywords to check")
    padded = " " + " ".join(words(text)) + " "
    return [bool(words(k)) and f" {' '.join(words(k))} " in padded for k in keywords]


# Intervals


@dataclass(frozen=True, slots=True)
class Estimate:
    """A mean over `n` values with its 95% interval (`low`, `high`); None where undefined."""

    mean: float
    low: float | None
    high: float | None
    n: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_Z95 = NormalDist().inv_cdf(0.975)


def mean_ci(values: Iterable[float]) -> Estimate:
    """The mean of `values` and a 95% confidence interval for it.

    Values that are all 0 or 1 (accuracies, hits) get the Wilson score interval (Wilson 1927),
    which stays inside [0, 1] and is sound at small n and at 0% or 100%. Other values (F1,
    reciprocal ranks) get Student's t interval, mean ± t(0.975, n-1)·s/√n, which needs n ≥ 2.
    An empty list raises ValueError.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(xs) / n
    if all(x in (0.0, 1.0) for x in xs):
        z2 = _Z95 * _Z95
        centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
        half = _Z95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return Estimate(mean, max(0.0, centre - half), min(1.0, centre + half), n, "wilson")
    if n == 1:
        return Estimate(mean, None, None, n, "t")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, "t")


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, resamples: int = 10000, seed: int = 0
) -> Estimate:
    """Mean of a - b over paired scores (the same questions) with a 95% percentile bootstrap
    interval: questions are resampled with replacement `resamples` times (Efron & Tibshirani
    1993, ch. 13). Deterministic for a given `seed`."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, found {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(diff)
    if n == 0:
        return Estimate(math.nan, None, None, 0, "bootstrap")
    mean = float(diff.mean())
    if n == 1:
        return Estimate(mean, None, None, 1, "bootstrap")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for lo in range(0, resamples, 1000):  # in blocks: 1,000 x n indices at a time
        size = min(1000, resamples - lo)
        means[lo : lo + size] = diff[rng.integers(0, n, size=(size, n))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return Estimate(mean, float(low), float(high), n, "bootstrap")


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (12.706 at 1, 2.228 at 10).

    Found by bisection on the exact two-sided probability P(|T| < t) for integer df
    (Abramowitz & Stegun 26.7.3-4); above 200 df by the Cornish-Fisher expansion (A&S 26.7.5),
    which is within 1e-6 there.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, found {df}")
    if df > 200:
        z = _Z95
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_inside(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def _t_inside(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer `df` (A&S 26.7.3 for odd df, 26.7.4 for even)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for j in range(1, (df - 1) // 2):
        term *= c2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


__all__ = [
    "Estimate",
    "exact_hit",
    "exact_match",
    "keyword_accuracy",
    "keyword_recall",
    "keywords_of",
    "locomo_f1",
    "mean_ci",
    "near_hit",
    "normalize_answer",
    "paired_difference",
    "recall_at_k",
    "reciprocal_rank",
    "t_quantile_975",
    "token_f1",
    "words",
]
