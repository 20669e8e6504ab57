"""JSONL text split into its records, shared by every reader of JSONL files.

It lives apart from `assistant.corpus` so that the audit log and the training-data reader can use it
without importing the document loaders.
"""

from __future__ import annotations


def jsonl_lines(text: str) -> list[str]:
    """Split JSONL text into its lines, each without its line end.

    JSONL separates records by "\\n" alone. str.splitlines() would also split at U+2028, U+2029, \\x85
    and other separators that JSON strings may hold unescaped, cutting a valid record in two.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]
