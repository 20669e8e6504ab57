"""Detect instructions planted in retrieved text (prompt injection).

Retrieved chunks are fenced as data in the prompt; this check additionally tells the clinician when
a source tries to give the model orders, so a tampered document cannot pass unnoticed.
"""

from __future__ import annotations

import re

# Phrasings aimed at the model rather than at a clinical reader.
INJECTION_PATTERNS: dict[str, re.Pattern[str]] = {
    "override": re.compile(
        r"\b(ignore|disregard|forget|override)\b[^.\n]{0,40}\b(previous|prior|earlier|above|all|any|system)\b"
        r"[^.\n]{0,20}\b(rules?|instructions?|prompts?|directions?|guidance)\b", re.I),
    "role_change": re.compile(r"\b(you are now|act as|pretend to be|new instructions?:|system prompt)\b", re.I),
    "output_format": re.compile(r"\b(answer|respond|reply|output)\b[^.\n]{0,20}\b(in|as|with)\s+(json|xml|yaml|code)\b", re.I),
    "denial": re.compile(r"\bsay\b[^.\n]{0,30}\bno\b[^.\n]{0,30}\b(allerg\w*|contraindications?|documented)\b", re.I),
    "exfiltration": re.compile(r"\b(reveal|print|repeat|show)\b[^.\n]{0,30}\b(system prompt|instructions|password|api key)\b", re.I),
}


def find_injections(text: str) -> list[dict[str, str]]:
    """Return one entry per matched pattern: its kind and the matched text."""
    found = []
    for kind, pattern in INJECTION_PATTERNS.items():
        match = pattern.search(text)
        if match:
            found.append({"kind": kind, "match": match.group(0)})
    return found
