"""Discharge drafting from FHIR: the Synthea bulk export, mixed ndjson and Bundle input, and failures.

Expected facts are recomputed here from the raw ndjson with plain `json`, following the rules in
`assistant.drafting.assembly`'s docstring, never through the drafter's own reader.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import need_shared

CLI_MODEL_FLAGS = [
    "--dtype",
    "float32",
    "--device",
    "cpu",
    "--no-progress",
    "--max-new-tokens",
    "32",
    "--note-tokens",
    "256",
]


# independent computation from the raw export


def load_export(folder: Path) -> dict[str, list[dict]]:
    resources: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*.ndjson")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                if "resourceType" in item:
                    resources[item["resourceType"]].append(item)
    return resources


def when(text: str) -> dt.datetime:
    # every timestamp in this export is a full dateTime with a zone offset
    return dt.datetime.fromisoformat(text)


def expected_stay(export: dict[str, list[dict]], encounter: dict) -> dict:
    """Dates, diagnosis ids and medication ids of one stay, by the documented rules."""
    patient_ref = encounter["subject"]["reference"]
    stay_ref = f"Encounter/{encounter['id']}"
    start, end = when(encounter["period"]["start"]), when(encounter["period"]["end"])

    def of_patient(item: dict) -> bool:
        return (item.get("subject") or item.get("patient"))["reference"] == patient_ref

    def in_stay(item: dict) -> bool:
        return item.get("encounter", {}).get("reference") == stay_ref

    diagnoses = set()
    for condition in export["Condition"]:
        if not of_patient(condition):
            continue
        if condition["verificationStatus"]["coding"][0]["code"] in {"refuted", "entered-in-error"}:
            continue
        onset = condition.get("onsetDateTime") or condition.get("recordedDate")
        abated = condition.get("abatementDateTime")
        if in_stay(condition) or (when(onset) <= end and (abated is None or when(abated) >= start)):
            diagnoses.add(condition["id"])

    def ongoing(request: dict, moment: dt.datetime) -> bool:
        if request["status"] in {"stopped", "cancelled", "entered-in-error", "draft"}:
            return False
        return when(request["authoredOn"]) <= moment and request["status"] in {"active", "on-hold"}

    requests = [m for m in export["MedicationRequest"] if of_patient(m)]
    own = [m for m in requests if in_stay(m)]
    admission = [m for m in requests if not in_stay(m) and ongoing(m, start)]
    discharge = [m for m in own + admission if ongoing(m, end)]

    def code(request: dict) -> str:
        return request["medicationCodeableConcept"]["coding"][0]["code"]

    admission_codes = {code(m) for m in admission}
    discharge_codes = {code(m) for m in discharge}
    return {
        "admitted": encounter["period"]["start"],
        "discharged": encounter["period"]["end"],
        "length_of_stay_days": (
            dt.date.fromisoformat(encounter["period"]["end"][:10])
            - dt.date.fromisoformat(encounter["period"]["start"][:10])
        ).days,
        "diagnoses": diagnoses,
        "on_admission": {m["id"] for m in admission},
        "at_discharge": {m["id"] for m in discharge},
        "new_codes": discharge_codes - admission_codes,
        "during_stay_only": {m["id"] for m in own if code(m) not in discharge_codes},
        "procedures": {
            p["id"] for p in export["Procedure"] if in_stay(p) and p["status"] != "entered-in-error"
        },
    }


def ids_of(facts: list[dict], prefix: str) -> set[str]:
    return {source.removeprefix(prefix) for fact in facts for source in fact["sources"]}


@pytest.fixture(scope="module")
def synthea() -> Path:
    return need_shared("synthea_fhir")


@pytest.fixture(scope="module")
def export(synthea) -> dict[str, list[dict]]:
    data = load_export(synthea)
    # the medication rule below ignores validity and bounds periods: check this export has none
    for request in data["MedicationRequest"]:
        assert "dispenseRequest" not in request
        assert not any(
            "boundsPeriod" in d.get("timing", {}).get("repeat", {})
            for d in request.get("dosageInstruction", [])
        )
    return data


@pytest.fixture
def cli_env(monkeypatch, tmp_path, demo_index_dir):
    """Run the real CLI in this process: the session's fp32 model is reused from the loader cache."""
    monkeypatch.setenv("BEDSIDE_AUDIT_DB", str(tmp_path / "audit.db"))
    monkeypatch.setenv("BEDSIDE_ADAPTERS_DIR", str(tmp_path / "no-adapters"))
    monkeypatch.setenv("BEDSIDE_INDEX_DIR", str(demo_index_dir))
    return tmp_path


def run_bedside(*args: str) -> int:
    from assistant.cli import main

    return main(list(args))


# reading the export


def test_synthea_discovers_all_inpatient_stays(synthea, export):
    from assistant.drafting import DraftOptions, read_stays

    result = read_stays(synthea, DraftOptions())

    inpatient = {e["id"] for e in export["Encounter"] if e["class"]["code"] == "IMP"}
    assert len(inpatient) == 49
    assert result.discovered == 49
    assert {s.encounter_id for s in result.stays} == inpatient
    assert result.errors == []


def test_synthea_facts_match_ndjson(synthea, export):
    from assistant.drafting import DraftOptions, read_stays

    result = read_stays(synthea, DraftOptions(include_emergency=True))

    stays = {s.encounter_id: s for s in result.stays}
    assert result.discovered == len(stays) == 49 + 23
    for encounter in export["Encounter"]:
        if encounter["class"]["code"] not in {"IMP", "EMER"}:
            continue
        expected = expected_stay(export, encounter)
        stay = stays[encounter["id"]]
        assert stay.admitted == expected["admitted"], encounter["id"]
        assert stay.discharged == expected["discharged"], encounter["id"]
        assert stay.length_of_stay_days == expected["length_of_stay_days"], encounter["id"]
        facts = {
            name: [f.to_dict() for f in getattr(stay.medications, name)]
            for name in ("on_admission", "at_discharge", "during_stay_only")
        }
        assert ids_of([f.to_dict() for f in stay.diagnoses], "Condition/") == expected["diagnoses"], (
            encounter["id"]
        )
        assert ids_of(facts["on_admission"], "MedicationRequest/") == expected["on_admission"], encounter[
            "id"
        ]
        assert ids_of(facts["at_discharge"], "MedicationRequest/") == expected["at_discharge"], encounter[
            "id"
        ]
        assert ids_of(facts["during_stay_only"], "MedicationRequest/") == expected["during_stay_only"], (
            encounter["id"]
        )
        assert ids_of([f.to_dict() for f in stay.procedures], "Procedure/") == expected["procedures"], (
            encounter["id"]
        )


def patient_names(export: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {
        p["id"]: [part for n in p["name"] for part in (*n.get("given", []), n.get("family", ""))]
        for p in export["Patient"]
    }


def test_synthea_prompts_name_no_other_patient(synthea, export, base_model):
    """No prompt of the 49 stays names another patient or patient id.

    Drafting all 49 stays is too slow for CI, so `test_synthea_drafts_match_ndjson` drafts three;
    this covers every stay's prompt, the only text the model reads.
    """
    from assistant.drafting import DraftOptions, read_stays
    from assistant.drafting.narrative import build_messages, fit_notes, listed_facts

    _, tokenizer = base_model
    names = patient_names(export)

    stays = read_stays(synthea, DraftOptions()).stays

    assert len(stays) == 49
    for stay in stays:
        fitted = fit_notes(stay.notes, tokenizer, 512, listed_facts(stay))
        prompt = "\n".join(m["content"] for m in build_messages(stay, fitted))
        for patient_id, parts in names.items():
            if patient_id == stay.patient_id:
                continue
            assert patient_id not in prompt, (stay.encounter_id, patient_id)
            for part in parts:
                assert part not in prompt, (stay.encounter_id, part)


# drafting the export


def test_synthea_drafts_match_ndjson(synthea, export, cli_env, capsys):
    out = cli_env / "drafts"
    inpatient = sorted((e for e in export["Encounter"] if e["class"]["code"] == "IMP"), key=lambda e: e["id"])
    # one stay from each of three patients
    chosen, patients = [], set()
    for encounter in inpatient:
        if encounter["subject"]["reference"] not in patients:
            patients.add(encounter["subject"]["reference"])
            chosen.append(encounter)
    chosen = chosen[:3]
    flags = [arg for e in chosen for arg in ("--encounter", e["id"])]

    status = run_bedside(
        "draft-discharge", str(synthea), "--out", str(out), "--batch-size", "3", *flags, *CLI_MODEL_FLAGS
    )

    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "49 stays found, 3 selected: 3 drafted" in printed
    names = {
        p["id"]: [part for n in p["name"] for part in (*n.get("given", []), n.get("family", ""))]
        for p in export["Patient"]
    }
    for encounter in chosen:
        expected = expected_stay(export, encounter)
        draft = json.loads((out / f"{encounter['id']}.json").read_text(encoding="utf-8"))
        markdown = (out / f"{encounter['id']}.md").read_text(encoding="utf-8")
        sections = draft["sections"]
        assert draft["status"] == "DRAFT"
        assert markdown.startswith("# DRAFT discharge summary")
        assert sections["patient_and_stay"]["admitted"] == expected["admitted"]
        assert sections["patient_and_stay"]["discharged"] == expected["discharged"]
        assert sections["patient_and_stay"]["length_of_stay_days"] == expected["length_of_stay_days"]
        assert ids_of(sections["diagnoses"], "Condition/") == expected["diagnoses"]
        medications = sections["medications"]
        assert ids_of(medications["on_admission"], "MedicationRequest/") == expected["on_admission"]
        assert ids_of(medications["at_discharge"], "MedicationRequest/") == expected["at_discharge"]
        assert ids_of(medications["during_stay_only"], "MedicationRequest/") == expected["during_stay_only"]
        new = {f["code"].split("|")[1] for f in medications["at_discharge"] if f["status"] == "new"}
        assert new == expected["new_codes"]
        assert ids_of(sections["procedures"], "Procedure/") == expected["procedures"]

        # every sentence of the narrative names a record of this stay and a support score
        own_ids = {
            s
            for facts in (sections["diagnoses"], sections["procedures"])
            for f in facts
            for s in f["sources"]
        }
        own_ids |= {n["source"] for n in sections["hospital_course"]["notes"]} | {
            f"Encounter/{encounter['id']}"
        }
        own_ids |= {s for facts in medications.values() for f in facts for s in f["sources"]}
        own_ids |= {s for f in sections["reason_for_admission"] + sections["allergies"] for s in f["sources"]}
        for sentence in sections["hospital_course"]["sentences"]:
            assert sentence["source"] in own_ids
            assert -1.0 <= sentence["support"] <= 1.0
            assert sentence["supported"] == (sentence["support"] >= draft["provenance"]["min_support"])
        unsupported = [s for s in sections["hospital_course"]["sentences"] if not s["supported"]]
        assert len([f for f in draft["flags"] if f["type"] == "unsupported"]) == len(unsupported)

        provenance = draft["provenance"]
        assert provenance["dtype"] == "float32"
        assert provenance["batch_size"] == 3
        assert provenance["index_version"]
        assert provenance["model_fingerprint"].startswith("sha256:")
        assert len(draft["input_hash"]) == 64

        # no other patient's id or name anywhere in the draft
        own_patient = encounter["subject"]["reference"].split("/")[1]
        text = markdown + json.dumps(draft)
        for patient_id, parts in names.items():
            if patient_id == own_patient:
                continue
            assert patient_id not in text
            for part in parts:
                assert part not in text, (encounter["id"], part)

    rows = sqlite3.connect(cli_env / "audit.db").execute("SELECT kind, answer FROM answers").fetchall()
    assert [kind for kind, _ in rows] == ["draft"] * 3
    assert all(answer.startswith("# DRAFT") for _, answer in rows)


# failures in mixed input


def _note(text: str) -> dict:
    return {
        "attachment": {
            "contentType": "text/plain; charset=utf-8",
            "data": base64.b64encode(text.encode()).decode(),
        }
    }


def _encounter(encounter_id: str, patient_ref: str, start: str, end: str | None, code: str = "IMP") -> dict:
    period = {"start": start, **({"end": end} if end else {})}
    return {
        "resourceType": "Encounter",
        "id": encounter_id,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code},
        "subject": {"reference": patient_ref},
        "period": period,
        "reasonCode": [{"text": "Community-acquired pneumonia"}],
    }


def _patient(patient_id: str, given: str, family: str) -> dict:
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "name": [{"given": [given], "family": family}],
        "gender": "female",
        "birthDate": "1950-01-02",
    }


def _condition(condition_id: str, patient_ref: str, encounter_ref: str, onset: str) -> dict:
    return {
        "resourceType": "Condition",
        "id": condition_id,
        "subject": {"reference": patient_ref},
        "encounter": {"reference": encounter_ref},
        "onsetDateTime": onset,
        "code": {"text": "Community-acquired pneumonia"},
        "clinicalStatus": {"coding": [{"code": "active"}]},
    }


def write_mixed_input(folder: Path) -> None:
    """ndjson for three invented patients plus two Bundles; four records are broken on purpose."""
    folder.mkdir()
    patients = [
        _patient("pt-ada", "Ada", "Quillfeather"),
        _patient("pt-bo", "Bo", "Marrowby"),
        _patient("pt-cy", "Cy", "Thistledown"),
    ]
    encounters = [
        _encounter("enc-good", "Patient/pt-ada", "2024-01-05T08:00:00+00:00", "2024-01-08T12:00:00+00:00"),
        _encounter("enc-no-end", "Patient/pt-bo", "2024-02-01T08:00:00+00:00", None),
        _encounter("enc-bad-date", "Patient/pt-cy", "2024-13-45T08:00:00+00:00", "2024-03-02T08:00:00+00:00"),
        _encounter(
            "enc-clinic", "Patient/pt-ada", "2024-01-20T08:00:00+00:00", "2024-01-20T09:00:00+00:00", "AMB"
        ),
    ]
    (folder / "Patient.ndjson").write_text("".join(json.dumps(p) + "\n" for p in patients))
    (folder / "Encounter.ndjson").write_text("".join(json.dumps(e) + "\n" for e in encounters))
    condition = _condition("cond-good", "Patient/pt-ada", "Encounter/enc-good", "2024-01-05T09:00:00+00:00")
    corrupt = '{"resourceType": "Condition", "id": "cond-cut", "code": {"text": "Asth'
    (folder / "Condition.ndjson").write_text(json.dumps(condition) + "\n" + corrupt + "\n")
    note = {
        "resourceType": "DocumentReference",
        "id": "note-good",
        "status": "current",
        "subject": {"reference": "Patient/pt-ada"},
        "date": "2024-01-05T10:00:00+00:00",
        "context": {"encounter": [{"reference": "Encounter/enc-good"}]},
        "content": [
            _note(
                "Admitted with fever and cough. Chest X-ray shows right lower lobe consolidation. "
                "Treated with amoxicillin; afebrile by day 3 and discharged home."
            )
        ],
    }
    (folder / "DocumentReference.ndjson").write_text(json.dumps(note) + "\n")

    bundle_patient = "urn:uuid:7d6c1a52-0000-4000-8000-000000000001"
    bundle_encounter = "urn:uuid:7d6c1a52-0000-4000-8000-000000000002"
    good_bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": bundle_patient,
                "resource": _patient("pt-dee", "Dee", "Larkspurrow"),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": bundle_encounter,
                "resource": _encounter(
                    "enc-bundle", bundle_patient, "2024-04-01T08:00:00+00:00", "2024-04-03T08:00:00+00:00"
                ),
                "request": {"method": "POST", "url": "Encounter"},
            },
            {
                "fullUrl": "urn:uuid:7d6c1a52-0000-4000-8000-000000000003",
                "resource": _condition(
                    "cond-bundle", bundle_patient, bundle_encounter, "2024-04-01T09:00:00+00:00"
                ),
                "request": {"method": "POST", "url": "Condition"},
            },
        ],
    }
    dangling_bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "fullUrl": "urn:uuid:7d6c1a52-0000-4000-8000-000000000010",
                "resource": _encounter(
                    "enc-dangling",
                    "urn:uuid:7d6c1a52-0000-4000-8000-0000000000ff",
                    "2024-05-01T08:00:00+00:00",
                    "2024-05-02T08:00:00+00:00",
                ),
            },
        ],
    }
    (folder / "bundle_good.json").write_text(json.dumps(good_bundle))
    (folder / "bundle_dangling.json").write_text(json.dumps(dangling_bundle))


def test_failures_land_in_errors_file(cli_env, capsys):
    source = cli_env / "mixed"
    write_mixed_input(source)
    out = cli_env / "drafts"

    status = run_bedside("draft-discharge", str(source), "--out", str(out), *CLI_MODEL_FLAGS)

    printed = capsys.readouterr().out
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert status == len(errors) == 4, errors
    by_encounter = {e.get("encounter_id"): e for e in errors}
    assert "no period.end" in by_encounter["enc-no-end"]["reason"]
    assert "not valid FHIR" in by_encounter["enc-bad-date"]["reason"]
    assert "period.start" in by_encounter["enc-bad-date"]["reason"]
    assert "not in the input" in by_encounter["enc-dangling"]["reason"]
    corrupt = by_encounter[None]
    assert corrupt["line"] == 2
    assert "not valid JSON" in corrupt["reason"]
    assert corrupt["file"].endswith("Condition.ndjson")

    # the good stays from ndjson and from the Bundle still complete
    assert sorted(p.name for p in out.glob("*.json")) == ["enc-bundle.json", "enc-good.json"]
    assert "4 failed" in printed
    good = json.loads((out / "enc-good.json").read_text())
    assert ids_of(good["sections"]["diagnoses"], "Condition/") == {"cond-good"}
    assert [n["source"] for n in good["sections"]["hospital_course"]["notes"]] == [
        "DocumentReference/note-good"
    ]
    # the unreadable line names no patient, so every draft warns that it may be missing a resource
    assert any(f["type"] == "incomplete_input" for f in good["flags"])
    bundle = json.loads((out / "enc-bundle.json").read_text())
    assert ids_of(bundle["sections"]["diagnoses"], "Condition/") == {"cond-bundle"}
    assert bundle["sections"]["patient_and_stay"]["patient"]["name"] == "Dee Larkspurrow"


def test_linked_resource_of_other_patient_fails_stay(tmp_path):
    from assistant.drafting import DraftOptions, read_stays

    source = tmp_path / "mixed"
    write_mixed_input(source)
    intruder = _condition("cond-intruder", "Patient/pt-bo", "Encounter/enc-good", "2024-01-06T09:00:00+00:00")
    with (source / "Condition.ndjson").open("a") as handle:
        handle.write(json.dumps(intruder) + "\n")

    result = read_stays(source, DraftOptions(encounter_ids=["enc-good"]))

    assert result.stays == []
    reasons = [e.reason for e in result.errors if e.encounter_id == "enc-good"]
    assert len(reasons) == 1
    assert "not Patient/pt-ada" in reasons[0]


def test_unknown_encounter_and_outpatient_rejected(tmp_path):
    from assistant.drafting import DraftOptions, read_stays

    source = tmp_path / "mixed"
    write_mixed_input(source)

    result = read_stays(source, DraftOptions(encounter_ids=["enc-clinic", "enc-missing"]))

    reasons = {e.encounter_id: e.reason for e in result.errors if e.encounter_id}
    assert "class 'AMB'" in reasons["enc-clinic"]
    assert "not in the input" in reasons["enc-missing"]
    assert result.stays == []
