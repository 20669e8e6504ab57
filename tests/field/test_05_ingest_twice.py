"""Field case 5: the same folder ingested twice.

Expected: the same chunk count as ingesting it once, whether the folder is named twice in one
rebuild (under any spelling, or with a file inside it) or rebuilt a second time, and top-k search
results hold distinct chunks.
"""

from __future__ import annotations

import json

from field_helpers import copy_demo_documents, run_bedside
from test_index_store import assert_consistent

pytest_plugins = ["field_support"]

NAMES = [
    "cardiology-heart-failure-reduced-ef.md",
    "nephrology-hyperkalaemia.md",
    "infectious-disease-community-acquired-pneumonia.md",
]


def rebuild(index, *corpus) -> str:
    result = run_bedside("index", "rebuild", "--corpus", *corpus, "--index", index, "--no-progress")
    assert result.status == 0, result.stderr
    return result.stdout


def test_folder_twice_gives_same_chunks(isolated):
    corpus = copy_demo_documents(isolated / "corpus", NAMES)
    once, twice = isolated / "once", isolated / "twice"
    rebuild(once, corpus)
    chunks_once = assert_consistent(once)

    # the folder under two spellings, plus one of its files named on its own
    stdout = rebuild(twice, corpus, isolated / "corpus" / ".." / "corpus", "corpus", corpus / NAMES[0])

    assert assert_consistent(twice) == chunks_once
    assert f"{len(NAMES)} documents ({len(NAMES)} added" in stdout
    assert "0 bad files or lines skipped" in stdout

    again = rebuild(twice, corpus)
    assert "0 embedded" in again
    assert assert_consistent(twice) == chunks_once


def test_top_k_holds_distinct_chunks(isolated):
    corpus = copy_demo_documents(isolated / "corpus", NAMES)
    index = isolated / "index"
    rebuild(index, corpus, corpus)

    for query in ("potassium above 6.5 with ECG changes", "heart failure with reduced ejection fraction",
                  "antibiotics for pneumonia"):
        found = run_bedside("search", query, "--index", index, "--top-k", "10", "--json")
        assert found.status == 0, found.stderr
        hits = json.loads(found.stdout)["hits"]
        assert len(hits) == 10
        assert len({h["chunk_id"] for h in hits}) == len(hits), query
        assert len({(h["doc_id"], h["text"]) for h in hits}) == len(hits), query
