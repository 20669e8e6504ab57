"""Field case 3: a 2,000-character note whose only drug allergy is in its last 200 characters,
indexed with an embedder limited to 256 tokens.

Expected: `bedside index rebuild` reports zero truncated chunks, and a search for the allergy finds
the chunk holding it.
"""

from __future__ import annotations

import json

from field_helpers import copy_demo_documents, run_bedside, write_markdown
from test_chunking import ALLERGY, allergy_document

pytest_plugins = ["field_support"]


def test_allergy_in_last_200_characters_found(isolated, embedder):
    assert embedder.max_seq_length == 256
    note = allergy_document()
    assert len(note.text) == 2000
    assert note.text.index(ALLERGY) >= 1800
    corpus = copy_demo_documents(isolated / "corpus", ["infectious-disease-community-acquired-pneumonia.md",
                                                       "pulmonology-copd-exacerbation.md"])
    write_markdown(corpus / "ward-note-17.md", note.doc_id, note.title, note.text, date=note.date)

    index = isolated / "index"
    built = run_bedside("index", "rebuild", "--corpus", corpus, "--index", index, "--no-progress")
    found = run_bedside("search", "does the patient have a penicillin allergy?", "--index", index,
                        "--top-k", "3", "--json")

    assert built.status == 0, built.stderr
    assert "0 truncated" in built.stdout
    assert found.status == 0, found.stderr
    top = json.loads(found.stdout)["hits"][0]
    assert top["doc_id"] == note.doc_id
    assert ALLERGY in top["text"]
