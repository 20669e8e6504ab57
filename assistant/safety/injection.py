"""Detect and neutralise instructions planted in retrieved text or notes (prompt injection).

Retrieved chunks are fenced as data in the prompt. On top of that, this module tells the clinician
when a source tries to give the model orders, and removes each such sentence from the text the
model sees, so a tampered document cannot steer the answer. Detection is by pattern, so an
instruction phrased in a way no pattern covers still reaches the model, fenced as data.
"""

from __future__ import annotations

import re

# Phrasings aimed at the model rather than at a clinical reader.
INJECTION_PATTERNS: dict[str, re.Pattern[str]] = {
    "override": re.compile(
        r"\b(ignore|disregard|forget|override)\b[^.\n]{0,40}\b(previous|prior|earlier|above|all|any|system)\b"
        r"[^.\n]{0,20}\b(rules?|instructions?|prompts?|directions?|guidance)\b", re.I),
    "role_change": re.compile(r"\b(you are now|act as|pretend to be|new instructions?:|system prompt)\b", re.I),
    "output_format": re.compile(
        r"\b(answer|respond|reply|output)\b[^.\n]{0,20}\b(in|as|with)\s+(json|xml|yaml|code)\b", re.I),
    "denial": re.compile(r"\bsay\b[^.\n]{0,30}\bno\b[^.\n]{0,30}\b(allerg\w*|contraindications?|documented)\b", re.I),
    "exfiltration": re.compile(
        r"\b(reveal|print|repeat|show)\b[^.\n]{0,30}\b(system prompt|instructions|password|api key)\b", re.I),
}
# Written where a planted instruction was, so the model sees that something was taken out.
REMOVED_INSTRUCTION = "[instruction aimed at the model removed by bedside]"
# A sentence ends at . ! ? or a line break; the removal covers the whole sentence around a match.
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def find_injections(text: str) -> list[dict[str, str]]:
    """Return one entry per matched pattern: its kind and the matched text."""
    found = []
    for kind, pattern in INJECTION_PATTERNS.items():
        match = pattern.search(text)
        if match:
            found.append({"kind": kind, "match": match.group(0)})
    return found


def neutralize_injections(text: str) -> str:
    """Return `text` with every sentence that matches an injection pattern replaced by REMOVED_INSTRUCTION.

    Text without a match is returned unchanged, so prompts built from clean sources stay identical.
    """
    spans = []
    for pattern in INJECTION_PATTERNS.values():
        for match in pattern.finditer(text):
            spans.append(_sentence_around(text, match.start(), match.end()))
    if not spans:
        return text

    # merge overlapping sentences, then rebuild the text around them
    spans.sort()
    merged = [spans[0]]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    pieces, position = [], 0
    for start, end in merged:
        pieces.append(text[position:start])
        pieces.append(REMOVED_INSTRUCTION)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _sentence_around(text: str, start: int, end: int) -> tuple[int, int]:
    """Return the span of the sentence that contains text[start:end], without surrounding white space."""
    before = [m.end() for m in _SENTENCE_END.finditer(text, 0, start)]
    first = before[-1] if before else 0
    after = _SENTENCE_END.search(text, end)
    if after is None:
        last = len(text)
    elif after.group(0) == "\n":
        # the line break stays, so the lines around a removed sentence stay apart
        last = after.start()
    else:
        last = after.end()
    while first < start and text[first].isspace():
        first += 1
    return first, last
