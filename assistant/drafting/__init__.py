"""Discharge-summary drafting: FHIR and notes readers, stay assembly, drafts, and the batch runner."""

from assistant.drafting.runner import (
    DraftingResources,
    DraftOptions,
    RunSummary,
    load_resources,
    read_stays,
    run_drafts,
)
from assistant.drafting.stay import Fact, Medications, Note, ReadResult, RecordError, Stay, StayError

__all__ = [
    "DraftOptions",
    "DraftingResources",
    "Fact",
    "Medications",
    "Note",
    "ReadResult",
    "RecordError",
    "RunSummary",
    "Stay",
    "StayError",
    "load_resources",
    "read_stays",
    "run_drafts",
]
