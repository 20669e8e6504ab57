"""Audit log: one complete SQLite row per answer, hashes-only mode, feedback, and exports that round-trip."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest

from assistant.audit import AuditLog, parse_since, read_export, sha256_text
from assistant.errors import BedsideError

IN_CORPUS = "What fixed-rate intravenous insulin infusion rate is used for diabetic ketoacidosis in adults?"
REQUIRED_FIELDS = ("created_at", "user", "question_sha256", "answer_sha256", "retrieved", "index_version",
                   "model", "model_fingerprint", "adapter_name", "adapter_sha256", "generation", "citations",
                   "flags", "feedback", "feedback_comment")


def sample_record(log: AuditLog, user: str = "alice", question: str = "Which dose? <b>", **overrides) -> int:
    fields = {
        "kind": "answer", "user": user, "question": question, "answer": "Give 0.1 units/kg/hour [1].",
        "abstained": False,
        "retrieved": [{"chunk_id": "dka#3", "doc_id": "dka", "version": "2024.2", "date": "2024-07-22",
                       "score": 0.8, "dense_score": 0.7}],
        "index_version": "v20250101T000000-abcd", "model": "SmolLM2-135M-Instruct",
        "model_fingerprint": "f" * 64,
        "adapter": {"name": "endocrinology", "sha256": "a" * 64}, "backend": "local",
        "generation": {"max_new_tokens": 16, "raw_output": "Give 0.1 units/kg/hour [1]."},
        "citations": [{"marker": 1, "chunk_id": "dka#3", "text": "Start 0.1 units/kg/hour", "support": 0.7}],
        "flags": [{"type": "auto_cited", "marker": 1, "sentence": "Give 0.1", "detail": "attached"}],
        "timings": {"total_s": 1.5},
    }
    fields.update(overrides)
    return log.record(**fields)


@pytest.fixture
def log(tmp_path):
    audit = AuditLog(tmp_path / "audit.db")
    yield audit
    audit.close()


def test_pipeline_answer_recorded_with_all_fields(demo_assistant):
    saved = demo_assistant.generation.max_new_tokens
    demo_assistant.generation.max_new_tokens = 16
    try:
        answer = demo_assistant.ask(IN_CORPUS, user="cli")
    finally:
        demo_assistant.generation.max_new_tokens = saved
    row = next(r for r in demo_assistant.audit.rows() if r["id"] == answer.audit_id)
    for name in REQUIRED_FIELDS:
        assert name in row
    assert row["user"] == "cli"
    assert row["question"] == IN_CORPUS
    assert row["question_sha256"] == sha256_text(IN_CORPUS)
    assert row["answer"] == answer.answer
    assert row["index_version"] == demo_assistant.index_version
    assert row["model_fingerprint"] == demo_assistant.generator.model_fingerprint
    assert row["generation"]["max_new_tokens"] == 16
    assert row["retrieved"], "retrieved chunks are recorded"
    assert all(hit["chunk_id"] and "version" in hit for hit in row["retrieved"])
    assert [c["marker"] for c in row["citations"]] == [c.marker for c in answer.citations]
    assert [f["type"] for f in row["flags"]] == [f["type"] for f in answer.flags]


def test_database_uses_wal(log):
    sample_record(log)
    mode = sqlite3.connect(log.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_no_store_text_keeps_only_hashes(tmp_path):
    log = AuditLog(tmp_path / "audit.db", store_text=False)
    row_id = sample_record(log, question="Patient John Smith, 54, dose?")
    [row] = log.rows()
    assert row["id"] == row_id
    assert row["question"] is None
    assert row["answer"] is None
    assert row["question_sha256"] == sha256_text("Patient John Smith, 54, dose?")
    assert "raw_output" not in row["generation"]
    assert all("text" not in c for c in row["citations"])
    assert row["flags"] == [{"type": "auto_cited"}]
    raw = (tmp_path / "audit.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("audit.db-*"))
    assert b"John Smith" not in raw
    log.close()


def test_feedback_attached_to_row(log):
    row_id = sample_record(log)
    log.add_feedback(row_id, "wrong", "the dose is per kg")
    [row] = log.rows()
    assert row["feedback"] == "wrong"
    assert row["feedback_comment"] == "the dose is per kg"
    assert row["feedback_at"]


def test_feedback_rejects_bad_kind_and_row(log):
    row_id = sample_record(log)
    with pytest.raises(BedsideError, match="invalid"):
        log.add_feedback(row_id, "great")
    with pytest.raises(BedsideError, match="not found"):
        log.add_feedback(row_id + 100, "helpful")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_round_trips(log, fmt):
    first = sample_record(log)
    # JSONL export keeps U+2028 unescaped; only "\n" may end a record when it is read back
    sample_record(log, user="bob", question='Comma, "quote"\nnew line\u2028and a line separator',
                  abstained=True, citations=[], flags=[])
    log.add_feedback(first, "helpful", "clear, with a comma")
    rows = log.rows()
    assert read_export(log.export(fmt), fmt) == rows


def test_export_since_filters(log):
    sample_record(log)
    tomorrow = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).date().isoformat()
    assert len(read_export(log.export("jsonl", since="2000-01-01"), "jsonl")) == 1
    assert read_export(log.export("jsonl", since=tomorrow), "jsonl") == []
    an_hour_ago = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)).isoformat()
    assert len(log.rows(since=an_hour_ago)) == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("2025-01-31", "2025-01-31"),
    ("2025-01-31T14:00:00", "2025-01-31T14:00:00.000+00:00"),
    ("2025-01-31T14:00:00+01:00", "2025-01-31T13:00:00.000+00:00"),
    ("2025-01-31T14:00:00Z", "2025-01-31T14:00:00.000+00:00"),
])
def test_parse_since(text, expected):
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["2025-13-01", "yesterday", "31/01/2025"])
def test_parse_since_rejects_bad_dates(text):
    with pytest.raises(BedsideError, match="--since"):
        parse_since(text)


def test_export_rejects_unknown_format(log):
    with pytest.raises(BedsideError, match="jsonl, csv"):
        log.export("xml")


# the `bedside audit export` command

def test_cli_export_jsonl_to_stdout(tmp_path, run_cli_in_process):
    log = AuditLog(tmp_path / "audit.db")
    sample_record(log)
    rows = log.rows()
    log.close()
    code, out, _ = run_cli_in_process("audit", "export", "--format", "jsonl",
                                      "--audit-db", str(tmp_path / "audit.db"))
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == rows


def test_cli_export_csv_to_file(tmp_path, run_cli_in_process):
    log = AuditLog(tmp_path / "audit.db")
    sample_record(log)
    sample_record(log, user="bob")
    rows = log.rows()
    log.close()
    out_file = tmp_path / "exports" / "audit.csv"
    code, out, err = run_cli_in_process("audit", "export", "--format", "csv", "--since", "2000-01-01",
                                        "--audit-db", str(tmp_path / "audit.db"), "--out", str(out_file))
    assert code == 0, err
    assert out == ""
    assert read_export(out_file.read_text(encoding="utf-8"), "csv") == rows
    assert [p.name for p in out_file.parent.iterdir()] == ["audit.csv"], "no temporary file is left behind"


def test_cli_export_missing_database(tmp_path, run_cli_in_process):
    code, _, err = run_cli_in_process("audit", "export", "--format", "csv",
                                      "--audit-db", str(tmp_path / "no.db"))
    assert code == 1
    assert "not found" in err
    assert not (tmp_path / "no.db").exists()


def test_cli_export_bad_since(tmp_path, run_cli_in_process):
    code, _, err = run_cli_in_process("audit", "export", "--format", "csv", "--since", "soon",
                                      "--audit-db", str(tmp_path / "no.db"))
    assert code == 1
    assert "--since 'soon' is invalid" in err


@pytest.fixture
def run_cli_in_process(capsys):
    """Run `bedside ARGS` through the real entry point in this process; return (exit code, stdout, stderr)."""
    from assistant.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
