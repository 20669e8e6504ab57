"""Reading stays from notes JSONL: one stay a line, for sources without FHIR.

Each line is an object::

    {"encounter_id": "E1", "patient_id": "P1", "admitted": "2024-03-01T08:00:00Z",
     "discharged": "2024-03-04", "notes": [{"time": "...", "author": "...", "text": "..."}],
     "diagnoses": ["Community-acquired pneumonia", {"name": "...", "code": "J18.9"}],
     "medications": ["Amoxicillin 500 mg", {"name": "...", "dose": "...", "change": "new"}]}

`encounter_id`, `patient_id`, `admitted`, `discharged` and a non-empty `notes` list are required.
Optional lists, each of strings or objects with a `name`, are `diagnoses`, `medications`,
`procedures`, `allergies` and `follow_up`. A medication's `change` relative to admission is new,
continued, changed or stopped. Optional `reason` is a string or a list of them, and optional `kind`
is "inpatient" (the default) or "emergency".
Dates are ISO 8601; a time without a zone is read as UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from assistant.drafting.stay import (
    Fact,
    Medications,
    Note,
    ReadResult,
    RecordError,
    Stay,
    StayError,
    check_safe_id,
    json_problem,
    parse_time,
)

logger = logging.getLogger(__name__)

MEDICATION_CHANGES = ("new", "continued", "changed", "stopped")
STAY_KINDS = ("inpatient", "emergency")


def read_notes(
    path: Path,
    *,
    include_emergency: bool = False,
    encounter_ids: list[str] | None = None,
    limit: int | None = None,
) -> ReadResult:
    """Read a notes JSONL file; lines that fail become errors and reading goes on."""
    path = Path(path)
    if not path.is_file():
        raise StayError(f"notes file {str(path)!r} not found; pass a JSONL file with one stay a line")
    requested = set(encounter_ids) if encounter_ids else None
    stays: list[Stay] = []
    errors: list[RecordError] = []
    seen: dict[str, int] = {}
    discovered = 0

    # one stay a line; a line that fails is reported by number
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            parsed = _parse_line(raw, number, path)
            if isinstance(parsed, RecordError):
                errors.append(parsed)
                continue
            if parsed.kind == "emergency" and not include_emergency:
                continue
            discovered += 1
            if parsed.encounter_id in seen:
                errors.append(
                    RecordError(
                        reason=f"encounter_id {parsed.encounter_id!r} also appears on line "
                        f"{seen[parsed.encounter_id]}; each stay must have its own id",
                        encounter_id=parsed.encounter_id,
                        file=str(path),
                        line=number,
                    )
                )
                continue
            seen[parsed.encounter_id] = number
            if requested is None or parsed.encounter_id in requested:
                stays.append(parsed)

    # selection: requested ids that are absent, then admission order and the limit
    for missing in sorted((requested or set()) - set(seen)):
        reason = f"encounter {missing} is not in {path.name}; check the id"
        errors.append(RecordError(reason=reason, encounter_id=missing))
    stays.sort(key=lambda s: (s.admitted_at, s.encounter_id))
    if limit is not None:
        stays = stays[:limit]
    return ReadResult(stays=stays, errors=errors, discovered=discovered)


def _parse_line(raw: bytes, number: int, path: Path) -> Stay | RecordError:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        reason = json_problem(err)
        return RecordError(
            reason=f"line {number} of {path.name} is not valid JSON ({reason}); the line was skipped",
            file=str(path),
            line=number,
        )
    try:
        return stay_from_record(record, f"line {number} of {path.name}")
    except StayError as err:
        encounter_id = record.get("encounter_id") if isinstance(record, dict) else None
        return RecordError(
            reason=str(err),
            encounter_id=encounter_id if isinstance(encounter_id, str) else None,
            file=str(path),
            line=number,
        )


def _time(value: Any, label: str, *, end: bool = False) -> dt.datetime:
    if not isinstance(value, str) or not value.strip():
        raise StayError(f"{label} is missing; give it as an ISO 8601 date or date and time")
    try:
        return parse_time(value, end=end, label=label)
    except StayError:
        pass
    try:
        moment = dt.datetime.fromisoformat(value.strip())
    except ValueError as err:
        raise StayError(
            f"{label} {value!r} is not a valid date; write it as YYYY-MM-DD or YYYY-MM-DDThh:mm"
        ) from err
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _items(record: dict[str, Any], field: str, where: str) -> list[dict[str, Any]]:
    """Normalise an optional list of strings or {"name": …} objects to objects."""
    value = record.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise StayError(f"{where}: `{field}` must be a list of strings or objects with a `name`")
    items = []
    for position, item in enumerate(value):
        if isinstance(item, str) and item.strip():
            items.append({"name": item.strip()})
        elif isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"].strip():
            items.append(item)
        else:
            raise StayError(
                f"{where}: `{field}[{position}]` must be a non-empty string or an object with a string `name`"
            )
    return items


def stay_from_record(record: Any, where: str) -> Stay:
    """Build a Stay from one notes JSONL object, raising StayError naming the bad field."""
    if not isinstance(record, dict):
        raise StayError(f"{where} is not a JSON object")
    encounter_id = check_safe_id(record.get("encounter_id"), f"{where}: encounter_id")
    patient_id = record.get("patient_id")
    if not isinstance(patient_id, str) or not patient_id.strip():
        raise StayError(f"{where}: patient_id is missing; give the patient's id as a string")
    kind = record.get("kind", "inpatient")
    if kind not in STAY_KINDS:
        raise StayError(f"{where}: kind {kind!r} is invalid; use inpatient or emergency")
    admitted_at = _time(record.get("admitted"), f"{where}: admitted")
    discharged_at = _time(record.get("discharged"), f"{where}: discharged", end=True)
    if discharged_at < admitted_at:
        raise StayError(
            f"{where}: discharged ({record['discharged']}) is before admitted ({record['admitted']})"
        )

    prefix = f"notes:{encounter_id}"
    stay = Stay(
        encounter_id=encounter_id,
        patient_id=patient_id,
        encounter_source=prefix,
        patient_source=prefix,
        kind=kind,
        admitted=record["admitted"],
        discharged=record["discharged"],
        admitted_at=admitted_at,
        discharged_at=discharged_at,
        origin=where,
        records=[record],
        patient={"name": None, "birth_date": None, "gender": None, "encounter": {"class": kind}},
    )

    notes = record.get("notes")
    if not isinstance(notes, list) or not notes:
        raise StayError(f"{where}: `notes` must be a non-empty list of objects with a `text`")
    for position, note in enumerate(notes):
        if not isinstance(note, dict) or not isinstance(note.get("text"), str) or not note["text"].strip():
            raise StayError(f"{where}: notes[{position}] must be an object with a non-empty string `text`")
        if note.get("time") is not None:
            _time(note["time"], f"{where}: notes[{position}].time")
        stay.notes.append(
            Note(
                source=f"{prefix}#notes[{position}]",
                text=note["text"].strip(),
                time=note.get("time"),
                author=note.get("author"),
            )
        )
    stay.notes.sort(key=lambda n: (n.time or "", n.source))

    reasons = record.get("reason")
    reasons = [reasons] if isinstance(reasons, str) else _items(record, "reason", where)
    stay.reasons = [
        Fact(text=r if isinstance(r, str) else r["name"], sources=[f"{prefix}#reason"]) for r in reasons
    ]
    stay.diagnoses = [
        Fact(text=item["name"], sources=[f"{prefix}#diagnoses[{i}]"], code=item.get("code"))
        for i, item in enumerate(_items(record, "diagnoses", where))
    ]
    stay.procedures = [
        Fact(text=item["name"], sources=[f"{prefix}#procedures[{i}]"], date=item.get("date"))
        for i, item in enumerate(_items(record, "procedures", where))
    ]
    stay.allergies = [
        Fact(text=item["name"], sources=[f"{prefix}#allergies[{i}]"], detail=item.get("reaction"))
        for i, item in enumerate(_items(record, "allergies", where))
    ]
    stay.follow_up = [
        Fact(text=item["name"], sources=[f"{prefix}#follow_up[{i}]"])
        for i, item in enumerate(_items(record, "follow_up", where))
    ]
    stay.medications = _medications(_items(record, "medications", where), prefix, where)
    return stay


def _medications(items: list[dict[str, Any]], prefix: str, where: str) -> Medications:
    medications = Medications()
    for position, item in enumerate(items):
        change = item.get("change")
        if change is not None and change not in MEDICATION_CHANGES:
            raise StayError(
                f"{where}: medications[{position}].change {change!r} is invalid; use one of "
                f"{', '.join(MEDICATION_CHANGES)}"
            )
        fact = Fact(
            text=item["name"],
            sources=[f"{prefix}#medications[{position}]"],
            detail=item.get("dose"),
            status=change or "unknown",
        )
        if change in {"continued", "changed", "stopped"}:
            medications.on_admission.append(
                Fact(text=fact.text, sources=list(fact.sources), status="on admission")
            )
        if change == "stopped":
            medications.stopped.append(fact)
        else:
            medications.at_discharge.append(fact)
    return medications
