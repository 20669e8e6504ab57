"""Citation verification: markers must name a source in the prompt, and each sentence needs support.

A sentence's support is the cosine similarity between its embedding and the embedding of the chunk
it cites (the best one when it cites several). A sentence that cites nothing is attributed to the
most similar source when that similarity clears the threshold, and flagged as such; otherwise it is
flagged as unsupported, so no claim reaches the clinician without either a source or a warning.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from assistant.retrieval import Hit

GROUP_MARKER = re.compile(r"\[(\s*\d+(?:\s*[,;]\s*\d+)*\s*)\]")
MARKER = re.compile(r"\[(\d+)\]")
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?")
# a sentence ends at . ! or ? followed by space, unless the next thing is a citation marker
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?!\[\d)|\n+")


@dataclass
class Citation:
    """What marker [n] points to: the exact chunk, document, version and date."""

    marker: int
    chunk_id: str
    doc_id: str
    title: str
    source: str
    text: str
    section: str | None
    page: int | None
    date: str | None
    issuer: str | None
    version: str | None
    support: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SentenceCheck:
    text: str
    markers: list[int]
    support: float
    supported: bool
    auto_cited: bool = False


@dataclass
class Verification:
    text: str
    citations: list[Citation]
    sentences: list[SentenceCheck]
    flags: list[dict[str, Any]] = field(default_factory=list)


def normalize_markers(text: str) -> str:
    """Rewrite grouped markers such as [1, 2] as [1][2]."""
    return GROUP_MARKER.sub(lambda m: "".join(f"[{n.strip()}]" for n in re.split(r"[,;]", m.group(1))), text)


def numbers_in(text: str) -> set[float]:
    """Numeric values written in `text` (1,000 and 1000 alike; a decimal comma is read as a point)."""
    values = set()
    for token in NUMBER.findall(MARKER.sub("", text)):
        token = token.replace(",", "") if re.fullmatch(r"\d{1,3},\d{3}", token) else token.replace(",", ".")
        values.add(float(token))
    return values


def unsourced_numbers(sentence: str, sources: list[Hit]) -> list[float]:
    """Numbers in the sentence that appear in none of its sources.

    Embedding similarity cannot tell "0.1 units/kg/hour" from "1.0 units/kg/hour", and a wrong dose
    is the most dangerous error a small model makes, so every number must be found in a cited source.
    """
    available = set().union(*(numbers_in(f"{hit.title} {hit.section or ''} {hit.text}") for hit in sources))
    return sorted(numbers_in(sentence) - available)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]


def verify_citations(text: str, hits: list[Hit], embedder: Any, min_support: float) -> Verification:
    """Remove markers that name no source, score every sentence, and list the citations used."""
    flags: list[dict[str, Any]] = []
    text = normalize_markers(text)

    # markers outside 1..len(hits) name no source: remove and flag each
    def keep_or_drop(match: re.Match) -> str:
        number = int(match.group(1))
        if 1 <= number <= len(hits):
            return match.group(0)
        flags.append({"type": "invalid_citation", "marker": number,
                      "detail": f"[{number}] named no source (only {len(hits)} were given); removed"})
        return ""

    text = MARKER.sub(keep_or_drop, text)
    # collapse a marker repeated back to back, e.g. [2][2]
    text = re.sub(r"(\[\d+\])(?:\s*\1)+", r"\1", text)
    sentences = split_sentences(text)
    if not sentences or not hits:
        return Verification(text=text.strip(), citations=[], sentences=[], flags=flags)

    plain = [MARKER.sub("", s).strip() for s in sentences]
    vectors = embedder.encode(plain + [f"{h.title}\n{h.text}" for h in hits], normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
    sentence_vectors, hit_vectors = vectors[: len(plain)], vectors[len(plain):]
    similarity = sentence_vectors @ hit_vectors.T

    checks: list[SentenceCheck] = []
    rows: list[int] = []
    out_sentences: list[str] = []
    for row, sentence in enumerate(sentences):
        markers = [int(n) for n in MARKER.findall(sentence)]
        if not plain[row]:
            continue
        if markers:
            support = float(max(similarity[row, n - 1] for n in markers))
            missing = unsourced_numbers(sentence, [hits[n - 1] for n in markers])
            check = SentenceCheck(sentence, markers, round(support, 4), support >= min_support and not missing)
        else:
            best = int(np.argmax(similarity[row]))
            support = float(similarity[row, best])
            missing = unsourced_numbers(sentence, [hits[best]])
            if support >= min_support and not missing:
                sentence = f"{sentence} [{best + 1}]"
                check = SentenceCheck(sentence, [best + 1], round(support, 4), True, auto_cited=True)
                flags.append({"type": "auto_cited", "marker": best + 1, "sentence": plain[row],
                              "detail": "the model cited nothing here; the closest source was attached"})
            else:
                check = SentenceCheck(sentence, [], round(support, 4), False)
        if missing:
            shown = ", ".join(f"{value:g}" for value in missing)
            flags.append({"type": "number_not_in_source", "sentence": plain[row], "numbers": missing,
                          "detail": f"{shown} appear(s) in no cited source; check every figure against the source"})
        if not check.supported:
            flags.append({"type": "unsupported", "sentence": plain[row], "support": check.support,
                          "detail": "no cited source supports this sentence; verify it before use"})
        checks.append(check)
        rows.append(row)
        out_sentences.append(sentence)

    citations: dict[int, Citation] = {}
    for row, check in zip(rows, checks, strict=True):
        for number in check.markers:
            hit = hits[number - 1]
            support = round(float(similarity[row, number - 1]), 4)
            if number not in citations:
                citations[number] = Citation(
                    marker=number, chunk_id=hit.chunk_id, doc_id=hit.doc_id, title=hit.title, source=hit.source,
                    text=hit.text, section=hit.section, page=hit.page, date=hit.date, issuer=hit.issuer,
                    version=hit.version, support=support,
                )
            else:
                citations[number].support = max(citations[number].support, support)
    return Verification(text=" ".join(out_sentences), citations=list(citations.values()), sentences=checks,
                        flags=flags)
