"""Reading FHIR R4 input: bulk-export ndjson (one resource a line) and Bundle JSON files.

Lines and files that cannot be read become `RecordError`s and reading goes on. Resources are
validated with the R4B models of `fhir.resources`, because R4B changed none of the fields used here
from R4. Validation is lazy, the first time a stay needs a resource, so a large export is parsed
once as plain JSON and only the patients being drafted pay for validation.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.drafting.stay import RecordError, StayError, json_problem

logger = logging.getLogger(__name__)

# Resource types the drafter reads; lines of any other type are skipped unparsed.
USED_TYPES = frozenset(
    {
        "Patient",
        "Encounter",
        "Condition",
        "MedicationRequest",
        "Medication",
        "Procedure",
        "AllergyIntolerance",
        "Immunization",
        "DocumentReference",
        "ServiceRequest",
        "CarePlan",
    }
)
# A literal reference: "Type/id", optionally versioned, optionally after a base URL.
LITERAL_REFERENCE = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$"
)


@dataclass
class FhirRecord:
    """One resource as read: its raw JSON and where it came from (file and line or bundle entry)."""

    resource: dict[str, Any]
    file: str
    line: int | None = None
    full_url: str | None = None
    bundle: str | None = None
    position: int = -1

    @property
    def type(self) -> str:
        return str(self.resource.get("resourceType"))

    @property
    def id(self) -> str:
        return str(self.resource.get("id") or "")

    @property
    def key(self) -> str:
        """The id provenance uses: "Type/id", or the fullUrl for a bundle entry without an id."""
        return f"{self.type}/{self.id}" if self.id else (self.full_url or f"{self.type}/?")

    def where(self) -> str:
        return f"line {self.line} of {self.file}" if self.line is not None else self.file


@dataclass
class FhirInput:
    """All records of one input, indexed for reference resolution."""

    records: list[FhirRecord] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    # raw text of lines that were not valid JSON, kept to tell which stays they may belong to
    unreadable: list[tuple[RecordError, str]] = field(default_factory=list)
    by_key: dict[str, FhirRecord] = field(default_factory=dict)
    by_full_url: dict[str, FhirRecord] = field(default_factory=dict)
    _models: dict[int, Any] = field(default_factory=dict)

    def add(self, record: FhirRecord) -> None:
        existing = self.by_key.get(record.key)
        if existing is not None:
            if existing.resource != record.resource:
                self.errors.append(
                    RecordError(
                        reason=f"{record.key} appears twice with different content (also at "
                        f"{existing.where()}); the first copy is used. Remove the stale copy from the input",
                        resource=record.key,
                        file=record.file,
                        line=record.line,
                    )
                )
            return
        record.position = len(self.records)
        self.records.append(record)
        self.by_key[record.key] = record
        if record.full_url:
            self.by_full_url.setdefault(record.full_url, record)

    def of_type(self, resource_type: str) -> list[FhirRecord]:
        return [r for r in self.records if r.type == resource_type]

    def resolve(self, reference: str | None) -> FhirRecord | None:
        """Find the record a reference points to; None when it is not a literal reference.

        Raises StayError for a literal reference ("Type/id", "urn:uuid:…", an absolute URL) to a
        resource that is not in the input: a dangling reference.
        """
        if not reference or reference.startswith("#") or "?" in reference:
            # contained resources and conditional references (Synthea's practitioners) are not joined
            return None
        if reference in self.by_full_url:
            return self.by_full_url[reference]
        match = LITERAL_REFERENCE.search(reference)
        if match and f"{match['type']}/{match['id']}" in self.by_key:
            return self.by_key[f"{match['type']}/{match['id']}"]
        if match or reference.startswith("urn:"):
            raise StayError(f"reference {reference!r} points to a resource that is not in the input")
        return None

    def model(self, record: FhirRecord) -> Any:
        """Validate a record against its FHIR model once; raise StayError naming the first problems."""
        cached = self._models.get(id(record))
        if cached is not None:
            return cached
        from fhir.resources.R4B import get_fhir_model_class
        from pydantic import ValidationError

        try:
            model_class = get_fhir_model_class(record.type)
        except KeyError as err:
            raise StayError(
                f"{record.key} at {record.where()} has unknown resourceType {record.type!r}"
            ) from err
        try:
            model = model_class.model_validate(record.resource)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or '(resource)'}: "
                f"{problem['msg'].removeprefix('Value error, ')} (value {problem.get('input')!r:.60})"
                for problem in err.errors()[:3]
            )
            raise StayError(f"{record.key} at {record.where()} is not valid FHIR: {problems}") from err
        self._models[id(record)] = model
        return model


def read_fhir(path: Path) -> FhirInput:
    """Read a folder of ndjson and/or Bundle JSON files, or one such file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".ndjson", ".json"})
        if not files:
            raise StayError(
                f"folder {str(path)!r} contains no .ndjson or .json files; pass a FHIR bulk-export "
                "folder, a Bundle file, or --format notes for notes JSONL"
            )
    elif path.is_file():
        files = [path]
    else:
        raise StayError(
            f"input {str(path)!r} not found; pass a FHIR folder, a Bundle file or a notes JSONL file"
        )

    data = FhirInput()
    for file in files:
        if file.suffix == ".ndjson":
            _read_ndjson(file, data)
        else:
            _read_json(file, data)
    logger.info(
        "read %d FHIR resources from %d file(s); %d problem(s)",
        len(data.records),
        len(files),
        len(data.errors),
    )
    return data


def _read_ndjson(file: Path, data: FhirInput) -> None:
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            # skip unused resource types without a full parse: bulk exports are mostly such lines
            head = raw[:200]
            if b'"resourceType"' in head and not any(t.encode() in head for t in USED_TYPES | {"Bundle"}):
                continue
            try:
                resource = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                reason = json_problem(err)
                error = RecordError(
                    reason=f"line {number} of {file.name} is not valid JSON ({reason}); "
                    "the line was skipped, so its resource is missing from the drafts",
                    file=str(file),
                    line=number,
                )
                data.errors.append(error)
                data.unreadable.append((error, raw.decode("utf-8", "replace")))
                continue
            if number == 1 and isinstance(resource, dict) and "resourceType" not in resource:
                # a bulk-export client writes log.ndjson beside the resources, and it contains no FHIR
                logger.info("skipped %s: its first line is not a FHIR resource", file.name)
                return
            _add_resource(resource, data, file, number)


def _read_json(file: Path, data: FhirInput) -> None:
    try:
        resource = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        reason = json_problem(err)
        error = RecordError(
            reason=f"{file.name} is not valid JSON ({reason}); the file was skipped", file=str(file)
        )
        data.errors.append(error)
        data.unreadable.append((error, file.read_bytes().decode("utf-8", "replace")))
        return
    _add_resource(resource, data, file, None)


def _add_resource(resource: Any, data: FhirInput, file: Path, line: int | None) -> None:
    where = f"line {line} of {file.name}" if line is not None else file.name
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        data.errors.append(
            RecordError(
                reason=f"{where} is not a FHIR resource (no resourceType); skipped", file=str(file), line=line
            )
        )
        return
    if resource["resourceType"] == "Bundle":
        _add_bundle(resource, data, file, line)
        return
    if resource["resourceType"] in USED_TYPES:
        data.add(FhirRecord(resource, str(file), line))


def _add_bundle(bundle: dict[str, Any], data: FhirInput, file: Path, line: int | None) -> None:
    name = file.name if line is None else f"{file.name}:{line}"
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        data.errors.append(
            RecordError(
                reason=f"Bundle in {name} has an `entry` that is not a list; skipped",
                file=str(file),
                line=line,
            )
        )
        return
    for position, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if resource is None:
            # transaction DELETE entries carry a request and no resource
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            data.errors.append(
                RecordError(
                    reason=f"entry {position} of the Bundle in {name} is not a FHIR "
                    "resource (no resourceType); skipped",
                    file=str(file),
                    line=line,
                )
            )
            continue
        if resource["resourceType"] in USED_TYPES:
            record = FhirRecord(
                resource,
                f"{file}#entry[{position}]" if line is None else f"{file}:{line}#entry[{position}]",
                None,
                entry.get("fullUrl"),
                bundle=name,
            )
            data.add(record)
