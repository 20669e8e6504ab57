"""Field case 4: five documents indexed, the second deleted through bedside, then a query with the
fourth document's exact text.

Expected: the fourth is the top hit and its citation names the fourth; the vector count equals the
metadata row count.
"""

from __future__ import annotations

import json
import sqlite3

from field_helpers import copy_demo_documents, run_bedside
from test_index_store import assert_consistent, current_folder

pytest_plugins = ["field_support"]

FIVE = [
    "cardiology-atrial-fibrillation-anticoagulation.md",
    "endocrinology-hypoglycaemia.md",
    "infectious-disease-urinary-tract-infection.md",
    "nephrology-hyperkalaemia.md",
    "pulmonology-asthma-stepwise-therapy.md",
]
SECOND, FOURTH = "endocrinology-hypoglycaemia", "nephrology-hyperkalaemia"


def test_fourth_document_found_after_second_removed(isolated, embedder):
    from assistant.answer.citations import verify_citations
    from assistant.retrieval import Hit

    corpus = copy_demo_documents(isolated / "corpus", FIVE)
    index = isolated / "index"
    assert run_bedside("index", "rebuild", "--corpus", corpus, "--index", index, "--no-progress").status == 0

    removed = run_bedside("index", "remove", SECOND, "--index", index)

    assert removed.status == 0, removed.stderr
    assert "1 removed" in removed.stdout
    rows = assert_consistent(index)
    with sqlite3.connect(current_folder(index) / "chunks.sqlite") as db:
        doc_ids = {doc for (doc,) in db.execute("SELECT DISTINCT doc_id FROM chunks")}
        texts = db.execute("SELECT text FROM chunks WHERE doc_id = ? ORDER BY position", (FOURTH,)).fetchall()
    assert doc_ids == {name.removesuffix(".md") for name in FIVE} - {SECOND}
    assert rows > 0

    for (text,) in texts:
        found = run_bedside("search", text[:3000], "--index", index, "--json")
        assert found.status == 0, found.stderr
        top = json.loads(found.stdout)["hits"][0]
        assert top["doc_id"] == FOURTH
        assert top["source"].endswith(f"{FOURTH}.md")
        assert top["text"] == text

        # a cited answer built on that hit names the fourth document in its citation
        hit = Hit(**{k: v for k, v in top.items() if k in Hit.__dataclass_fields__})
        checked = verify_citations(f"{text.splitlines()[0]} [1]", [hit], embedder, 0.45)
        assert [c.doc_id for c in checked.citations] == [FOURTH]
        assert checked.citations[0].title == top["title"]
