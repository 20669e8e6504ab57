"""Hybrid retrieval: dense (FAISS) and BM25 candidates fused, filtered, and gated for relevance.

Every search returns one shape: hits sorted by score, each carrying the chunk id, its scores and
the metadata a citation needs. `docs/benchmarks.md` records how the fusion defaults were chosen.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from assistant.chunking import Chunk
from assistant.errors import BedsideError, CorpusError
from assistant.indexing.lexical import bm25_search, bm25_tokenize
from assistant.indexing.store import LoadedIndex, embed_texts

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 4000
SEARCH_MODES = ("hybrid", "dense", "bm25")


@dataclass
class Hit:
    """One retrieved chunk. `score` ranks the hits; `dense_score` is the exact cosine similarity."""

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


def normalize_since(since: str | None) -> str | None:
    """Return `since` as an ISO date (YYYY-MM-DD), or raise naming the value and the expected form."""
    if since is None or since == "":
        return None
    from assistant.corpus.text import normalize_date

    try:
        return normalize_date(since, "since")
    except CorpusError as err:
        raise BedsideError(f"since date {since!r} is invalid; write it as YYYY-MM-DD") from err


# fusion: each function maps (dense scores, BM25 scores, retriever) to one score per chunk

def _min_max(scores: dict[int, float]) -> dict[int, float]:
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    if high - low < 1e-9:
        return {i: 1.0 for i in scores}
    return {i: (s - low) / (high - low) for i, s in scores.items()}


def _ranked(scores: dict[int, float]) -> list[int]:
    # ties broken by chunk id, so equal scores give the same order on every run
    return sorted(scores, key=lambda i: (-scores[i], i))


def weighted_fusion(dense: dict[int, float], lexical: dict[int, float],
                    retriever: Retriever) -> dict[int, float]:
    """Convex combination of min-max normalised scores; a chunk missing from one list scores 0 there."""
    dense_norm, lexical_norm = _min_max(dense), _min_max(lexical)
    weight = retriever.dense_weight
    return {i: weight * dense_norm.get(i, 0.0) + (1 - weight) * lexical_norm.get(i, 0.0)
            for i in dense.keys() | lexical.keys()}


def rrf_fusion(dense: dict[int, float], lexical: dict[int, float], retriever: Retriever) -> dict[int, float]:
    """Reciprocal rank fusion: sum of 1 / (rrf_k + rank) over the two rankings."""
    fused: dict[int, float] = {}
    for ranking in (dense, lexical):
        for rank, chunk in enumerate(_ranked(ranking), 1):
            fused[chunk] = fused.get(chunk, 0.0) + 1.0 / (retriever.rrf_k + rank)
    return fused


FUSIONS: dict[str, Callable[[dict[int, float], dict[int, float], Retriever], dict[int, float]]] = {
    "weighted": weighted_fusion,
    "rrf": rrf_fusion,
}


class TermCache:
    """Stemmed content words per text, tokenized as BM25 does so query and header words match alike.

    Titles and section labels repeat across chunks and queries, so each distinct text is
    tokenized once, and all new texts of a query in one call (a bm25s call has a fixed cost of
    about a millisecond).
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self.terms: dict[str, frozenset[str]] = {}

    def lookup(self, texts: Iterable[str]) -> dict[str, frozenset[str]]:
        wanted = set(texts)
        missing = [t for t in wanted if t not in self.terms]
        if missing:
            if len(self.terms) + len(missing) > self.max_entries:
                self.terms.clear()
            self.terms.update(zip(missing, map(frozenset, bm25_tokenize(missing)), strict=True))
        return {t: self.terms[t] for t in wanted}


def header_matches(title_terms: frozenset[str], section_terms: frozenset[str],
                   query_terms: frozenset[str]) -> tuple[bool, bool]:
    """Test whether the query contains every content word of a chunk's title, and then of its section.

    The section counts only together with the title, so a query naming "treatment" lifts the
    treatment section of the document it names, not every document's treatment section.
    """
    if not title_terms or not title_terms <= query_terms:
        return False, False
    return True, bool(section_terms) and section_terms <= query_terms


class Retriever:
    """Dense + BM25 retrieval over one loaded index.

    Hybrid search takes the `candidates` best chunks of each method and fuses their scores:
    "weighted" (the default) mixes min-max normalised scores with `dense_weight`, and "rrf" sums
    reciprocal ranks with `rrf_k`. It then adds `title_boost` to chunks whose document title has
    every content word in the query, and `section_boost` when their section label does too. A
    question that names its subject and aspect ("What are the treatments for gout?") thereby
    prefers the treatment section of the gout document over near-duplicates about a neighbouring
    disease or another aspect of gout. The boosts are sized for weighted fusion, whose scores lie
    in [0, 1]. With "rrf" they outweigh the fused score, so pass 0 unless that is intended.
    docs/benchmarks.md has the measurements behind the defaults.

    When the index contains several versions of one guideline (same title and issuer, another date
    or version), only the newest version's chunks are searched (`prefer_newest`).
    """

    def __init__(self, index: LoadedIndex, embedder: Any, fusion: str = "weighted", dense_weight: float = 0.6,
                 candidates: int = 100, rrf_k: int = 60, title_boost: float = 0.3, section_boost: float = 0.4,
                 prefer_newest: bool = True) -> None:
        if fusion not in FUSIONS:
            raise BedsideError(f"fusion {fusion!r} is invalid; use one of {', '.join(FUSIONS)}")
        if not 0.0 <= dense_weight <= 1.0:
            raise BedsideError(f"dense_weight {dense_weight} is invalid; use a number from 0 to 1")
        if candidates < 1 or rrf_k < 1:
            raise BedsideError(
                f"candidates ({candidates}) and rrf_k ({rrf_k}) are invalid; use whole numbers of at least 1"
            )
        if title_boost < 0 or section_boost < 0:
            raise BedsideError(
                f"title_boost ({title_boost}) and section_boost ({section_boost}) are invalid; use 0 or more"
            )
        self.index = index
        self.embedder = embedder
        self.fusion = fusion
        self.dense_weight = dense_weight
        self.candidates = candidates
        self.rrf_k = rrf_k
        self.title_boost = title_boost
        self.section_boost = section_boost
        self.superseded = superseded_chunk_ids(index) if prefer_newest else np.array([], dtype=np.int64)
        self.term_cache = TermCache()

    def search(self, query: str, top_k: int = 5, since: str | None = None, specialty: str | None = None,
               mode: str = "hybrid") -> list[Hit]:
        """Return the `top_k` best chunks for `query`, best first."""
        return self.search_many([query], top_k, since, specialty, mode)[0]

    def search_many(self, queries: list[str], top_k: int = 5, since: str | None = None,
                    specialty: str | None = None, mode: str = "hybrid") -> list[list[Hit]]:
        """Return the `top_k` best chunks for each query; the queries are embedded in one batch.

        `since` (YYYY-MM-DD) keeps chunks dated on or after it, so undated chunks are dropped;
        `specialty` keeps chunks of that specialty. `mode` is hybrid, dense or bm25.
        """
        if mode not in SEARCH_MODES:
            raise BedsideError(f"search mode {mode!r} is invalid; use {', '.join(SEARCH_MODES)}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise BedsideError(f"top_k {top_k!r} is invalid; use a whole number of at least 1")
        queries = [validate_query(q) for q in queries]
        since = normalize_since(since)
        if self.index.size == 0:
            return [[] for _ in queries]
        if specialty and specialty not in self.index.specialties():
            raise BedsideError(
                f"specialty {specialty!r} is not in the index; indexed specialties: "
                f"{', '.join(self.index.specialties()) or 'none'}"
            )

        # one filter for the whole batch: chunks passing since/specialty, minus superseded versions
        allowed = self.index.filtered_int_ids(since, specialty) if (since or specialty) else None
        if allowed is not None and len(self.superseded):
            allowed = np.setdiff1d(allowed, self.superseded)
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in queries]
        dense_params = self._faiss_params(allowed)
        lexical_mask = self._bm25_mask(allowed)

        query_vectors = embed_texts(self.embedder, queries)
        pool = max(self.candidates, top_k)
        no_pools: list[dict[int, float]] = [{} for _ in queries]
        dense_pools = self._dense(query_vectors, pool, dense_params) if mode != "bm25" else no_pools
        results = []
        for query, vector, dense in zip(queries, query_vectors, dense_pools, strict=True):
            lexical = self._lexical(query, pool, lexical_mask) if mode != "dense" else {}
            scores = FUSIONS[self.fusion](dense, lexical, self) if mode == "hybrid" else (dense or lexical)
            chunks: dict[int, Chunk] = {}
            if mode == "hybrid" and (self.title_boost or self.section_boost):
                # the header boosts need every candidate's title and section, not only the top_k
                chunks = self.index.chunks_by_int_id(list(scores))
                scores = self._boost_headers(query, scores, chunks)
            ranked = _ranked(scores)[:top_k]
            chunks = chunks or self.index.chunks_by_int_id(ranked)
            results.append(self._hits(ranked, scores, chunks, vector, lexical))
        return results

    def _faiss_params(self, allowed: np.ndarray | None) -> Any:
        import faiss

        if allowed is not None:
            return faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        if len(self.superseded):
            return faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(self.superseded)))
        return None

    def _bm25_mask(self, allowed: np.ndarray | None) -> np.ndarray | None:
        if allowed is not None:
            return np.isin(self.index.bm25_ids, allowed).astype(np.float32)
        if len(self.superseded):
            return (~np.isin(self.index.bm25_ids, self.superseded)).astype(np.float32)
        return None

    def _dense(self, vectors: np.ndarray, k: int, params: Any) -> list[dict[int, float]]:
        # One FAISS call for the whole batch: per-query calls pay FAISS's thread start-up each time,
        # which dominated search time on a busy 2-core machine.
        k = min(k, self.index.size)
        scores, ids = self.index.faiss_index.search(vectors, k, params=params)
        return [{int(i): float(s) for i, s in zip(row_ids, row_scores, strict=True) if i != -1}
                for row_ids, row_scores in zip(ids, scores, strict=True)]

    def _lexical(self, query: str, k: int, mask: np.ndarray | None) -> dict[int, float]:
        if self.index.bm25 is None:
            return {}
        rows, scores = bm25_search(self.index.bm25, query, k, mask)
        return {int(self.index.bm25_ids[r]): float(s) for r, s in zip(rows, scores, strict=True)}

    def _boost_headers(self, query: str, scores: dict[int, float],
                       chunks: dict[int, Chunk]) -> dict[int, float]:
        terms = self.term_cache.lookup([query, *(c.title or "" for c in chunks.values()),
                                        *(c.section or "" for c in chunks.values())])
        query_terms = terms[query]
        boosted = {}
        for int_id, score in scores.items():
            chunk = chunks[int_id]
            title_match, section_match = header_matches(terms[chunk.title or ""], terms[chunk.section or ""],
                                                         query_terms)
            boosted[int_id] = score + self.title_boost * title_match + self.section_boost * section_match
        return boosted

    def _hits(self, ranked: list[int], scores: dict[int, float], chunks: dict[int, Chunk], vector: np.ndarray,
              lexical: dict[int, float]) -> list[Hit]:
        # exact cosine for every hit, also those BM25 alone found, so the relevance gate can use it
        exact = self.index.vectors_of(ranked) @ vector if ranked else np.array([])
        hits = []
        for row, int_id in enumerate(ranked):
            chunk = chunks[int_id]
            hits.append(Hit(
                chunk_id=chunk.chunk_id, doc_id=chunk.doc_id, score=round(scores[int_id], 6),
                title=chunk.title, source=chunk.source, text=chunk.text, section=chunk.section,
                page=chunk.page, date=chunk.date, specialty=chunk.specialty, issuer=chunk.issuer,
                version=chunk.version, dense_score=round(float(exact[row]), 6),
                bm25_score=round(lexical.get(int_id, 0.0), 6),
            ))
        return hits


# versions

def _version_key(version: str) -> tuple:
    """Natural order for version strings, so "10" sorts after "9" and "2.10" after "2.9"."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.casefold())
                 for part in re.findall(r"\d+|\D+", version))


def _stamp(document: dict[str, Any]) -> tuple:
    # undated sorts before any date, and an unversioned document before any version
    return (document.get("date") or "", _version_key(str(document.get("version") or "")))


def superseded_chunk_ids(index: LoadedIndex) -> np.ndarray:
    """Chunk ids of documents that a newer version of the same guideline (title and issuer) replaces.

    The newer version has the later date, then the higher version. Documents with equal stamps
    (many MedQuAD answers share a title and have neither) are all kept.
    """
    by_title: dict[str, list[str]] = defaultdict(list)
    documents: dict[str, dict[str, Any]] = index.manifest.get("documents", {})
    for doc_id, document in documents.items():
        by_title[str(document.get("title") or "").casefold()].append(doc_id)

    superseded: list[str] = []
    for doc_ids in by_title.values():
        if len({_stamp(documents[d]) for d in doc_ids}) < 2:
            continue
        # the manifest has no issuer, so read it from each document's chunks
        issuers = {chunk.doc_id: chunk.issuer for chunk in index.chunks_of_documents(doc_ids)}
        by_issuer: dict[str | None, list[str]] = defaultdict(list)
        for doc_id in doc_ids:
            by_issuer[issuers.get(doc_id)].append(doc_id)
        for versions in by_issuer.values():
            newest = max(_stamp(documents[d]) for d in versions)
            superseded += [d for d in versions if _stamp(documents[d]) < newest]
    if not superseded:
        return np.array([], dtype=np.int64)
    logger.info("%d superseded guideline version(s) excluded from search: %s", len(superseded),
                ", ".join(sorted(superseded)[:5]) + (" ..." if len(superseded) > 5 else ""))
    return np.array(sorted(c.int_id for c in index.chunks_of_documents(superseded)), dtype=np.int64)


def passes_relevance_gate(hits: list[Hit], min_relevance: float) -> bool:
    """True when the best hit's cosine similarity to the question reaches `min_relevance`."""
    return bool(hits) and max(h.dense_score for h in hits) >= min_relevance
