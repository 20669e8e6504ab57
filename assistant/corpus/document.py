"""The `Document` every loader returns, whatever the source format."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class Section:
    """A titled part of a document; `page` is 1-based for PDFs and None elsewhere."""

    text: str
    title: str | None = None
    page: int | None = None


@dataclass
class Document:
    """One source document. `doc_id` is stable across rebuilds and versions of the same guideline."""

    doc_id: str
    title: str
    sections: list[Section]
    source: str
    date: str | None = None
    specialty: str | None = None
    issuer: str | None = None
    version: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n\n".join(section.text for section in self.sections)

    @property
    def content_hash(self) -> str:
        """sha256 over everything that reaches a chunk, so any change to text or metadata re-embeds."""
        digest = hashlib.sha256()
        for part in (self.title, self.source, self.date, self.specialty, self.issuer, self.version):
            digest.update((part or "").encode("utf-8") + b"\x00")
        for section in self.sections:
            digest.update(f"{section.title or ''}\x00{section.page or ''}\x00{section.text}\x01".encode())
        return digest.hexdigest()
