"""Versioned index store: FAISS + BM25 + chunk metadata + manifest, switched in atomically."""

from assistant.indexing.store import BuildSummary, IndexStore, LoadedIndex

__all__ = ["BuildSummary", "IndexStore", "LoadedIndex"]
