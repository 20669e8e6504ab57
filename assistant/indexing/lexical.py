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
    return bm25s.tokenize(texts, stopwords="en", stemmer=_get_stemmer(), return_ids=False, show_progress=False)


def save_bm25(folder: Path, tokens: list[list[str]]) -> None:
    bm25s = _bm25s()
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    retriever.save(str(folder), allow_pickle=False, show_progress=False)


def load_bm25(folder: Path) -> Any:
    bm25s = _bm25s()
    return bm25s.BM25.load(str(folder), allow_pickle=False, show_progress=False, verbosity=0)


def bm25_search(retriever: Any, query: str, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (row indices, scores) of the top `k` rows; rows with zero score are dropped."""
    if retriever is None:
        return np.array([], dtype=np.int64), np.array([], dtype=np.float32)
    tokens = [t for t in bm25_tokenize([query])[0] if t in retriever.vocab_dict]
    if not tokens:
        return np.array([], dtype=np.int64), np.array([], dtype=np.float32)
    n_rows = retriever.scores["num_docs"]
    k = min(k, n_rows)
    rows, scores = retriever.retrieve([tokens], k=k, show_progress=False, weight_mask=mask, n_threads=0)
    rows, scores = rows[0], scores[0]
    keep = scores > 0
    return rows[keep].astype(np.int64), scores[keep].astype(np.float32)
