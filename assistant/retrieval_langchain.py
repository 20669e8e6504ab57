"""bedside's hybrid retriever as a LangChain `BaseRetriever`, for chains and agents built on LangChain.

Each hit becomes a `Document` whose `page_content` is the chunk text, whose `id` is the chunk id and
whose metadata carries every other field of the hit (doc_id, score, title, source, page, section,
date, specialty, issuer, version, dense_score, bm25_score).
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from assistant.retrieval import Hit, Retriever


def hit_to_document(hit: Hit) -> Document:
    """Convert one hit to a LangChain `Document`: chunk text as content, the other fields as metadata."""
    metadata = hit.to_dict()
    text = metadata.pop("text")
    return Document(page_content=text, metadata=metadata, id=hit.chunk_id)


class BedsideRetriever(BaseRetriever):
    """Hybrid (dense + BM25) search over a loaded bedside index.

    `k`, `since`, `specialty` and `mode` set the defaults; `invoke(query, k=3, since="2024-01-01")`
    overrides any of them for one call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Retriever = Field(description="the bedside retriever over one loaded index")
    k: int = Field(default=5, ge=1, description="number of chunks returned per query")
    since: str | None = Field(default=None, description="only chunks dated on or after this ISO date")
    specialty: str | None = Field(default=None, description="only chunks of this specialty")
    mode: str = Field(default="hybrid", description="hybrid, dense or bm25")

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        unknown = set(kwargs) - {"k", "since", "specialty", "mode"}
        if unknown:
            raise TypeError(
                f"unexpected search argument(s) {sorted(unknown)}; use k, since, specialty or mode"
            )
        hits = self.retriever.search(
            query,
            top_k=kwargs.get("k", self.k),
            since=kwargs.get("since", self.since),
            specialty=kwargs.get("specialty", self.specialty),
            mode=kwargs.get("mode", self.mode),
        )
        return [hit_to_document(hit) for hit in hits]
