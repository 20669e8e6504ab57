"""Ranking and classification metrics as plain functions over ids and labels.

Relevance is binary: a retrieved document is relevant when its id is in the query's gold set.
Rankings are lists of document ids, best first, without repeats (see `dedupe`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

RECALL_KS = (1, 5, 10)
# MRR and nDCG look at the first 10 documents, the depth a reader of a results list sees.
RANK_DEPTH = 10


def dedupe(ids: Iterable[str]) -> list[str]:
    """Keep the first occurrence of each id, in order: several chunks of one document count once."""
    seen: set[str] = set()
    out = []
    for doc_id in ids:
        if doc_id not in seen:
            seen.add(doc_id)
            out.append(doc_id)
    return out


def recall_at_k(ranking: Sequence[str], gold: set[str], k: int) -> float:
    """Share of the gold documents found in the first `k` results."""
    if not gold:
        raise ValueError("a query needs at least one gold document id")
    return len(gold.intersection(ranking[:k])) / len(gold)


def reciprocal_rank(ranking: Sequence[str], gold: set[str], depth: int = RANK_DEPTH) -> float:
    """1 / rank of the first gold document within `depth`, else 0."""
    for rank, doc_id in enumerate(ranking[:depth], 1):
        if doc_id in gold:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranking: Sequence[str], gold: set[str], k: int = RANK_DEPTH) -> float:
    """Normalised discounted cumulative gain with binary gains and the log2(rank + 1) discount."""
    dcg = sum(1.0 / math.log2(rank + 1) for rank, doc_id in enumerate(ranking[:k], 1) if doc_id in gold)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(gold), k) + 1))
    return dcg / ideal


def ranking_metrics(rankings: Sequence[Sequence[str]], golds: Sequence[set[str]],
                    ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Mean recall@k for each k, MRR@10 and nDCG@10 over queries."""
    if len(rankings) != len(golds):
        raise ValueError(f"{len(rankings)} rankings but {len(golds)} gold sets; pass one of each per query")
    if not rankings:
        raise ValueError("no queries to score")
    n = len(rankings)
    out = {f"recall@{k}": sum(recall_at_k(r, g, k) for r, g in zip(rankings, golds, strict=True)) / n
           for k in ks}
    out["mrr"] = sum(reciprocal_rank(r, g) for r, g in zip(rankings, golds, strict=True)) / n
    out["ndcg@10"] = sum(ndcg_at_k(r, g) for r, g in zip(rankings, golds, strict=True)) / n
    return out


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("accuracy needs one prediction per label and at least one label")
    return sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(labels)


def macro_f1(predictions: Sequence[str], labels: Sequence[str], classes: Sequence[str]) -> float:
    """Unweighted mean of per-class F1; a class never predicted nor present scores 0, as in scikit-learn."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError("macro-F1 needs one prediction per label and at least one label")
    scores = []
    for cls in classes:
        tp = sum(p == cls and t == cls for p, t in zip(predictions, labels, strict=True))
        fp = sum(p == cls and t != cls for p, t in zip(predictions, labels, strict=True))
        fn = sum(p != cls and t == cls for p, t in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def majority_class(labels: Iterable[str]) -> str:
    """The most frequent label; ties go to the label seen first."""
    counts = Counter(labels)
    if not counts:
        raise ValueError("no labels to take a majority of")
    return counts.most_common(1)[0][0]
