"""Token-aware, section-, page- and table-aware chunking.

Lengths are measured in the embedder's own tokens, and every chunk's header plus body fits the
embedder's maximum sequence length, so no chunk is silently truncated at embedding time. Markdown
tables split only between rows, with the header row repeated in every piece.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from langchain_text_splitters import RecursiveCharacterTextSplitter

from assistant.corpus.document import Document

logger = logging.getLogger(__name__)

_TABLE_LINE = re.compile(r"^\s*\|.*\|\s*$")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


@dataclass
class Chunk:
    """A retrievable piece of one document, with everything a citation needs."""

    chunk_id: str
    doc_id: str
    position: int
    text: str
    title: str
    source: str
    section: str | None = None
    page: int | None = None
    date: str | None = None
    specialty: str | None = None
    issuer: str | None = None
    version: str | None = None

    @property
    def header(self) -> str:
        return f"{self.title} — {self.section}" if self.section else self.title

    @property
    def embedding_text(self) -> str:
        # The document title on every chunk lifts recall sharply (MedQuAD answers rarely name their
        # disease), so the same header goes to the embedder and to BM25.
        return f"{self.header}\n{self.text}"

    @property
    def int_id(self) -> int:
        return chunk_int_id(self.chunk_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chunk_int_id(chunk_id: str) -> int:
    """The 63-bit integer FAISS stores for a chunk id; derived, so it never depends on row order."""
    return int.from_bytes(hashlib.sha256(chunk_id.encode()).digest()[:8], "big") >> 1


@dataclass
class ChunkingReport:
    chunks: int = 0
    hard_splits: int = 0
    truncated: int = 0
    oversized_rows: list[str] = field(default_factory=list)


class Chunker:
    """Split documents into chunks whose header + body fit `max_tokens` of `tokenizer`."""

    def __init__(self, tokenizer: Any, chunk_tokens: int, chunk_overlap: int, max_seq_length: int) -> None:
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.chunk_overlap = chunk_overlap
        # [CLS] and [SEP] (or their equivalents) take two of the embedder's positions
        self.max_tokens = max_seq_length - 2
        self.report = ChunkingReport()

    def count(self, text: str) -> int:
        return len(self.tokenizer.tokenize(text))

    def chunk_document(self, document: Document) -> list[Chunk]:
        chunks: list[Chunk] = []
        for section in document.sections:
            header_stub = Chunk("", document.doc_id, 0, "", document.title, document.source, section.title)
            # one separator token between header and body
            budget = min(self.chunk_tokens, self.max_tokens - self.count(header_stub.header) - 1)
            if budget < 16:
                # A header longer than the embedder window would crowd out the text: keep a short body
                # budget and let the embedder see at least the start of the header.
                budget = min(self.chunk_tokens, self.max_tokens // 2)
            for body in self._split_section(section.text, budget):
                chunks.append(self._make_chunk(document, section, len(chunks), body))
        self.report.chunks += len(chunks)
        return chunks

    def _make_chunk(self, document: Document, section: Any, position: int, body: str) -> Chunk:
        digest = hashlib.sha256(f"{document.title}\x00{section.title}\x00{body}".encode()).hexdigest()[:12]
        chunk = Chunk(
            chunk_id=f"{document.doc_id}#{position}-{digest}",
            doc_id=document.doc_id,
            position=position,
            text=body,
            title=document.title,
            source=document.source,
            section=section.title,
            page=section.page,
            date=document.date,
            specialty=document.specialty,
            issuer=document.issuer,
            version=document.version,
        )
        if self.count(chunk.embedding_text) > self.max_tokens:
            self.report.truncated += 1
            logger.warning("chunk %s exceeds the embedder window and would be truncated", chunk.chunk_id)
        return chunk

    # splitting

    def _split_section(self, text: str, budget: int) -> list[str]:
        pieces: list[str] = []
        for is_table, block in _blocks(text):
            if is_table:
                pieces.extend(self._split_table(block, budget))
            elif block.strip():
                pieces.extend(self._split_prose(block, budget))
        return pieces

    def _split_prose(self, text: str, budget: int, overlap: int | None = None) -> list[str]:
        if self.count(text) <= budget:
            return [text.strip()]
        splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            self.tokenizer,
            chunk_size=budget,
            chunk_overlap=min(self.chunk_overlap if overlap is None else overlap, budget // 4),
            separators=["\n\n", "\n", ". ", "; ", ", ", " ", ""],
            keep_separator="end",
        )
        out = []
        for piece in splitter.split_text(text):
            out.extend(self._hard_split(piece.strip(), budget))
        return [p for p in out if p]

    def _hard_split(self, text: str, budget: int) -> list[str]:
        """Cut at token boundaries where the recursive splitter left a piece over budget (one giant word).

        Pieces are slices of the original text, cut where a token starts: decoding token ids instead
        would lower-case the text and respace its punctuation under an uncased WordPiece tokenizer.
        """
        if self.count(text) <= budget:
            return [text]
        self.report.hard_splits += 1
        if not getattr(self.tokenizer, "is_fast", False):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return [self.tokenizer.decode(ids[i:i + budget]) for i in range(0, len(ids), budget)]
        starts = [start for start, _ in self.tokenizer(text, add_special_tokens=False,
                                                        return_offsets_mapping=True)["offset_mapping"]]
        pieces = []
        first = 0
        while first < len(starts):
            last = min(first + budget, len(starts))
            if last < len(starts):
                # prefer a cut before a token that follows whitespace, so no word is cut in two
                word_start = next((i for i in range(last, first, -1) if text[starts[i] - 1:starts[i]].isspace()), None)
                last = word_start or last
            piece = text[starts[first]:starts[last] if last < len(starts) else len(text)]
            # a slice that starts inside a word can tokenize a little differently: shrink until it fits
            while last - first > 1 and self.count(piece) > budget:
                last -= 1
                piece = text[starts[first]:starts[last]]
            pieces.append(piece.strip())
            first = last
        return [piece for piece in pieces if piece]

    def _split_table(self, block: str, budget: int) -> list[str]:
        lines = [line for line in block.splitlines() if line.strip()]
        header = lines[:1]
        rows = lines[1:]
        if rows and _TABLE_SEPARATOR.match(rows[0]):
            header, rows = lines[:2], lines[2:]
        head_text = "\n".join(header)
        head_tokens = self.count(head_text) + 1
        pieces: list[str] = []
        group: list[str] = []
        used = head_tokens
        for row in rows:
            row_tokens = self.count(row) + 1
            if group and used + row_tokens > budget:
                pieces.append("\n".join(header + group))
                group, used = [], head_tokens
            if head_tokens + row_tokens > budget:
                # A single row larger than the budget is the one case where a row is cut: each piece
                # still carries the header, so every piece reads as part of the same table.
                self.report.oversized_rows.append(row[:80])
                row_budget = max(budget - head_tokens, 8)
                pieces.extend("\n".join(header + [piece]) for piece in self._split_prose(row, row_budget, overlap=0))
                continue
            group.append(row)
            used += row_tokens
        if group or not rows:
            pieces.append("\n".join(header + group))
        return pieces


def _blocks(text: str) -> list[tuple[bool, str]]:
    """Split text into alternating prose and Markdown-table blocks, in order."""
    blocks: list[tuple[bool, list[str]]] = []
    for line in text.splitlines():
        is_table = bool(_TABLE_LINE.match(line))
        if blocks and blocks[-1][0] == is_table:
            blocks[-1][1].append(line)
        else:
            blocks.append((is_table, [line]))
    return [(is_table, "\n".join(lines)) for is_table, lines in blocks]
