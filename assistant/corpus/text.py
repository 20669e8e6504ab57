"""Helpers shared by the loaders: strict decoding, dates, and Markdown tables."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from assistant.errors import CorpusError


def read_utf8(path: Path) -> str:
    """Read a file as UTF-8, naming the offending byte and the fix when it is not."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{str(path)!r} is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "re-save it as UTF-8"
        ) from err
    return text.lstrip("\ufeff")


def normalize_date(value: object, path: Path | str = "") -> str | None:
    """Return an ISO date (YYYY-MM-DD) for a date, datetime or string; None for an empty value."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    text = str(value).strip()
    # Front matter writes 2025-06-12 and FHIR may add a time after "T". SPL writes 20140113, sometimes
    # with a time and zone offset as more digits. Any other trailing text makes the value invalid.
    candidates = [(text, "%Y-%m"), (text, "%Y")]
    if len(text) == 10 or text[10:11] in {"T", " "}:
        candidates.insert(0, (text[:10], "%Y-%m-%d"))
    if re.fullmatch(r"\d{8}(\d{2,6})?([+-]\d{4})?", text):
        candidates.insert(0, (text[:8], "%Y%m%d"))
    for candidate, pattern in candidates:
        try:
            return dt.datetime.strptime(candidate, pattern).date().isoformat()
        except ValueError:
            continue
    raise CorpusError(f"date {text!r} in {str(path)!r} is not a date; write it as YYYY-MM-DD")


def markdown_table(rows: list[list[str]]) -> str:
    """Render rows (the first is the header) as a Markdown table, one line per row."""
    if not rows:
        return ""
    width = max(len(row) for row in rows)
    cleaned = [[" ".join(cell.split()).replace("|", "/") for cell in row] + [""] * (width - len(row)) for row in rows]
    lines = ["| " + " | ".join(cleaned[0]) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(row) + " |" for row in cleaned[1:]]
    return "\n".join(lines)


def collapse_whitespace(text: str) -> str:
    """Collapse runs of spaces inside lines and runs of blank lines, keeping paragraph breaks."""
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
