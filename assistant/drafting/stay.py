"""A hospital stay as the drafter uses it: structured facts with their record ids, and the notes.

Readers (`fhir`, `notes`) build `Stay` objects; nothing downstream looks at the input format again.
Every fact keeps the ids of the records it was taken from (`Condition/<id>`, `notes:<encounter>#…`),
so each line of a draft can be traced back to the record.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from assistant.errors import BedsideError

# A FHIR dateTime: year, optional month, day, and time with seconds and a mandatory zone.
FHIR_DATETIME = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)(?P<zone>Z|[+-]\d{2}:\d{2}))?)?)?$"
)
# SNOMED CT display names end in a semantic tag such as "(disorder)", noise in prompts and queries
SEMANTIC_TAG = re.compile(r"\s*\((disorder|finding|situation|procedure|morphologic abnormality)\)\s*$", re.I)
# Encounter ids become file names, so they must not carry path separators or start with a dot.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StayError(BedsideError):
    """A stay that cannot be drafted; the message names the record and the reason."""


def parse_time(value: str, *, end: bool = False, label: str = "date") -> dt.datetime:
    """Parse a FHIR date or dateTime into an aware datetime for comparisons.

    Partial dates cover a span: with `end=False` they mean its first instant, with `end=True` its
    last, so "2020-05" as a period end includes the whole of May. Values without a zone are dates,
    read as UTC.
    """
    match = FHIR_DATETIME.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise StayError(
            f"{label} {value!r} is not a valid date; write it as YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz"
        )
    year = int(match["year"])
    month = int(match["month"] or (12 if end else 1))
    try:
        if match["time"]:
            text = f"{match['year']}-{match['month']}-{match['day']}T{match['time']}"
            zone = "+00:00" if match["zone"] == "Z" else match["zone"]
            return dt.datetime.fromisoformat(text + zone)
        if match["day"]:
            day = dt.date(year, month, int(match["day"]))
        elif end:
            day = dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)
        else:
            day = dt.date(year, month, 1)
    except ValueError as err:
        raise StayError(f"{label} {value!r} is not a valid date ({err})") from err
    clock = dt.time.max if end else dt.time.min
    return dt.datetime.combine(day, clock, tzinfo=dt.timezone.utc)


def json_problem(err: Exception) -> str:
    """Describe why a line or file could not be parsed as JSON, for a RecordError reason."""
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(err, RecursionError):
        # the json module recurses once per nesting level and gives up near 1,000
        return "nested too deeply"
    return getattr(err, "msg", str(err))


def strip_semantic_tag(text: str) -> str:
    return SEMANTIC_TAG.sub("", text)


def check_safe_id(value: str, label: str) -> str:
    """Return `value` when it can serve as a file name; raise naming the rule otherwise."""
    if not isinstance(value, str) or not SAFE_ID.match(value):
        raise StayError(
            f"{label} {value!r} cannot name an output file; use letters, digits, '.', '_' or '-' "
            "(at most 128, not starting with '.')"
        )
    return value


@dataclass
class Fact:
    """One structured item of a draft, filled from the record and never generated."""

    text: str
    sources: list[str]
    code: str | None = None
    date: str | None = None
    status: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class Note:
    """A clinical note of the stay; `source` is the record id provenance points to."""

    source: str
    text: str
    time: str | None = None
    author: str | None = None
    title: str | None = None


@dataclass
class Medications:
    """Medications compared between admission and discharge, keyed by drug code (or name).

    `at_discharge` items carry `status` "new", "continued" or "changed", or "unknown" when the record
    gives no admission list. `stopped` items were taken on admission and not at discharge.
    `during_stay_only` items were ordered in the stay and not continued after it.
    """

    on_admission: list[Fact] = field(default_factory=list)
    at_discharge: list[Fact] = field(default_factory=list)
    stopped: list[Fact] = field(default_factory=list)
    during_stay_only: list[Fact] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {
            name: [fact.to_dict() for fact in getattr(self, name)]
            for name in ("on_admission", "at_discharge", "stopped", "during_stay_only")
        }


@dataclass
class Stay:
    """Everything known about one ended stay, ready for drafting."""

    encounter_id: str
    patient_id: str
    encounter_source: str
    patient_source: str
    kind: str
    admitted: str
    discharged: str
    admitted_at: dt.datetime
    discharged_at: dt.datetime
    patient: dict[str, Any] = field(default_factory=dict)
    reasons: list[Fact] = field(default_factory=list)
    diagnoses: list[Fact] = field(default_factory=list)
    procedures: list[Fact] = field(default_factory=list)
    medications: Medications = field(default_factory=Medications)
    allergies: list[Fact] = field(default_factory=list)
    immunizations: list[Fact] = field(default_factory=list)
    follow_up: list[Fact] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    # raw input records this stay was built from (canonical JSON), hashed to detect changed input
    records: list[dict[str, Any]] = field(default_factory=list)
    origin: str = ""
    flags: list[dict[str, Any]] = field(default_factory=list)

    @property
    def length_of_stay_days(self) -> int:
        """Calendar days between the admission and discharge dates as recorded (0 for a same-day stay)."""
        return (dt.date.fromisoformat(self.discharged[:10]) - dt.date.fromisoformat(self.admitted[:10])).days

    @property
    def duration_hours(self) -> float:
        return round((self.discharged_at - self.admitted_at).total_seconds() / 3600, 1)

    def all_facts(self) -> list[Fact]:
        meds = self.medications
        return [
            *self.reasons,
            *self.diagnoses,
            *self.procedures,
            *meds.on_admission,
            *meds.at_discharge,
            *meds.stopped,
            *meds.during_stay_only,
            *self.allergies,
            *self.immunizations,
            *self.follow_up,
        ]


@dataclass
class RecordError:
    """A line, resource or stay that failed, as written to errors.jsonl."""

    reason: str
    encounter_id: str | None = None
    resource: str | None = None
    file: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class ReadResult:
    """Reader output: stays ready to draft, failures, and stays that have not ended yet."""

    stays: list[Stay]
    errors: list[RecordError]
    discovered: int
    not_ended: list[str] = field(default_factory=list)
    unreadable_lines: int = 0
