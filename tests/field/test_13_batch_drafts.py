"""Field case 13: eight stays with notes from 100 to 3,000 tokens drafted in one batch.

Expected: each draft is non-empty, names only its own patient, and equals the draft made for that
stay alone. Patients, ids and notes are invented.
"""

from __future__ import annotations

import json

import pytest
from field_helpers import run_bedside
from test_drafting import read_draft

pytest_plugins = ["field_support"]

# Short answers and note budgets keep sixteen drafts within CI time; every note above 160 tokens is
# cut to fit. Scoring still reads each note whole.
MODEL_FLAGS = ["--dtype", "float32", "--device", "cpu", "--no-progress", "--max-new-tokens", "8",
               "--note-tokens", "160"]

# (patient name, condition, note length in base-model tokens)
STAYS = [
    ("Orla Fenwick", "community-acquired pneumonia", 100),
    ("Piet Marlowe", "cellulitis of the left leg", 300),
    ("Quentin Ashby", "an exacerbation of COPD", 600),
    ("Rosa Lindqvist", "diabetic ketoacidosis", 900),
    ("Saul Okafor", "acute kidney injury after vomiting", 1300),
    ("Tamsin Greer", "a fractured neck of femur", 1800),
    ("Ulric Haddon", "decompensated heart failure", 2400),
    ("Vera Pankhurst", "a urinary tract infection with delirium", 3000),
]


def note_text(tokenizer, name: str, condition: str, tokens: int) -> str:
    """A progress note about one patient of about `tokens` tokens; every line differs from the others."""
    lines = [f"Admission note. {name} was admitted with {condition}."]
    day = 1
    while len(tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"]) < tokens:
        lines.append(f"Day {day}, {6 + day % 12:02d}:00. {name} reviewed on the ward round for {condition}; "
                     f"observations recorded, fluid balance {day * 35 % 900} ml, pain score {day % 4}, "
                     f"plan reviewed with the nurse in charge (entry {day}).")
        day += 1
    return "\n".join(lines)


@pytest.fixture
def cli_env(isolated, monkeypatch):
    """An isolated folder without a guideline index: these drafts need no recommendations."""
    monkeypatch.setenv("BEDSIDE_INDEX_DIR", str(isolated / "no-index"))
    return isolated


@pytest.fixture
def notes_file(cli_env, base_model):
    _, tokenizer = base_model
    records = []
    for number, (name, condition, tokens) in enumerate(STAYS, 1):
        text = note_text(tokenizer, name, condition, tokens)
        records.append({
            "encounter_id": f"F-{number:02d}", "patient_id": f"PX-{number:02d}",
            "admitted": f"2025-05-{number:02d}T08:00:00Z",
            "discharged": f"2025-05-{number + 3:02d}T12:00:00Z",
            "notes": [{"time": f"2025-05-{number:02d}T09:00:00Z", "author": "Dr. Invented Reed",
                       "text": text}],
            "diagnoses": [condition.capitalize()],
        })
    path = cli_env / "stays.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_batch_of_eight_equals_solo_drafts(cli_env, notes_file, base_model):
    _, tokenizer = base_model
    batched, solo = cli_env / "batched", cli_env / "solo"

    together = run_bedside("draft-discharge", notes_file, "--out", batched, "--batch-size", "8", *MODEL_FLAGS)
    alone = run_bedside("draft-discharge", notes_file, "--out", solo, "--batch-size", "1", *MODEL_FLAGS)

    assert (together.status, alone.status) == (0, 0), together.stderr + alone.stderr
    assert "8 drafted" in together.stdout
    lengths = []
    for number, (name, _, _) in enumerate(STAYS, 1):
        encounter = f"F-{number:02d}"
        draft, single = read_draft(batched, encounter), read_draft(solo, encounter)
        assert draft["provenance"]["batch_rows"] == 8
        assert draft["sections"]["hospital_course"]["text"].strip(), encounter
        assert draft["sections"] == single["sections"], encounter
        assert draft["flags"] == single["flags"], encounter
        assert draft["sections"]["patient_and_stay"]["patient"]["id"] == f"PX-{number:02d}"
        lengths.append(draft["sections"]["hospital_course"]["notes"][0]["tokens"])

        # the draft may name its own patient but no other
        written = (batched / f"{encounter}.md").read_text(encoding="utf-8") + json.dumps(draft)
        for other, _, _ in STAYS:
            if other != name:
                assert other not in written, (encounter, other)
                assert other.split()[1] not in written, (encounter, other)
    # the notes span the case's range, from about 100 to at least 3,000 tokens
    assert min(lengths) < 150
    assert max(lengths) >= 3000
