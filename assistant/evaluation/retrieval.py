"""Retrieval evaluation: build (or reuse) an index of a dataset's passages, then score each mode.

Hits are chunks, but gold ids name documents, so each ranking keeps a document's first chunk only
(`metrics.dedupe`). Enough chunks are fetched that the deduplicated list almost always reaches the
10 documents that recall@10, MRR and nDCG@10 look at.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from assistant.corpus.document import Document
from assistant.corpus.text import markdown_table
from assistant.evaluation.datasets import RetrievalQuery
from assistant.evaluation.metrics import RANK_DEPTH, dedupe, ranking_metrics
from assistant.retrieval import Retriever

logger = logging.getLogger(__name__)

MODES = ("dense", "bm25", "hybrid")
CHUNK_DEPTH = 50


def index_key(documents: list[Document], embedder_fingerprint: str, settings: Settings) -> str:
    """A short hash naming the passages, embedder and chunking an evaluation index is built from."""
    digest = hashlib.sha256(embedder_fingerprint.encode())
    digest.update(f"{settings.chunk_tokens}/{settings.chunk_overlap}".encode())
    for document in documents:
        digest.update(document.doc_id.encode() + b"\x00" + document.content_hash.encode())
    return digest.hexdigest()[:16]


def open_eval_index(documents: list[Document], root: Path, settings: Settings, progress: bool = False) -> Retriever:
    """Open a retriever over `documents`, rebuilding the index in `root` only when they changed.

    The index is an ordinary versioned store, so a rebuild after a small change re-embeds only the
    changed documents.
    """
    from assistant import models
    from assistant.answer.pipeline import embedder_info
    from assistant.chunking import Chunker
    from assistant.indexing import IndexStore

    embedder_path = models.resolve_embedder(settings.embedder)
    embedder = models.load_embedder(embedder_path, settings.device)
    info = embedder_info(settings.embedder, embedder_path, embedder)
    store = IndexStore(root)
    wanted = {d.doc_id: d.content_hash for d in documents}
    current = None
    if store.current_version():
        manifest = store.read_manifest()
        same = (manifest["embedder"] == info.to_dict()
                and {k: v["content_hash"] for k, v in manifest["documents"].items()} == wanted
                and manifest["chunking"].get("chunk_tokens") == settings.chunk_tokens
                and manifest["chunking"].get("chunk_overlap") == settings.chunk_overlap)
        current = manifest["version"] if same else None
    if current is None:
        chunker = Chunker(embedder.tokenizer, settings.chunk_tokens, settings.chunk_overlap, embedder.max_seq_length)
        summary = store.rebuild(documents, chunker, embedder, info, settings.to_dict(), progress=progress)
        logger.info("evaluation index: %s", summary.line())
    else:
        logger.info("evaluation index %s in %s is up to date", current, root)
    return Retriever(store.open(info), embedder)


def evaluate_retrieval(retriever: Retriever, queries: list[RetrievalQuery], modes: tuple[str, ...] = MODES,
                       chunk_depth: int = CHUNK_DEPTH) -> dict[str, Any]:
    """Score each retrieval mode on `queries`; returns metrics per mode and each query's ranking."""
    texts = [q.query for q in queries]
    golds = [q.gold for q in queries]
    results: dict[str, Any] = {"queries": len(queries), "chunk_depth": chunk_depth, "modes": {}}
    per_query: list[dict[str, Any]] = [{"query": q.query, "gold": sorted(q.gold)} for q in queries]
    for mode in modes:
        start = time.perf_counter()
        hits = retriever.search_many(texts, top_k=chunk_depth, mode=mode)
        seconds = time.perf_counter() - start
        rankings = [dedupe(h.doc_id for h in query_hits)[:RANK_DEPTH] for query_hits in hits]
        metrics = ranking_metrics(rankings, golds)
        metrics["seconds"] = round(seconds, 3)
        metrics["ms_per_query"] = round(1000 * seconds / len(queries), 2)
        results["modes"][mode] = metrics
        for row, ranking in zip(per_query, rankings, strict=True):
            row[mode] = ranking
        logger.info("retrieval %s: %s", mode, {k: round(v, 4) for k, v in metrics.items()})
    results["per_query"] = per_query
    return results


def retrieval_table(results: dict[str, Any]) -> str:
    """A Markdown table with one row per mode."""
    columns = ["recall@1", "recall@5", "recall@10", "mrr", "ndcg@10", "ms_per_query"]
    rows = [["mode", *columns]]
    for mode, metrics in results["modes"].items():
        rows.append([mode] + [f"{metrics[c]:.3f}" if c != "ms_per_query" else f"{metrics[c]:.1f}" for c in columns])
    return markdown_table(rows)
