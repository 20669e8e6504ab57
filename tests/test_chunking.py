"""Chunking: tables split only between rows with the header repeated, and no chunk exceeds the embedder window."""

from __future__ import annotations

import datetime as dt

import pytest
from conftest import DEMO_CORPUS, build_index, make_chunker

from assistant.chunking import Chunker
from assistant.corpus import Document, Section, load_corpus
from assistant.indexing import IndexStore
from assistant.retrieval import Retriever

TESTS = ["Sodium", "Potassium", "Creatinine", "Urea", "Haemoglobin", "White cell count"]
UNITS = {"Sodium": ("mmol/L", "135-145"), "Potassium": ("mmol/L", "3.5-5.3"), "Creatinine": ("umol/L", "60-110"),
         "Urea": ("mmol/L", "2.5-7.8"), "Haemoglobin": ("g/L", "130-170"), "White cell count": ("10^9/L", "4.0-11.0")}


def window_tokens(embedder, text: str) -> int:
    """Oracle: what the embedder's tokenizer feeds the model, special tokens included."""
    return len(embedder.tokenizer(text)["input_ids"])


def lab_table_document() -> tuple[Document, list[str], list[str]]:
    header = ["| Date | Test | Value | Unit | Reference range |", "|---|---|---|---|---|"]
    rows = []
    for number in range(60):
        test = TESTS[number % len(TESTS)]
        unit, reference = UNITS[test]
        day = dt.date(2025, 1, 1) + dt.timedelta(days=number // 3)
        rows.append(f"| {day.isoformat()} | {test} | {100 + number}.{number % 10} | {unit} | {reference} |")
    text = "Results for the admission, oldest first.\n\n" + "\n".join(header + rows) + "\n\nReviewed by the ward team."
    document = Document(doc_id="lab-results", title="Inpatient laboratory results", source="labs.md",
                        sections=[Section(text=text, title="Biochemistry and haematology")])
    return document, header, rows


def test_lab_table_splits_between_rows(embedder):
    document, header, rows = lab_table_document()
    chunker = make_chunker(embedder, chunk_tokens=96, overlap=16)

    chunks = chunker.chunk_document(document)

    table_chunks = [c for c in chunks if c.text.startswith("|")]
    assert len(table_chunks) >= 4
    seen_rows = []
    for chunk in table_chunks:
        lines = chunk.text.splitlines()
        assert lines[:2] == header, chunk.chunk_id
        assert len(lines) > 2, chunk.chunk_id
        assert all(line in rows for line in lines[2:]), chunk.chunk_id
        seen_rows += lines[2:]
    assert seen_rows == rows
    prose = [c.text for c in chunks if not c.text.startswith("|")]
    assert prose == ["Results for the admission, oldest first.", "Reviewed by the ward team."]
    assert chunker.report.truncated == 0
    assert chunker.report.hard_splits == 0
    assert all(window_tokens(embedder, c.embedding_text) <= embedder.max_seq_length for c in chunks)


def test_oversized_row_keeps_header_and_text(embedder):
    header = "| Drug | Interaction note |\n|---|---|"
    long_note = " ".join(f"Clarithromycin raises exposure {n}-fold with Myopathy-risk." for n in range(60))
    table = f"{header}\n| Atorvastatin | {long_note} |\n| Amlodipine | Minor |"
    document = Document("interactions", "Statin interactions", [Section(table, "Table 3")], "label.xml")
    chunker = make_chunker(embedder, chunk_tokens=120)

    chunks = chunker.chunk_document(document)

    assert len(chunks) >= 3
    assert all(c.text.startswith(header + "\n") for c in chunks)
    assert chunker.report.oversized_rows == [f"| Atorvastatin | {long_note}"[:80]]
    # the cut pieces are slices of the original text: case and punctuation survive
    rejoined = " ".join(c.text.removeprefix(header + "\n") for c in chunks[:-1])
    assert " ".join(rejoined.split()) == " ".join(f"| Atorvastatin | {long_note} |".split())
    assert chunks[-1].text == f"{header}\n| Amlodipine | Minor |"
    assert chunker.report.truncated == 0


def test_demo_corpus_never_truncated(embedder):
    documents = load_corpus([DEMO_CORPUS]).documents
    chunker = make_chunker(embedder)

    chunks = [c for d in documents for c in chunker.chunk_document(d)]

    assert chunker.report.truncated == 0
    longest = max(window_tokens(embedder, c.embedding_text) for c in chunks)
    assert longest <= embedder.max_seq_length
    assert {c.doc_id for c in chunks} == {d.doc_id for d in documents}


def test_pages_and_sections_never_mix(embedder):
    pages = [Section(f"Page {n} text about wound care. " * 30, page=n) for n in (1, 2, 3)]
    document = Document("wound-care", "Wound care guide", pages, "wound.pdf")

    chunks = make_chunker(embedder, chunk_tokens=64).chunk_document(document)

    assert {c.page for c in chunks} == {1, 2, 3}
    for chunk in chunks:
        assert f"Page {chunk.page} text" in chunk.text
        assert all(f"Page {n} text" not in chunk.text for n in (1, 2, 3) if n != chunk.page)


def test_chunk_ids_stable_and_content_addressed(embedder):
    document = load_corpus([DEMO_CORPUS / "nephrology-hyperkalaemia.md"]).documents[0]

    first = [c.chunk_id for c in make_chunker(embedder).chunk_document(document)]
    second = [c.chunk_id for c in make_chunker(embedder).chunk_document(document)]
    document.sections[-1].text += " Recheck potassium within 4 hours."
    edited = [c.chunk_id for c in make_chunker(embedder).chunk_document(document)]

    assert first == second
    assert all(chunk_id.startswith(f"{document.doc_id}#{n}-") for n, chunk_id in enumerate(first))
    assert edited[:-1] == first[:-1]
    assert edited[-1] != first[-1]


ALLERGY = "Allergy: anaphylaxis to penicillin in 2019; avoid all beta-lactam antibiotics."


def allergy_document() -> Document:
    filler = ("The patient was admitted with community-acquired pneumonia and treated with intravenous fluids, "
              "oxygen by nasal cannula and chest physiotherapy. Observations were stable on the ward. ")
    body = (filler * 12)[: 2000 - 200]
    tail = f" Discharge planning was discussed with the family. {ALLERGY}"
    text = body + tail.rjust(200)
    assert len(text) == 2000
    assert text.index(ALLERGY) >= 1800
    return Document("ward-note-17", "Ward round note", [Section(text, "Progress note")], "note-17.txt",
                    date="2025-03-02", specialty="infectious_disease")


@pytest.mark.parametrize("chunk_tokens", [200, 1000])
def test_allergy_at_end_not_truncated(embedder, chunk_tokens):
    document = allergy_document()
    # embedded whole, the 2,000 characters would not fit the window and the allergy would be cut off
    assert window_tokens(embedder, f"{document.title}\n{document.text}") > embedder.max_seq_length
    chunker = Chunker(embedder.tokenizer, chunk_tokens, 32, embedder.max_seq_length)

    chunks = chunker.chunk_document(document)

    assert chunker.report.truncated == 0
    assert all(window_tokens(embedder, c.embedding_text) <= embedder.max_seq_length for c in chunks)
    assert any(ALLERGY in c.text for c in chunks)


def test_allergy_at_end_is_retrievable(tmp_path, embedder, embedder_info):
    documents = [allergy_document()] + load_corpus([DEMO_CORPUS / "infectious-disease-community-acquired-pneumonia.md",
                                                    DEMO_CORPUS / "pulmonology-copd-exacerbation.md"]).documents
    summary = build_index(tmp_path / "index", documents, embedder, embedder_info)
    index = IndexStore(tmp_path / "index").open(embedder_info)

    hits = Retriever(index, embedder).search("does the patient have a penicillin allergy?", top_k=3)

    assert summary.truncated_chunks == 0
    assert hits[0].doc_id == "ward-note-17"
    assert ALLERGY in hits[0].text
    index.close()
