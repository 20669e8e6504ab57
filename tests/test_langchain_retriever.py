"""The LangChain retriever: the `langchain-tests` standard retriever suite, plus its metadata and filters."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from langchain_tests.integration_tests import RetrieversIntegrationTests

from assistant.indexing import IndexStore
from assistant.retrieval import Retriever
from assistant.retrieval_langchain import BedsideRetriever

HIT_METADATA = {"chunk_id", "doc_id", "score", "title", "source", "page", "section", "date", "specialty",
                "issuer", "version", "dense_score", "bm25_score"}


@pytest.fixture(scope="module")
def demo_retriever(demo_index_dir, embedder, embedder_info):
    index = IndexStore(demo_index_dir).open(embedder_info)
    yield Retriever(index, embedder)
    index.close()


# pytest-asyncio's strict mode runs the suite's one async test only under the asyncio mark. The mark
# on the class also reaches the sync tests, which only costs a warning.
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function .*> is marked with '@pytest.mark.asyncio'")
class TestBedsideRetrieverStandard(RetrieversIntegrationTests):
    """`RetrieversIntegrationTests` over the demo index (its k tests ask for 1 and 3 hits)."""

    @pytest.fixture(autouse=True)
    def _use_demo_retriever(self, demo_retriever):
        # The suite reads its constructor parameters from properties, which cannot take fixtures.
        type(self).bedside_retriever = demo_retriever

    @property
    def retriever_constructor(self) -> type[BedsideRetriever]:
        return BedsideRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"retriever": self.bedside_retriever}

    @property
    def retriever_query_example(self) -> str:
        return "What dose of calcium gluconate is given for hyperkalaemia with ECG changes?"


def test_documents_carry_hit_fields(demo_retriever):
    documents = BedsideRetriever(retriever=demo_retriever, k=4).invoke("calcium gluconate for hyperkalaemia")
    hits = demo_retriever.search("calcium gluconate for hyperkalaemia", top_k=4)

    assert len(documents) == 4
    assert all(isinstance(d, Document) for d in documents)
    assert set(documents[0].metadata) == HIT_METADATA
    assert [d.id for d in documents] == [h.chunk_id for h in hits]
    assert [d.page_content for d in documents] == [h.text for h in hits]
    assert [d.metadata["score"] for d in documents] == [h.score for h in hits]
    assert documents[0].metadata["doc_id"] == "nephrology-hyperkalaemia"


def test_invoke_filters(demo_retriever):
    retriever = BedsideRetriever(retriever=demo_retriever, k=10, specialty="oncology")

    by_default = retriever.invoke("screening interval")
    overridden = retriever.invoke("screening interval", since="2025-01-01", specialty="nephrology")

    assert {d.metadata["specialty"] for d in by_default} == {"oncology"}
    assert {d.metadata["specialty"] for d in overridden} == {"nephrology"}
    assert all(d.metadata["date"] >= "2025-01-01" for d in overridden)


def test_unknown_invoke_argument_rejected(demo_retriever):
    with pytest.raises(TypeError, match="unexpected search argument"):
        BedsideRetriever(retriever=demo_retriever).invoke("sepsis", top_n=3)
