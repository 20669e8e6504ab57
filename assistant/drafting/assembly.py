"""Stay assembly: join FHIR resources to their encounter and derive each section's facts.

A resource belongs to a stay when its encounter reference points to the stay's Encounter. A
resource without an encounter reference belongs to it when its own time (authoredOn, performed,
date…) falls inside the stay's period and its subject is the stay's patient. Every joined resource
must have the stay's patient as subject, and a mismatch fails the stay rather than mix two patients
in one draft.

The rules each section follows (the tests recompute them from the raw ndjson):

- diagnoses: the patient's Conditions recorded in the stay, plus those active during it (onset or
  recordedDate at or before discharge, and no abatement before admission); refuted and
  entered-in-error Conditions are left out.
- medications: a MedicationRequest is ongoing at time T when it was authored at or before T and
  either its validity or dosage bounds period covers T (status not stopped/cancelled), or it has no
  such period and its status is active or on-hold. On admission: the patient's requests from outside
  the stay that were ongoing at admission. At discharge: requests ongoing at discharge among the
  stay's own and the admission list. Compared by drug code: new, continued, changed (other dosage),
  stopped (on admission, not at discharge) and given during the stay only.
- allergies: the patient's AllergyIntolerances recorded by discharge, not refuted, not resolved.

NOTE: FHIR statuses are the status at export time, and a stopped request without an end date gives
no stop time; such a request counts as not ongoing at either end of the stay.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from assistant.drafting.fhir import FhirInput, FhirRecord
from assistant.drafting.stay import (
    Fact,
    Medications,
    Note,
    ReadResult,
    RecordError,
    Stay,
    StayError,
    parse_time,
)

logger = logging.getLogger(__name__)

INPATIENT_CLASSES = frozenset({"IMP", "ACUTE", "NONAC"})
EMERGENCY_CLASSES = frozenset({"EMER"})
NOT_ENDED_STATUSES = frozenset({"planned", "arrived", "triaged", "in-progress", "onleave"})
NOT_A_STAY_STATUSES = frozenset({"cancelled", "entered-in-error"})
ONGOING_MEDICATION_STATUSES = frozenset({"active", "on-hold"})
NEVER_ONGOING_STATUSES = frozenset({"stopped", "cancelled", "entered-in-error", "draft"})
EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
INACTIVE_ALLERGY = frozenset({"inactive", "resolved"})
PENDING_PROCEDURE = frozenset({"preparation", "in-progress", "on-hold"})
PENDING_REQUEST = frozenset({"draft", "active", "on-hold"})
ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
# Types joined to a stay by their own time when they carry no encounter reference.
TIME_FIELDS = {
    "Condition": ("recordedDate", "onsetDateTime"),
    "MedicationRequest": ("authoredOn",),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
    "Immunization": ("occurrenceDateTime",),
    "DocumentReference": ("context.period.start", "date"),
    "ServiceRequest": ("authoredOn", "occurrenceDateTime"),
}


@dataclass
class _Links:
    """The input indexed by encounter and by patient, plus reference problems per record."""

    by_encounter: dict[str, list[FhirRecord]] = field(default_factory=lambda: defaultdict(list))
    by_patient: dict[str, list[FhirRecord]] = field(default_factory=lambda: defaultdict(list))
    problems: dict[int, str] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)


def stays_from_fhir(
    data: FhirInput,
    *,
    include_emergency: bool = False,
    encounter_ids: list[str] | None = None,
    limit: int | None = None,
) -> ReadResult:
    """Find the ended inpatient (and optionally emergency) stays and assemble the selected ones."""
    errors = list(data.errors)
    links = _index_links(data)

    # candidates: encounters of the drafted classes, in admission order
    requested = dict.fromkeys(encounter_ids) if encounter_ids else None
    candidates: list[tuple[FhirRecord, str]] = []
    for record in data.of_type("Encounter"):
        kind = _stay_kind(record.resource, include_emergency)
        if requested is not None and record.id in requested:
            requested[record.id] = record
            if kind is None:
                errors.append(
                    RecordError(
                        reason=f"encounter {record.id} has class {_class_code(record.resource)!r}; only "
                        "inpatient stays (and emergency ones with --include-emergency) are drafted",
                        encounter_id=record.id,
                        resource=record.key,
                        file=record.file,
                        line=record.line,
                    )
                )
        if kind is not None and record.resource.get("status") not in NOT_A_STAY_STATUSES:
            candidates.append((record, kind))
    candidates.sort(key=lambda item: (_sort_time(item[0].resource), item[0].id))
    discovered = len(candidates)
    if requested is not None:
        for missing in [key for key, value in requested.items() if value is None]:
            errors.append(
                RecordError(
                    reason=f"encounter {missing} is not in the input; check the id", encounter_id=missing
                )
            )
        candidates = [item for item in candidates if item[0].id in requested]

    # stays that have not ended yet are not drafted and not failures
    not_ended = []
    ended = []
    for record, kind in candidates:
        period = record.resource.get("period") or {}
        if not period.get("end") and record.resource.get("status") in NOT_ENDED_STATUSES:
            not_ended.append(record.id)
        else:
            ended.append((record, kind))
    if limit is not None:
        ended = ended[:limit]

    stays = []
    for record, kind in ended:
        try:
            stay = _assemble(record, kind, data, links)
        except StayError as err:
            errors.append(
                RecordError(
                    reason=str(err),
                    encounter_id=record.id,
                    resource=record.key,
                    file=record.file,
                    line=record.line,
                )
            )
            continue
        except ValueError as err:
            # the R4B models raise plain ValueErrors for a few malformed values (e.g. base64)
            errors.append(
                RecordError(
                    reason=f"{record.key}: {err}",
                    encounter_id=record.id,
                    resource=record.key,
                    file=record.file,
                    line=record.line,
                )
            )
            continue
        stays.append(stay)
    _attribute_unreadable(data, stays, errors)

    for index, problem in links.problems.items():
        if index not in links.reported:
            record = data.records[index]
            errors.append(
                RecordError(reason=problem, resource=record.key, file=record.file, line=record.line)
            )
    return ReadResult(
        stays=stays,
        errors=errors,
        discovered=discovered,
        not_ended=not_ended,
        unreadable_lines=len(data.unreadable),
    )


# indexing


def _index_links(data: FhirInput) -> _Links:
    links = _Links()
    for index, record in enumerate(data.records):
        raw = record.resource
        if record.type in {"Patient", "Encounter"}:
            # an Encounter's own subject is checked when its stay is assembled
            continue
        subject = (raw.get("subject") or raw.get("patient") or {}).get("reference")
        try:
            patient = data.resolve(subject)
            if patient is not None:
                links.by_patient[patient.key].append(record)
        except StayError as err:
            links.problems[index] = f"{record.key} at {record.where()}: subject {err}"
        for reference in _encounter_references(raw):
            try:
                encounter = data.resolve(reference)
            except StayError as err:
                links.problems.setdefault(
                    index,
                    f"{record.key} at {record.where()}: encounter {err}; it is not attached to any stay",
                )
                continue
            if encounter is not None:
                links.by_encounter[encounter.key].append(record)
    return links


def _encounter_references(raw: dict[str, Any]) -> list[str]:
    references = []
    if isinstance(raw.get("encounter"), dict):
        references.append(raw["encounter"].get("reference"))
    context = raw.get("context")
    if isinstance(context, dict):
        # in FHIR R4, DocumentReference.context.encounter is a list of references
        references += [
            ref.get("reference") for ref in context.get("encounter") or [] if isinstance(ref, dict)
        ]
    return [ref for ref in references if ref]


def _class_code(raw: dict[str, Any]) -> str | None:
    value = raw.get("class")
    if isinstance(value, dict):
        return value.get("code")
    if isinstance(value, list):
        # R5 shape: a list of CodeableConcepts
        for concept in value:
            for coding in (concept or {}).get("coding") or []:
                if coding.get("code"):
                    return coding["code"]
    return None


def _stay_kind(raw: dict[str, Any], include_emergency: bool) -> str | None:
    code = _class_code(raw)
    if code in INPATIENT_CLASSES:
        return "inpatient"
    if include_emergency and code in EMERGENCY_CLASSES:
        return "emergency"
    return None


def _sort_time(raw: dict[str, Any]) -> dt.datetime:
    try:
        return parse_time((raw.get("period") or {}).get("start", ""))
    except StayError:
        return dt.datetime.max.replace(tzinfo=dt.timezone.utc)


def _attribute_unreadable(data: FhirInput, stays: list[Stay], errors: list[RecordError]) -> None:
    """Fail stays named by an unreadable line; flag stays whose patient it may concern."""
    if not data.unreadable:
        return
    patient_ids = {record.id for record in data.of_type("Patient")}
    failed = set()
    for error, text in data.unreadable:
        named_patients = {pid for pid in patient_ids if pid and pid in text}
        for stay in stays:
            if stay.encounter_id in text:
                failed.add(stay.encounter_id)
                errors.append(
                    RecordError(
                        reason=f"{error.file} line {error.line} mentions this encounter but is not valid "
                        "JSON, so a resource of the stay is missing; fix the line and rerun",
                        encounter_id=stay.encounter_id,
                        resource=stay.encounter_source,
                        file=error.file,
                        line=error.line,
                    )
                )
            elif not named_patients or stay.patient_id in named_patients:
                stay.flags.append(
                    {
                        "type": "incomplete_input",
                        "detail": (
                            f"{error.file} line {error.line} could not be read and may hold a resource of "
                            "this patient; check it before relying on the lists below"
                        ),
                    }
                )
    stays[:] = [stay for stay in stays if stay.encounter_id not in failed]


# one stay


def _assemble(record: FhirRecord, kind: str, data: FhirInput, links: _Links) -> Stay:
    data.model(record)
    raw = record.resource
    key = record.key
    period = raw.get("period") or {}
    if not period.get("start"):
        raise StayError(f"{key} has no period.start, so the admission time is unknown; add it")
    if not period.get("end"):
        raise StayError(
            f"{key} has status {raw.get('status')!r} but no period.end, so the discharge time is "
            "unknown; add period.end, or set status to in-progress if the stay has not ended"
        )
    admitted_at = parse_time(period["start"], label=f"{key} period.start")
    discharged_at = parse_time(period["end"], end=True, label=f"{key} period.end")
    if discharged_at < admitted_at:
        raise StayError(f"{key} ends ({period['end']}) before it starts ({period['start']}); fix the period")

    patient_record = _resolve(data, raw.get("subject", {}).get("reference"), f"{key} subject")
    if patient_record is None or patient_record.type != "Patient":
        raise StayError(f"{key} has no subject reference to a Patient in the input")
    data.model(patient_record)

    own = _own_records(record, patient_record, admitted_at, discharged_at, data, links)
    patient_records = links.by_patient.get(patient_record.key, [])
    stay = Stay(
        encounter_id=record.id,
        patient_id=patient_record.id,
        encounter_source=key,
        patient_source=patient_record.key,
        kind=kind,
        admitted=period["start"],
        discharged=period["end"],
        admitted_at=admitted_at,
        discharged_at=discharged_at,
        origin=record.where(),
        patient=_patient_facts(patient_record.resource),
    )
    stay.patient["encounter"] = _encounter_facts(raw)
    usable = _validated_patient_records(patient_records, own, data, links, stay)

    stay.reasons = _reasons(record, data)
    stay.diagnoses = _diagnoses(own["Condition"], usable["Condition"], admitted_at, discharged_at)
    stay.procedures = _procedures(own["Procedure"])
    stay.medications = _medications(
        own["MedicationRequest"], usable["MedicationRequest"], admitted_at, discharged_at, data
    )
    stay.allergies = _allergies(usable["AllergyIntolerance"], discharged_at)
    stay.immunizations = _group(
        [r for r in own["Immunization"] if r.resource.get("status") == "completed"],
        lambda r: r.resource.get("vaccineCode"),
        ("occurrenceDateTime",),
    )
    stay.notes = _notes(own["DocumentReference"], stay)
    stay.follow_up = _follow_up(stay, own, usable["CarePlan"], discharged_at)

    used = {key, patient_record.key}
    used |= {source for fact in stay.all_facts() for source in fact.sources}
    used |= {note.source for note in stay.notes}
    stay.records = [data.by_key[source].resource for source in sorted(used) if source in data.by_key]
    return stay


def _resolve(data: FhirInput, reference: str | None, label: str) -> FhirRecord | None:
    try:
        return data.resolve(reference)
    except StayError as err:
        raise StayError(f"{label}: {err}") from err


def _own_records(
    encounter: FhirRecord,
    patient: FhirRecord,
    start: dt.datetime,
    end: dt.datetime,
    data: FhirInput,
    links: _Links,
) -> dict[str, list[FhirRecord]]:
    """Collect the stay's own resources: linked by encounter reference, or by time when they have none."""
    own: dict[str, list[FhirRecord]] = defaultdict(list)
    for record in links.by_encounter.get(encounter.key, []):
        if record.position in links.problems:
            links.reported.add(record.position)
            raise StayError(
                f"{links.problems[record.position]}; it is linked to this stay, so the stay was not drafted"
            )
        data.model(record)
        subject = (record.resource.get("subject") or record.resource.get("patient") or {}).get("reference")
        if _resolve(data, subject, f"{record.key} subject") is not patient:
            raise StayError(
                f"{record.key} is linked to {encounter.key} but its subject is {subject!r}, not "
                f"{patient.key}; fix the reference so the draft does not mix two patients"
            )
        own[record.type].append(record)
    for record in links.by_patient.get(patient.key, []):
        if record.type in TIME_FIELDS and not _encounter_references(record.resource):
            when = _first_time(record.resource, TIME_FIELDS[record.type])
            if when and start <= parse_time(when, label=f"{record.key} time") <= end:
                data.model(record)
                own[record.type].append(record)
    return own


def _validated_patient_records(
    records: list[FhirRecord], own: dict[str, list[FhirRecord]], data: FhirInput, links: _Links, stay: Stay
) -> dict[str, list[FhirRecord]]:
    """Validate the patient's records that feed patient-level sections; report and flag invalid ones."""
    usable: dict[str, list[FhirRecord]] = defaultdict(list)
    own_ids = {id(r) for rows in own.values() for r in rows}
    for record in records:
        if record.type not in {"Condition", "MedicationRequest", "AllergyIntolerance", "CarePlan"}:
            continue
        if id(record) in own_ids:
            usable[record.type].append(record)
            continue
        try:
            data.model(record)
        except (StayError, ValueError) as err:
            links.problems.setdefault(record.position, str(err))
            stay.flags.append(
                {
                    "type": "incomplete_input",
                    "resource": record.key,
                    "detail": f"{record.key} of this patient is not valid FHIR and was left out; "
                    "the lists below may be incomplete (see errors.jsonl)",
                }
            )
            continue
        usable[record.type].append(record)
    # the stay's own Conditions count as the patient's too
    for record in own["Condition"]:
        if id(record) not in {id(r) for r in usable["Condition"]}:
            usable["Condition"].append(record)
    return usable


# field helpers


def _get(raw: dict[str, Any], path: str) -> Any:
    value: Any = raw
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _first_time(raw: dict[str, Any], paths: tuple[str, ...]) -> str | None:
    for path in paths:
        value = _get(raw, path)
        if isinstance(value, str) and value:
            return value
    return None


def _concept_text(concept: dict[str, Any] | None) -> str:
    if not concept:
        return "(not coded)"
    if concept.get("text"):
        return concept["text"]
    for coding in concept.get("coding") or []:
        if coding.get("display") or coding.get("code"):
            return coding.get("display") or coding["code"]
    return "(not coded)"


def _concept_code(concept: dict[str, Any] | None) -> str | None:
    for coding in (concept or {}).get("coding") or []:
        if coding.get("code"):
            return f"{coding.get('system', '')}|{coding['code']}"
    return None


def _status_code(concept: dict[str, Any] | None) -> str | None:
    for coding in (concept or {}).get("coding") or []:
        if coding.get("code"):
            return coding["code"]
    return None


def _group(
    records: list[FhirRecord], concept_of: Any, time_paths: tuple[str, ...], status: str | None = None
) -> list[Fact]:
    """Group records into one fact per code (or text) that lists every record carrying it, earliest first."""
    groups: dict[str, list[FhirRecord]] = {}
    for record in records:
        concept = concept_of(record)
        key = _concept_code(concept) or _concept_text(concept).casefold()
        groups.setdefault(key, []).append(record)
    facts = []
    for rows in groups.values():
        rows.sort(key=lambda r: (_first_time(r.resource, time_paths) or "", r.key))
        concept = concept_of(rows[0])
        facts.append(
            Fact(
                text=_concept_text(concept),
                sources=[r.key for r in rows],
                code=_concept_code(concept),
                date=_first_time(rows[0].resource, time_paths),
                status=status,
                detail=f"{len(rows)} times" if len(rows) > 1 else None,
            )
        )
    facts.sort(key=lambda f: (f.date or "", f.text))
    return facts


# sections


def _patient_facts(raw: dict[str, Any]) -> dict[str, Any]:
    names = raw.get("name") or []
    chosen = next((n for n in names if n.get("use") in {"official", "usual"}), names[0] if names else {})
    name = chosen.get("text") or " ".join([*(chosen.get("given") or []), chosen.get("family") or ""]).strip()
    return {"name": name or None, "birth_date": raw.get("birthDate"), "gender": raw.get("gender")}


def _encounter_facts(raw: dict[str, Any]) -> dict[str, Any]:
    types = [_concept_text(t) for t in raw.get("type") or []]
    disposition = _get(raw, "hospitalization.dischargeDisposition")
    return {
        "class": _class_code(raw),
        "status": raw.get("status"),
        "type": types[0] if types else None,
        "service_provider": _get(raw, "serviceProvider.display"),
        "discharge_disposition": _concept_text(disposition) if disposition else None,
    }


def _reasons(record: FhirRecord, data: FhirInput) -> list[Fact]:
    raw = record.resource
    reasons = [
        Fact(text=_concept_text(c), sources=[record.key], code=_concept_code(c))
        for c in raw.get("reasonCode") or []
    ]
    for reference in raw.get("reasonReference") or []:
        target = _resolve(data, reference.get("reference"), f"{record.key} reasonReference")
        if target is None:
            reasons.append(Fact(text=reference.get("display") or "(unresolved reason)", sources=[record.key]))
            continue
        data.model(target)
        reasons.append(
            Fact(
                text=_concept_text(target.resource.get("code")),
                sources=[target.key],
                code=_concept_code(target.resource.get("code")),
            )
        )
    return reasons


def _onset(raw: dict[str, Any]) -> str | None:
    return _first_time(raw, ("onsetDateTime", "onsetPeriod.start", "recordedDate"))


def _abatement(raw: dict[str, Any]) -> str | None:
    return _first_time(raw, ("abatementDateTime", "abatementPeriod.end"))


def _diagnoses(
    own: list[FhirRecord], conditions: list[FhirRecord], start: dt.datetime, end: dt.datetime
) -> list[Fact]:
    own_ids = {id(r) for r in own}
    chosen: list[tuple[FhirRecord, bool]] = []
    for record in conditions:
        raw = record.resource
        if _status_code(raw.get("verificationStatus")) in EXCLUDED_VERIFICATION:
            continue
        if id(record) in own_ids:
            chosen.append((record, True))
            continue
        onset, abated = _onset(raw), _abatement(raw)
        if onset is None:
            active = _status_code(raw.get("clinicalStatus")) in ACTIVE_CONDITION
        else:
            active = parse_time(onset, label=f"{record.key} onset") <= end and (
                abated is None or parse_time(abated, end=True, label=f"{record.key} abatement") >= start
            )
        if active:
            chosen.append((record, False))

    groups: dict[str, list[tuple[FhirRecord, bool]]] = {}
    for record, this_stay in chosen:
        concept = record.resource.get("code")
        groups.setdefault(_concept_code(concept) or _concept_text(concept).casefold(), []).append(
            (record, this_stay)
        )
    facts = []
    for rows in groups.values():
        rows.sort(key=lambda row: (_onset(row[0].resource) or "", row[0].key))
        first = rows[0][0].resource
        this_stay = any(flag for _, flag in rows)
        abated = [a for a in (_abatement(r.resource) for r, _ in rows) if a]
        detail = "recorded in this stay" if this_stay else "present during the stay"
        if abated:
            detail += f"; abated {max(abated)[:10]}"
        facts.append(
            Fact(
                text=_concept_text(first.get("code")),
                sources=[r.key for r, _ in rows],
                code=_concept_code(first.get("code")),
                date=_onset(first),
                status=_status_code(first.get("clinicalStatus")),
                detail=detail,
            )
        )
    facts.sort(key=lambda f: (f.detail is None or not f.detail.startswith("recorded"), f.date or "", f.text))
    return facts


def _procedures(records: list[FhirRecord]) -> list[Fact]:
    kept = [r for r in records if r.resource.get("status") != "entered-in-error"]
    facts = _group(kept, lambda r: r.resource.get("code"), TIME_FIELDS["Procedure"])
    for fact in facts:
        statuses = sorted({r.resource.get("status") for r in kept if r.key in fact.sources} - {None})
        fact.status = ", ".join(statuses) or None
    return facts


def _drug_concept(record: FhirRecord, data: FhirInput) -> dict[str, Any] | None:
    raw = record.resource
    if raw.get("medicationCodeableConcept"):
        return raw["medicationCodeableConcept"]
    reference = _get(raw, "medicationReference.reference")
    target = _resolve(data, reference, f"{record.key} medicationReference") if reference else None
    if target is None:
        display = _get(raw, "medicationReference.display")
        return {"text": display} if display else None
    data.model(target)
    return target.resource.get("code")


def _dosage_text(raw: dict[str, Any]) -> str | None:
    parts = []
    for dosage in raw.get("dosageInstruction") or []:
        if dosage.get("text"):
            parts.append(dosage["text"])
            continue
        pieces = []
        for dose in dosage.get("doseAndRate") or []:
            quantity = dose.get("doseQuantity") or {}
            if "value" in quantity:
                pieces.append(f"{quantity['value']:g} {quantity.get('unit', 'dose')}".strip())
        repeat = _get(dosage, "timing.repeat") or {}
        if repeat.get("frequency") and repeat.get("period"):
            pieces.append(
                f"{repeat['frequency']}x every {repeat['period']:g} {repeat.get('periodUnit', '')}".strip()
            )
        if dosage.get("asNeededBoolean"):
            pieces.append("as needed")
        if pieces:
            parts.append(", ".join(pieces))
    return "; ".join(parts) or None


def _bounds_end(raw: dict[str, Any]) -> str | None:
    ends = [_get(raw, "dispenseRequest.validityPeriod.end")]
    ends += [_get(d, "timing.repeat.boundsPeriod.end") for d in raw.get("dosageInstruction") or []]
    ends = [e for e in ends if isinstance(e, str) and e]
    return max(ends) if ends else None


def medication_ongoing_at(raw: dict[str, Any], moment: dt.datetime) -> bool:
    """Return whether a MedicationRequest was running at `moment`, by the rule in the module docstring."""
    status = raw.get("status")
    if status in NEVER_ONGOING_STATUSES:
        return False
    authored = raw.get("authoredOn")
    if authored and parse_time(authored, label="authoredOn") > moment:
        return False
    end = _bounds_end(raw)
    if end is not None:
        return parse_time(end, end=True, label="bounds end") >= moment
    return status in ONGOING_MEDICATION_STATUSES


def _medications(
    own: list[FhirRecord],
    patient_requests: list[FhirRecord],
    start: dt.datetime,
    end: dt.datetime,
    data: FhirInput,
) -> Medications:
    own_ids = {id(r) for r in own}
    admission = [
        r for r in patient_requests if id(r) not in own_ids and medication_ongoing_at(r.resource, start)
    ]
    discharge = [r for r in [*own, *admission] if medication_ongoing_at(r.resource, end)]

    def by_drug(records: list[FhirRecord]) -> dict[str, list[FhirRecord]]:
        groups: dict[str, list[FhirRecord]] = {}
        for record in sorted(records, key=lambda r: (r.resource.get("authoredOn") or "", r.key)):
            concept = _drug_concept(record, data)
            groups.setdefault(_concept_code(concept) or _concept_text(concept).casefold(), []).append(record)
        return groups

    def fact(rows: list[FhirRecord], status: str | None) -> Fact:
        concept = _drug_concept(rows[-1], data)
        return Fact(
            text=_concept_text(concept),
            sources=[r.key for r in rows],
            code=_concept_code(concept),
            # the first order's date, so "since" reads as when the drug was started
            date=rows[0].resource.get("authoredOn"),
            status=status,
            detail=_dosage_text(rows[-1].resource),
        )

    on_admission, at_discharge, during = by_drug(admission), by_drug(discharge), by_drug(own)
    medications = Medications()
    medications.on_admission = [fact(rows, "on admission") for rows in on_admission.values()]
    for drug, rows in at_discharge.items():
        if drug not in on_admission:
            status = "new"
        elif _dosage_text(rows[-1].resource) != _dosage_text(on_admission[drug][-1].resource):
            status = "changed"
        else:
            status = "continued"
        medications.at_discharge.append(fact(rows, status))
    medications.stopped = [
        fact(rows, "stopped") for drug, rows in on_admission.items() if drug not in at_discharge
    ]
    medications.during_stay_only = [
        fact(rows, "not continued after discharge")
        for drug, rows in during.items()
        if drug not in at_discharge
    ]
    return medications


def _allergies(records: list[FhirRecord], end: dt.datetime) -> list[Fact]:
    facts = []
    for record in sorted(records, key=lambda r: r.key):
        raw = record.resource
        if _status_code(raw.get("verificationStatus")) in EXCLUDED_VERIFICATION:
            continue
        if _status_code(raw.get("clinicalStatus")) in INACTIVE_ALLERGY:
            continue
        recorded = _first_time(raw, ("recordedDate", "onsetDateTime"))
        if recorded and parse_time(recorded, label=f"{record.key} recordedDate") > end:
            continue
        reactions = []
        for reaction in raw.get("reaction") or []:
            manifestations = ", ".join(_concept_text(m) for m in reaction.get("manifestation") or [])
            severity = f" ({reaction['severity']})" if reaction.get("severity") else ""
            if manifestations:
                reactions.append(manifestations + severity)
        facts.append(
            Fact(
                text=_concept_text(raw.get("code")),
                sources=[record.key],
                code=_concept_code(raw.get("code")),
                date=recorded,
                status=raw.get("criticality"),
                detail=("reaction: " + "; ".join(reactions)) if reactions else None,
            )
        )
    return facts


def _notes(records: list[FhirRecord], stay: Stay) -> list[Note]:
    notes = []
    for record in sorted(
        records, key=lambda r: (_first_time(r.resource, TIME_FIELDS["DocumentReference"]) or "", r.key)
    ):
        raw = record.resource
        if raw.get("status") == "entered-in-error":
            continue
        texts = []
        for position, content in enumerate(raw.get("content") or []):
            attachment = content.get("attachment") or {}
            kind = (attachment.get("contentType") or "text/plain").split(";")[0].strip()
            if not kind.startswith("text/"):
                stay.flags.append(
                    {
                        "type": "note_not_read",
                        "source": record.key,
                        "detail": f"attachment {position} is {kind}, not text; it was not read",
                    }
                )
                continue
            if attachment.get("data") is None:
                stay.flags.append(
                    {
                        "type": "note_not_read",
                        "source": record.key,
                        "detail": f"attachment {position} has no inline data (url only); not fetched",
                    }
                )
                continue
            try:
                texts.append(base64.b64decode(attachment["data"], validate=True).decode("utf-8"))
            except (binascii.Error, ValueError) as err:
                raise StayError(
                    f"{record.key} at {record.where()}: attachment {position} is not base64-encoded "
                    f"UTF-8 text ({err}); fix the note"
                ) from err
        text = "\n".join(t.strip() for t in texts if t.strip())
        if text:
            author = next((a.get("display") for a in raw.get("author") or [] if a.get("display")), None)
            notes.append(
                Note(
                    source=record.key,
                    text=text,
                    author=author,
                    time=_first_time(raw, TIME_FIELDS["DocumentReference"]),
                    title=_concept_text(raw.get("type")) if raw.get("type") else None,
                )
            )
    return notes


def _follow_up(
    stay: Stay, own: dict[str, list[FhirRecord]], care_plans: list[FhirRecord], end: dt.datetime
) -> list[Fact]:
    items = []
    for record in own["ServiceRequest"]:
        if record.resource.get("status") in PENDING_REQUEST:
            items.append(
                Fact(
                    text=f"Pending request: {_concept_text(record.resource.get('code'))}",
                    sources=[record.key],
                    status=record.resource.get("status"),
                )
            )
    for record in own["Procedure"]:
        if record.resource.get("status") in PENDING_PROCEDURE:
            items.append(
                Fact(
                    text=f"Pending procedure: {_concept_text(record.resource.get('code'))}",
                    sources=[record.key],
                    status=record.resource.get("status"),
                )
            )
    for record in care_plans:
        raw = record.resource
        started = _first_time(raw, ("period.start", "created"))
        finished = _get(raw, "period.end")
        if raw.get("status") != "active" or (started and parse_time(started) > end):
            continue
        if finished and parse_time(finished, end=True) < end:
            continue
        title = (
            raw.get("title") or ", ".join(_concept_text(c) for c in raw.get("category") or []) or "care plan"
        )
        items.append(Fact(text=f"Care plan: {title}", sources=[record.key], status="active"))
    for fact in stay.diagnoses:
        if fact.detail == "recorded in this stay":
            items.append(
                Fact(
                    text=f"Review at follow-up: {fact.text} (diagnosed in this stay, not abated)",
                    sources=list(fact.sources),
                )
            )
    for fact in stay.medications.at_discharge:
        if fact.status in {"new", "changed"}:
            items.append(
                Fact(text=f"Review {fact.status} medication: {fact.text}", sources=list(fact.sources))
            )
    return items
