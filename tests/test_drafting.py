"""Discharge drafting from notes JSONL: the example stays, long notes, batched vs solo, kill and resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

NOTES_EXAMPLE = Path(__file__).parent / "data" / "notes_example.jsonl"
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


def read_draft(folder: Path, encounter_id: str) -> dict:
    return json.loads((folder / f"{encounter_id}.json").read_text(encoding="utf-8"))


def texts(facts: list[dict]) -> list[str]:
    return [f["text"] for f in facts]


# units


def test_parse_time_partial_and_invalid():
    import datetime as dt

    from assistant.drafting.stay import StayError, parse_time

    utc = dt.timezone.utc
    assert parse_time("2020-05", end=True) == dt.datetime(2020, 5, 31, 23, 59, 59, 999999, tzinfo=utc)
    assert parse_time("2020") == dt.datetime(2020, 1, 1, tzinfo=utc)
    assert parse_time("2024-02-03T09:15:00Z") == dt.datetime(2024, 2, 3, 9, 15, tzinfo=utc)
    assert parse_time("2023-12", end=True).date() == dt.date(2023, 12, 31)
    for bad in ("2020-13-01", "2020-02-30", "03/02/2020", ""):
        with pytest.raises(StayError):
            parse_time(bad)


def test_omit_sections_by_heading():
    from assistant.drafting.narrative import omit_sections

    text = (
        "# Chief Complaint\n- Cough\n\n# Social History\nLives alone. Smokes.\n## Work\nNight shifts.\n\n"
        "# Medications\naspirin 81 mg\n\n# Assessment and Plan\nPneumonia.\n## Plan\nAmoxicillin.\n"
        "ALLERGIES:\nPenicillin rash\nCOURSE:\nImproved."
    )

    kept, removed = omit_sections(text)

    assert removed == ["Social History", "Medications", "ALLERGIES"]
    assert kept == (
        "# Chief Complaint\n- Cough\n\n# Assessment and Plan\nPneumonia.\n## Plan\nAmoxicillin.\n"
        "COURSE:\nImproved."
    )


def test_drop_restated_facts_keeps_new_lines():
    from assistant.drafting.narrative import drop_restated_facts
    from assistant.drafting.stay import Fact

    facts = [Fact("Cisplatin 50 MG Injection", ["MedicationRequest/m1"]),
             Fact("Hearing examination (procedure)", ["Procedure/p1"])]
    text = (
        "History of stress (finding) and sinusitis (disorder).\n"
        "The following procedures were conducted:\n- hearing examination (procedure)\n"
        "- hearing examination (procedure)\n"
        "The patient was prescribed the following medications:\n- cisplatin 50 mg injection\n"
        "- ondansetron 8 mg\n"
    )

    kept, dropped = drop_restated_facts(text, facts)

    assert kept == (
        "History of stress and sinusitis.\n"
        "The patient was prescribed the following medications:\n- ondansetron 8 mg"
    )
    assert dropped == 4


def test_collapse_repeated_lines_counts():
    from assistant.drafting.narrative import collapse_repeated_lines

    text = "Plan\n- cisplatin 50 mg\n- paclitaxel\n- cisplatin 50 mg\n-  Cisplatin 50 mg\nEnd"

    collapsed, removed = collapse_repeated_lines(text)

    assert collapsed == "Plan\n- cisplatin 50 mg (x3)\n- paclitaxel\nEnd"
    assert removed == 2


def test_notes_reader_reports_bad_lines(tmp_path):
    from assistant.drafting.notes import read_notes

    good = {
        "encounter_id": "A-1",
        "patient_id": "P",
        "admitted": "2024-01-01",
        "discharged": "2024-01-03",
        "notes": [{"text": "Admitted for observation."}],
    }
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "encounter_id": "A-2", "discharged": None}),
        json.dumps({**good, "encounter_id": "A-3", "admitted": "2024-02-31"}),
        json.dumps({**good, "encounter_id": "../escape"}),
        json.dumps({**good, "encounter_id": "A-4", "discharged": "2023-12-01"}),
        json.dumps(good),
        json.dumps({**good, "encounter_id": "A-5", "medications": [{"name": "X", "change": "paused"}]}),
    ]
    path = tmp_path / "stays.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = read_notes(path)

    assert [s.encounter_id for s in result.stays] == ["A-1"]
    reasons = {e.line: e.reason for e in result.errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    assert "not valid JSON" in reasons[2]
    assert "discharged is missing" in reasons[3]
    assert "not a valid date" in reasons[4]
    assert "cannot name an output file" in reasons[5]
    assert "before admitted" in reasons[6]
    assert "also appears on line 1" in reasons[7]
    assert "'paused' is invalid" in reasons[8]


def test_exit_status_is_capped():
    from assistant.drafting import RunSummary

    assert RunSummary(failed=0).exit_status == 0
    assert RunSummary(failed=3).exit_status == 3
    assert RunSummary(failed=400).exit_status == 125


def test_specialty_without_registry_rejected(cli_env, capsys):
    status = run_bedside(
        "draft-discharge",
        str(NOTES_EXAMPLE),
        "--out",
        str(cli_env / "d"),
        "--specialty",
        "cardiology",
        *CLI_MODEL_FLAGS,
    )

    assert status == 1
    assert "--specialty cardiology needs an adapter registry" in capsys.readouterr().err
    assert not list((cli_env / "d").glob("*.json"))


def test_fit_notes_truncates_deterministically(base_model):
    from assistant.drafting.narrative import TRUNCATION_MARK, count_tokens, fit_notes
    from assistant.drafting.stay import Note

    _, tokenizer = base_model
    long_text = long_note(1500)
    notes = [Note("a", long_text), Note("b", "Short note about a stable night.")]

    first = fit_notes(notes, tokenizer, 300)
    second = fit_notes(notes, tokenizer, 300)

    assert [n.text for n in first] == [n.text for n in second]
    assert first[0].truncated and first[0].text.endswith(TRUNCATION_MARK)
    assert sum(count_tokens(tokenizer, n.text) for n in first) <= 300
    assert first[0].tokens >= 1500


# drafting


def long_note(min_words: int) -> str:
    """A varied (not collapsible) invented nursing log of at least `min_words` words."""
    lines, day = [], 0
    while sum(len(line.split()) for line in lines) < min_words:
        day += 1
        for hour in (2, 8, 14, 20):
            lines.append(
                f"Day {day} {hour:02d}:00 observation: "
                f"temperature {36.4 + ((day * 7 + hour) % 19) / 10:.1f} C, "
                f"heart rate {68 + (day * 13 + hour * 7) % 41}, blood pressure {112 + (day * 5 + hour) % 30}/"
                f"{64 + (day * 3 + hour) % 20}, oxygen saturation {92 + (day + hour) % 7}% on "
                f"{['room air', '2 L nasal cannula', '1 L nasal cannula'][(day + hour) % 3]}; "
                f"fluid balance {(day * 170 + hour * 30) % 900 - 300:+d} mL; "
                f"pain score {(day + hour) % 5} of 10."
            )
    return "\n".join(lines)


def test_notes_example_drafts_and_batched_equals_solo(cli_env, capsys):
    batched, solo = cli_env / "batched", cli_env / "solo"

    first = run_bedside(
        "draft-discharge", str(NOTES_EXAMPLE), "--out", str(batched), "--batch-size", "3", *CLI_MODEL_FLAGS
    )
    second = run_bedside(
        "draft-discharge", str(NOTES_EXAMPLE), "--out", str(solo), "--batch-size", "1", *CLI_MODEL_FLAGS
    )

    assert (first, second) == (0, 0), capsys.readouterr().err
    ids = ["N-1001", "N-1002", "N-1003"]
    for encounter_id in ids:
        together, alone = read_draft(batched, encounter_id), read_draft(solo, encounter_id)
        assert together["provenance"]["batch_rows"] == 3
        assert alone["provenance"]["batch_rows"] == 1
        assert together["sections"] == alone["sections"], encounter_id
        assert together["flags"] == alone["flags"], encounter_id
        assert together["citations"] == alone["citations"], encounter_id
        assert together["input_hash"] == alone["input_hash"]
        assert together["sections"]["hospital_course"]["text"]

    pneumonia = read_draft(batched, "N-1001")["sections"]
    stay = pneumonia["patient_and_stay"]
    assert (stay["admitted"], stay["discharged"], stay["length_of_stay_days"]) == (
        "2024-02-03T09:15:00Z",
        "2024-02-06T14:30:00Z",
        3,
    )
    assert texts(pneumonia["reason_for_admission"]) == ["Fever and productive cough"]
    assert texts(pneumonia["diagnoses"]) == [
        "Community-acquired pneumonia, right lower lobe",
        "Essential hypertension",
    ]
    assert pneumonia["diagnoses"][0]["sources"] == ["notes:N-1001#diagnoses[0]"]
    discharge = {f["text"]: f["status"] for f in pneumonia["medications"]["at_discharge"]}
    assert discharge == {"Amoxicillin 500 mg oral": "new", "Lisinopril 10 mg oral": "continued"}
    assert texts(pneumonia["medications"]["stopped"]) == ["Ibuprofen 400 mg oral"]
    assert texts(pneumonia["allergies"]) == ["Sulfonamides"]
    assert texts(pneumonia["follow_up"]) == ["Repeat chest X-ray in 6 weeks", "GP review in 1 week"]
    notes = [n["source"] for n in pneumonia["hospital_course"]["notes"]]
    assert notes == ["notes:N-1001#notes[0]", "notes:N-1001#notes[1]"]
    for sentence in pneumonia["hospital_course"]["sentences"]:
        assert sentence["source"].startswith("notes:N-1001")

    # the demo index has a pneumonia guideline: its recommendation is quoted with a citation
    recommendations = pneumonia["recommendations"]
    assert recommendations
    citations = read_draft(batched, "N-1001")["citations"]
    assert {c["marker"] for c in citations} == {r["marker"] for r in recommendations}
    for item, citation in zip(recommendations, citations, strict=True):
        assert item["text"] in citation["text"]

    ketoacidosis = read_draft(batched, "N-1003")["sections"]
    assert ketoacidosis["reason_for_admission"] == []
    assert texts(ketoacidosis["procedures"]) == ["Central venous catheter insertion"]
    assert ketoacidosis["patient_and_stay"]["length_of_stay_days"] == 3
    markdown = (batched / "N-1003.md").read_text()
    assert markdown.startswith("# DRAFT discharge summary — encounter N-1003")
    assert "DRAFT for clinician review" in markdown

    # a third run finds every draft unchanged and rewrites nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in batched.iterdir()}
    capsys.readouterr()
    assert run_bedside("draft-discharge", str(NOTES_EXAMPLE), "--out", str(batched), *CLI_MODEL_FLAGS) == 0
    assert "3 unchanged and skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in batched.iterdir()} == stamps
    rows = sqlite3.connect(cli_env / "audit.db").execute("SELECT kind FROM answers").fetchall()
    assert rows == [("draft",)] * 6


def test_long_and_short_notes_same_batch(cli_env, capsys, caplog, base_model):
    from assistant.drafting.narrative import count_tokens

    caplog.set_level(logging.INFO)

    _, tokenizer = base_model
    long_text = long_note(2200)
    short_text = (
        "Admitted overnight after a fall at home with a minor scalp laceration, which was closed with "
        "three sutures. CT head showed no bleed. Observations stayed normal and she walked safely with "
        "the physiotherapist before discharge home with her daughter."
    )
    assert count_tokens(tokenizer, long_text) >= 3000
    assert 40 <= count_tokens(tokenizer, short_text) <= 120
    base = {"patient_id": "P-900", "admitted": "2024-06-01T08:00:00Z", "discharged": "2024-06-02T09:00:00Z"}
    source = cli_env / "long.jsonl"
    source.write_text(
        json.dumps(
            {
                **base,
                "encounter_id": "L-long",
                "notes": [{"text": long_text}],
                "diagnoses": ["Lower respiratory tract infection"],
            }
        )
        + "\n"
        + json.dumps(
            {
                **base,
                "encounter_id": "L-short",
                "patient_id": "P-901",
                "notes": [{"text": short_text}],
                "diagnoses": ["Scalp laceration"],
            }
        )
        + "\n"
    )
    out = cli_env / "drafts"

    status = run_bedside(
        "draft-discharge",
        str(source),
        "--out",
        str(out),
        "--batch-size",
        "2",
        *CLI_MODEL_FLAGS,
        "--note-tokens",
        "384",
    )

    assert status == 0, capsys.readouterr().err
    long_draft, short_draft = read_draft(out, "L-long"), read_draft(out, "L-short")
    assert long_draft["provenance"]["batch_rows"] == short_draft["provenance"]["batch_rows"] == 2
    for draft in (long_draft, short_draft):
        assert draft["sections"]["hospital_course"]["text"]
        assert draft["sections"]["diagnoses"]
        assert draft["provenance"]["prompt_tokens"] + 32 <= 8192
    truncated = [f for f in long_draft["flags"] if f["type"] == "note_truncated"]
    assert len(truncated) == 1
    assert truncated[0]["tokens"] >= 3000
    assert truncated[0]["kept_tokens"] <= 384
    assert long_draft["sections"]["hospital_course"]["notes"][0]["truncated"] is True
    assert not [f for f in short_draft["flags"] if f["type"] == "note_truncated"]
    assert short_draft["sections"]["hospital_course"]["notes"][0]["truncated"] is False

    # without --log-phi the log names no patient, encounter or note text
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for private in ("L-long", "L-short", "P-900", "P-901", "scalp laceration", "Day 1 02:00"):
        assert private not in logged


def test_killed_batch_resumes(cli_env, demo_index_dir, capsys, caplog):
    out = cli_env / "drafts"
    command = [
        sys.executable,
        "-m",
        "assistant.cli",
        "draft-discharge",
        str(NOTES_EXAMPLE),
        "--out",
        str(out),
        "--batch-size",
        "1",
        *CLI_MODEL_FLAGS,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*.json")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    finished = sorted(out.glob("N-*.json"))
    assert finished, "no draft appeared before the deadline"
    assert len(finished) < 3, "the run finished before it could be killed"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished}
    before.update(
        {
            p.with_suffix(".md").name: (
                p.with_suffix(".md").stat().st_mtime_ns,
                p.with_suffix(".md").read_bytes(),
            )
            for p in finished
        }
    )

    caplog.set_level(logging.INFO)
    status = run_bedside(
        "draft-discharge",
        str(NOTES_EXAMPLE),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--log-phi",
        *CLI_MODEL_FLAGS,
    )

    assert status == 0
    # --log-phi names the redrafted encounters in the log, and only those
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for encounter_id in ("N-1001", "N-1002", "N-1003"):
        assert (f"drafted encounter {encounter_id}" in logged) == (f"{encounter_id}.json" not in before)
    assert f"{len(finished)} unchanged and skipped" in capsys.readouterr().out
    for name, (stamp, content) in before.items():
        assert (out / name).stat().st_mtime_ns == stamp, name
        assert (out / name).read_bytes() == content, name
    assert sorted(p.name for p in out.glob("N-*.json")) == ["N-1001.json", "N-1002.json", "N-1003.json"]
    assert sorted(p.name for p in out.glob("N-*.md")) == ["N-1001.md", "N-1002.md", "N-1003.md"]
    assert not list(out.glob(".*.tmp"))
