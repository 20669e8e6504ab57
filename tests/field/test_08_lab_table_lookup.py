"""Field case 8: a 60-row lab table (date | test | value | unit | range) with a small chunk size.

Expected: chunks split only between rows with the header repeated, and the question "what was the
potassium on <date>" retrieves the chunk holding that row, whose citation carries the value and unit.
"""

from __future__ import annotations

import json

import pytest
from field_helpers import run_bedside, write_markdown
from test_chunking import lab_table_document

pytest_plugins = ["field_support"]


@pytest.fixture(scope="module")
def lab_index(tmp_path_factory):
    """The lab table as a Markdown file, indexed through the CLI with 96-token chunks."""
    document, header, rows = lab_table_document()
    root = tmp_path_factory.mktemp("case-08")
    write_markdown(root / "corpus" / "labs.md", document.doc_id, document.title,
                   f"## {document.sections[0].title}\n\n{document.sections[0].text}")
    (root / "bedside.toml").write_text("chunk_tokens = 96\nchunk_overlap = 16\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        built = run_bedside("index", "rebuild", "--corpus", root / "corpus", "--index", root / "index",
                            "--no-progress")
    assert built.status == 0, built.stderr
    assert "0 truncated" in built.stdout
    return root / "index", header, rows


def potassium_rows(rows: list[str]) -> list[tuple[str, str]]:
    """(date, row) of every potassium row."""
    return [(row.split("|")[1].strip(), row) for row in rows if "| Potassium |" in row]


def test_table_chunks_split_between_rows(lab_index):
    import sqlite3

    from test_index_store import current_folder

    index, header, rows = lab_index
    with sqlite3.connect(current_folder(index) / "chunks.sqlite") as db:
        texts = [text for (text,) in db.execute("SELECT text FROM chunks ORDER BY position")]
    tables = [t for t in texts if t.startswith("|")]
    assert len(tables) >= 4
    seen = []
    for text in tables:
        lines = text.splitlines()
        assert lines[:2] == header
        assert all(line in rows for line in lines[2:])
        seen += lines[2:]
    assert seen == rows


def test_potassium_on_date_cites_row(lab_index, embedder):
    from assistant.answer.citations import verify_citations
    from assistant.retrieval import Hit

    index, _, rows = lab_index
    for date, row in potassium_rows(rows):
        found = run_bedside("search", f"What was the potassium on {date}?", "--index", index, "--top-k", "3",
                            "--json")
        assert found.status == 0, found.stderr
        top = json.loads(found.stdout)["hits"][0]
        assert row in top["text"].splitlines(), (date, top["text"])

        value, unit = row.split("|")[3].strip(), row.split("|")[4].strip()
        hit = Hit(**{k: v for k, v in top.items() if k in Hit.__dataclass_fields__})
        checked = verify_citations(f"The potassium on {date} was {value} {unit} [1].", [hit], embedder, 0.45)
        assert [c.chunk_id for c in checked.citations] == [top["chunk_id"]]
        assert f"| {value} | {unit} |" in checked.citations[0].text
        assert not [f for f in checked.flags if f["type"] == "number_not_in_source"]
