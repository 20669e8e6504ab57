"""De-identification of free text before indexing or training, with Microsoft Presidio.

Structured identifiers (MRN, phone, email, SSN, dates, street addresses, URLs, IP addresses) are
found by Presidio's pattern recognizers plus two of ours (MRN and street address). Person names need
a statistical NER model: when a spaCy English pipeline (`en_core_web_*`) is installed it is used;
otherwise names are NOT detected, and every report says so.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Presidio entity -> the placeholder written in place of the text
PLACEHOLDERS = {
    "MEDICAL_RECORD_NUMBER": "[MRN]",
    "PHONE_NUMBER": "[PHONE]",
    "EMAIL_ADDRESS": "[EMAIL]",
    "US_SSN": "[SSN]",
    "DATE_TIME": "[DATE]",
    "STREET_ADDRESS": "[ADDRESS]",
    "URL": "[URL]",
    "IP_ADDRESS": "[IP]",
    "PERSON": "[NAME]",
}
SPACY_PIPELINES = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")
MIN_SCORE = 0.3


@dataclass
class ScrubReport:
    """Counts of replaced identifiers per kind, and whether person names could be detected."""

    counts: Counter = field(default_factory=Counter)
    names_detected: bool = False
    ner_model: str | None = None

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items())) or "no identifiers found"
        names = (f"person names detected with {self.ner_model}" if self.names_detected else
                 "person names NOT detected: no spaCy English NER pipeline is installed "
                 "(install one, e.g. en_core_web_sm, to scrub names)")
        return f"replaced: {kinds}; {names}"


class Scrubber:
    """Presidio analyzer + anonymizer, built once per process (loading spaCy takes seconds)."""

    _instance: Scrubber | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import spacy
        from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_anonymizer import AnonymizerEngine

        _offline_tldextract()
        self.ner_model = next((name for name in SPACY_PIPELINES if spacy.util.is_package(name)), None)
        pipeline = spacy.load(self.ner_model) if self.ner_model else spacy.blank("en")

        class _LoadedEngine(SpacyNlpEngine):
            # Presidio would download en_core_web_lg; hand it the pipeline already loaded instead.
            def load(self) -> None:
                self.nlp = {"en": pipeline}

        engine = _LoadedEngine(models=[{"lang_code": "en", "model_name": self.ner_model or "blank"}])
        engine.load()
        registry = RecognizerRegistry(supported_languages=["en"])
        registry.load_predefined_recognizers(languages=["en"], nlp_engine=engine)
        registry.add_recognizer(PatternRecognizer(
            supported_entity="MEDICAL_RECORD_NUMBER",
            patterns=[Pattern("mrn", r"\b(?:MRN|medical record(?: number)?|record no\.?)"
                                     r"[:#\s]*[A-Z]{0,3}\d{5,12}\b", 0.9)],
        ))
        registry.add_recognizer(PatternRecognizer(
            supported_entity="STREET_ADDRESS",
            patterns=[Pattern("street", r"\b\d{1,5}(?:\s+[A-Z][a-z]+){1,4}\s+(?:Street|St|Avenue|Ave|Road|Rd|"
                                        r"Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl)\b\.?", 0.7)],
        ))
        self.analyzer = AnalyzerEngine(nlp_engine=engine, registry=registry, supported_languages=["en"])
        self.anonymizer = AnonymizerEngine()
        self.entities = [e for e in PLACEHOLDERS if e != "PERSON" or self.ner_model]
        if not self.ner_model:
            logger.warning("no spaCy English NER pipeline installed: person names will NOT be scrubbed")

    @classmethod
    def get(cls) -> Scrubber:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def scrub(self, text: str, report: ScrubReport | None = None) -> str:
        from presidio_anonymizer.entities import OperatorConfig

        if not text.strip():
            return text
        results = self.analyzer.analyze(text=text, language="en", entities=self.entities, score_threshold=MIN_SCORE)
        if report is not None:
            report.names_detected = self.ner_model is not None
            report.ner_model = self.ner_model
            # overlapping findings are merged by the anonymizer; count what it replaces
        operators = {entity: OperatorConfig("replace", {"new_value": value}) for entity, value in PLACEHOLDERS.items()}
        output = self.anonymizer.anonymize(text=text, analyzer_results=results, operators=operators)
        if report is not None:
            report.counts.update(item.entity_type for item in output.items)
        return output.text


def _offline_tldextract() -> None:
    """Make tldextract use its bundled public-suffix snapshot instead of downloading the list."""
    import tldextract
    import tldextract.tldextract as module

    module.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())
    tldextract.extract = module.TLD_EXTRACTOR


def scrub_text(text: str, report: ScrubReport | None = None) -> str:
    return Scrubber.get().scrub(text, report)


def scrub_value(value: Any, scrub: Callable[[str], str]) -> Any:
    """Scrub every string inside a JSON value, keeping its structure and keys."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [scrub_value(v, scrub) for v in value]
    if isinstance(value, dict):
        return {k: scrub_value(v, scrub) for k, v in value.items()}
    return value


def scrub_jsonl(text: str, source: str, report: ScrubReport,
                problems: list[tuple[int, str]] | None = None) -> str:
    """Scrub every string value of each JSON line of `text`; blank lines stay, keys and structure too.

    A line that is not valid JSON is never copied, because it could not be scrubbed. Without
    `problems` it raises BedsideError naming `source` and the line. With `problems` it becomes a
    blank line, so later lines keep their numbers, and (line, reason) is appended there.
    """
    import json

    from assistant.errors import BedsideError
    from assistant.jsonl import jsonl_lines

    def scrub(value: str) -> str:
        return scrub_text(value, report)

    lines = []
    for number, line in enumerate(jsonl_lines(text.removesuffix("\n")), 1):
        if not line.strip():
            lines.append(line)
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
            if problems is None:
                raise BedsideError(
                    f"{source}:{number} is not valid JSON ({reason}); fix the line and rerun"
                ) from err
            problems.append((number, f"invalid JSON ({reason}); left out of the scrubbed copy"))
            lines.append("")
            continue
        lines.append(json.dumps(scrub_value(record, scrub), ensure_ascii=False))
    return "\n".join(lines) + "\n"


def scrub_jsonl_file(source: Path, target: Path,
                     problems: list[tuple[int, str]] | None = None) -> ScrubReport:
    """Write a scrubbed copy of the JSONL file `source` to `target` atomically; return what was replaced."""
    from assistant.corpus.text import read_utf8
    from assistant.errors import BedsideError
    from assistant.fileio import atomic_write_text

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise BedsideError(f"{str(source)!r} not found; pass an existing JSONL file")
    if target.resolve() == source.resolve():
        raise BedsideError(f"the scrubbed copy would overwrite {str(source)!r}; write it to another file")
    try:
        # invalid UTF-8 raises CorpusError, which names the byte and the fix
        text = read_utf8(source)
    except OSError as err:
        raise BedsideError(
            f"{str(source)!r} cannot be read ({err.strerror or err}); check its permissions"
        ) from err
    report = ScrubReport()
    cleaned = scrub_jsonl(text, str(source), report, problems)
    report.names_detected = Scrubber.get().ner_model is not None
    report.ner_model = Scrubber.get().ner_model
    atomic_write_text(target, cleaned)
    return report


def scrub_documents(documents: list[Any]) -> tuple[list[Any], ScrubReport]:
    """Scrub the text and title of each `Document` in place of a copy; returns the copies and the report."""
    import copy

    report = ScrubReport()
    scrubber = Scrubber.get()
    cleaned = []
    for document in documents:
        twin = copy.deepcopy(document)
        twin.title = scrubber.scrub(twin.title, report)
        for section in twin.sections:
            section.text = scrubber.scrub(section.text, report)
        cleaned.append(twin)
    report.names_detected = scrubber.ner_model is not None
    report.ner_model = scrubber.ner_model
    return cleaned, report
