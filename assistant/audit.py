"""SQLite audit log of every answer and draft (WAL mode, so readers never block the writer).

With `store_text=False` the question and answer are stored only as sha256 hashes, so the log can be
kept where patient details must not be.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from assistant.errors import BedsideError
from assistant.jsonl import jsonl_lines

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'answer',
    user TEXT NOT NULL,
    question TEXT,
    question_sha256 TEXT NOT NULL,
    answer TEXT,
    answer_sha256 TEXT NOT NULL,
    abstained INTEGER NOT NULL,
    retrieved TEXT NOT NULL,
    index_version TEXT,
    model TEXT,
    model_fingerprint TEXT,
    adapter_name TEXT,
    adapter_sha256 TEXT,
    backend TEXT,
    generation TEXT NOT NULL,
    citations TEXT NOT NULL,
    flags TEXT NOT NULL,
    timings TEXT NOT NULL,
    feedback TEXT,
    feedback_comment TEXT,
    feedback_at TEXT
);
CREATE INDEX IF NOT EXISTS answers_created ON answers (created_at);
"""
JSON_COLUMNS = ("retrieved", "generation", "citations", "flags", "timings")
FEEDBACK_KINDS = ("helpful", "wrong", "unsafe")


INTEGER_COLUMNS = ("id", "abstained")
EXPORT_FORMATS = ("jsonl", "csv")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_since(text: str) -> str:
    """Normalise a --since value to the stored `created_at` form, UTC ISO 8601, so strings sort by time.

    A bare date means midnight UTC; a time without an offset is taken as UTC.
    """
    raw = text.strip()
    try:
        if len(raw) == 10:
            return dt.date.fromisoformat(raw).isoformat()
        moment = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as err:
        raise BedsideError(f"--since {text!r} is invalid; use a date such as 2025-01-31 or an ISO time "
                           "such as 2025-01-31T14:00:00+01:00") from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")


def read_export(text: str, fmt: str) -> list[dict[str, Any]]:
    """Parse an `AuditLog.export` output back into rows shaped like `AuditLog.rows`."""
    if fmt == "jsonl":
        return [json.loads(line) for line in jsonl_lines(text) if line.strip()]
    if fmt == "csv":
        rows = []
        for record in csv.DictReader(io.StringIO(text, newline="")):
            row: dict[str, Any] = {}
            for key, value in record.items():
                if key in JSON_COLUMNS:
                    row[key] = json.loads(value) if value else None
                elif value == "":
                    row[key] = None
                elif key in INTEGER_COLUMNS:
                    row[key] = int(value)
                else:
                    row[key] = value
            rows.append(row)
        return rows
    raise BedsideError(f"export format {fmt!r} is invalid; use one of {', '.join(EXPORT_FORMATS)}")


class AuditLog:
    """Append-only record of answers, with feedback attached later by row id."""

    def __init__(self, path: Path, store_text: bool = True) -> None:
        self.path = Path(path)
        self.store_text = store_text
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise BedsideError(f"audit database {str(self.path)!r} cannot be opened ({err}); "
                               "set audit_db to a writable file") from err

    def record(self, *, kind: str, user: str, question: str, answer: str, abstained: bool,
               retrieved: list[dict], index_version: str | None, model: str | None,
               model_fingerprint: str | None, adapter: dict[str, Any] | None, backend: str | None,
               generation: dict[str, Any], citations: list[dict], flags: list[dict],
               timings: dict[str, float]) -> int:
        adapter = adapter or {}
        row = {
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "kind": kind,
            "user": user,
            "question": question if self.store_text else None,
            "question_sha256": sha256_text(question),
            "answer": answer if self.store_text else None,
            "answer_sha256": sha256_text(answer),
            "abstained": int(abstained),
            "retrieved": json.dumps(retrieved),
            "index_version": index_version,
            "model": model,
            "model_fingerprint": model_fingerprint,
            "adapter_name": adapter.get("name"),
            "adapter_sha256": adapter.get("sha256"),
            "backend": backend,
            "generation": json.dumps({k: v for k, v in generation.items()
                                      if k != "raw_output" or self.store_text}),
            "citations": json.dumps(citations if self.store_text else
                                    [{k: v for k, v in c.items() if k != "text"} for c in citations]),
            "flags": json.dumps(flags if self.store_text else [{"type": f.get("type")} for f in flags]),
            "timings": json.dumps(timings),
        }
        columns = ", ".join(row)
        marks = ", ".join("?" * len(row))
        try:
            with self._lock, self._db:
                cursor = self._db.execute(f"INSERT INTO answers ({columns}) VALUES ({marks})",
                                          list(row.values()))
        except sqlite3.Error as err:
            raise BedsideError(f"writing the audit record to {str(self.path)!r} failed: {err}") from err
        return int(cursor.lastrowid)

    def record_answer(self, answer: Any, user: str) -> int:
        record = answer.to_dict()
        answer.audit_id = self.record(
            kind="answer", user=user, question=answer.question, answer=answer.answer,
            abstained=answer.abstained, retrieved=record["retrieved"], index_version=answer.index_version,
            model=answer.model, model_fingerprint=answer.model_fingerprint, adapter=answer.adapter,
            backend=answer.backend, generation=answer.generation, citations=record["citations"],
            flags=answer.flags, timings=answer.timings,
        )
        return answer.audit_id

    def add_feedback(self, row_id: int, feedback: str, comment: str = "") -> None:
        if feedback not in FEEDBACK_KINDS:
            raise BedsideError(f"feedback {feedback!r} is invalid; use one of {', '.join(FEEDBACK_KINDS)}")
        with self._lock, self._db:
            updated = self._db.execute(
                "UPDATE answers SET feedback = ?, feedback_comment = ?, feedback_at = ? WHERE id = ?",
                (feedback, comment or None, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 row_id),
            ).rowcount
        if not updated:
            raise BedsideError(f"audit record {row_id} not found")

    def rows(self, since: str | None = None) -> list[dict[str, Any]]:
        """Return the records created at or after `since` (see `parse_since`), oldest first."""
        query = "SELECT * FROM answers"
        args: tuple = ()
        if since:
            query += " WHERE created_at >= ?"
            args = (parse_since(since),)
        with self._lock:
            cursor = self._db.execute(query + " ORDER BY id", args)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
        for row in rows:
            for column in JSON_COLUMNS:
                row[column] = json.loads(row[column]) if row[column] else None
        return rows

    def export(self, fmt: str, since: str | None = None) -> str:
        """Render rows as JSONL or CSV (JSON-valued columns stay JSON strings in CSV)."""
        rows = self.rows(since)
        if fmt == "jsonl":
            return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if fmt == "csv":
            out = io.StringIO()
            columns = [d[1] for d in self._db.execute("PRAGMA table_info(answers)").fetchall()]
            # NOTE: an empty string and NULL both become an empty cell; read_export reads it back as None
            writer = csv.DictWriter(out, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in row.items()})
            return out.getvalue()
        raise BedsideError(f"export format {fmt!r} is invalid; use one of {', '.join(EXPORT_FORMATS)}")

    def close(self) -> None:
        self._db.close()
