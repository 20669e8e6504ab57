"""Hybrid retrieval: dense (FAISS) and BM25 candidates fused, filtered, and gated for relevance.

Every search returns one shape: hits sorted by fused score, each carrying the chunk id, its scores
and the metadata a citation needs.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from assistant.errors import BedsideError
from assistant.indexing.lexical import bm25_search
from assistant.indexing.store import LoadedIndex, embed_texts

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 4000
RRF_K = 60


@dataclass
class Hit:
    """One retrieved chunk. `score` is the fused score; `dense_score` is the exact cosine similarity."""

    chunk_id: str
    doc_id: str
    score: float
    title: str
    source: str
    text: str
    section: str | None = None
    page: int | None = None
    date: str | None = None
    specialty: str | None = None
    issuer: str | None = None
    version: str | None = None
    dense_score: float = 0.0
    bm25_score: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_query(query: str) -> str:
    """Return the stripped query, or raise naming what is wrong with it and the fix."""
    if not isinstance(query, str) or not query.strip():
        raise BedsideError("the query is empty; type a question or search terms")
    if len(query) > MAX_QUERY_CHARS:
        raise BedsideError(
            f"the query is {len(query):,} characters long; the limit is {MAX_QUERY_CHARS:,}. "
            "Shorten it to the question itself"
        )
    for position, char in enumerate(query):
        if unicodedata.category(char) == "Cc" and char not in "\n\t\r":
            raise BedsideError(
                f"the query contains control character U+{ord(char):04X} at position {position}; remove it"
            )
    return query.strip()


class Retriever:
    """Dense + BM25 retrieval over one loaded index.

    `fusion` is "weighted" (a convex combination of min-max normalised scores, the default because it
    kept dense recall on PubMedQA and beat both sources on MedQuAD) or "rrf" (reciprocal rank fusion).
    """

    def __init__(self, index: LoadedIndex, embedder: Any, fusion: str = "weighted", dense_weight: float = 0.7,
                 candidates: int = 50) -> None:
        if fusion not in FUSIONS:
            raise BedsideError(f"fusion {fusion!r} is invalid; use one of {', '.join(FUSIONS)}")
        self.index = index
        self.embedder = embedder
        self.fusion = fusion
        self.dense_weight = dense_weight
        self.candidates = candidates

    def search(self, query: str, top_k: int = 5, since: str | None = None, specialty: str | None = None,
               mode: str = "hybrid") -> list[Hit]:
        return self.search_many([query], top_k, since, specialty, mode)[0]

    def search_many(self, queries: list[str], top_k: int = 5, since: str | None = None,
                    specialty: str | None = None, mode: str = "hybrid") -> list[list[Hit]]:
        if mode not in {"hybrid", "dense", "bm25"}:
            raise BedsideError(f"search mode {mode!r} is invalid; use hybrid, dense or bm25")
        if top_k < 1:
            raise BedsideError(f"top_k {top_k} is invalid; use a whole number of at least 1")
        queries = [validate_query(q) for q in queries]
        if self.index.size == 0:
            return [[] for _ in queries]
        if specialty and specialty not in self.index.specialties():
            raise BedsideError(
                f"specialty {specialty!r} is not in the index; indexed specialties: "
                f"{', '.join(self.index.specialties()) or 'none'}"
            )
        allowed = self.index.filtered_int_ids(since, specialty) if (since or specialty) else None
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in queries]

        query_vectors = embed_texts(self.embedder, queries)
        n_candidates = max(self.candidates, top_k * 4)
        results = []
        for query, vector in zip(queries, query_vectors, strict=True):
            dense = self._dense(vector, n_candidates, allowed) if mode != "bm25" else {}
            lexical = self._lexical(query, n_candidates, allowed) if mode != "dense" else {}
            fused = FUSIONS[self.fusion](self, dense, lexical) if mode == "hybrid" else (dense or lexical)
            results.append(self._hits(fused, vector, dense, lexical, top_k))
        return results

    def _dense(self, vector: np.ndarray, k: int, allowed: np.ndarray | None) -> dict[int, float]:
        import faiss

        params = None
        if allowed is not None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        k = min(k, self.index.size)
        scores, ids = self.index.faiss_index.search(vector[None, :], k, params=params)
        return {int(i): float(s) for i, s in zip(ids[0], scores[0], strict=True) if i != -1}

    def _lexical(self, query: str, k: int, allowed: np.ndarray | None) -> dict[int, float]:
        if self.index.bm25 is None:
            return {}
        mask = np.isin(self.index.bm25_ids, allowed).astype(np.float32) if allowed is not None else None
        rows, scores = bm25_search(self.index.bm25, query, k, mask)
        return {int(self.index.bm25_ids[r]): float(s) for r, s in zip(rows, scores, strict=True)}

    def _weighted(self, dense: dict[int, float], lexical: dict[int, float]) -> dict[int, float]:
        dense_norm, lexical_norm = _min_max(dense), _min_max(lexical)
        weight = self.dense_weight
        return {i: weight * dense_norm.get(i, 0.0) + (1 - weight) * lexical_norm.get(i, 0.0)
                for i in set(dense) | set(lexical)}

    def _rrf(self, dense: dict[int, float], lexical: dict[int, float]) -> dict[int, float]:
        fused: dict[int, float] = {}
        for ranking in (dense, lexical):
            for rank, chunk in enumerate(sorted(ranking, key=ranking.get, reverse=True), 1):
                fused[chunk] = fused.get(chunk, 0.0) + 1.0 / (RRF_K + rank)
        return fused

    def _hits(self, fused: dict[int, float], vector: np.ndarray, dense: dict[int, float],
              lexical: dict[int, float], top_k: int) -> list[Hit]:
        # rank a few extra, since preferring the newest version of a guideline can drop hits
        ranked = sorted(fused, key=lambda i: (-fused[i], i))[: top_k * 3]
        chunks = self.index.chunks_by_int_id(ranked)
        exact = self.index.vectors_of(ranked) @ vector if ranked else np.array([])
        hits = []
        for row, int_id in enumerate(ranked):
            chunk = chunks[int_id]
            hits.append(Hit(
                chunk_id=chunk.chunk_id, doc_id=chunk.doc_id, score=round(fused[int_id], 6), title=chunk.title,
                source=chunk.source, text=chunk.text, section=chunk.section, page=chunk.page, date=chunk.date,
                specialty=chunk.specialty, issuer=chunk.issuer, version=chunk.version,
                dense_score=round(float(exact[row]), 6), bm25_score=round(lexical.get(int_id, 0.0), 6),
            ))
        return prefer_newest(hits)[:top_k]


FUSIONS = {"weighted": Retriever._weighted, "rrf": Retriever._rrf}


def _min_max(scores: dict[int, float]) -> dict[int, float]:
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    if high - low < 1e-9:
        return {i: 1.0 for i in scores}
    return {i: (s - low) / (high - low) for i, s in scores.items()}


def prefer_newest(hits: list[Hit]) -> list[Hit]:
    """Drop hits from older versions of a guideline when a newer version of it is also retrieved.

    Two documents are versions of one guideline when they share title and issuer but differ in
    (date, version); the newer has the later date, then the higher version string. Documents with
    equal stamps (MedQuAD answers about one disease) are all kept.
    """
    newest: dict[tuple[str, str | None], tuple[str, str]] = {}
    for hit in hits:
        key = (hit.title.casefold(), hit.issuer)
        stamp = (hit.date or "", hit.version or "")
        if key not in newest or stamp > newest[key]:
            newest[key] = stamp
    return [h for h in hits if newest[(h.title.casefold(), h.issuer)] == (h.date or "", h.version or "")]


def passes_relevance_gate(hits: list[Hit], min_relevance: float) -> bool:
    """True when the best hit's cosine similarity to the question reaches `min_relevance`."""
    return bool(hits) and max(h.dense_score for h in hits) >= min_relevance
