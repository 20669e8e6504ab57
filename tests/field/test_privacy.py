"""Privacy: `bedside train --scrub` and `bedside index rebuild --scrub` de-identify their input first and
report what they replaced. The audit log can keep hashes only, and logs carry no patient text by default.

Every patient detail below is invented.
"""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest
from field_helpers import DEMO_CORPUS, run_bedside, write_markdown

pytest_plugins = ["field_support"]

MRN, PHONE, EMAIL, WHEN = "MRN 40417723", "555-231-8841", "iris.quell@example.org", "2024-11-02"
RECORDS = [
    {"instruction": f"Summarise the stay of {MRN}, seen on {WHEN}.",
     "output": "Admitted with pneumonia, treated with amoxicillin, home on day 3."},
    {"instruction": f"Who should the ward call about this patient? Phone {PHONE}.",
     "output": "Call the next of kin before discharge."},
    {"instruction": f"Draft a reply to {EMAIL} about the follow-up.",
     "output": "Follow-up chest X-ray in six weeks."},
    {"instruction": "Which antibiotic treats mild pneumonia?",
     "output": "Amoxicillin 500 mg three times daily."},
]
IDENTIFIERS = ["40417723", PHONE, EMAIL, WHEN]


def test_train_scrub_trains_on_scrubbed_copy(isolated):
    data = isolated / "ward.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "{not json\n", encoding="utf-8")
    adapters = isolated / "no-adapters"  # the adapters folder the isolated environment sets

    result = run_bedside("train", "--scrub", "--specialty", "discharge_summary", "--data", data,
                         "--max-steps", "1", "--lora-r", "4", "--target-modules", "q_proj",
                         "--batch-size", "2", "--max-seq-length", "64", "--name", "scrubbed-lora",
                         "--no-progress", "--dtype", "float32", "--device", "cpu")

    assert result.status == 0, result.stderr
    scrubbed = isolated / "ward.scrubbed.jsonl"
    line = next(line for line in result.stdout.splitlines() if line.startswith("scrubbed "))
    assert f"into {scrubbed}" in line
    for kind in ("MEDICAL_RECORD_NUMBER 1", "PHONE_NUMBER 1", "EMAIL_ADDRESS 1", "DATE_TIME 1"):
        assert kind in line
    assert "person names" in line
    assert f"{data}:5 skipped: invalid JSON" in result.stderr

    # the copy keeps every valid record and no identifier; the original is untouched
    text = scrubbed.read_text(encoding="utf-8")
    for identifier in IDENTIFIERS:
        assert identifier not in text
    copies = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert [set(c) for c in copies] == [set(r) for r in RECORDS]
    assert copies[3] == RECORDS[3]
    assert MRN in data.read_text(encoding="utf-8")

    # the adapter's record names the scrubbed file as its training data
    record = json.loads((adapters / "scrubbed-lora" / "training.json").read_text())
    assert record["data"]["path"] == str(scrubbed)
    assert record["data"]["examples"] == 4
    entry = next(e for e in json.loads((adapters / "registry.json").read_text())["adapters"]
                 if e["name"] == "scrubbed-lora")
    assert entry["data"]["path"] == str(scrubbed)


def test_train_scrub_without_data_rejected(isolated):
    result = run_bedside("train", "--scrub", "--specialty", "cardiology")

    assert result.status == 1
    assert "no training data given; pass --data FILE.jsonl" in result.error_line()


def test_index_rebuild_scrub_reports_kinds(isolated, embedder):
    corpus = isolated / "corpus"
    write_markdown(corpus / "note.md", "ward-note-quell", "Ward note",
                   f"Seen on {WHEN}. {MRN}. Call {PHONE} or write to {EMAIL}. Potassium 6.1 mmol/L, "
                   "repeat the level after insulin and glucose.")
    index = isolated / "index"

    result = run_bedside("index", "rebuild", "--scrub", "--corpus", corpus, "--index", index, "--no-progress")

    assert result.status == 0, result.stderr
    assert "replaced: " in result.stderr
    assert "MEDICAL_RECORD_NUMBER 1" in result.stderr
    from test_index_store import current_folder

    with sqlite3.connect(current_folder(index) / "chunks.sqlite") as db:
        stored = " ".join(text for (text,) in db.execute("SELECT text FROM chunks"))
    assert "Potassium 6.1 mmol/L" in stored
    for identifier in IDENTIFIERS:
        assert identifier not in stored


@pytest.mark.parametrize("how", ["flag", "setting"])
def test_audit_keeps_hashes_only(how, isolated, demo_index_dir, monkeypatch, caplog):
    from assistant.audit import sha256_text

    question = f"What dose of insulin for Mrs Iris Quell ({MRN}) with potassium 6.8 and peaked T waves?"
    flags = ["--no-store-text"] if how == "flag" else []
    if how == "setting":
        monkeypatch.setenv("BEDSIDE_STORE_TEXT", "false")
    caplog.set_level(logging.INFO)

    result = run_bedside("ask", question, *flags, "--json", "--index", demo_index_dir, "--max-new-tokens",
                         "8", "--dtype", "float32", "--device", "cpu")

    assert result.status == 0, result.stderr
    answer = json.loads(result.stdout)
    database = isolated / "audit.db"
    raw = b"".join(p.read_bytes() for p in isolated.glob("audit.db*"))
    for private in ("Iris Quell", "40417723", answer["answer"][:40]):
        assert private.encode() not in raw
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        [row] = db.execute("SELECT * FROM answers").fetchall()
    assert row["question"] is None
    assert row["answer"] is None
    assert row["question_sha256"] == sha256_text(question)
    assert row["answer_sha256"] == sha256_text(answer["answer"])
    assert "raw_output" not in json.loads(row["generation"])
    assert all("text" not in c for c in json.loads(row["citations"]))

    # nothing logged at the default level carries the question or the answer
    logged = "\n".join(r.getMessage() for r in caplog.records) + result.stderr
    assert "Iris Quell" not in logged
    assert "40417723" not in logged


def test_rebuild_logs_no_document_text(isolated, caplog):
    corpus = isolated / "corpus"
    write_markdown(corpus / "note.md", "ward-note-quell", "Ward note",
                   "Mrs Iris Quell was reviewed; potassium 6.1 mmol/L, repeat after insulin.")
    broken = '{"id": "x", "title": "Mrs Iris Quell", "text": ""}\n'
    (corpus / "broken.jsonl").write_text(broken, encoding="utf-8")
    caplog.set_level(logging.INFO)

    result = run_bedside("index", "rebuild", "--corpus", corpus, DEMO_CORPUS / "nephrology-hyperkalaemia.md",
                         "--index", isolated / "index", "--no-progress")

    assert result.status == 0, result.stderr
    logged = "\n".join(r.getMessage() for r in caplog.records) + result.stderr + result.stdout
    assert "Iris Quell" not in logged
    assert "potassium 6.1" not in logged
