"""Guideline-based recommendations: index passages retrieved for the stay's diagnoses, quoted with citations.

The recommendation text is quoted from the guideline chunk (its sentence closest to the diagnosis),
never generated, so each line states exactly what the cited source states. A diagnosis whose best hit
does not pass the relevance gate yields nothing; a stay with no relevant hit gets no recommendations.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from assistant.answer.citations import split_sentences
from assistant.drafting.stay import Fact, Stay, strip_semantic_tag
from assistant.retrieval import Hit, Retriever, passes_relevance_gate

MAX_QUERIES = 8
MAX_RECOMMENDATIONS = 5
# so that one well-covered diagnosis cannot take every slot
MAX_PER_DIAGNOSIS = 2
HITS_PER_QUERY = 3


@dataclass
class Recommendations:
    """Quoted recommendations, the citations they point to, and why there are none when empty."""

    items: list[dict[str, Any]] = field(default_factory=list)
    citations: list[dict[str, Any]] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = 0.0


def diagnosis_queries(stay: Stay) -> list[tuple[str, Fact]]:
    """Build retrieval queries: reasons for admission, diagnoses recorded in the stay, then the rest."""
    recorded = [f for f in stay.diagnoses if (f.detail or "").startswith("recorded")]
    ordered = [*stay.reasons, *recorded, *[f for f in stay.diagnoses if f not in recorded]]
    queries: dict[str, Fact] = {}
    for fact in ordered:
        text = "".join(ch for ch in strip_semantic_tag(fact.text) if unicodedata.category(ch) != "Cc")[
            :300
        ].strip()
        if text and text.casefold() not in {q.casefold() for q in queries}:
            queries[text] = fact
    return list(queries.items())[:MAX_QUERIES]


def recommend_many(
    stays: list[Stay], retriever: Retriever | None, min_relevance: float, embed: Any
) -> list[Recommendations]:
    """Retrieve for every stay of a batch in one search call, then pick and quote per stay."""
    if retriever is None:
        return [
            Recommendations(
                flags=[
                    {
                        "type": "no_index",
                        "detail": "no guideline index was available, so no "
                        "recommendations were looked up; build one with `bedside index rebuild`",
                    }
                ]
            )
            for _ in stays
        ]
    per_stay = [diagnosis_queries(stay) for stay in stays]
    flat = [query for queries in per_stay for query, _ in queries]
    results = retriever.search_many(flat, top_k=HITS_PER_QUERY) if flat else []

    out = []
    position = 0
    for queries in per_stay:
        hits_per_query = results[position : position + len(queries)]
        position += len(queries)
        out.append(_pick(queries, hits_per_query, min_relevance, embed))
    return out


def _pick(
    queries: list[tuple[str, Fact]], hits_per_query: list[list[Hit]], min_relevance: float, embed: Any
) -> Recommendations:
    result = Recommendations()
    best: dict[str, tuple[Hit, str, Fact]] = {}
    for (query, fact), hits in zip(queries, hits_per_query, strict=True):
        result.best_score = max([result.best_score, *(h.dense_score for h in hits)])
        if not passes_relevance_gate(hits, min_relevance):
            continue
        for hit in hits:
            # a chunk without a quotable sentence (a bare table, a heading) cannot be quoted as advice
            if hit.dense_score < min_relevance or not _quotable(hit.text):
                continue
            if hit.chunk_id not in best or hit.dense_score > best[hit.chunk_id][0].dense_score:
                best[hit.chunk_id] = (hit, query, fact)
    if not best:
        result.flags.append(
            {
                "type": "no_recommendations",
                "detail": (
                    f"no quotable indexed guideline passed the relevance gate for the diagnoses (best "
                    f"similarity {result.best_score:.2f}, gate {min_relevance:.2f})"
                ),
            }
        )
        return result

    ranked = sorted(best.values(), key=lambda item: (-item[0].dense_score, item[0].chunk_id))
    per_query: dict[str, int] = {}
    chosen = []
    for hit, query, fact in ranked:
        if per_query.get(query, 0) < MAX_PER_DIAGNOSIS and len(chosen) < MAX_RECOMMENDATIONS:
            per_query[query] = per_query.get(query, 0) + 1
            chosen.append((hit, query, fact))
    quotes = _closest_sentences([(hit.text, query) for hit, query, _ in chosen], embed)
    for marker, ((hit, query, fact), quote) in enumerate(zip(chosen, quotes, strict=True), 1):
        result.items.append(
            {
                "marker": marker,
                "for": query,
                "diagnosis_sources": list(fact.sources),
                "text": quote,
                "score": round(hit.dense_score, 4),
            }
        )
        result.citations.append(
            {
                "marker": marker,
                "chunk_id": hit.chunk_id,
                "doc_id": hit.doc_id,
                "title": hit.title,
                "source": hit.source,
                "section": hit.section,
                "page": hit.page,
                "date": hit.date,
                "issuer": hit.issuer,
                "version": hit.version,
                "score": round(hit.dense_score, 4),
                "text": hit.text,
            }
        )
    return result


def _quotable(text: str) -> list[str]:
    """Return the sentences of a chunk worth quoting: no headings, table rows or fragments."""
    sentences = []
    for line in text.splitlines():
        if line.lstrip().startswith(("#", "|")):
            continue
        # a list item is quoted without its bullet
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", line)
        sentences += [s for s in split_sentences(line) if len(s.split()) >= 4]
    return sentences


def _closest_sentences(pairs: list[tuple[str, str]], embed: Any) -> list[str]:
    """For each (chunk text, query), the chunk sentence closest to the query, all embedded in one call.

    Every chunk passed in has at least one quotable sentence (`_pick` drops the others).
    """
    candidates = [_quotable(text) for text, _ in pairs]
    texts = [query for _, query in pairs] + [s for sentences in candidates for s in sentences]
    vectors = embed(texts) if texts else np.zeros((0, 0), dtype=np.float32)
    quotes, offset = [], len(pairs)
    for row, sentences in enumerate(candidates):
        scores = vectors[offset : offset + len(sentences)] @ vectors[row]
        quotes.append(sentences[int(np.argmax(scores))])
        offset += len(sentences)
    return quotes
