"""BM25 over chunk text with bm25s: English stopwords and the Snowball English stemmer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_stemmer: Any = None


def _get_stemmer() -> Any:
    global _stemmer
    if _stemmer is None:
        import Stemmer

        _stemmer = Stemmer.Stemmer("english")
    return _stemmer


def _bm25s() -> Any:
    import bm25s

    # bm25s sets its own logger to DEBUG on import, which would print a line per index build
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def bm25_tokenize(texts: list[str]) -> list[list[str]]:
    bm25s = _bm25s()
    return bm25s.tokenize(texts, stopwords="en", stemmer=_get_stemmer(), return_ids=False,
                          show_progress=False)


def save_bm25(folder: Path, tokens: list[list[str]]) -> None:
    bm25s = _bm25s()
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    retriever.save(str(folder), allow_pickle=False, show_progress=False)


def load_bm25(folder: Path) -> Any:
    bm25s = _bm25s()
    return bm25s.BM25.load(str(folder), allow_pickle=False, show_progress=False, verbosity=0)


def bm25_search(retriever: Any, query: str, k: int,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (row indices, scores) of the top `k` rows, best first; rows with zero score are dropped.

    The top k are selected among the rows that score above zero. bm25s's own `retrieve` (0.3.16)
    partitions the whole score array, mostly zeros: at 100k generated chunks it took 16 ms per query
    against 0.2 ms here, with the same scores (one thread on a loaded 2-core machine; the corpus of
    benchmarks/retrieval_scale.py). Equal scores are ordered by row, so results repeat.
    """
    if retriever is None:
        return np.array([], dtype=np.int64), np.array([], dtype=np.float32)
    tokens = [t for t in bm25_tokenize([query])[0] if t in retriever.vocab_dict]
    if not tokens or k < 1:
        return np.array([], dtype=np.int64), np.array([], dtype=np.float32)
    scores = retriever.get_scores(tokens, weight_mask=mask)
    rows = np.flatnonzero(scores > 0)
    if len(rows) > k:
        rows = rows[np.argpartition(-scores[rows], k - 1)[:k]]
    rows = rows[np.lexsort((rows, -scores[rows]))]
    return rows.astype(np.int64), scores[rows].astype(np.float32)
